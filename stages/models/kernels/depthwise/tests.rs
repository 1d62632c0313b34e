use super::*;
use candle_core::{DType, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::super::SWITCH;
use super::super::testing::{
    assert_same_bits_at_any_thread_count, median_ms, random, rel_err, switch_on,
};

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

/// candle's grouped `conv2d`, differentiable for every shape. candle 0.11's
/// conv2d backward derives the transposed conv's `output_padding` from the
/// height only and fails with a shape mismatch when
/// `(H+2p-K) % s != (W+2p-K) % s` (e.g. 8x7, stride 2). For those shapes
/// the padding is applied explicitly and the rows/columns no window reads
/// are cropped, so candle's conv runs with padding 0 and no remainder.
fn candle_reference(x: &Tensor, w: &Tensor, s: usize, p: usize) -> Result<Tensor> {
    let (_, c, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    if (h + 2 * p - kh) % s == (wd + 2 * p - kw) % s {
        return x.conv2d(w, p, s, 1, c);
    }
    let used_h = (h + 2 * p - kh) / s * s + kh;
    let used_w = (wd + 2 * p - kw) / s * s + kw;
    let xp = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
    xp.narrow(2, 0, used_h)?
        .narrow(3, 0, used_w)?
        .conv2d(w, 0, s, 1, c)
}

#[allow(clippy::too_many_arguments)]
fn check(n: usize, c: usize, h: usize, wd: usize, k: usize, s: usize, p: usize, seed: u64) {
    check_rect(n, c, h, wd, (k, k), s, p, seed)
}

#[allow(clippy::too_many_arguments)]
fn check_rect(
    n: usize,
    c: usize,
    h: usize,
    wd: usize,
    (kh, kw): (usize, usize),
    s: usize,
    p: usize,
    seed: u64,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = Var::from_tensor(&random(&mut rng, &[n, c, h, wd])).unwrap();
    let w = Var::from_tensor(&random(&mut rng, &[c, 1, kh, kw])).unwrap();
    let (ho, wo) = ((h + 2 * p - kh) / s + 1, (wd + 2 * p - kw) / s + 1);
    let r = random(&mut rng, &[n, c, ho, wo]);
    let fast = run(|x, w| depthwise_conv2d(x, w, s, p), &x, &w, &r);
    let reference = run(|x, w| candle_reference(x, w, s, p), &x, &w, &r);
    let case = format!("n{n} c{c} {h}x{wd} k{kh}x{kw} s{s} p{p}");
    let direct = x.conv2d(&w, p, s, 1, c).unwrap();
    assert!(rel_err(&fast.0, &direct) <= 1e-5, "{case}: y vs conv2d");
    assert_eq!(fast.0.dims(), &[n, c, ho, wo], "{case}");
    for (what, a, b) in [
        ("y", &fast.0, &reference.0),
        ("dx", &fast.1, &reference.1),
        ("dw", &fast.2, &reference.2),
    ] {
        let e = rel_err(a, b);
        assert!(e <= 1e-5, "{case}: {what} rel err {e:e}");
    }
}

/// Forward and both gradients are bit-identical at 1, 2 and 7 threads
/// (EfficientNet's 3x3 and 5x5 layers, strides 1 and 2, batches 1 to 8:
/// the weight gradient's batch sum stays inside one channel's task).
#[test]
fn same_bits_at_any_thread_count() {
    let _on = switch_on();
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    for &(n, c, h, w, k, s) in &[
        (8, 16, 32, 32, 3, 1),
        (3, 24, 17, 15, 5, 2),
        (1, 40, 20, 20, 5, 1),
        (5, 9, 12, 13, 3, 2),
    ] {
        let p = k / 2;
        let x = Var::from_tensor(&random(&mut rng, &[n, c, h, w])).unwrap();
        let wt = Var::from_tensor(&random(&mut rng, &[c, 1, k, k])).unwrap();
        let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let r = random(&mut rng, &[n, c, ho, wo]);
        let case = format!("n{n} c{c} {h}x{w} k{k} s{s}");
        assert_same_bits_at_any_thread_count(&case, || {
            let (y, dx, dw) = run(|x, w| depthwise_conv2d(x, w, s, p), &x, &wt, &r);
            vec![("y", y), ("dx", dx), ("dw", dw)]
        });
    }
}

#[test]
fn matches_candle_on_edge_shapes() {
    let _on = switch_on();
    let mut seed = 0;
    // Odd sizes, single channel, batch 1 and 3, both kernels, both strides,
    // padding 0 and K/2, and 1x1 planes that are all padding but the centre.
    for &(n, c, h, w) in &[
        (1, 1, 7, 9),
        (3, 4, 13, 13),
        (1, 3, 9, 7),
        (3, 1, 5, 6),
        (2, 5, 8, 8),
    ] {
        for k in [3, 5] {
            for s in [1, 2] {
                for p in [0, k / 2] {
                    if h + 2 * p < k || w + 2 * p < k {
                        continue;
                    }
                    seed += 1;
                    check(n, c, h, w, k, s, p, seed);
                }
            }
        }
    }
    for (k, s) in [(3, 1), (3, 2), (5, 1), (5, 2)] {
        seed += 1;
        check(1, 1, 1, 1, k, s, k / 2, seed);
        check(3, 2, 2, 3, k, s, k / 2, seed);
    }
}

#[test]
fn matches_candle_on_random_shapes() {
    let _on = switch_on();
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    for case in 0..40 {
        let k: usize = if rng.random_bool(0.5) { 3 } else { 5 };
        let s = rng.random_range(1..=2);
        let p = if rng.random_bool(0.5) {
            k / 2
        } else {
            rng.random_range(0..=k)
        };
        let h = rng.random_range(k.saturating_sub(2 * p).max(1)..=20);
        let w = rng.random_range(k.saturating_sub(2 * p).max(1)..=20);
        let n = rng.random_range(1..=3);
        let c = rng.random_range(1..=6);
        check(n, c, h, w, k, s, p, 1000 + case);
    }
    // Longer rows: every strip width of the blocked kernels (32/16/8 with
    // an overlapping last strip; 16/8/4/1 for the weight gradient).
    check(2, 8, 56, 56, 3, 2, 1, 7);
    check(1, 4, 28, 28, 5, 1, 2, 8);
    check(2, 3, 40, 37, 3, 1, 1, 9);
    check(1, 2, 75, 71, 5, 2, 2, 10);
}

#[test]
fn matches_candle_beyond_efficientnet() {
    let _on = switch_on();
    // Stride 3 (generic phase split), padding >= K (input gradient by
    // scatter), non-square kernels, kernel 1 and 7.
    let mut seed = 2000;
    for &(kh, kw) in &[(1, 1), (3, 5), (5, 3), (7, 7), (2, 4)] {
        for s in [1, 2, 3] {
            for p in [0, 1, kh.max(kw) / 2, kh.max(kw)] {
                for &(h, w) in &[(9, 11), (14, 13)] {
                    seed += 1;
                    check_rect(2, 3, h, w, (kh, kw), s, p, seed);
                }
            }
        }
    }
}

#[test]
fn non_contiguous_inputs_and_untracked_input() {
    let _on = switch_on();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (n, c, h, wd, k, s, p) = (2, 3, 11, 8, 3, 2, 1);
    // x and w are transposed views of the variables.
    let xb = Var::from_tensor(&random(&mut rng, &[n, c, wd, h])).unwrap();
    let wb = Var::from_tensor(&random(&mut rng, &[c, 1, k, k])).unwrap();
    let r = random(
        &mut rng,
        &[n, c, (h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1],
    );
    let grads = |conv: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| {
        let x = xb.as_tensor().transpose(2, 3).unwrap();
        let w = wb.as_tensor().transpose(2, 3).unwrap();
        assert!(!x.is_contiguous() && !w.is_contiguous());
        let y = conv(&x, &w).unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(&xb).unwrap().clone(), g.get(&wb).unwrap().clone())
    };
    let fast = grads(&|x, w| depthwise_conv2d(x, w, s, p));
    let reference = grads(&|x, w| candle_reference(x, w, s, p));
    assert!(rel_err(&fast.0, &reference.0) <= 1e-5);
    assert!(rel_err(&fast.1, &reference.1) <= 1e-5);
    assert!(rel_err(&fast.2, &reference.2) <= 1e-5);

    // The custom op also gathers strided storage itself.
    let x = xb.as_tensor().detach().transpose(2, 3).unwrap();
    let op = DepthwiseConv {
        stride: s,
        padding: p,
    };
    let w = wb.as_tensor().detach().transpose(2, 3).unwrap();
    let y = x.apply_op2_no_bwd(&w, &op).unwrap();
    assert!(rel_err(&y, &reference.0) <= 1e-5);

    // An input outside the graph gets no gradient; the weight still does.
    let x = xb
        .as_tensor()
        .detach()
        .transpose(2, 3)
        .unwrap()
        .contiguous()
        .unwrap();
    let y = depthwise_conv2d(&x, wb.as_tensor(), s, p).unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_none());
    let yr = candle_reference(&x, wb.as_tensor(), s, p).unwrap();
    let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(rel_err(g.get(&wb).unwrap(), gr.get(&wb).unwrap()) <= 1e-5);
}

#[test]
fn other_dtypes_fall_back_to_candle() {
    let _on = switch_on();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = random(&mut rng, &[2, 3, 9, 9])
        .to_dtype(DType::F64)
        .unwrap();
    let w = random(&mut rng, &[3, 1, 3, 3])
        .to_dtype(DType::F64)
        .unwrap();
    let y = depthwise_conv2d(&x, &w, 2, 1).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    let reference = x.conv2d(&w, 1, 2, 1, 3).unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        reference.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    );
}

#[test]
fn bad_shapes_are_errors() {
    let _on = switch_on();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x = random(&mut rng, &[1, 2, 2, 2]);
    let w = random(&mut rng, &[2, 1, 3, 3]);
    assert!(
        depthwise_conv2d(&x, &w, 1, 0).is_err(),
        "kernel larger than input"
    );
    assert!(depthwise_conv2d(&x, &w, 0, 1).is_err(), "stride 0");
    let w3 = random(&mut rng, &[3, 1, 3, 3]);
    assert!(depthwise_conv2d(&x, &w3, 1, 1).is_err(), "channel mismatch");
    let w2 = random(&mut rng, &[2, 2, 3, 3]);
    assert!(depthwise_conv2d(&x, &w2, 1, 1).is_err(), "not depthwise");
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
    let (c, k, s, p) = (4, 5, 2, 2);
    let x = Var::from_tensor(&random(&mut rng, &[3, c, 13, 11])).unwrap();
    let w = Var::from_tensor(&random(&mut rng, &[c, 1, k, k])).unwrap();
    let r = random(&mut rng, &[3, c, 7, 6]);
    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let reference = run(|x, w| x.conv2d(w, p, s, 1, c), &x, &w, &r);

    assert!(fast_kernels_enabled(), "default is on");
    set_fast_kernels(false);
    assert!(!fast_kernels_enabled());
    let off = run(|x, w| depthwise_conv2d(x, w, s, p), &x, &w, &r);
    // Same ops in the same order: bit-identical to candle.
    assert_eq!(bits(&off.0), bits(&reference.0));
    assert_eq!(bits(&off.1), bits(&reference.1));
    assert_eq!(bits(&off.2), bits(&reference.2));

    set_fast_kernels(true);
    assert!(fast_kernels_enabled());
    let on = run(|x, w| depthwise_conv2d(x, w, s, p), &x, &w, &r);
    assert!(rel_err(&on.0, &reference.0) <= 1e-5);
    assert!(rel_err(&on.1, &reference.1) <= 1e-5);
    assert!(rel_err(&on.2, &reference.2) <= 1e-5);
}

/// `RAYON_NUM_THREADS=2 cargo test --release -- --ignored --nocapture bench_depthwise`
#[test]
#[ignore = "benchmark; run explicitly"]
fn bench_depthwise() {
    let _on = switch_on();
    let runs_fast = 11;
    let runs_candle: usize = std::env::var("CANDLE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "{:<28} {:>9} {:>9} {:>11} {:>10} {:>10}",
        "case", "fast fwd", "fast bwd", "fast bwd-k", "candle fwd", "candle bwd"
    );
    for (n, c, hw, k, s) in [(8, 96, 112, 3, 2), (8, 144, 56, 5, 1), (8, 480, 14, 3, 1)] {
        let p = k / 2;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let x = Var::from_tensor(&random(&mut rng, &[n, c, hw, hw])).unwrap();
        let w = Var::from_tensor(&random(&mut rng, &[c, 1, k, k])).unwrap();
        let (xt, wt) = (x.as_tensor(), w.as_tensor());

        let fast_fwd = median_ms(runs_fast, || {
            depthwise_conv2d(xt, wt, s, p).unwrap();
        });
        let y = depthwise_conv2d(xt, wt, s, p).unwrap();
        // Through candle's backward(): includes seeding dy = ones and
        // accumulating into zero-initialised gradient slots.
        let fast_bwd = median_ms(runs_fast, || {
            y.backward().unwrap();
        });
        // The two gradient kernels alone.
        let gy = y.ones_like().unwrap();
        let op = DepthwiseConv {
            stride: s,
            padding: p,
        };
        let fast_bwd_k = median_ms(runs_fast, || {
            op.bwd(xt, wt, &y, &gy).unwrap();
        });

        // CANDLE_RUNS=0 skips the (slow) reference: reports NaN.
        let (mut candle_fwd, mut candle_bwd) = (f64::NAN, f64::NAN);
        if runs_candle > 0 {
            candle_fwd = median_ms(runs_candle, || {
                xt.conv2d(wt, p, s, 1, c).unwrap();
            });
            let y = xt.conv2d(wt, p, s, 1, c).unwrap();
            candle_bwd = median_ms(runs_candle, || {
                y.backward().unwrap();
            });
        }
        println!(
            "{:<28} {:>9.1} {:>9.1} {:>11.1} {:>10.1} {:>10.1}",
            format!("[{n},{c},{hw},{hw}] k{k} s{s} p{p}"),
            fast_fwd,
            fast_bwd,
            fast_bwd_k,
            candle_fwd,
            candle_bwd
        );
    }
}
