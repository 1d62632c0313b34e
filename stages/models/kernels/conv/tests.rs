use super::super::fast_kernels_enabled;
use super::*;
use candle_core::{DType, Device, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::super::testing::{
    assert_same_bits_at_any_thread_count, bits, median_ms, random, rel_err, switch_on, values,
};
use super::super::{SWITCH, set_fast_kernels};

fn random_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    random(rng, &[n]).to_vec1::<f32>().unwrap()
}

/// [`rel_err`] of two raw buffers.
fn rel_err_vec(a: &[f32], b: &[f32]) -> f64 {
    let t = |v: &[f32]| Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap();
    rel_err(&t(a), &t(b))
}

/// Output, input gradient, weight gradient of `conv` against a random cotangent `r`.
fn run(
    conv: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    x: &Var,
    w: &Var,
    r: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    let y = conv(x.as_tensor(), w.as_tensor()).unwrap();
    let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let gx = grads.get(x.as_tensor()).unwrap().clone();
    let gw = grads.get(w.as_tensor()).unwrap().clone();
    (y, gx, gw)
}

/// candle's `conv2d`, differentiable for every shape. candle 0.11's conv2d
/// backward derives the transposed conv's `output_padding` from the height
/// only and fails with a shape mismatch when `(H+2p−Kh) % s != (W+2p−Kw) %
/// s`. For those shapes the padding is applied explicitly and the
/// rows/columns no window reads are cropped, so candle's conv runs with
/// padding 0 and no remainder.
fn candle_reference(x: &Tensor, w: &Tensor, s: usize, p: usize) -> Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    if (h + 2 * p - kh) % s == (wd + 2 * p - kw) % s {
        return x.conv2d(w, p, s, 1, 1);
    }
    let used_h = (h + 2 * p - kh) / s * s + kh;
    let used_w = (wd + 2 * p - kw) / s * s + kw;
    let xp = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
    xp.narrow(2, 0, used_h)?
        .narrow(3, 0, used_w)?
        .conv2d(w, 0, s, 1, 1)
}

/// Tolerance: 1e-5 relative throughout (sums of up to 16·49 = 784 terms
/// per output and a few thousand per weight-gradient entry stay well
/// inside it).
const TOL: f64 = 1e-5;

/// conv2d of `[n, ci, h, wd]` with `[co, ci, kh, kw]`: forward against
/// candle's conv2d, both gradients against [`candle_reference`].
#[allow(clippy::too_many_arguments)]
fn check(
    n: usize,
    (ci, co): (usize, usize),
    (h, wd): (usize, usize),
    (kh, kw): (usize, usize),
    s: usize,
    p: usize,
    seed: u64,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = Var::from_tensor(&random(&mut rng, &[n, ci, h, wd])).unwrap();
    let w = Var::from_tensor(&random(&mut rng, &[co, ci, kh, kw])).unwrap();
    let (ho, wo) = ((h + 2 * p - kh) / s + 1, (wd + 2 * p - kw) / s + 1);
    let r = random(&mut rng, &[n, co, ho, wo]);
    let case = format!("n{n} {ci}->{co} {h}x{wd} k{kh}x{kw} s{s} p{p}");
    let fast = run(|x, w| conv2d(x, w, s, p), &x, &w, &r);
    assert_eq!(fast.0.dims(), &[n, co, ho, wo], "{case}");
    let direct = x.conv2d(&w, p, s, 1, 1).unwrap();
    let e = rel_err(&fast.0, &direct);
    assert!(e <= TOL, "{case}: y vs conv2d rel err {e:e}");
    let reference = run(|x, w| candle_reference(x, w, s, p), &x, &w, &r);
    for (what, a, b) in [("dx", &fast.1, &reference.1), ("dw", &fast.2, &reference.2)] {
        let e = rel_err(a, b);
        assert!(e <= TOL, "{case}: {what} rel err {e:e}");
    }
}

/// conv_transpose2d of `[n, ci, h, wd]` with `[ci, co, kh, kw]`, forward and
/// both gradients against candle's conv_transpose2d.
#[allow(clippy::too_many_arguments)]
fn check_t(
    n: usize,
    (ci, co): (usize, usize),
    (h, wd): (usize, usize),
    (kh, kw): (usize, usize),
    s: usize,
    p: usize,
    op: usize,
    seed: u64,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = Var::from_tensor(&random(&mut rng, &[n, ci, h, wd])).unwrap();
    let w = Var::from_tensor(&random(&mut rng, &[ci, co, kh, kw])).unwrap();
    let (ho, wo) = (
        (h - 1) * s + kh + op - 2 * p,
        (wd - 1) * s + kw + op - 2 * p,
    );
    let r = random(&mut rng, &[n, co, ho, wo]);
    let case = format!("T n{n} {ci}->{co} {h}x{wd} k{kh}x{kw} s{s} p{p} op{op}");
    let fast = run(|x, w| conv_transpose2d(x, w, s, p, op), &x, &w, &r);
    assert_eq!(fast.0.dims(), &[n, co, ho, wo], "{case}");
    let reference = run(|x, w| x.conv_transpose2d(w, p, op, s, 1), &x, &w, &r);
    for (what, a, b) in [
        ("y", &fast.0, &reference.0),
        ("dx", &fast.1, &reference.1),
        ("dw", &fast.2, &reference.2),
    ] {
        let e = rel_err(a, b);
        assert!(e <= TOL, "{case}: {what} rel err {e:e}");
    }
}

#[test]
fn conv2d_matches_candle_on_random_shapes() {
    let _on = switch_on();
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    for case in 0..48 {
        let k: usize = [1, 3, 4, 7][rng.random_range(0..4)];
        let s = rng.random_range(1..=2);
        let p: usize = [0, 1, 3][rng.random_range(0..3)];
        let lo = k.saturating_sub(2 * p).max(1);
        let h = rng.random_range(lo..=lo + 13);
        let w = rng.random_range(lo..=lo + 13);
        let n = [1, 3][rng.random_range(0..2)];
        let ci = rng.random_range(1..=16);
        let co = rng.random_range(1..=16);
        check(n, (ci, co), (h, w), (k, k), s, p, 1000 + case);
    }
}

#[test]
fn conv2d_matches_candle_on_edge_shapes() {
    let _on = switch_on();
    let mut seed = 0;
    // The CycleGAN's and EfficientNet stem's layers, shrunk; shapes that
    // trip candle's own backward (8x7 at stride 2); pointwise (1x1, s1,
    // p0: no im2col); 1x1 planes that are all padding but one cell.
    for &(n, ci, co, h, w, k, s, p) in &[
        (1, 3, 8, 14, 14, 7, 1, 0),
        (2, 8, 16, 12, 12, 3, 2, 1),
        (1, 16, 16, 9, 9, 3, 1, 1),
        (3, 6, 5, 8, 7, 3, 2, 1),
        (3, 6, 5, 8, 7, 4, 2, 1),
        (2, 3, 8, 16, 16, 4, 2, 1),
        (3, 3, 4, 13, 11, 3, 2, 1),
        (2, 12, 7, 5, 6, 1, 1, 0),
        (1, 5, 9, 7, 7, 1, 2, 0),
        (1, 4, 3, 6, 5, 1, 1, 1),
        (2, 2, 3, 1, 1, 3, 1, 1),
        (2, 2, 3, 1, 1, 7, 2, 3),
    ] {
        seed += 1;
        check(n, (ci, co), (h, w), (k, k), s, p, seed);
    }
    // candle's own backward fails on the 8x7 stride-2 shape above: the
    // reason the reference pads and crops.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x = Var::from_tensor(&random(&mut rng, &[1, 2, 8, 7])).unwrap();
    let w = random(&mut rng, &[2, 2, 3, 3]);
    let y = x.as_tensor().conv2d(&w, 1, 2, 1, 1).unwrap();
    assert!(y.sum_all().unwrap().backward().is_err());
}

#[test]
fn conv2d_matches_candle_beyond_the_models() {
    let _on = switch_on();
    // Non-square kernels, stride 3, padding up to and beyond the kernel.
    let mut seed = 2000;
    for &(kh, kw) in &[(3, 5), (1, 7), (7, 1), (2, 4)] {
        for s in [1, 2, 3] {
            for p in [0, 1, 3, 5] {
                for &(h, w) in &[(9, 11), (14, 13)] {
                    seed += 1;
                    check(2, (3, 4), (h, w), (kh, kw), s, p, seed);
                }
            }
        }
    }
}

#[test]
fn conv_transpose2d_matches_candle() {
    let _on = switch_on();
    let mut seed = 3000;
    // The CycleGAN's upsampling (k3 s2 p1 op1), stride 1, DCGAN-style
    // k4 s2 p1, odd and non-square sizes, pointwise.
    for &(k, s, p, op) in &[
        (3, 2, 1, 1),
        (3, 1, 1, 0),
        (4, 2, 1, 0),
        (7, 1, 3, 0),
        (3, 2, 0, 1),
        (1, 1, 0, 0),
        (5, 3, 2, 2),
    ] {
        for &(n, ci, co, h, w) in &[(1, 16, 8, 7, 9), (3, 5, 11, 4, 4), (2, 1, 3, 6, 5)] {
            seed += 1;
            check_t(n, (ci, co), (h, w), (k, k), s, p, op, seed);
        }
    }
    check_t(2, (4, 6), (5, 7), (3, 5), 2, 1, 1, 3100);
    check_t(1, (3, 2), (1, 1), (3, 3), 2, 1, 1, 3101);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for case in 0..16 {
        let k: usize = [1, 3, 4, 7][rng.random_range(0..4)];
        let s = rng.random_range(1..=2);
        let p = rng.random_range(0..=(k - 1) / 2);
        let op = rng.random_range(0..s);
        let n = [1, 3][rng.random_range(0..2)];
        let (h, w) = (rng.random_range(1..=12), rng.random_range(1..=12));
        let (ci, co) = (rng.random_range(1..=16), rng.random_range(1..=16));
        check_t(n, (ci, co), (h, w), (k, k), s, p, op, 3200 + case);
    }
}

/// The reflection pad the fused conv replaces: candle's own ops, so the
/// reference does not share code with the kernel under test.
fn reflect_pad_reference(x: &Tensor, p: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mirror = |t: &Tensor, dim: usize, len: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..len + 2 * p)
            .map(|i| i as i64 - p as i64)
            .map(|i| {
                if i < 0 {
                    -i
                } else if i >= len as i64 {
                    2 * (len as i64 - 1) - i
                } else {
                    i
                }
            })
            .map(|i| i as u32)
            .collect();
        t.index_select(&Tensor::new(idx.as_slice(), t.device())?, dim)
    };
    mirror(&mirror(x, 2, h)?, 3, w)
}

/// `conv2d_reflect` of `[n, ci, h, wd]` with `[co, ci, k, k]`: the forward
/// bit for bit equal to the fast conv of the explicitly padded input (the
/// same im2col matrix), both gradients within [`TOL`] of candle's pad +
/// conv2d (the padding's gradient is added in another order).
#[allow(clippy::too_many_arguments)]
fn check_reflect(
    n: usize,
    (ci, co): (usize, usize),
    (h, wd): (usize, usize),
    k: usize,
    s: usize,
    p: usize,
    seed: u64,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = Var::from_tensor(&random(&mut rng, &[n, ci, h, wd])).unwrap();
    let w = Var::from_tensor(&random(&mut rng, &[co, ci, k, k])).unwrap();
    let (ho, wo) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
    let r = random(&mut rng, &[n, co, ho, wo]);
    let case = format!("reflect n{n} {ci}->{co} {h}x{wd} k{k} s{s} p{p}");
    let fused = run(|x, w| conv2d_reflect(x, w, s, p), &x, &w, &r);
    assert_eq!(fused.0.dims(), &[n, co, ho, wo], "{case}");
    let padded = conv2d(
        &reflect_pad_reference(x.as_tensor(), p).unwrap(),
        w.as_tensor(),
        s,
        0,
    )
    .unwrap();
    assert_eq!(
        bits(&fused.0),
        bits(&padded),
        "{case}: forward not bitwise equal"
    );
    let reference = run(
        |x, w| candle_reference(&reflect_pad_reference(x, p)?, w, s, 0),
        &x,
        &w,
        &r,
    );
    for (what, a, b) in [
        ("y", &fused.0, &reference.0),
        ("dx", &fused.1, &reference.1),
        ("dw", &fused.2, &reference.2),
    ] {
        let e = rel_err(a, b);
        assert!(e <= TOL, "{case}: {what} rel err {e:e}");
    }
}

#[test]
fn conv2d_reflect_matches_pad_then_conv() {
    let _on = switch_on();
    // The generator's layers, shrunk (7x7 stem and head at p3, residual 3x3
    // at p1); strides 2 and 3; padding up to the largest the input allows
    // (h − 1), where the mirrored cells reach the far edge; 1-wide planes
    // need padding 0; non-square, odd sizes; batch 3.
    let mut seed = 4000;
    for &(n, ci, co, h, w, k, s, p) in &[
        (1, 3, 8, 14, 14, 7, 1, 3),
        (1, 16, 16, 9, 9, 3, 1, 1),
        (3, 6, 5, 8, 7, 3, 2, 1),
        (2, 4, 3, 11, 6, 5, 2, 2),
        (1, 5, 4, 4, 5, 7, 1, 3),
        (2, 3, 2, 4, 4, 3, 1, 3),
        (1, 2, 3, 9, 13, 4, 3, 2),
        (2, 3, 4, 1, 5, 1, 1, 0),
    ] {
        seed += 1;
        check_reflect(n, (ci, co), (h, w), k, s, p, seed);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(43);
    for case in 0..24 {
        let k: usize = [1, 3, 4, 7][rng.random_range(0..4)];
        let s = rng.random_range(1..=2);
        let p: usize = [0, 1, 3][rng.random_range(0..3)];
        let lo = (p + 1).max(k.saturating_sub(2 * p)).max(1);
        let (h, w) = (rng.random_range(lo..=lo + 9), rng.random_range(lo..=lo + 9));
        let (ci, co) = (rng.random_range(1..=12), rng.random_range(1..=12));
        check_reflect(
            [1, 3][rng.random_range(0..2)],
            (ci, co),
            (h, w),
            k,
            s,
            p,
            4100 + case,
        );
    }
    // Reflection needs padding < H and < W.
    let x = random(&mut rng, &[1, 2, 3, 5]);
    let w = random(&mut rng, &[2, 2, 3, 3]);
    let e = conv2d_reflect(&x, &w, 1, 3).unwrap_err().to_string();
    assert!(
        e.contains("reflection padding 3 must be smaller than the 3x5 input"),
        "{e}"
    );
    assert!(conv2d_reflect(&x, &w, 1, 2).is_ok());
}

/// Every way of cutting the work (units, tile budget down to one row,
/// channel groups, threads and gemm's inner parallelism) gives the same
/// result to rounding.
#[test]
fn all_work_splits_agree() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for &(n, c, h, w, o, k, s, p) in &[
        (1, 5, 13, 11, 7, 3, 2, 1),
        (3, 16, 9, 10, 4, 3, 1, 1),
        (2, 20, 6, 7, 9, 1, 1, 0),
        (1, 3, 20, 20, 8, 7, 1, 3),
        (5, 9, 5, 4, 3, 4, 2, 1),
    ] {
        for reflect in [false, true] {
            let g = Geom::new((n, c, h, w), o, (k, k), s, p)
                .unwrap()
                .padded_by(reflect)
                .unwrap();
            let img = random_vec(&mut rng, g.n * g.img_len());
            let wt = random_vec(&mut rng, g.o * g.k());
            let gy = random_vec(&mut rng, g.n * g.o * g.pixels());
            let one = Plan {
                threads: 1,
                units: 1,
                budget: usize::MAX / 2,
            };
            let y = conv_forward(&g, &img, &wt, one);
            let dx = conv_grad_input(&g, &gy, &wt, one);
            let dw = conv_grad_weight(&g, &img, &gy, one);
            for (threads, units) in [(1, 1), (2, 4), (1, 8), (3, 8), (5, 3), (16, 32)] {
                for budget in [1, 300, COL_BUDGET] {
                    let plan = Plan {
                        threads,
                        units,
                        budget,
                    };
                    let case = format!("{g:?} {plan:?}");
                    let e = rel_err_vec(&conv_forward(&g, &img, &wt, plan), &y);
                    assert!(e <= TOL, "{case}: y {e:e}");
                    let e = rel_err_vec(&conv_grad_input(&g, &gy, &wt, plan), &dx);
                    assert!(e <= TOL, "{case}: dx {e:e}");
                    let e = rel_err_vec(&conv_grad_weight(&g, &img, &gy, plan), &dw);
                    assert!(e <= TOL, "{case}: dw {e:e}");
                }
            }
        }
    }
}

/// Forward and both gradients, of the convolution and of the transposed
/// convolution, are bit-identical at 1, 2 and 7 threads. The shapes are
/// ones a per-thread split cut differently (the first failed before the
/// split was fixed: one weight-gradient partial sum per worker, and
/// channel groups per thread, which set the input gradient's row tiles
/// and so the order each input cell's terms are added in): batch 1 with
/// many row tiles, a batch of 3, `K = 576` (gemm blocks a sum that deep
/// by 512 + 64 or 288 + 288 depending on the product's shape), pointwise,
/// the CycleGAN's stem and its upsampling.
#[test]
fn same_bits_at_any_thread_count() {
    let _on = switch_on();
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for &(n, c, h, w, o, k, s, p) in &[
        (1, 16, 48, 48, 16, 3, 1, 1),
        (3, 8, 21, 19, 12, 3, 2, 1),
        (1, 64, 24, 24, 32, 3, 1, 1),
        (2, 24, 30, 30, 20, 1, 1, 0),
        (1, 3, 70, 70, 8, 7, 1, 0),
    ] {
        let x = Var::from_tensor(&random(&mut rng, &[n, c, h, w])).unwrap();
        let wt = Var::from_tensor(&random(&mut rng, &[o, c, k, k])).unwrap();
        let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let r = random(&mut rng, &[n, o, ho, wo]);
        let case = format!("n{n} {c}->{o} {h}x{w} k{k} s{s} p{p}");
        assert_same_bits_at_any_thread_count(&case, || {
            let (y, dx, dw) = run(|x, w| conv2d(x, w, s, p), &x, &wt, &r);
            vec![("y", y), ("dx", dx), ("dw", dw)]
        });
    }
    // Reflection-padded: the generator's stem and a residual conv.
    for &(n, c, h, w, o, k, p) in &[(1, 3, 40, 40, 8, 7, 3), (2, 32, 17, 19, 16, 3, 1)] {
        let x = Var::from_tensor(&random(&mut rng, &[n, c, h, w])).unwrap();
        let wt = Var::from_tensor(&random(&mut rng, &[o, c, k, k])).unwrap();
        let r = random(&mut rng, &[n, o, h + 2 * p - k + 1, w + 2 * p - k + 1]);
        let case = format!("reflect n{n} {c}->{o} {h}x{w} k{k} p{p}");
        assert_same_bits_at_any_thread_count(&case, || {
            let (y, dx, dw) = run(|x, w| conv2d_reflect(x, w, 1, p), &x, &wt, &r);
            vec![("y", y), ("dx", dx), ("dw", dw)]
        });
    }
    // Transposed, stride 2 (the CycleGAN's upsampling), batch 1 and 2.
    for &(n, ci, co, h, w) in &[(1, 32, 16, 24, 24), (2, 16, 8, 17, 15)] {
        let x = Var::from_tensor(&random(&mut rng, &[n, ci, h, w])).unwrap();
        let wt = Var::from_tensor(&random(&mut rng, &[ci, co, 3, 3])).unwrap();
        let r = random(&mut rng, &[n, co, 2 * h, 2 * w]);
        let case = format!("T n{n} {ci}->{co} {h}x{w}");
        assert_same_bits_at_any_thread_count(&case, || {
            let (y, dx, dw) = run(|x, w| conv_transpose2d(x, w, 2, 1, 1), &x, &wt, &r);
            vec![("y", y), ("dx", dx), ("dw", dw)]
        });
    }
}

#[test]
fn non_contiguous_inputs_and_untracked_input() {
    let _on = switch_on();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (n, ci, co, h, wd, k, s, p) = (2, 3, 4, 11, 8, 3, 2, 1);
    // x and w are transposed views of the variables.
    let xb = Var::from_tensor(&random(&mut rng, &[n, ci, wd, h])).unwrap();
    let wb = Var::from_tensor(&random(&mut rng, &[co, ci, k, k])).unwrap();
    let (ho, wo) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
    let r = random(&mut rng, &[n, co, ho, wo]);
    let grads = |conv: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| {
        let x = xb.as_tensor().transpose(2, 3).unwrap();
        let w = wb.as_tensor().transpose(2, 3).unwrap();
        assert!(!x.is_contiguous() && !w.is_contiguous());
        let y = conv(&x, &w).unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(&xb).unwrap().clone(), g.get(&wb).unwrap().clone())
    };
    let fast = grads(&|x, w| conv2d(x, w, s, p));
    let reference = grads(&|x, w| candle_reference(x, w, s, p));
    assert!(rel_err(&fast.0, &reference.0) <= TOL);
    assert!(rel_err(&fast.1, &reference.1) <= TOL);
    assert!(rel_err(&fast.2, &reference.2) <= TOL);

    // The custom ops also gather strided storage themselves, including
    // a broadcast (stride-0) output gradient.
    let x = xb.as_tensor().detach().transpose(2, 3).unwrap();
    let w = wb.as_tensor().detach().transpose(2, 3).unwrap();
    let y = x
        .apply_op2_no_bwd(
            &w,
            &ConvFwd {
                stride: s,
                padding: p,
                reflect: false,
            },
        )
        .unwrap();
    assert!(rel_err(&y, &reference.0) <= TOL);
    let ones = Tensor::ones(1, DType::F32, &Device::Cpu)
        .unwrap()
        .broadcast_as((n, co, ho, wo))
        .unwrap();
    let op = ConvGradWeight {
        stride: s,
        padding: p,
        reflect: false,
        kh: k,
        kw: k,
    };
    let dw = x.apply_op2_no_bwd(&ones, &op).unwrap();
    let dw_ref = x
        .apply_op2_no_bwd(&ones.contiguous().unwrap(), &op)
        .unwrap();
    assert_eq!(values(&dw), values(&dw_ref));

    // An input outside the graph gets no gradient; the weight still does.
    let x = x.contiguous().unwrap();
    let y = conv2d(&x, wb.as_tensor(), s, p).unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_none());
    let yr = candle_reference(&x, wb.as_tensor(), s, p).unwrap();
    let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(rel_err(g.get(&wb).unwrap(), gr.get(&wb).unwrap()) <= TOL);

    // Same for the transposed convolution, with a fixed weight instead.
    let xt = Var::from_tensor(&random(&mut rng, &[n, co, 5, 6])).unwrap();
    let wt = random(&mut rng, &[co, ci, 3, 3]);
    let y = conv_transpose2d(xt.as_tensor(), &wt, 2, 1, 1).unwrap();
    let r = random(&mut rng, y.dims());
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&wt).is_none());
    let yr = xt.as_tensor().conv_transpose2d(&wt, 1, 1, 2, 1).unwrap();
    let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(rel_err(g.get(&xt).unwrap(), gr.get(&xt).unwrap()) <= TOL);
}

#[test]
fn other_dtypes_fall_back_to_candle() {
    let _on = switch_on();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let f64s = |t: Tensor| t.to_dtype(DType::F64).unwrap();
    let x = f64s(random(&mut rng, &[2, 3, 9, 9]));
    let w = f64s(random(&mut rng, &[4, 3, 3, 3]));
    let y = conv2d(&x, &w, 2, 1).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    let reference = x.conv2d(&w, 1, 2, 1, 1).unwrap();
    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(bits(&y), bits(&reference));
    let wt = f64s(random(&mut rng, &[3, 5, 3, 3]));
    let y = conv_transpose2d(&x, &wt, 2, 1, 1).unwrap();
    assert_eq!(
        bits(&y),
        bits(&x.conv_transpose2d(&wt, 1, 1, 2, 1).unwrap())
    );
}

#[test]
fn bad_shapes_are_errors() {
    let _on = switch_on();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x = random(&mut rng, &[1, 2, 2, 2]);
    let w = random(&mut rng, &[3, 2, 3, 3]);
    assert!(conv2d(&x, &w, 1, 0).is_err(), "kernel larger than input");
    assert!(conv2d(&x, &w, 0, 1).is_err(), "stride 0");
    let w3 = random(&mut rng, &[3, 3, 3, 3]);
    assert!(conv2d(&x, &w3, 1, 1).is_err(), "channel mismatch");
    let wt = random(&mut rng, &[3, 2, 3, 3]);
    assert!(
        conv_transpose2d(&x, &wt, 2, 1, 1).is_err(),
        "channel mismatch"
    );
    let wt = random(&mut rng, &[2, 2, 3, 3]);
    assert!(
        conv_transpose2d(&x, &wt, 2, 1, 2).is_err(),
        "output_padding >= stride"
    );
    assert!(
        conv_transpose2d(&x, &wt, 1, 3, 0).is_err(),
        "padding eats the output"
    );
    assert!(conv_transpose2d(&x, &wt, 2, 1, 1).is_ok());
}

#[test]
fn switch_selects_candle_path() {
    let _exclusive = SWITCH.write().unwrap_or_else(|e| e.into_inner());
    /// Turns the kernels back on even if an assertion fails.
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            set_fast_kernels(true);
        }
    }
    let _restore = Restore;

    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (s, p) = (2, 1);
    let x = Var::from_tensor(&random(&mut rng, &[3, 4, 13, 11])).unwrap();
    let w = Var::from_tensor(&random(&mut rng, &[6, 4, 3, 3])).unwrap();
    let r = random(&mut rng, &[3, 6, 7, 6]);
    let wt = Var::from_tensor(&random(&mut rng, &[4, 5, 3, 3])).unwrap();
    let rt = random(&mut rng, &[3, 5, 26, 22]);
    let reference = run(|x, w| x.conv2d(w, p, s, 1, 1), &x, &w, &r);
    let reference_t = run(|x, w| x.conv_transpose2d(w, p, 1, s, 1), &x, &wt, &rt);

    assert!(fast_kernels_enabled(), "default is on");
    set_fast_kernels(false);
    assert!(!fast_kernels_enabled());
    let off = run(|x, w| conv2d(x, w, s, p), &x, &w, &r);
    let off_t = run(|x, w| conv_transpose2d(x, w, s, p, 1), &x, &wt, &rt);
    // Same ops in the same order: bit-identical to candle.
    for (a, b) in [
        (&off.0, &reference.0),
        (&off.1, &reference.1),
        (&off.2, &reference.2),
        (&off_t.0, &reference_t.0),
        (&off_t.1, &reference_t.1),
        (&off_t.2, &reference_t.2),
    ] {
        assert_eq!(values(a), values(b));
    }

    set_fast_kernels(true);
    assert!(fast_kernels_enabled());
    let on = run(|x, w| conv2d(x, w, s, p), &x, &w, &r);
    let on_t = run(|x, w| conv_transpose2d(x, w, s, p, 1), &x, &wt, &rt);
    for (a, b) in [
        (&on.0, &reference.0),
        (&on.1, &reference.1),
        (&on.2, &reference.2),
        (&on_t.0, &reference_t.0),
        (&on_t.1, &reference_t.1),
        (&on_t.2, &reference_t.2),
    ] {
        assert!(rel_err(a, b) <= TOL);
    }
}

/// `RAYON_NUM_THREADS=2 cargo test --release -- --ignored --nocapture bench_conv`
/// (`CANDLE_RUNS=0` skips the slow candle reference). Run it with
/// `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=2147483647`,
/// the allocator setting the pipeline makes (`tune_allocator`): otherwise
/// every fresh multi-MB tensor is page-faulted in and "bwd" (through
/// candle's `backward()`) runs several ms above "bwd-k" (the gradient ops alone).
#[test]
#[ignore = "benchmark; run explicitly"]
fn bench_conv() {
    let _on = switch_on();
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (runs_fast, runs_candle) = (env("FAST_RUNS", 7), env("CANDLE_RUNS", 3));
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "{:<44} {:>9} {:>9} {:>11} {:>10} {:>10}",
        "case", "fast fwd", "fast bwd", "fast bwd-k", "candle fwd", "candle bwd"
    );
    // (name, x dims, w dims, stride, padding, transposed output_padding, input grad)
    type Case = (
        &'static str,
        [usize; 4],
        [usize; 4],
        usize,
        usize,
        Option<usize>,
        bool,
    );
    let cases: [Case; 5] = [
        (
            "(a) [1,64,128,128] 64x3x3 s1 p1",
            [1, 64, 128, 128],
            [64, 64, 3, 3],
            1,
            1,
            None,
            true,
        ),
        (
            "(b) [1,3,134,134] 64x7x7 s1 p0",
            [1, 3, 134, 134],
            [64, 3, 7, 7],
            1,
            0,
            None,
            true,
        ),
        (
            "(c) [1,64,128,128] 128x3x3 s2 p1",
            [1, 64, 128, 128],
            [128, 64, 3, 3],
            2,
            1,
            None,
            true,
        ),
        (
            "(d) T [1,128,64,64] ->64 3x3 s2 p1 op1",
            [1, 128, 64, 64],
            [128, 64, 3, 3],
            2,
            1,
            Some(1),
            true,
        ),
        (
            "(e) [8,3,64,64] 32x3x3 s2 p1 (no dx)",
            [8, 3, 64, 64],
            [32, 3, 3, 3],
            2,
            1,
            None,
            false,
        ),
    ];
    for (name, xd, wd, s, p, op, input_grad) in cases {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let x = random(&mut rng, &xd);
        let x = if input_grad {
            Var::from_tensor(&x).unwrap().as_tensor().clone()
        } else {
            x
        };
        let w = Var::from_tensor(&random(&mut rng, &wd)).unwrap();
        let wt = w.as_tensor();
        let fast = |x: &Tensor| match op {
            Some(op) => conv_transpose2d(x, wt, s, p, op).unwrap(),
            None => conv2d(x, wt, s, p).unwrap(),
        };
        let candle = |x: &Tensor| match op {
            Some(op) => x.conv_transpose2d(wt, p, op, s, 1).unwrap(),
            None => x.conv2d(wt, p, s, 1, 1).unwrap(),
        };
        let fast_fwd = median_ms(runs_fast, || {
            fast(&x);
        });
        let y = fast(&x);
        // Through candle's backward(): includes seeding dy = ones and
        // adding into zero-initialised gradient slots.
        let fast_bwd = median_ms(runs_fast, || {
            y.backward().unwrap();
        });
        // The gradient ops alone, without candle's seeding and summing.
        let gy = y.ones_like().unwrap();
        let fast_bwd_k = median_ms(runs_fast, || {
            let (_, _, h, w) = y.dims4().unwrap();
            match op {
                Some(_) => ConvData {
                    stride: s,
                    padding: p,
                    reflect: false,
                    h,
                    w,
                }
                .bwd(&x, wt, &y, &gy),
                None => ConvFwd {
                    stride: s,
                    padding: p,
                    reflect: false,
                }
                .bwd(&x, wt, &y, &gy),
            }
            .unwrap();
        });
        let (mut candle_fwd, mut candle_bwd) = (f64::NAN, f64::NAN);
        if runs_candle > 0 {
            candle_fwd = median_ms(runs_candle, || {
                candle(&x);
            });
            let y = candle(&x);
            candle_bwd = median_ms(runs_candle, || {
                y.backward().unwrap();
            });
        }
        println!(
            "{name:<44} {fast_fwd:>9.1} {fast_bwd:>9.1} {fast_bwd_k:>11.1} {candle_fwd:>10.1} {candle_bwd:>10.1}"
        );
    }
}
