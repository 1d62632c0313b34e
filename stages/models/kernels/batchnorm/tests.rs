use super::super::{fast_kernels_enabled, set_fast_kernels};
use super::*;
use candle_core::{Device, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::super::SWITCH;
use super::super::testing::{
    assert_same_bits_at_any_thread_count, median_ms, rel_err, switch_on, uniform, values,
};

const ACTS: [Act; 4] = [Act::Identity, Act::Silu, Act::Relu6, Act::LeakyRelu(0.2)];
const EPS: f64 = 1e-5;
const TOL: f64 = 1e-5;

/// candle_nn 0.11's `BatchNorm::forward_train` (channels first, flattened),
/// then the activation as candle ops. Returns y, mean, unbiased var.
fn reference_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    act: Act,
) -> Result<(Tensor, Tensor, Tensor)> {
    let xt = x.transpose(0, 1)?;
    let tdims = xt.dims().to_vec();
    let xf = xt.flatten_from(1)?.contiguous()?;
    let mean = xf.mean_keepdim(1)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(1)?;
    let xhat = xc.broadcast_div(&(&var + EPS)?.sqrt()?)?;
    let z = xhat
        .broadcast_mul(&gamma.reshape(((), 1))?)?
        .broadcast_add(&beta.reshape(((), 1))?)?;
    let y = act.apply_candle(&z.reshape(tdims)?.transpose(0, 1)?)?;
    let m = xf.dim(1)? as f64;
    Ok((
        y,
        mean.flatten_all()?,
        (var.flatten_all()? * (m / (m - 1.0)))?,
    ))
}

fn reference_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    act: Act,
) -> Result<Tensor> {
    let mut dims = vec![1; x.rank()];
    dims[1] = x.dim(1)?;
    let r = |t: &Tensor| t.reshape(dims.as_slice());
    let z = x
        .broadcast_sub(&r(mean)?)?
        .broadcast_div(&(r(var)? + EPS)?.sqrt()?)?
        .broadcast_mul(&r(gamma)?)?
        .broadcast_add(&r(beta)?)?;
    act.apply_candle(&z)
}

/// y, mean, var, dx, dgamma, dbeta.
type Outs = [Tensor; 6];

/// A training-mode BatchNorm: (x, gamma, beta) → (y, mean, unbiased var).
type TrainFn<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor, Tensor)>;

/// Runs `f` on fresh variables holding x, gamma, beta (in `dtype`) and
/// backprops `sum(y * r)`.
fn run(f: TrainFn, [x, gamma, beta, r]: &[Tensor; 4], dtype: DType) -> Outs {
    let var = |t: &Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
    let (xv, gv, bv) = (var(x), var(gamma), var(beta));
    let (y, mean, v) = f(xv.as_tensor(), gv.as_tensor(), bv.as_tensor()).unwrap();
    let grads = (&y * r.to_dtype(dtype).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = |v: &Var| grads.get(v.as_tensor()).expect("gradient").clone();
    [y, mean, v, g(&xv), g(&gv), g(&bv)]
}

const NAMES: [&str; 6] = ["y", "mean", "var", "dx", "dgamma", "dbeta"];

fn assert_close(case: &str, got: &Outs, want: &Outs, tol: f64) {
    for ((name, a), b) in NAMES.iter().zip(got).zip(want) {
        let e = rel_err(a, b);
        assert!(e <= tol, "{case}: {name} rel err {e:e}");
    }
}

/// x around 0.5 with spread ~1.2; gamma of both signs and beta up to 4, so
/// z crosses both ReLU6 corners and SiLU's curved part.
fn inputs(seed: u64, dims: &[usize]) -> [Tensor; 4] {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let c = dims[1];
    [
        uniform(&mut rng, dims, -1.5, 2.5),
        uniform(&mut rng, &[c], -2.5, 2.5),
        uniform(&mut rng, &[c], -1.0, 4.0),
        uniform(&mut rng, dims, -1.0, 1.0),
    ]
}

fn fused_train(act: Act) -> impl Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    move |x, g, b| batch_norm_act_train(x, g, b, EPS, act)
}

fn reference_train_fn(
    act: Act,
) -> impl Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    move |x, g, b| reference_train(x, g, b, act)
}

const SHAPES: [&[usize]; 8] = [
    &[2, 3, 5, 7],
    &[4, 16, 8, 8],
    &[3, 5],
    &[1, 4, 3, 3],
    &[3, 2, 1, 1],
    &[3, 4, 6],
    &[5, 7, 3, 5],
    &[8, 6, 28, 28],
];

/// Training forward (y, batch mean and variance) and backward (dx, dgamma,
/// dbeta), and the eval forward and backward, are bit-identical at 1, 2
/// and 7 threads, for every activation: statistics are per-plane partials
/// combined per channel in plane order, whatever the task split. Shapes
/// span one task to many (`TASK_ELEMS` values per task) and `[N, C]`.
#[test]
fn same_bits_at_any_thread_count() {
    let _on = switch_on();
    for (i, dims) in [
        &[16, 24, 32, 32][..],
        &[3, 40, 17, 19],
        &[64, 96, 2, 2],
        &[32, 1280],
    ]
    .into_iter()
    .enumerate()
    {
        for act in ACTS {
            let data = inputs(500 + i as u64, dims);
            let case = format!("{dims:?} {act:?}");
            assert_same_bits_at_any_thread_count(&case, || {
                let outs = run(&fused_train(act), &data, DType::F32);
                NAMES.into_iter().zip(outs).collect()
            });
            let [x, gamma, beta, r] = &data;
            let c = dims[1];
            let mean = (gamma * 0.1).unwrap();
            let var = (beta.abs().unwrap() + 0.5).unwrap();
            assert_eq!(mean.dims(), &[c]);
            assert_same_bits_at_any_thread_count(&format!("eval {case}"), || {
                let (xv, gv) = (
                    Var::from_tensor(x).unwrap(),
                    Var::from_tensor(gamma).unwrap(),
                );
                let y = batch_norm_act_eval(
                    xv.as_tensor(),
                    gv.as_tensor(),
                    beta,
                    &mean,
                    &var,
                    EPS,
                    act,
                )
                .unwrap();
                let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
                let dx = g.get(xv.as_tensor()).unwrap().clone();
                let dgamma = g.get(gv.as_tensor()).unwrap().clone();
                vec![("y", y), ("dx", dx), ("dgamma", dgamma)]
            });
        }
    }
}

#[test]
fn train_matches_candle_reference() {
    let _on = switch_on();
    for (i, dims) in SHAPES.iter().enumerate() {
        for act in ACTS {
            let data = inputs(i as u64, dims);
            let fast = run(&fused_train(act), &data, DType::F32);
            let reference = run(&reference_train_fn(act), &data, DType::F32);
            assert_eq!(fast[0].dims(), *dims);
            assert_eq!(fast[1].dims(), &dims[1..2]);
            assert_close(&format!("{dims:?} {act:?}"), &fast, &reference, TOL);
        }
    }
}

/// Against the reference evaluated in f64 (same f32 inputs): the fused
/// op's error is f32 rounding, even when `|mean| ≫ std` (where a plain f32
/// BatchNorm, like the candle reference in f32, loses digits).
#[test]
fn train_matches_f64_reference_with_large_offsets() {
    let _on = switch_on();
    for (seed, (dims, offset, spread)) in [
        (&[4usize, 5, 6, 6][..], 20.0f32, 0.05f32),
        (&[64, 3][..], -300.0, 1.0),
        (&[2, 4, 9, 9][..], 0.0, 1.0),
    ]
    .into_iter()
    .enumerate()
    {
        let mut data = inputs(100 + seed as u64, dims);
        data[0] = ((&data[0] * spread as f64).unwrap() + offset as f64).unwrap();
        for act in ACTS {
            let fast = run(&fused_train(act), &data, DType::F32);
            let exact = run(&reference_train_fn(act), &data, DType::F64);
            assert_close(&format!("{dims:?} +{offset} {act:?}"), &fast, &exact, TOL);
        }
    }
}

fn eval_stats(seed: u64, c: usize) -> (Tensor, Tensor) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (
        uniform(&mut rng, &[c], -0.5, 1.5),
        uniform(&mut rng, &[c], 0.2, 3.0),
    )
}

#[test]
fn eval_matches_candle_reference() {
    let _on = switch_on();
    for (i, dims) in SHAPES.iter().enumerate() {
        let (mean, var) = eval_stats(50 + i as u64, dims[1]);
        for act in ACTS {
            let data = inputs(i as u64, dims);
            let with =
                |f: fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor, Act) -> Result<Tensor>| {
                    let (mean, var) = (mean.clone(), var.clone());
                    move |x: &Tensor, g: &Tensor, b: &Tensor| {
                        let y = f(x, g, b, &mean, &var, act)?;
                        // Pad the tuple; mean/var slots compare the inputs to themselves.
                        Ok((y, mean.clone(), var.clone()))
                    }
                };
            let fast = run(
                &with(|x, g, b, m, v, a| batch_norm_act_eval(x, g, b, m, v, EPS, a)),
                &data,
                DType::F32,
            );
            let reference = run(&with(reference_eval), &data, DType::F32);
            assert_close(&format!("eval {dims:?} {act:?}"), &fast, &reference, TOL);
        }
    }
}

#[test]
fn eval_with_tracked_statistics_takes_candle_path() {
    let _on = switch_on();
    let dims = [3, 4, 5, 5];
    let [x, gamma, beta, r] = inputs(7, &dims);
    let (mean, var) = eval_stats(8, 4);
    let (mv, vv) = (
        Var::from_tensor(&mean).unwrap(),
        Var::from_tensor(&var).unwrap(),
    );
    let y = batch_norm_act_eval(
        &x,
        &gamma,
        &beta,
        mv.as_tensor(),
        vv.as_tensor(),
        EPS,
        Act::Silu,
    )
    .unwrap();
    let gr = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let yr = reference_eval(&x, &gamma, &beta, mv.as_tensor(), vv.as_tensor(), Act::Silu).unwrap();
    let grr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(rel_err(&y, &yr) <= TOL);
    for v in [&mv, &vv] {
        assert!(rel_err(gr.get(v).unwrap(), grr.get(v).unwrap()) <= TOL);
    }
}

#[test]
fn non_contiguous_and_untracked_inputs() {
    let _on = switch_on();
    let [x, gamma, beta, r] = inputs(11, &[3, 4, 7, 5]);
    // x is a transposed view of a [3, 4, 5, 7] variable.
    let xv = Var::from_tensor(&x.transpose(2, 3).unwrap().contiguous().unwrap()).unwrap();
    let (gv, bv) = (
        Var::from_tensor(&gamma).unwrap(),
        Var::from_tensor(&beta).unwrap(),
    );
    for act in ACTS {
        let grads = |f: TrainFn| {
            let xt = xv.as_tensor().transpose(2, 3).unwrap();
            assert!(!xt.is_contiguous());
            let (y, m, v) = f(&xt, gv.as_tensor(), bv.as_tensor()).unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let get = |t: &Tensor| g.get(t).unwrap().clone();
            [
                y,
                m,
                v,
                get(xv.as_tensor()),
                get(gv.as_tensor()),
                get(bv.as_tensor()),
            ]
        };
        let fast = grads(&fused_train(act));
        let reference = grads(&reference_train_fn(act));
        assert_close(&format!("strided {act:?}"), &fast, &reference, TOL);

        // The op also gathers strided storage itself (no contiguous copy first).
        let saved = Arc::new(OnceLock::new());
        let op = BnAct {
            act,
            mode: Mode::Train { eps: EPS },
            saved,
        };
        let xt = x
            .transpose(2, 3)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        let y = xt.apply_op3_no_bwd(&gamma, &beta, &op).unwrap();
        assert!(rel_err(&y, &reference[0]) <= TOL);

        // A channel slice: strided, but gathered in whole H·W runs.
        let wide = Tensor::cat(&[&x, &x.affine(0.5, 1.0).unwrap()], 1).unwrap();
        let xs = wide.narrow(1, 2, 4).unwrap();
        assert!(!xs.is_contiguous());
        let op = BnAct {
            act,
            mode: Mode::Train { eps: EPS },
            saved: Arc::new(OnceLock::new()),
        };
        let y = xs.apply_op3_no_bwd(&gamma, &beta, &op).unwrap();
        let (yr, _, _) = reference_train(&xs, &gamma, &beta, act).unwrap();
        assert!(rel_err(&y, &yr) <= TOL);

        // An input outside the graph gets no gradient; the parameters still do.
        let (y, _, _) = batch_norm_act_train(&x, gv.as_tensor(), bv.as_tensor(), EPS, act).unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        let (yr, _, _) = reference_train(&x, gv.as_tensor(), bv.as_tensor(), act).unwrap();
        let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&gv, &bv] {
            assert!(rel_err(g.get(v).unwrap(), gr.get(v).unwrap()) <= TOL);
        }
    }
}

#[test]
fn other_dtypes_take_candle_path() {
    let _on = switch_on();
    let dims = [2, 3, 4, 4];
    for act in ACTS {
        let data = inputs(21, &dims);
        let fast = run(&fused_train(act), &data, DType::F64);
        let reference = run(&reference_train_fn(act), &data, DType::F64);
        assert_eq!(fast[0].dtype(), DType::F64);
        assert_eq!(fast[1].dtype(), DType::F64);
        assert_close(&format!("f64 {act:?}"), &fast, &reference, 1e-12);
    }
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
    assert!(fast_kernels_enabled(), "default is on");
    set_fast_kernels(false);
    for (i, dims) in [&[2usize, 3, 5, 7][..], &[3, 5], &[4, 16, 8, 8]]
        .into_iter()
        .enumerate()
    {
        for act in ACTS {
            let data = inputs(30 + i as u64, dims);
            let off = run(&fused_train(act), &data, DType::F32);
            let reference = run(&reference_train_fn(act), &data, DType::F32);
            assert_close(&format!("off {dims:?} {act:?}"), &off, &reference, TOL);

            let (mean, var) = eval_stats(40 + i as u64, dims[1]);
            let [x, g, b, _] = &data;
            let y = batch_norm_act_eval(x, g, b, &mean, &var, EPS, act).unwrap();
            let yr = reference_eval(x, g, b, &mean, &var, act).unwrap();
            assert!(rel_err(&y, &yr) <= TOL, "off eval {dims:?} {act:?}");
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let _on = switch_on();
    let [x, gamma, beta, _] = inputs(5, &[2, 3, 4, 4]);
    let (mean, var) = eval_stats(6, 3);
    let four = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    assert!(
        batch_norm_act_train(&x, &four, &beta, EPS, Act::Silu).is_err(),
        "gamma size"
    );
    assert!(
        batch_norm_act_train(&x, &gamma, &four, EPS, Act::Silu).is_err(),
        "beta size"
    );
    assert!(
        batch_norm_act_eval(&x, &gamma, &beta, &four, &var, EPS, Act::Silu).is_err(),
        "mean size"
    );
    assert!(
        batch_norm_act_eval(&x, &gamma, &beta, &mean, &four, EPS, Act::Silu).is_err(),
        "var size"
    );
    let flat = x.flatten_all().unwrap();
    assert!(
        batch_norm_act_train(&flat, &gamma, &beta, EPS, Act::Silu).is_err(),
        "rank 1"
    );
    // One value per channel: no unbiased variance (PyTorch refuses too).
    let single = x
        .narrow(0, 0, 1)
        .unwrap()
        .narrow(2, 0, 1)
        .unwrap()
        .narrow(3, 0, 1)
        .unwrap();
    assert!(
        batch_norm_act_train(&single, &gamma, &beta, EPS, Act::Silu).is_err(),
        "M = 1"
    );
    // ... which eval mode handles.
    let y = batch_norm_act_eval(&single, &gamma, &beta, &mean, &var, EPS, Act::Silu).unwrap();
    let yr = reference_eval(&single, &gamma, &beta, &mean, &var, Act::Silu).unwrap();
    assert!(rel_err(&y, &yr) <= TOL);
}

#[test]
fn nan_propagates() {
    let _on = switch_on();
    let [x, gamma, beta, _] = inputs(9, &[2, 3, 4, 4]);
    let mut v = values(&x).into_iter().map(|v| v as f32).collect::<Vec<_>>();
    v[5] = f32::NAN; // channel 0
    let x = Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap();
    for act in ACTS {
        let (y, mean, _) = batch_norm_act_train(&x, &gamma, &beta, EPS, act).unwrap();
        let chan = |c: usize| values(&y.narrow(1, c, 1).unwrap());
        assert!(chan(0).iter().all(|v| v.is_nan()), "{act:?}");
        assert!(
            chan(1).iter().chain(&chan(2)).all(|v| v.is_finite()),
            "{act:?}"
        );
        assert!(values(&mean)[0].is_nan());
    }
}

/// With two values per channel `xhat = ±1` for any data, so the true dx is
/// tiny (O(eps/σ²)) and every f32 computation of it is all cancellation:
/// candle's own f32 result is off by ~3e-4 relative to the f64 one. Measured
/// against the size of the cancelling terms, `|γ·invstd·dy|`, the error is
/// f32 rounding.
#[test]
fn two_values_per_channel() {
    let _on = switch_on();
    for act in ACTS {
        let data = inputs(4, &[2, 3, 1, 1]);
        let fast = run(&fused_train(act), &data, DType::F32);
        let exact = run(&reference_train_fn(act), &data, DType::F64);
        let (gamma, r, var) = (values(&data[1]), values(&data[3]), values(&exact[2]));
        // Biased variance = unbiased / 2 for M = 2.
        let slope = gamma
            .iter()
            .zip(&var)
            .map(|(g, v)| g.abs() / (v / 2.0 + EPS).sqrt())
            .fold(0.0, f64::max);
        let scale = slope * r.iter().map(|v| v.abs()).fold(0.0, f64::max);
        let (dx, dx_exact) = (values(&fast[3]), values(&exact[3]));
        let err = dx
            .iter()
            .zip(&dx_exact)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            err <= TOL * scale,
            "{act:?}: dx err {err:e}, scale {scale:e}"
        );
        let others = [0, 1, 2, 4, 5].map(|i| (NAMES[i], rel_err(&fast[i], &exact[i])));
        assert!(others.iter().all(|&(_, e)| e <= TOL), "{act:?}: {others:?}");
    }
}

#[test]
fn exp_is_accurate() {
    let mut worst = [0f64; 2];
    let mut x = -87.0f32;
    while x <= 88.0 {
        let want = (x as f64).exp();
        for (w, got) in worst.iter_mut().zip([exp::<false>(x), exp::<true>(x)]) {
            *w = w.max((got as f64 - want).abs() / want);
        }
        x += 0.000_731;
    }
    // 2^-22: within ~2 ulp.
    assert!(worst.iter().all(|&w| w < 2.4e-7), "{worst:?}");
    assert!(exp::<false>(f32::NAN).is_nan());
    assert_eq!(exp::<false>(-1000.0), exp::<false>(-87.0));
    assert!(exp::<false>(1000.0).is_finite());
    assert_eq!(exp::<false>(0.0), 1.0);
}

/// `RAYON_NUM_THREADS=2 cargo test --release -- --ignored --nocapture bench_batchnorm`
///
/// Columns, ms (median): forward; the backward op alone (`bwd` on a given
/// dy); candle's `backward()` from y (adds seeding dy = ones and
/// accumulating into zero-initialised gradient slots); forward + backward.
#[test]
#[ignore = "benchmark; run explicitly"]
fn bench_batchnorm() {
    let _on = switch_on();
    let runs = 7;
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "{:<18} {:>9} {:>9} {:>9} {:>9} | {:>10} {:>10} {:>10}",
        "case (SiLU)", "fused fwd", "bwd op", "backward", "f+b", "candle fwd", "backward", "f+b"
    );
    for dims in [[32usize, 96, 32, 32], [32, 480, 4, 4]] {
        let data = inputs(1, &dims);
        let xv = Var::from_tensor(&data[0]).unwrap();
        let gv = Var::from_tensor(&data[1]).unwrap();
        let bv = Var::from_tensor(&data[2]).unwrap();
        let (x, g, b) = (xv.as_tensor(), gv.as_tensor(), bv.as_tensor());
        let mut row = Vec::new();

        let op = BnAct {
            act: Act::Silu,
            mode: Mode::Train { eps: EPS },
            saved: Arc::new(OnceLock::new()),
        };
        let y = x.apply_op3_no_bwd(g, b, &op).unwrap();
        let dy = y.ones_like().unwrap();
        let bwd_op = median_ms(runs, || {
            op.bwd(x, g, b, &y, &dy).unwrap();
        });

        let fused = fused_train(Act::Silu);
        let reference = reference_train_fn(Act::Silu);
        for f in [&fused as TrainFn, &reference] {
            row.push(median_ms(runs, || {
                f(x, g, b).unwrap();
            }));
            let (y, _, _) = f(x, g, b).unwrap();
            row.push(median_ms(runs, || {
                y.backward().unwrap();
            }));
            row.push(median_ms(runs, || {
                f(x, g, b).unwrap().0.backward().unwrap();
            }));
        }
        println!(
            "{:<18} {:>9.2} {:>9.2} {:>9.2} {:>9.2} | {:>10.2} {:>10.2} {:>10.2}",
            format!("{dims:?}"),
            row[0],
            bwd_op,
            row[1],
            row[2],
            row[3],
            row[4],
            row[5]
        );
    }
}
