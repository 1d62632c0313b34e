//! The GPU formulations, checked on CPU: each against the CPU kernel and
//! candle's own op (forward and the gradients of input, weight and bias, on
//! odd shapes, strides 1 and 2, every padding up to k/2, with im2col budgets
//! small enough to take every cut), to 1e-5 relative; and whole models
//! (CycleGAN generator and discriminator, EfficientNet-B0 in training mode)
//! with every kernel call routed to the formulations, against the CPU
//! kernels, to 1e-4 relative L2 per parameter gradient.

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::super::testing::{random, rel_err, switch_on, uniform, values};
use super::super::{Path, formulations_on_cpu, gpu_formulations_enabled, path};
use super::super::{
    conv as cpu_conv, depthwise as cpu_depthwise, set_fast_kernels, set_gpu_formulations,
};
use super::{COL_BUDGET, Index, cached_index, conv, depthwise, norm};
use crate::models::cyclegan::{
    Discriminator, DiscriminatorConfig, Generator, GeneratorConfig, Upsample,
};
use crate::models::efficientnet::{EfficientNet, EfficientNetConfig, Variant, init_weights};
use crate::models::layers;

const TOL: f64 = 1e-5;

/// Per-parameter relative L2 error allowed in whole-model gradients.
const MODEL_TOL: f64 = 1e-4;

/// A weighted-sum loss `Σ (f(x, w) + b)·r` and what it yields: the output
/// and the gradients with respect to x, w and the per-channel bias b.
struct Outs {
    y: Tensor,
    grads: [Tensor; 3],
}

fn run(
    f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    r: &Tensor,
) -> Outs {
    let (xv, wv, bv) = (
        Var::from_tensor(x).unwrap(),
        Var::from_tensor(w).unwrap(),
        Var::from_tensor(b).unwrap(),
    );
    let c = b.dim(0).unwrap();
    let y = f(xv.as_tensor(), wv.as_tensor())
        .unwrap()
        .broadcast_add(&bv.as_tensor().reshape((1, c, 1, 1)).unwrap())
        .unwrap();
    let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
    Outs {
        grads: [g(&xv), g(&wv), g(&bv)],
        y: y.detach(),
    }
}

/// Asserts `got` matches `want` in every output, to [`TOL`].
fn assert_close(case: &str, got: &Outs, want: &Outs, against: &str) {
    let pairs = [("y", &got.y, &want.y)].into_iter().chain(
        ["dx", "dw", "db"]
            .into_iter()
            .zip(got.grads.iter().zip(&want.grads))
            .map(|(n, (a, b))| (n, a, b)),
    );
    for (name, a, b) in pairs {
        let e = rel_err(a, b);
        assert!(e < TOL, "{case}: {name} differs from {against} by {e:e}");
    }
}

/// conv2d: the formulation (at the default budget and at budgets that cut
/// the batch, the rows of one item, and everything down to one tap of one
/// item) against the CPU kernel and candle's conv2d, with a bias.
#[test]
fn conv2d_matches_cpu_kernel_and_candle() {
    let _on = switch_on();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (n, c, o, h, wd) = (2, 3, 5, 7, 9);
    let mut cases = 0;
    for k in [1, 3, 4, 7] {
        for s in [1, 2] {
            for p in 0..=k / 2 {
                let case = format!("k{k} s{s} p{p}");
                let x = random(&mut rng, &[n, c, h, wd]);
                let w = random(&mut rng, &[o, c, k, k]);
                let b = random(&mut rng, &[o]);
                let candle = |x: &Tensor, w: &Tensor| x.conv2d(w, p, s, 1, 1);
                let (ho, wo) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
                let r = random(&mut rng, &[n, o, ho, wo]);
                let want = run(&candle, &x, &w, &b, &r);
                let kernel = run(&|x, w| cpu_conv::conv2d(x, w, s, p), &x, &w, &b, &r);
                assert_close(&case, &kernel, &want, "candle (CPU kernel)");
                let per_item = c * k * k * ho * wo;
                for budget in [COL_BUDGET, per_item, per_item / 2 + 1, 1] {
                    let gpu = run(
                        &|x, w| conv::conv2d_with(x, w, s, p, budget),
                        &x,
                        &w,
                        &b,
                        &r,
                    );
                    let case = format!("{case} budget {budget}");
                    assert_close(&case, &gpu, &want, "candle");
                    assert_close(&case, &gpu, &kernel, "the CPU kernel");
                }
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 2 * (1 + 2 + 3 + 4));
}

/// The CycleGAN's 7x7 head (64 channels in) at 224 px: candle would build
/// one `64·49·N·224²` im2col for the weight gradient, past `u32::MAX` values
/// from batch ~28 (its launch grid is a u32). Every buffer of the
/// formulation stays within [`COL_BUDGET`] (2^28), at any batch, and one
/// 1024 px item still cuts its forward into row runs.
#[test]
fn large_kernel_buffers_stay_within_the_budget() {
    use conv::{Cut, forward_cut, weight_grad_cut};
    let (c, k, side) = (64, 7, 224);
    for n in [1, 8, 28, 32, 64, 256] {
        let candle = c * k * k * n * side * side;
        assert_eq!(candle > u32::MAX as usize, n >= 28, "batch {n}");
        let per_row = c * k * k * side;
        let largest = match forward_cut(n, per_row, side, COL_BUDGET) {
            Cut::Whole => n * per_row * side,
            Cut::Items(items) => items * per_row * side,
            Cut::Rows(rows) => rows * per_row,
        };
        assert!(largest <= COL_BUDGET, "forward, batch {n}: {largest}");
        let (items, taps) = weight_grad_cut(n, c * side * side, k * k, COL_BUDGET);
        let largest = items * taps * c * side * side;
        assert!(
            largest <= COL_BUDGET && items <= n,
            "weight gradient, batch {n}: {largest}"
        );
    }
    assert_eq!(
        forward_cut(8, 64 * 49 * 224, 224, COL_BUDGET),
        Cut::Items(1)
    );
    assert_eq!(weight_grad_cut(8, 64 * 224 * 224, 49, COL_BUDGET), (8, 10));
    let big = 64 * 49 * 1024;
    assert_eq!(
        forward_cut(1, big, 1024, COL_BUDGET),
        Cut::Rows(COL_BUDGET / big)
    );
}

/// conv_transpose2d (weight [Cin, Cout, K, K]) with every output padding
/// below the stride, against the CPU kernel and candle's conv_transpose2d.
#[test]
fn conv_transpose2d_matches_cpu_kernel_and_candle() {
    let _on = switch_on();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (n, ci, co, h, wd) = (2, 3, 5, 4, 5);
    let mut cases = 0;
    for k in [1, 3, 4] {
        for s in [1, 2] {
            for p in 0..=k / 2 {
                for op in 0..s {
                    let case = format!("k{k} s{s} p{p} op{op}");
                    let x = random(&mut rng, &[n, ci, h, wd]);
                    let w = random(&mut rng, &[ci, co, k, k]);
                    let b = random(&mut rng, &[co]);
                    let (ho, wo) = ((h - 1) * s + k + op - 2 * p, (wd - 1) * s + k + op - 2 * p);
                    let r = random(&mut rng, &[n, co, ho, wo]);
                    let candle = |x: &Tensor, w: &Tensor| x.conv_transpose2d(w, p, op, s, 1);
                    let want = run(&candle, &x, &w, &b, &r);
                    let kernel = run(
                        &|x, w| cpu_conv::conv_transpose2d(x, w, s, p, op),
                        &x,
                        &w,
                        &b,
                        &r,
                    );
                    assert_close(&case, &kernel, &want, "candle (CPU kernel)");
                    for budget in [COL_BUDGET, co * k * k * h * wd, 1] {
                        let gpu = run(
                            &|x, w| conv::conv_transpose2d_with(x, w, s, p, op, budget),
                            &x,
                            &w,
                            &b,
                            &r,
                        );
                        let case = format!("{case} budget {budget}");
                        assert_close(&case, &gpu, &want, "candle");
                        assert_close(&case, &gpu, &kernel, "the CPU kernel");
                    }
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 3 * (1 + 2 + 3));
}

/// Depthwise conv: the tap sum against the CPU kernel and candle's grouped
/// conv2d (groups = C).
#[test]
fn depthwise_matches_cpu_kernel_and_candle() {
    let _on = switch_on();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (n, c, h, wd) = (2, 5, 7, 9);
    let mut cases = 0;
    for k in [1, 3, 5] {
        for s in [1, 2] {
            for p in 0..=k / 2 {
                let case = format!("k{k} s{s} p{p}");
                let x = random(&mut rng, &[n, c, h, wd]);
                let w = random(&mut rng, &[c, 1, k, k]);
                let b = random(&mut rng, &[c]);
                let (ho, wo) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
                let r = random(&mut rng, &[n, c, ho, wo]);
                let want = run(&|x, w| x.conv2d(w, p, s, 1, c), &x, &w, &b, &r);
                let kernel = run(
                    &|x, w| cpu_depthwise::depthwise_conv2d(x, w, s, p),
                    &x,
                    &w,
                    &b,
                    &r,
                );
                let gpu = run(
                    &|x, w| depthwise::depthwise_conv2d(x, w, s, p),
                    &x,
                    &w,
                    &b,
                    &r,
                );
                assert_close(&case, &kernel, &want, "candle (CPU kernel)");
                assert_close(&case, &gpu, &want, "candle");
                assert_close(&case, &gpu, &kernel, "the CPU kernel");
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 2 * (1 + 2 + 3));
}

/// Instance norm: the closed-form formulation against the CPU kernel (fused
/// BatchNorm) and candle ops with autograd, on inputs whose mean is far from
/// zero; the weight slot of [`run`] is a per-channel scale after the norm.
#[test]
fn instance_norm_matches_cpu_kernel_and_candle() {
    let _on = switch_on();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for dims in [[2, 3, 7, 9], [1, 5, 3, 1]] {
        let case = format!("{dims:?}");
        let x = uniform(&mut rng, &dims, 2.0, 5.0);
        let c = dims[1];
        let g = uniform(&mut rng, &[1, c, 1, 1], 0.5, 1.5);
        let b = random(&mut rng, &[c]);
        let r = random(&mut rng, &dims);
        let candle = |x: &Tensor, g: &Tensor| {
            let mean = x.mean_keepdim((2, 3))?;
            let xc = x.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim((2, 3))?;
            xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?.broadcast_mul(g)
        };
        let want = run(&candle, &x, &g, &b, &r);
        let kernel = run(
            &|x, g| layers::instance_norm(x)?.broadcast_mul(g),
            &x,
            &g,
            &b,
            &r,
        );
        let gpu = run(
            &|x, g| norm::instance_norm(x, 1e-5)?.broadcast_mul(g),
            &x,
            &g,
            &b,
            &r,
        );
        assert_close(&case, &kernel, &want, "candle (CPU kernel)");
        assert_close(&case, &gpu, &want, "candle");
        assert_close(&case, &gpu, &kernel, "the CPU kernel");
    }
    let one = Tensor::zeros((2, 3, 1, 1), DType::F32, &Device::Cpu).unwrap();
    assert!(norm::instance_norm(&one, 1e-5).is_err());
}

/// Reflection padding gathers with index tensors built once per (device,
/// size, padding): the same tensor comes back, with PyTorch's indices.
#[test]
fn reflection_indices_are_cached_and_match_torch() {
    let key = Index::Reflect { n: 3, pad: 2 };
    let a = cached_index(key, &Device::Cpu).unwrap();
    let b = cached_index(key, &Device::Cpu).unwrap();
    assert_eq!(a.id(), b.id(), "uploaded twice");
    assert_eq!(a.to_vec1::<u32>().unwrap(), [2, 1, 0, 1, 2, 1, 0]);
    let rev = cached_index(Index::Reverse(4), &Device::Cpu).unwrap();
    assert_eq!(rev.to_vec1::<u32>().unwrap(), [3, 2, 1, 0]);
    // torch.nn.ReflectionPad2d(1)(torch.arange(6.).reshape(1, 1, 2, 3))[0, 0]
    let x = Tensor::arange(0f32, 6., &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 2, 3))
        .unwrap();
    let y = norm::reflection_pad2d(&x, 1).unwrap();
    assert_eq!(
        values(&y),
        [
            4., 3., 4., 5., 4., 1., 0., 1., 2., 1., 4., 3., 4., 5., 4., 1., 0., 1., 2., 1.
        ]
    );
    assert!(norm::reflection_pad2d(&x, 2).is_err(), "p must be < H");
}

/// One place decides: CPU F32 tensors take the CPU kernels, other CPU dtypes
/// candle's ops, and CPU tensors take the formulations only while a test
/// asks (CUDA tensors take them unless switched off).
#[test]
fn path_selection() {
    let _on = switch_on();
    let x = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let x64 = x.to_dtype(DType::F64).unwrap();
    assert_eq!(path(&[&x]), Path::Cpu);
    assert_eq!(path(&[&x, &x64]), Path::Candle);
    {
        let _forced = formulations_on_cpu();
        assert_eq!(path(&[&x, &x64]), Path::Formulation);
    }
    assert_eq!(path(&[&x]), Path::Cpu, "the guard resets");
    assert!(
        gpu_formulations_enabled(),
        "on unless MELANOFLOW_GPU_OPS=candle"
    );
    set_gpu_formulations(false);
    assert!(!gpu_formulations_enabled());
    set_gpu_formulations(true);
    assert!(gpu_formulations_enabled());
}

/// `‖a − b‖ / ‖b‖`.
fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (values(a), values(b));
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm.max(1e-30)).sqrt()
}

/// Per variable name, the gradient of `loss(model)` with the kernels or,
/// when `formulations`, with every kernel call routed to the formulations.
fn model_grads(
    vm: &VarMap,
    loss: &dyn Fn() -> Result<Tensor>,
    formulations: bool,
) -> Vec<(String, Tensor)> {
    let _forced = formulations.then(formulations_on_cpu);
    let grads = loss().unwrap().backward().unwrap();
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|n| {
            grads
                .get(data[n].as_tensor())
                .map(|g| (n.clone(), g.clone()))
        })
        .collect()
}

/// Asserts that `got` gives every parameter `want`'s gradient to `tol`
/// relative L2, and that there are `at_least` of them. Gradients that are
/// zero in exact arithmetic (biases of convolutions followed by a norm, which
/// removes any per-channel shift) are rounding noise on both sides, below
/// 1e-5 of the largest gradient: those must merely stay that small.
fn assert_same_grads(
    model: &str,
    got: &[(String, Tensor)],
    want: &[(String, Tensor)],
    against: &str,
    tol: f64,
    at_least: usize,
) {
    assert!(want.len() >= at_least, "{model}: {} gradients", want.len());
    assert_eq!(got.len(), want.len(), "{model}: gradient count");
    let norm = |t: &Tensor| values(t).iter().map(|v| v * v).sum::<f64>().sqrt();
    let floor = 1e-5 * want.iter().map(|(_, k)| norm(k)).fold(0.0, f64::max);
    let mut compared = 0;
    for ((name, g), (want_name, k)) in got.iter().zip(want) {
        assert_eq!(name, want_name, "{model}");
        if norm(k) < floor {
            assert!(
                norm(g) < floor,
                "{model}: {name}: gradient {} where {against} has {} (zero in exact arithmetic)",
                norm(g),
                norm(k)
            );
            continue;
        }
        let e = rel_l2(g, k);
        assert!(
            e < tol,
            "{model}: {name}: relative L2 error {e:e} against {against}"
        );
        compared += 1;
    }
    assert!(
        compared >= at_least / 2,
        "{model}: only {compared} gradients compared"
    );
}

/// A CycleGAN generator (stem, down, residual blocks, transposed up, head)
/// and a PatchGAN discriminator, forward and backward, through the
/// formulations and through the CPU kernels.
#[test]
fn cyclegan_gradients_match_cpu_kernels() {
    let _on = switch_on();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let cfg = GeneratorConfig {
        ngf: 4,
        n_blocks: 2,
        upsample: Upsample::Transposed,
        slope: 0.2,
    };
    let g = Generator::new(&cfg, vb.pp("g")).unwrap();
    let d = Discriminator::new(
        &DiscriminatorConfig {
            ndf: 4,
            n_layers: 3,
        },
        vb.pp("d"),
    )
    .unwrap();
    crate::models::init::normal_init(&vm, 7, 0.3).unwrap();
    let x = random(&mut rng, &[2, 3, 32, 36]);
    let r = random(&mut rng, &[2, 3, 32, 36]);
    let loss = || {
        let y = g.forward(&x)?;
        y.mul(&r)?.sum_all()? + d.forward(&y)?.sqr()?.mean_all()?
    };
    let want = model_grads(&vm, &loss, false);
    let got = model_grads(&vm, &loss, true);
    // stem, 2 down, 2x2 block convs, 2 up, head; 5 discriminator convs; w + b each
    let params = 2 * (1 + 2 + 4 + 2 + 1 + 5);
    assert_same_grads(
        "cyclegan",
        &got,
        &want,
        "the CPU kernels",
        MODEL_TOL,
        params,
    );
}

/// EfficientNet-B0 in training mode (batch statistics) on a 96 px batch of
/// two: stem conv, depthwise and pointwise convs, BatchNorm, squeeze-excite,
/// against the CPU kernels and against candle's ops. This network's deepest
/// gradients (the squeeze-excite reductions) move by a few 1e-5 between any
/// two f32 summation orders: measured, at most 5.7e-5 against the kernels
/// (whose BatchNorm keeps f64 statistics) and 2.7e-5 against candle's ops
/// (the same BatchNorm and 1x1 convolutions as the formulations); at 64 px
/// candle's ops and the kernels differ by 1.7e-4 from each other.
#[test]
fn efficientnet_gradients_match_cpu_kernels_and_candle() {
    // Exclusive: the candle run turns the fast kernels off.
    let _switch = super::super::SWITCH
        .write()
        .unwrap_or_else(|e| e.into_inner());
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let vm = VarMap::new();
    let cfg = EfficientNetConfig {
        dropout: Some(0.0),
        stochastic_depth: 0.0,
        ..EfficientNetConfig::new(Variant::B0, 1)
    };
    let model =
        EfficientNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    init_weights(&vm, 3).unwrap();
    let x = random(&mut rng, &[2, 3, 96, 96]);
    let loss = || {
        let mut train = ChaCha8Rng::seed_from_u64(0);
        let logits = model.forward_t(&x, Some(&mut train))?;
        (logits * Tensor::new(&[[1f32], [-0.5]], &Device::Cpu)?)?.sum_all()
    };
    let kernels = model_grads(&vm, &loss, false);
    let got = model_grads(&vm, &loss, true);
    set_fast_kernels(false);
    let candle = model_grads(&vm, &loss, false);
    set_fast_kernels(true);
    let b0 = "efficientnet-b0";
    assert_same_grads(b0, &got, &kernels, "the CPU kernels", MODEL_TOL, 200);
    assert_same_grads(b0, &got, &candle, "candle's ops", MODEL_TOL, 200);
}
