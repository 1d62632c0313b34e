//! Fused BatchNorm + activation for candle on CPU, with its own backward.
//!
//! candle 0.11's `BatchNorm::forward_train` is a chain of ~10 generic ops
//! (transpose + contiguous copy, mean, broadcast_sub, sqr, mean, broadcast_div,
//! sqrt, mul, add, transpose back), followed by the activation, and backprop
//! walks the same chain in reverse; each step allocates and streams a full
//! activation-sized temporary. On CPU that, not the GEMMs, dominates an
//! EfficientNet training step. This module does the whole thing in two passes
//! over the data forward (statistics; `y`) and two backward (`Σg`, `Σg·xhat`;
//! `dx`), with no activation-sized temporaries besides the outputs.
//!
//! Math, per channel `c` over the `M = N·H·W` values of the batch:
//! * forward: `xhat = (x − μ)·invstd`, `invstd = 1/sqrt(σ² + eps)` with σ² the
//!   biased batch variance, `z = γ·xhat + β`, `y = act(z)`;
//! * backward, with `g = dy·act'(z)`: `dβ = Σg`, `dγ = Σ g·xhat`,
//!   `dx = γ·invstd·(g − dβ/M − xhat·dγ/M)` (training), `dx = γ·invstd·g` (eval).
//!
//! Promises:
//! * [`batch_norm_act_train`] and [`batch_norm_act_eval`] compute the same
//!   function as candle's BatchNorm (training resp. evaluation mode) followed by
//!   `silu()`, `clamp(0, 6)` or nothing, forward and first-order gradients with
//!   respect to `x`, `gamma` and `beta`, to f32 rounding (statistics are
//!   accumulated in f64, so they are usually *more* accurate than candle's; the
//!   mean is carried as an f32 hi+lo pair, so inputs with `|mean| ≫ std` keep
//!   their precision).
//! * The fast path is taken only on CPU with F32 tensors and while
//!   [`fast_kernels_enabled`](super::fast_kernels_enabled) is on
//!   (`kernels::path`); BF16/F16 CPU tensors take it in F32, the output
//!   rounded back; anything else (CUDA, Metal, F64, the switch off) computes
//!   the same thing with plain candle ops, which is also the GPU formulation
//!   (elementwise ops and reductions), and the reference. Half-precision
//!   inputs are normalised in F32 on every path, and their batch statistics
//!   are returned in F32.
//! * Gradients are first order: the backward op is not itself differentiable.
//!   In evaluation mode, when `mean` or `var` tracks a graph, the candle path is
//!   used so that their gradients exist too.
//! * Inputs may be `[N, C]`, `[N, C, H, W]` or any `[N, C, ...]`, in any
//!   layout (non-contiguous tensors are made contiguous); `gamma`, `beta`,
//!   `mean`, `var` must be `[C]`.
//! * Training mode needs `M ≥ 2` (as PyTorch does): the unbiased variance it
//!   returns is undefined for one value per channel.
//! * SiLU uses a polynomial `exp` (Cephes `expf`, ≤ ~2 ulp, inputs clamped to
//!   [−87, 88]), so the element loops vectorise; NaNs propagate through every
//!   activation. ReLU6's derivative is 1 inside (0, 6), 0 outside and ½ at
//!   exactly 0 or 6 — candle's `maximum`/`minimum` convention.
//!
//! Design: x is NCHW, so channel `c` is `N` blocks of `H·W` contiguous values
//! (one *plane* per `(n, c)`). Every pass runs over runs of whole planes in
//! parallel with rayon: reductions produce per-plane partial results (mean and
//! centred sum of squares, combined per channel with Chan's formula, or
//! `Σg, Σg·(x−μ)`), and element passes look up their plane's channel
//! coefficients. Inner loops are branch-free element loops (LLVM vectorises
//! them); on x86-64 they are compiled a second time with AVX2+FMA and picked at
//! run time.

use super::cpu::f32_values;
use std::mem::MaybeUninit;
use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::{Path, accumulation_dtype, path, widen};

mod planes;
use planes::*;

// The plane kernels, each compiled twice (with and without FMA) and picked
// at run time by the CPU (`dispatch!`, in kernels/mod.rs).
dispatch!(moments, moments_avx2, moments_impl, (x: &[f32], hw: usize, out: &mut [(f64, f64)]));
dispatch!(forward_planes, forward_planes_avx2, forward_impl, act,
    (x: &[f32], y: &mut [MaybeUninit<f32>], hw: usize, p0: usize, ch: Chan));
dispatch!(grad_sums, grad_sums_avx2, grad_sums_impl, act,
    (x: &[f32], dy: &[f32], hw: usize, p0: usize, ch: Chan, out: &mut [(f64, f64)]));
dispatch!(grad_input_planes, grad_input_planes_avx2, grad_input_impl, act,
    (x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>], hw: usize, p0: usize, ch: Chan, k: &[(f32, f32)]));

/// `$f::<ACT>(args)` for the runtime activation `$act`.
macro_rules! with_act {
    ($act:expr, $f:ident($($arg:expr),*)) => {
        match $act {
            Act::Identity => $f::<IDENTITY>($($arg),*),
            Act::Silu => $f::<SILU>($($arg),*),
            Act::Relu6 => $f::<RELU6>($($arg),*),
            Act::LeakyRelu(_) => $f::<LEAKY>($($arg),*),
        }
    };
}

/// The activation applied after the affine transform.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    Identity,
    /// `z·sigmoid(z)` (candle's `silu`).
    Silu,
    /// `min(max(z, 0), 6)` (candle's `clamp(0, 6)`).
    Relu6,
    /// `max(z, slope·z)` for a slope in [0, 1) (the CycleGAN's LeakyReLU,
    /// `layers::leaky_relu`); its derivative is 1 above 0, `slope` below and
    /// `(1 + slope)/2` at exactly 0, candle's `maximum` convention.
    LeakyRelu(f32),
}

impl Act {
    /// The activation as candle ops (the fallback path).
    fn apply_candle(self, z: &Tensor) -> Result<Tensor> {
        match self {
            Act::Identity => Ok(z.clone()),
            Act::Silu => z.silu(),
            Act::Relu6 => z.clamp(0f32, 6f32),
            Act::LeakyRelu(slope) => z.maximum(&(z * slope as f64)?),
        }
    }
}

/// Training mode: normalises x [N, C, H, W] (or [N, C]) with the batch's per-channel mean and biased variance
/// over (N, H, W), then y = act(gamma * xhat + beta). Returns y and the batch mean and *unbiased* variance
/// (what PyTorch folds into running_var), each [C], detached.
///
/// `mean` and `var` are in x's [`accumulation_dtype`] (F32 for BF16/F16 x: statistics stay F32). Errors when a
/// channel has fewer than two values (`N·H·W < 2`).
pub fn batch_norm_act_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    act: Act,
) -> Result<(Tensor, Tensor, Tensor)> {
    let what = "batch_norm_act_train";
    let g = Geom::new(x.dims(), what)?;
    check_channel_params(what, g.c, &[("gamma", gamma), ("beta", beta)])?;
    if g.m() < 2 {
        bail!(
            "{what}: need more than one value per channel when training, got input {:?}",
            x.dims()
        );
    }
    match path(&[x, gamma, beta]) {
        Path::Cpu => {}
        Path::Widened => {
            let (y, mean, var) =
                batch_norm_act_train(&widen(x)?, &widen(gamma)?, &widen(beta)?, eps, act)?;
            return Ok((y.to_dtype(x.dtype())?, mean, var));
        }
        Path::Formulation | Path::Candle => return train_candle(x, gamma, beta, eps, act, &g),
    }
    let saved = Arc::new(OnceLock::new());
    let op = BnAct {
        act,
        mode: Mode::Train { eps },
        saved: Arc::clone(&saved),
    };
    // `contiguous` is a no-op (same tensor, same graph node) when the layout
    // already is; otherwise a differentiable copy, so both the forward and the
    // backward read plain slices.
    let y = x.contiguous()?.apply_op3(gamma, beta, op)?;
    let Some(s) = saved.get() else {
        bail!("{what}: forward kernel did not record its statistics");
    };
    let mean = Tensor::from_vec(s.mean_hi.clone(), g.c, x.device())?;
    let var = Tensor::from_vec(s.var_unbiased.clone(), g.c, x.device())?;
    Ok((y, mean, var))
}

/// Evaluation mode with given running statistics: y = act(gamma * (x - mean) / sqrt(var + eps) + beta).
///
/// Differentiable (first order) with respect to x, gamma and beta; also with respect to `mean` and
/// `var` when they track a graph (that case takes the candle path).
pub fn batch_norm_act_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    act: Act,
) -> Result<Tensor> {
    let what = "batch_norm_act_eval";
    let g = Geom::new(x.dims(), what)?;
    let params = [
        ("gamma", gamma),
        ("beta", beta),
        ("mean", mean),
        ("var", var),
    ];
    check_channel_params(what, g.c, &params)?;
    // Running statistics are buffers; the fused backward has no gradient for
    // them, so a graph through them needs candle's ops.
    match path(&[x, gamma, beta, mean, var]) {
        _ if mean.track_op() || var.track_op() => {
            return eval_candle(x, gamma, beta, mean, var, eps, act, &g);
        }
        Path::Cpu => {}
        Path::Widened => {
            let [gamma, beta, mean, var] = [gamma, beta, mean, var].map(widen);
            return batch_norm_act_eval(&widen(x)?, &gamma?, &beta?, &mean?, &var?, eps, act)?
                .to_dtype(x.dtype());
        }
        Path::Formulation | Path::Candle => {
            return eval_candle(x, gamma, beta, mean, var, eps, act, &g);
        }
    }
    let mean = mean.to_vec1::<f32>()?;
    let invstd = var
        .to_vec1::<f32>()?
        .iter()
        .map(|&v| 1.0 / (v as f64 + eps).sqrt())
        .collect();
    let op = BnAct {
        act,
        mode: Mode::Eval { mean, invstd },
        saved: Arc::new(OnceLock::new()),
    };
    x.contiguous()?.apply_op3(gamma, beta, op)
}

fn check_channel_params(what: &str, c: usize, params: &[(&str, &Tensor)]) -> Result<()> {
    for (name, t) in params {
        if t.dims() != [c] {
            bail!(
                "{what}: {name} must be [{c}] (one value per channel), got {:?}",
                t.dims()
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// candle-op path (other devices and dtypes, or the switch off)
// ---------------------------------------------------------------------------

/// `[1, C, 1, ...]`: a per-channel vector shaped to broadcast against x.
fn per_channel(t: &Tensor, rank: usize, c: usize, dtype: DType) -> Result<Tensor> {
    let mut dims = vec![1; rank];
    dims[1] = c;
    t.to_dtype(dtype)?.reshape(dims)
}

fn train_candle(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    act: Act,
    g: &Geom,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (dtype, rank) = (x.dtype(), x.rank());
    // In F32 for half-precision x, as candle_nn does.
    let dt = accumulation_dtype(dtype);
    let xi = x.to_dtype(dt)?;
    let reduce: Vec<usize> = (0..rank).filter(|&d| d != 1).collect();
    let mean = xi.mean_keepdim(reduce.as_slice())?;
    let xc = xi.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(reduce.as_slice())?;
    let xhat = xc.broadcast_div(&(&var + eps)?.sqrt()?)?;
    let z = xhat
        .broadcast_mul(&per_channel(gamma, rank, g.c, dt)?)?
        .broadcast_add(&per_channel(beta, rank, g.c, dt)?)?;
    let y = act.apply_candle(&z)?.to_dtype(dtype)?;
    let m = g.m() as f64;
    let mean = mean.flatten_all()?.detach();
    let var = (var.flatten_all()?.detach() * (m / (m - 1.0)))?;
    Ok((y, mean, var))
}

#[allow(clippy::too_many_arguments)]
fn eval_candle(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    act: Act,
    g: &Geom,
) -> Result<Tensor> {
    let (dtype, rank) = (x.dtype(), x.rank());
    let dt = accumulation_dtype(dtype);
    let std = (per_channel(var, rank, g.c, dt)? + eps)?.sqrt()?;
    let z = x
        .to_dtype(dt)?
        .broadcast_sub(&per_channel(mean, rank, g.c, dt)?)?
        .broadcast_div(&std)?
        .broadcast_mul(&per_channel(gamma, rank, g.c, dt)?)?
        .broadcast_add(&per_channel(beta, rank, g.c, dt)?)?;
    act.apply_candle(&z)?.to_dtype(dtype)
}

// ---------------------------------------------------------------------------
// Geometry and per-channel state
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    c: usize,
    /// Values per plane: the product of the dims after C (1 for `[N, C]`).
    hw: usize,
}

impl Geom {
    fn new(dims: &[usize], what: &str) -> Result<Self> {
        if dims.len() < 2 {
            bail!("{what}: input must be [N, C, ...], got {dims:?}");
        }
        Ok(Self {
            n: dims[0],
            c: dims[1],
            hw: dims[2..].iter().product(),
        })
    }

    /// Values per channel.
    fn m(&self) -> usize {
        self.n * self.hw
    }

    fn planes(&self) -> usize {
        self.n * self.c
    }

    fn is_empty(&self) -> bool {
        self.planes() * self.hw == 0
    }

    /// Planes per rayon task: enough that a task streams ~16K values, so tiny
    /// planes (4x4 late in EfficientNet, 1x1 for `[N, C]`) don't pay per-task
    /// overhead, while large tensors still split into many tasks.
    fn planes_per_task(&self) -> usize {
        (TASK_ELEMS / self.hw.max(1)).max(1)
    }
}

const TASK_ELEMS: usize = 1 << 14;

/// What the forward computed per channel, kept for the backward.
struct Saved {
    /// The mean as `hi + lo` (both f32): `(x − hi) − lo` is exact-ish even when
    /// `|μ| ≫ σ`, where a single f32 μ would cost `ulp(μ)/σ` of precision.
    mean_hi: Vec<f32>,
    mean_lo: Vec<f32>,
    invstd: Vec<f64>,
    /// `γ·invstd`, the slope from `x − μ` to `z`.
    a: Vec<f32>,
    beta: Vec<f32>,
    /// Training only (empty in eval mode): `Σ(x−μ)²/(M−1)`.
    var_unbiased: Vec<f32>,
}

impl Saved {
    fn chan(&self, act: Act) -> Chan<'_> {
        Chan {
            mean_hi: &self.mean_hi,
            mean_lo: &self.mean_lo,
            a: &self.a,
            beta: &self.beta,
            slope: match act {
                Act::LeakyRelu(slope) => slope,
                _ => 0.0,
            },
        }
    }
}

/// Per-channel coefficients the element kernels read, each `[C]`.
#[derive(Clone, Copy)]
struct Chan<'a> {
    mean_hi: &'a [f32],
    mean_lo: &'a [f32],
    a: &'a [f32],
    beta: &'a [f32],
    /// [`Act::LeakyRelu`]'s slope (unused by the other activations).
    slope: f32,
}

// ---------------------------------------------------------------------------
// Whole-tensor drivers (rayon over runs of planes)
// ---------------------------------------------------------------------------

/// Per-channel `(mean, invstd, unbiased var)` of x, from per-plane moments.
fn batch_stats(g: &Geom, x: &[f32], eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f32>) {
    let mut planes = vec![(0f64, 0f64); g.planes()];
    if !g.is_empty() {
        let ppt = g.planes_per_task();
        planes
            .par_chunks_mut(ppt)
            .zip(x.par_chunks(ppt * g.hw))
            .for_each(|(out, xs)| moments(xs, g.hw, out));
    }
    let (m, hw) = (g.m() as f64, g.hw as f64);
    let mut mean = Vec::with_capacity(g.c);
    let mut invstd = Vec::with_capacity(g.c);
    let mut var_unbiased = Vec::with_capacity(g.c);
    for k in 0..g.c {
        let chan = || (0..g.n).map(|n| planes[n * g.c + k]);
        // Equal-size groups: the mean is the mean of plane means, and
        // Σ(x−μ)² = Σ_planes [m2_p + hw·(μ_p − μ)²] (Chan et al.).
        let mu = chan().map(|(mp, _)| mp).sum::<f64>() / g.n as f64;
        let m2 = chan()
            .map(|(mp, m2p)| m2p + hw * (mp - mu) * (mp - mu))
            .sum::<f64>();
        mean.push(mu);
        invstd.push(1.0 / (m2 / m + eps).sqrt());
        var_unbiased.push((m2 / (m - 1.0)) as f32);
    }
    (mean, invstd, var_unbiased)
}

/// A `len`-value output written in full by `fill` (each element exactly once),
/// without zeroing it first: a zeroing pass would be one more full write of an
/// activation-sized buffer (allocators often hand back recycled memory, so
/// `vec![0.0; len]` is a real memset).
fn filled(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: `fill` initialised all `len` values. Callers pass a buffer of
    // `planes·hw` values split into runs of whole planes, and the plane
    // kernels write every value of every plane they are given.
    unsafe { v.set_len(len) };
    v
}

fn forward(g: &Geom, x: &[f32], s: &Saved, act: Act) -> Vec<f32> {
    let (ppt, ch) = (g.planes_per_task(), s.chan(act));
    filled(x.len(), |y| {
        if g.is_empty() {
            return;
        }
        y.par_chunks_mut(ppt * g.hw)
            .zip(x.par_chunks(ppt * g.hw))
            .enumerate()
            .for_each(|(t, (ys, xs))| with_act!(act, forward_planes(xs, ys, g.hw, t * ppt, ch)));
    })
}

/// Per-channel `(Σg, Σg·(x−μ))`.
fn channel_grad_sums(g: &Geom, x: &[f32], dy: &[f32], s: &Saved, act: Act) -> Vec<(f64, f64)> {
    let mut planes = vec![(0f64, 0f64); g.planes()];
    if !g.is_empty() {
        let (ppt, ch) = (g.planes_per_task(), s.chan(act));
        let runs = planes
            .par_chunks_mut(ppt)
            .zip(x.par_chunks(ppt * g.hw))
            .zip(dy.par_chunks(ppt * g.hw));
        runs.enumerate().for_each(|(t, ((out, xs), ds))| {
            with_act!(act, grad_sums(xs, ds, g.hw, t * ppt, ch, out))
        });
    }
    (0..g.c)
        .map(|k| {
            (0..g.n)
                .map(|n| planes[n * g.c + k])
                .fold((0.0, 0.0), |(a, b), (pa, pb)| (a + pa, b + pb))
        })
        .collect()
}

fn grad_input(g: &Geom, x: &[f32], dy: &[f32], s: &Saved, k: &[(f32, f32)], act: Act) -> Vec<f32> {
    let (ppt, ch) = (g.planes_per_task(), s.chan(act));
    filled(x.len(), |dx| {
        if g.is_empty() {
            return;
        }
        let runs = dx
            .par_chunks_mut(ppt * g.hw)
            .zip(x.par_chunks(ppt * g.hw))
            .zip(dy.par_chunks(ppt * g.hw));
        runs.enumerate().for_each(|(t, ((dxs, xs), ds))| {
            with_act!(act, grad_input_planes(xs, ds, dxs, g.hw, t * ppt, ch, k))
        });
    })
}

// ---------------------------------------------------------------------------
// candle custom ops
// ---------------------------------------------------------------------------

enum Mode {
    /// Batch statistics, computed by the forward.
    Train { eps: f64 },
    /// Given statistics: `mean` and `1/sqrt(var + eps)` per channel.
    Eval { mean: Vec<f32>, invstd: Vec<f64> },
}

/// Forward op over (x, gamma, beta). `saved` is shared with the caller (who
/// reads the batch statistics) and, through candle's graph, with `bwd`.
struct BnAct {
    act: Act,
    mode: Mode,
    saved: Arc<OnceLock<Saved>>,
}

impl CustomOp3 for BnAct {
    fn name(&self) -> &'static str {
        "batch-norm-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), self.name())?;
        let (gamma, beta) = (f32_values(s2, l2)?, f32_values(s3, l3)?);
        if gamma.len() != g.c || beta.len() != g.c {
            bail!("batch-norm-act: gamma and beta must have {} values", g.c);
        }
        if self.saved.get().is_some() {
            bail!("batch-norm-act: op instance already ran (its statistics belong to that run)");
        }
        let x = f32_values(s1, l1)?;
        let (mean, invstd, var_unbiased) = match &self.mode {
            Mode::Train { eps } => {
                if g.m() < 2 {
                    bail!(
                        "batch-norm-act: need more than one value per channel, got {:?}",
                        l1.dims()
                    );
                }
                batch_stats(&g, &x, *eps)
            }
            Mode::Eval { mean, invstd } => (
                mean.iter().map(|&v| v as f64).collect(),
                invstd.clone(),
                Vec::new(),
            ),
        };
        if mean.len() != g.c {
            bail!(
                "batch-norm-act: statistics for {} channels, input has {}",
                mean.len(),
                g.c
            );
        }
        let mean_hi: Vec<f32> = mean.iter().map(|&v| v as f32).collect();
        let saved = Saved {
            mean_lo: mean
                .iter()
                .zip(&mean_hi)
                .map(|(&v, &h)| (v - h as f64) as f32)
                .collect(),
            mean_hi,
            a: gamma
                .iter()
                .zip(&invstd)
                .map(|(&gm, &i)| (gm as f64 * i) as f32)
                .collect(),
            beta: beta.to_vec(),
            invstd,
            var_unbiased,
        };
        let y = forward(&g, &x, &saved, self.act);
        // Cannot fail: checked empty above, and candle runs an op's forward once.
        let _ = self.saved.set(saved);
        Ok((CpuStorage::F32(y), Shape::from(l1.dims())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(saved) = self.saved.get() else {
            bail!("batch-norm-act: backward without a forward");
        };
        let (want_dx, want_dgamma, want_dbeta) = (x.track_op(), gamma.track_op(), beta.track_op());
        let op = BnActGrad {
            act: self.act,
            train: matches!(self.mode, Mode::Train { .. }),
            want_dx,
            want_params: want_dgamma || want_dbeta,
            saved,
            params: OnceLock::new(),
        };
        // An op2 (not a direct storage read) so candle takes the storage
        // locks the way it does for any op.
        let dx = x.apply_op2_no_bwd(grad_res, &op)?;
        let dx = want_dx.then_some(dx);
        let (dgamma, dbeta) = match op.params.into_inner() {
            Some((dg, db)) if op.want_params => {
                let c = dg.len();
                let dg = want_dgamma
                    .then(|| Tensor::from_vec(dg, c, x.device()))
                    .transpose()?;
                let db = want_dbeta
                    .then(|| Tensor::from_vec(db, c, x.device()))
                    .transpose()?;
                (dg, db)
            }
            _ => (None, None),
        };
        Ok((dx, dgamma, dbeta))
    }
}

/// Backward op over (x, dy): returns dx (an empty tensor when x needs no
/// gradient) and leaves `(dgamma, dbeta)` in `params`.
struct BnActGrad<'a> {
    act: Act,
    train: bool,
    want_dx: bool,
    want_params: bool,
    saved: &'a Saved,
    params: OnceLock<(Vec<f32>, Vec<f32>)>,
}

impl CustomOp2 for BnActGrad<'_> {
    fn name(&self) -> &'static str {
        "batch-norm-act-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), self.name())?;
        if l2.dims() != l1.dims() {
            bail!(
                "batch-norm-act: output gradient is {:?}, expected {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let s = self.saved;
        let (x, dy) = (f32_values(s1, l1)?, f32_values(s2, l2)?);
        // Training's dx needs the sums; eval's needs them only for dγ, dβ.
        let sums = if self.train || self.want_params {
            channel_grad_sums(&g, &x, &dy, s, self.act)
        } else {
            Vec::new()
        };
        let m = g.m() as f64;
        let k: Vec<(f32, f32)> = if self.train {
            sums.iter()
                .enumerate()
                .map(|(j, &(sg, sgd))| {
                    let (a, inv) = (s.a[j] as f64, s.invstd[j]);
                    ((a * sg / m) as f32, (a * inv * inv * sgd / m) as f32)
                })
                .collect()
        } else {
            vec![(0.0, 0.0); g.c]
        };
        let dgamma = sums
            .iter()
            .zip(&s.invstd)
            .map(|(&(_, sgd), &inv)| (sgd * inv) as f32)
            .collect();
        let dbeta = sums.iter().map(|&(sg, _)| sg as f32).collect();
        let _ = self.params.set((dgamma, dbeta));
        if !self.want_dx {
            return Ok((CpuStorage::F32(Vec::new()), Shape::from(0)));
        }
        let dx = grad_input(&g, &x, &dy, s, &k, self.act);
        Ok((CpuStorage::F32(dx), Shape::from(l1.dims())))
    }
}

#[cfg(test)]
mod tests;
