use super::super::{fast_kernels_enabled, set_fast_kernels};
use super::*;
use candle_core::{DType, Device, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::super::SWITCH;
use super::super::testing::{
    assert_same_bits_at_any_thread_count, median_ms, random, rel_err, switch_on, values,
};

const TOL: f64 = 1e-5;

/// The candle formulation the fast path replaces.
fn reference(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let o = w.dim(0)?;
    w.reshape((o, c))?
        .broadcast_matmul(&x.reshape((b, c, h * wd))?)?
        .reshape((b, o, h, wd))
}

type ConvFn<'a> = &'a dyn Fn(&Tensor, &Tensor) -> Result<Tensor>;

/// `(y, dx, dw)` for the loss `Σ y·r`.
fn run(f: ConvFn, x: &Var, w: &Var, r: &Tensor) -> (Tensor, Tensor, Tensor) {
    let y = f(x.as_tensor(), w.as_tensor()).unwrap();
    let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = g.get(x.as_tensor()).unwrap().clone();
    let dw = g.get(w.as_tensor()).unwrap().clone();
    assert_eq!(dx.dims(), x.as_tensor().dims());
    assert_eq!(dw.dims(), w.as_tensor().dims());
    (y, dx, dw)
}

fn inputs(seed: u64, xd: &[usize], wd: &[usize]) -> (Var, Var, Tensor) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = Var::from_tensor(&random(&mut rng, xd)).unwrap();
    let w = Var::from_tensor(&random(&mut rng, wd)).unwrap();
    let r = random(&mut rng, &[xd[0], wd[0], xd[2], xd[3]]);
    (x, w, r)
}

fn check(xd: &[usize], wd: &[usize], seed: u64) {
    let (x, w, r) = inputs(seed, xd, wd);
    let fast = run(&pointwise_conv2d, &x, &w, &r);
    let want = run(&reference, &x, &w, &r);
    for (name, got, want) in [
        ("y", &fast.0, &want.0),
        ("dx", &fast.1, &want.1),
        ("dw", &fast.2, &want.2),
    ] {
        let e = rel_err(got, want);
        assert!(e <= TOL, "x {xd:?} w {wd:?}: {name} rel err {e:e}");
    }
}

const SHAPES: [(&[usize], &[usize]); 13] = [
    (&[2, 3, 5, 7], &[4, 3, 1, 1]),
    (&[4, 16, 8, 8], &[24, 16]),
    (&[1, 1, 1, 1], &[1, 1, 1, 1]),
    (&[3, 40, 4, 4], &[240, 40, 1, 1]),
    (&[5, 7, 1, 1], &[9, 7, 1, 1]),
    // Groups with a short last group (hw 9: 29 items per group).
    (&[37, 5, 3, 3], &[6, 5]),
    // Items wider than GROUP_COLS: gemm straight from the buffers.
    (&[3, 8, 20, 20], &[5, 8, 1, 1]),
    (&[1, 12, 17, 19], &[7, 12]),
    // A single item, rows and columns not multiples of any
    // microkernel size.
    (&[1, 33, 3, 5], &[65, 33, 1, 1]),
    (&[70, 13, 2, 2], &[31, 13, 1, 1]),
    (&[9, 100, 7, 7], &[17, 100]),
    (&[300, 3, 1, 1], &[2, 3]),
    // Weight-gradient partial sums over uneven runs of groups.
    (&[45, 6, 5, 5], &[11, 6, 1, 1]),
];

#[test]
fn matches_candle_reference() {
    let _on = switch_on();
    for (i, (xd, wd)) in SHAPES.into_iter().enumerate() {
        check(xd, wd, i as u64);
    }
}

/// Both scheduling branches (groups in parallel; groups in turn with
/// gemm's threads) and single-threaded gemm, whatever the machine has.
#[test]
fn matches_candle_reference_at_any_thread_count() {
    let _on = switch_on();
    for threads in [1, 3, 8] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for (i, (xd, wd)) in SHAPES.into_iter().enumerate() {
                check(xd, wd, 100 + i as u64);
            }
            check(&[16, 64, 14, 14], &[96, 64, 1, 1], 7);
        });
    }
}

/// Forward and both gradients are bit-identical at 1, 2 and 7 threads.
/// The per-thread split grouped items by thread count: `[8, 600, 5, 5]`
/// gave 75-column products on one thread and 50-column ones on seven,
/// and gemm blocks a 600-deep sum differently for the two widths; long
/// batches gave the weight gradient one partial sum per thread.
#[test]
fn same_bits_at_any_thread_count() {
    let _on = switch_on();
    for (i, (xd, wd)) in [
        (&[8, 600, 5, 5][..], &[48, 600][..]),
        (&[64, 32, 8, 8], &[48, 32, 1, 1]),
        (&[32, 320, 2, 2], &[1280, 320, 1, 1]),
        (&[16, 24, 16, 16], &[144, 24, 1, 1]),
        (&[45, 6, 5, 5], &[11, 6, 1, 1]),
    ]
    .into_iter()
    .enumerate()
    {
        let (x, w, r) = inputs(900 + i as u64, xd, wd);
        assert_same_bits_at_any_thread_count(&format!("x {xd:?} w {wd:?}"), || {
            let (y, dx, dw) = run(&pointwise_conv2d, &x, &w, &r);
            vec![("y", y), ("dx", dx), ("dw", dw)]
        });
    }
}

#[test]
fn non_contiguous_and_untracked_inputs() {
    let _on = switch_on();
    let (x, w, r) = inputs(11, &[3, 6, 5, 4], &[7, 6, 1, 1]);
    // Transposed views of the same values, and their inverse transposes.
    let xt =
        Var::from_tensor(&x.as_tensor().transpose(2, 3).unwrap().contiguous().unwrap()).unwrap();
    let wt = Var::from_tensor(
        &w.as_tensor()
            .reshape((7, 6))
            .unwrap()
            .t()
            .unwrap()
            .contiguous()
            .unwrap(),
    )
    .unwrap();
    let view = |f: fn(&Tensor, &Tensor) -> Result<Tensor>| {
        move |x: &Tensor, w: &Tensor| {
            let x = x.transpose(2, 3)?;
            let w = w.t()?;
            assert!(!x.is_contiguous() && !w.is_contiguous());
            f(&x, &w)
        }
    };
    let fast = run(&view(pointwise_conv2d), &xt, &wt, &r);
    let want = run(&reference, &x, &w, &r);
    assert!(rel_err(&fast.0, &want.0) <= TOL);
    assert!(rel_err(&fast.1.transpose(2, 3).unwrap(), &want.1) <= TOL);
    assert!(rel_err(&fast.2.t().unwrap(), &want.2.reshape((7, 6)).unwrap()) <= TOL);

    // The custom ops also gather strided storage themselves.
    let y = x
        .as_tensor()
        .transpose(2, 3)
        .unwrap()
        .apply_op2_no_bwd(&wt.as_tensor().t().unwrap(), &PointwiseConv)
        .unwrap();
    assert!(rel_err(&y, &want.0.transpose(2, 3).unwrap()) <= TOL);

    // The gradient ops gather a strided (here stride-0) output gradient.
    let dy = Tensor::new(&[0.75f32], &Device::Cpu)
        .unwrap()
        .broadcast_as(want.0.dims())
        .unwrap();
    assert!(!dy.is_contiguous());
    let dx = dy
        .apply_op2_no_bwd(w.as_tensor(), &PointwiseGradInput)
        .unwrap();
    let dw = x
        .as_tensor()
        .apply_op2_no_bwd(&dy, &PointwiseGradWeight { weight_4d: true })
        .unwrap();
    let yr = reference(x.as_tensor(), w.as_tensor()).unwrap();
    let gr = (yr.sum_all().unwrap() * 0.75).unwrap().backward().unwrap();
    assert!(rel_err(&dx, gr.get(x.as_tensor()).unwrap()) <= TOL);
    assert!(rel_err(&dw, gr.get(w.as_tensor()).unwrap()) <= TOL);

    // An input outside the graph gets no gradient; the weight still does.
    let xd = x.as_tensor().detach();
    let y = pointwise_conv2d(&xd, w.as_tensor()).unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&xd).is_none());
    assert!(rel_err(g.get(w.as_tensor()).unwrap(), &want.2) <= TOL);
    // And a frozen weight gets none while the input does.
    let wd = w.as_tensor().detach();
    let y = pointwise_conv2d(x.as_tensor(), &wd).unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&wd).is_none());
    assert!(rel_err(g.get(x.as_tensor()).unwrap(), &want.1) <= TOL);
}

#[test]
fn empty_dimensions() {
    let _on = switch_on();
    // No input channels: y is an empty sum, dw is [O, 0].
    let (x, w, r) = inputs(12, &[2, 0, 3, 3], &[4, 0]);
    let (y, dx, dw) = run(&pointwise_conv2d, &x, &w, &r);
    assert_eq!(y.dims(), [2, 4, 3, 3]);
    assert!(values(&y).iter().all(|&v| v == 0.0));
    assert_eq!((dx.dims(), dw.dims()), (&[2, 0, 3, 3][..], &[4, 0][..]));
    // No batch items: dw is an empty sum.
    let (x, w, r) = inputs(13, &[0, 3, 2, 2], &[5, 3, 1, 1]);
    let (y, _, dw) = run(&pointwise_conv2d, &x, &w, &r);
    assert_eq!(y.dims(), [0, 5, 2, 2]);
    assert!(values(&dw).iter().all(|&v| v == 0.0));
}

#[test]
fn other_dtypes_fall_back_to_candle() {
    let _on = switch_on();
    let (x, w, _) = inputs(3, &[2, 3, 4, 5], &[6, 3, 1, 1]);
    let x = x.as_tensor().to_dtype(DType::F64).unwrap();
    let w = w.as_tensor().to_dtype(DType::F64).unwrap();
    let y = pointwise_conv2d(&x, &w).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    let want = reference(&x, &w).unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    );
}

#[test]
fn bad_shapes_are_errors() {
    let _on = switch_on();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x = random(&mut rng, &[2, 3, 4, 4]);
    for wd in [&[5, 4][..], &[5, 3, 3, 3], &[5, 3, 1], &[5, 4, 1, 1], &[15]] {
        let w = random(&mut rng, wd);
        assert!(pointwise_conv2d(&x, &w).is_err(), "weight {wd:?}");
    }
    let w = random(&mut rng, &[5, 3]);
    assert!(
        pointwise_conv2d(&x.flatten_from(2).unwrap(), &w).is_err(),
        "rank 3"
    );
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
    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();

    assert!(fast_kernels_enabled(), "default is on");
    for (i, (xd, wd)) in SHAPES.into_iter().enumerate() {
        let (x, w, r) = inputs(200 + i as u64, xd, wd);
        let want = run(&reference, &x, &w, &r);
        set_fast_kernels(false);
        let off = run(&pointwise_conv2d, &x, &w, &r);
        // Same ops in the same order: bit-identical to candle.
        assert_eq!(bits(&off.0), bits(&want.0), "{xd:?}");
        assert_eq!(bits(&off.1), bits(&want.1), "{xd:?}");
        assert_eq!(bits(&off.2), bits(&want.2), "{xd:?}");
        set_fast_kernels(true);
        let on = run(&pointwise_conv2d, &x, &w, &r);
        assert!(rel_err(&on.0, &want.0) <= TOL);
        assert!(rel_err(&on.1, &want.1) <= TOL);
        assert!(rel_err(&on.2, &want.2) <= TOL);
    }
}

/// `RAYON_NUM_THREADS=2 cargo test --release -- --ignored --nocapture bench_pointwise`
///
/// Columns, ms (median): the three products alone (forward, input
/// gradient, weight gradient, each on given operands), then forward +
/// backward of the loss `Σ y·r` with both gradients (adds candle's
/// bookkeeping: `y·r`, its backward, zero-initialised gradient slots), for
/// this module and for the candle `broadcast_matmul` formulation it
/// replaces (whose weight gradient is `Σ_b` over a `[B, O, C]` product).
#[test]
#[ignore = "benchmark; run explicitly"]
fn bench_pointwise() {
    let _on = switch_on();
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "{:<27} {:>6} {:>6} {:>6} {:>7} | {:>6} {:>6} {:>6} {:>7} | {:>6}",
        "case", "fwd", "dx", "dw", "f+b", "fwd", "dx", "dw", "f+b", "f+b"
    );
    println!(
        "{:<27} {:^30}   {:^30}   {:>6}",
        "", "this module", "candle reference", "speedup"
    );
    let cases: [(&[usize], &[usize]); 4] = [
        (&[32, 96, 16, 16], &[24, 96]),
        (&[32, 40, 8, 8], &[240, 40]),
        (&[32, 672, 4, 4], &[192, 672]),
        (&[32, 320, 2, 2], &[1280, 320]),
    ];
    for (xd, wd) in cases {
        let (x, w, r) = inputs(1, xd, wd);
        let (xt, wt) = (x.as_tensor(), w.as_tensor());
        let (b, c, h, wdt) = xt.dims4().unwrap();
        let o = wd[0];
        let dy = r.clone();
        let mut row = vec![
            median_ms(runs, || {
                xt.apply_op2_no_bwd(wt, &PointwiseConv).unwrap();
            }),
            median_ms(runs, || {
                dy.apply_op2_no_bwd(wt, &PointwiseGradInput).unwrap();
            }),
            median_ms(runs, || {
                let op = PointwiseGradWeight { weight_4d: false };
                xt.apply_op2_no_bwd(&dy, &op).unwrap();
            }),
        ];
        let w2 = wt.reshape((o, c)).unwrap();
        let dy3 = dy.reshape((b, o, h * wdt)).unwrap();
        let x3 = xt.reshape((b, c, h * wdt)).unwrap();
        // What candle's Matmul backward does for `w2.broadcast_matmul(x3)`.
        let reference_ops = [
            median_ms(runs, || {
                reference(xt, wt).unwrap();
            }),
            median_ms(runs, || {
                w2.t().unwrap().broadcast_matmul(&dy3).unwrap();
            }),
            median_ms(runs, || {
                dy3.matmul(&x3.t().unwrap())
                    .unwrap()
                    .sum_keepdim(0)
                    .unwrap();
            }),
        ];
        let train_step = |f: ConvFn| {
            median_ms(runs, || {
                let y = f(xt, wt).unwrap();
                (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            })
        };
        row.push(train_step(&pointwise_conv2d));
        row.extend(reference_ops);
        row.push(train_step(&reference));
        println!(
            "{:<27} {:>6.2} {:>6.2} {:>6.2} {:>7.2} | {:>6.2} {:>6.2} {:>6.2} {:>7.2} | {:>5.1}x",
            format!("{xd:?}·{wd:?}"),
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            row[7],
            row[7] / row[3]
        );
    }
}
