//! Fast depthwise 2-D convolution for candle on CPU.
//!
//! candle 0.11 runs a grouped convolution with `groups == channels` as one
//! convolution per channel followed by a `cat`, and its input gradient goes
//! through a direct-loop `conv_transpose2d`; for EfficientNet's depthwise
//! layers that is ~10x (forward) to ~100x (backward) slower than PyTorch on
//! the same cores. This module replaces it with three direct kernels, wrapped
//! as candle custom ops so autograd works as usual:
//!
//! * forward:         `y[n,c] = x[n,c] ⋆ w[c]` (cross-correlation, stride `s`, zero padding `p`),
//! * input gradient:  the transposed convolution of `dy[n,c]` with `w[c]`,
//! * weight gradient: `dw[c] = Σ_n x[n,c] ⋆ dy[n,c]`.
//!
//! Promises:
//! * [`depthwise_conv2d`] computes the same function as candle's
//!   `x.conv2d(w, padding, stride, 1, C)` (NCHW, weight `[C, 1, Kh, Kw]`, no
//!   bias, output `(H + 2p - K)/s + 1`), forward and both gradients, to f32
//!   rounding (summation order differs, and FMA is used where the CPU has it).
//! * The fast path is taken only on CPU with F32 input and weight and while
//!   [`fast_kernels_enabled`]; CUDA tensors take `gpu::depthwise`'s
//!   formulation, anything else (Metal, F64, or the switch turned off)
//!   candle's own op (`kernels::path` decides). BF16/F16 tensors compute in
//!   F32, the result rounded back, on every device.
//! * Gradients are first order: the backward ops are not themselves
//!   differentiable (no double backward through this op).
//! * Any input layout is accepted (non-contiguous tensors are made contiguous).
//! * Unlike candle 0.11's conv2d backward, which takes the transposed conv's
//!   `output_padding` from the height alone and fails for e.g. 8x7 inputs at
//!   stride 2, every shape the forward accepts has gradients.
//!
//! Design: kernels work one `(n, c)` plane at a time (the weight gradient: one
//! channel, summing over `n` inside the task), in parallel with rayon. The
//! input plane is first copied into a zero-padded, *stride-phased* scratch
//! buffer: padded row `r` is stored as `s` sub-rows, sub-row `φ` holding padded
//! columns `φ, φ+s, φ+2s, …`. Output column `ox` at tap `kx` reads padded
//! column `s·ox + kx`, which is element `ox + kx/s` of sub-row `kx % s` — so
//! for any stride, one tap over a run of output columns reads a contiguous
//! run of the buffer, with no edge tests. The forward and weight-gradient
//! loops keep a strip of 8–32 output columns' sums in registers across taps
//! (resp. rows), so LLVM emits plain vector FMAs; on x86-64 they are compiled
//! a second time with AVX2+FMA and picked at run time. The input gradient is
//! the forward kernel on `dy` with the flipped kernel for stride 1, and a
//! scatter into the phased layout otherwise.

use super::cpu::{dims4, f32_values};
use std::borrow::Cow;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::{Path, accumulation_dtype, gpu, path, widen};
pub use super::{fast_kernels_enabled, set_fast_kernels};

/// y = depthwise_conv2d(x [N,C,H,W], w [C,1,K,K]) with stride and symmetric zero padding, no bias.
///
/// Non-square kernels `[C,1,Kh,Kw]` work too. Output `[N, C, (H+2p-Kh)/s+1, (W+2p-Kw)/s+1]`.
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let widened = || depthwise_conv2d(&widen(x)?, &widen(w)?, stride, padding)?.to_dtype(x.dtype());
    match path(&[x, w]) {
        Path::Cpu => {}
        // Half precision computes in F32 on CUDA too: the formulation's tap
        // sums and its weight gradient (a sum over N·Ho·Wo) are elementwise
        // adds and candle reductions, which would add in BF16.
        Path::Formulation if x.dtype() != accumulation_dtype(x.dtype()) => return widened(),
        Path::Formulation => return gpu::depthwise::depthwise_conv2d(x, w, stride, padding),
        Path::Candle => return x.conv2d(w, padding, stride, 1, c),
        Path::Widened => return widened(),
    }
    // `contiguous` is a no-op (same tensor, same gradient node) when the
    // layout already is; otherwise it is a differentiable copy.
    x.contiguous()?
        .apply_op2(&w.contiguous()?, DepthwiseConv { stride, padding })
}

// ---------------------------------------------------------------------------
// Geometry and the phased scratch layout
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    s: usize,
    p: usize,
    ho: usize,
    wo: usize,
    /// Padded height `h + 2p`.
    hp: usize,
    /// Length of one phase sub-row: `ceil((w + 2p) / s)`.
    l: usize,
    /// Scratch offset between consecutive output rows: `s` padded rows.
    row_step: usize,
    /// Per tap `ky*kw+kx`: scratch offset of its first value for output row 0.
    /// Precomputed because `kx / s` and `kx % s` with a run-time `s` are
    /// integer divisions, far costlier than the few FMAs per tap.
    taps: Vec<usize>,
    /// Largest entry of `taps`.
    max_tap: usize,
}

impl Geom {
    fn new(
        (n, c, h, w): (usize, usize, usize, usize),
        (kh, kw): (usize, usize),
        s: usize,
        p: usize,
    ) -> Result<Self> {
        if s == 0 {
            bail!("depthwise_conv2d: stride must be >= 1");
        }
        if kh == 0 || kw == 0 || h == 0 || w == 0 {
            bail!("depthwise_conv2d: empty kernel {kh}x{kw} or input {h}x{w}");
        }
        let (hp, wp) = (h + 2 * p, w + 2 * p);
        if hp < kh || wp < kw {
            bail!("depthwise_conv2d: kernel {kh}x{kw} larger than padded input {hp}x{wp}");
        }
        let l = wp.div_ceil(s);
        // Tap (ky, kx) of output column ox reads padded (s·oy+ky, s·ox+kx):
        // sub-row kx % s of padded row s·oy+ky, element ox + kx / s. In
        // bounds: the last value read, padded column s(wo-1)+kx <= w+2p-1,
        // is sub-row element < l.
        let taps: Vec<usize> = (0..kh)
            .flat_map(|ky| (0..kw).map(move |kx| (ky * s + kx % s) * l + kx / s))
            .collect();
        let max_tap = taps.iter().copied().max().unwrap_or(0);
        Ok(Self {
            n,
            c,
            h,
            w,
            kh,
            kw,
            s,
            p,
            ho: (hp - kh) / s + 1,
            wo: (wp - kw) / s + 1,
            hp,
            l,
            row_step: s * s * l,
            taps,
            max_tap,
        })
    }

    /// Size of the phased scratch plane.
    fn buf_len(&self) -> usize {
        self.hp * self.s * self.l
    }

    /// For phase `ph` of a padded row: the first input column that lands in it,
    /// the sub-row element it lands on, and how many input columns land in it.
    #[inline(always)]
    fn phase_span(&self, ph: usize) -> (usize, usize, usize) {
        let s = self.s;
        let ix0 = (ph + s - self.p % s) % s;
        let j0 = (ix0 + self.p) / s;
        let count = if ix0 < self.w {
            (self.w - ix0).div_ceil(s)
        } else {
            0
        };
        (ix0, j0, count)
    }

    /// Offset of the first sub-row of input row `iy` (padded row `iy + p`).
    #[inline(always)]
    fn row_offset(&self, iy: usize) -> usize {
        (iy + self.p) * self.s * self.l
    }
}

/// For stride 2, the parts of one padded row's two sub-rows (`row2`, length
/// `2l`) that hold the even and the odd input columns, each starting at input
/// column 0 resp. 1.
fn stride2_phases<'a>(g: &Geom, row2: &'a mut [f32]) -> (&'a mut [f32], &'a mut [f32]) {
    let (p0, p1) = row2.split_at_mut(g.l);
    // Even input columns land in phase p % 2.
    let (pe, po) = if g.p.is_multiple_of(2) {
        (p0, p1)
    } else {
        (p1, p0)
    };
    (
        &mut pe[g.phase_span(g.p % 2).1..],
        &mut po[g.phase_span(1 - g.p % 2).1..],
    )
}

fn stride2_phases_ref<'a>(g: &Geom, row2: &'a [f32]) -> (&'a [f32], &'a [f32]) {
    let (p0, p1) = row2.split_at(g.l);
    let (pe, po) = if g.p.is_multiple_of(2) {
        (p0, p1)
    } else {
        (p1, p0)
    };
    (
        &pe[g.phase_span(g.p % 2).1..],
        &po[g.phase_span(1 - g.p % 2).1..],
    )
}

/// Copies an input plane `[h, w]` into the interior of a phased scratch plane.
/// Only interior cells are written, so padding cells keep whatever they held —
/// zero, if the buffer was zeroed once when allocated.
fn fill_phased(g: &Geom, src: &[f32], buf: &mut [f32]) {
    for (iy, row) in src.chunks_exact(g.w).enumerate() {
        let base = g.row_offset(iy);
        if g.s == 1 {
            buf[base + g.p..base + g.p + g.w].copy_from_slice(row);
            continue;
        }
        if g.s == 2 {
            let (even, odd) = stride2_phases(g, &mut buf[base..base + 2 * g.l]);
            let pairs = g.w / 2;
            // Fixed-length slices and plain indexing: LLVM turns this into
            // vector loads + shuffles (the generic step_by loop stays scalar).
            if g.w % 2 == 1 {
                even[pairs] = row[g.w - 1];
            }
            let (row2, even, odd) = (&row[..2 * pairs], &mut even[..pairs], &mut odd[..pairs]);
            for k in 0..pairs {
                even[k] = row2[2 * k];
                odd[k] = row2[2 * k + 1];
            }
            continue;
        }
        for ph in 0..g.s {
            let (ix0, j0, count) = g.phase_span(ph);
            let dst = &mut buf[base + ph * g.l + j0..][..count];
            for (d, &v) in dst.iter_mut().zip(row[ix0..].iter().step_by(g.s)) {
                *d = v;
            }
        }
    }
}

/// Inverse of [`fill_phased`]: reads the interior of a phased plane into `[h, w]`.
fn extract_phased(g: &Geom, buf: &[f32], dst: &mut [f32]) {
    for (iy, row) in dst.chunks_exact_mut(g.w).enumerate() {
        let base = g.row_offset(iy);
        if g.s == 1 {
            row.copy_from_slice(&buf[base + g.p..base + g.p + g.w]);
            continue;
        }
        if g.s == 2 {
            let (even, odd) = stride2_phases_ref(g, &buf[base..base + 2 * g.l]);
            let pairs = g.w / 2;
            if g.w % 2 == 1 {
                row[g.w - 1] = even[pairs];
            }
            let (row2, even, odd) = (&mut row[..2 * pairs], &even[..pairs], &odd[..pairs]);
            for k in 0..pairs {
                row2[2 * k] = even[k];
                row2[2 * k + 1] = odd[k];
            }
            continue;
        }
        for ph in 0..g.s {
            let (ix0, j0, count) = g.phase_span(ph);
            let src = &buf[base + ph * g.l + j0..][..count];
            for (d, &v) in row[ix0..].iter_mut().step_by(g.s).zip(src) {
                *d = v;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Inner kernels. Generic over FMA so the same source is compiled once for the
// baseline target and once inside `#[target_feature(enable = "avx2,fma")]`
// wrappers (`#[inline(always)]` lets the wide instructions reach the loops).
// ---------------------------------------------------------------------------

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    // `mul_add` is a single instruction only where FMA is enabled; elsewhere it
    // would call libm's `fmaf`, so the baseline build keeps mul + add.
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `v[at..at + B]` as an array, without a bounds check.
///
/// The register-blocked loops below do one or two strip loads per vector FMA;
/// per-access bounds checks (compares, branches and the register pressure they
/// add) made the weight-gradient loop ~1.4x slower. Each caller asserts once,
/// up front, that every index it will use is in bounds.
///
/// # Safety
/// `at + B <= v.len()`.
#[inline(always)]
unsafe fn strip<const B: usize>(v: &[f32], at: usize) -> &[f32; B] {
    debug_assert!(at + B <= v.len());
    // SAFETY: in bounds per the contract; [f32; B] has f32's alignment.
    unsafe { &*(v.as_ptr().add(at) as *const [f32; B]) }
}

/// `out[i] += a * x[i]`.
#[inline(always)]
fn axpy<const FMA: bool>(out: &mut [f32], a: f32, x: &[f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = madd::<FMA>(a, v, *o);
    }
}

/// Forward for output columns `x0..x0+B` of row `oy`: the `B` sums stay in
/// registers across all taps (one load + one FMA per tap and column), instead
/// of reloading and storing the output row once per tap. Taps alternate
/// between `U` accumulator sets so that `U·B/8` independent FMA chains hide
/// the FMA latency.
#[inline(always)]
fn fwd_strip<const FMA: bool, const B: usize, const U: usize>(
    g: &Geom,
    buf: &[f32],
    wk: &[f32],
    oy: usize,
    x0: usize,
    orow: &mut [f32],
) {
    let mut acc = [[0f32; B]; U];
    let base = oy * g.row_step + x0;
    // Every read below is `buf[base + t..][..B]` with `t <= max_tap`.
    assert!(base + g.max_tap + B <= buf.len());
    let (wk, taps) = (&wk[..g.taps.len()], &g.taps[..]);
    let full = taps.len() / U * U;
    for (wu, tu) in wk[..full].chunks_exact(U).zip(taps[..full].chunks_exact(U)) {
        for u in 0..U {
            // SAFETY: asserted above.
            let src = unsafe { strip::<B>(buf, base + tu[u]) };
            for i in 0..B {
                acc[u][i] = madd::<FMA>(wu[u], src[i], acc[u][i]);
            }
        }
    }
    for (u, (&wv, &t)) in wk[full..].iter().zip(&taps[full..]).enumerate() {
        // SAFETY: asserted above.
        let src = unsafe { strip::<B>(buf, base + t) };
        for i in 0..B {
            acc[u][i] = madd::<FMA>(wv, src[i], acc[u][i]);
        }
    }
    let out: &mut [f32; B] = (&mut orow[x0..x0 + B]).try_into().unwrap();
    *out = acc[0];
    for a in &acc[1..] {
        for i in 0..B {
            out[i] += a[i];
        }
    }
}

/// Forward for row `oy` in strips of width `B` (needs `wo >= B`). The last
/// strip is shifted left to end at `wo`, overlapping the previous one:
/// recomputing a few outputs is cheaper than a scalar tail. (A plain loop, not
/// a helper taking a closure: such a closure is compiled without the AVX2/FMA
/// features of the wrapper it ends up in, and there `mul_add` became a libm
/// call — 15x slower.)
#[inline(always)]
fn fwd_row<const FMA: bool, const B: usize, const U: usize>(
    g: &Geom,
    buf: &[f32],
    wk: &[f32],
    oy: usize,
    orow: &mut [f32],
) {
    let mut x0 = 0;
    while x0 + B <= g.wo {
        fwd_strip::<FMA, B, U>(g, buf, wk, oy, x0, orow);
        x0 += B;
    }
    if x0 < g.wo {
        fwd_strip::<FMA, B, U>(g, buf, wk, oy, g.wo - B, orow);
    }
}

/// Forward for one plane: `buf` holds the phased input, `wk` the `kh*kw` taps.
#[inline(always)]
fn fwd_plane_impl<const FMA: bool>(g: &Geom, buf: &[f32], wk: &[f32], out: &mut [f32]) {
    for (oy, orow) in out.chunks_exact_mut(g.wo).enumerate() {
        match g.wo {
            // 8 independent FMA chains (of 8 lanes) in each case.
            32.. => fwd_row::<FMA, 32, 2>(g, buf, wk, oy, orow),
            16.. => fwd_row::<FMA, 16, 4>(g, buf, wk, oy, orow),
            8.. => fwd_row::<FMA, 8, 4>(g, buf, wk, oy, orow),
            _ => {
                orow.fill(0.0);
                for (&wv, &t) in wk.iter().zip(&g.taps) {
                    axpy::<FMA>(orow, wv, &buf[oy * g.row_step + t..][..g.wo]);
                }
            }
        }
    }
}

/// Input gradient for one plane, scattered into a phased buffer `buf`
/// (zeroed here): output `(oy, ox)` fed padded input `(s·oy+ky, s·ox+kx)` with
/// weight `w[ky,kx]`, so it sends `w[ky,kx]·dy[oy,ox]` back to the same cell.
#[inline(always)]
fn grad_input_plane_impl<const FMA: bool>(g: &Geom, gy: &[f32], wk: &[f32], buf: &mut [f32]) {
    buf.fill(0.0);
    for (oy, grow) in gy.chunks_exact(g.wo).enumerate() {
        for (&wv, &t) in wk.iter().zip(&g.taps) {
            axpy::<FMA>(&mut buf[oy * g.row_step + t..][..g.wo], wv, grow);
        }
    }
}

/// Weight-gradient partial sums of taps `t0..t0+G` for output columns
/// `x0..x0+B` of one plane: `acc[tap][ox] += Σ_oy dy[oy,ox] · xpad[s·oy+ky,
/// s·ox+kx]`. The `G·B` sums stay in registers while `oy` runs, and each `dy`
/// strip loaded serves `G` taps: a term costs ~1 + 1/G loads instead of 2
/// (loads, not FMAs, bound this kernel) and the `G·B/8` chains hide FMA
/// latency. Sums are reduced over columns once per channel, by the caller.
#[inline(always)]
fn grad_weight_taps<const FMA: bool, const B: usize, const G: usize>(
    g: &Geom,
    buf: &[f32],
    gy: &[f32],
    x0: usize,
    t0: usize,
    acc: &mut [f32],
) {
    let offs: [usize; G] = std::array::from_fn(|j| g.taps[t0 + j] + x0);
    // Reads below: gy[oy·wo + x0..][..B] and buf[oy·row_step + offs[j]..][..B]
    // for oy < ho; the largest oy bounds them all.
    assert!(g.ho >= 1 && x0 + B <= g.wo && g.ho * g.wo <= gy.len());
    assert!(
        offs.iter()
            .all(|&o| (g.ho - 1) * g.row_step + o + B <= buf.len())
    );
    let mut sum = [[0f32; B]; G];
    for oy in 0..g.ho {
        // SAFETY: asserted above.
        let dy = unsafe { strip::<B>(gy, oy * g.wo + x0) };
        for j in 0..G {
            // SAFETY: asserted above.
            let src = unsafe { strip::<B>(buf, oy * g.row_step + offs[j]) };
            for i in 0..B {
                sum[j][i] = madd::<FMA>(dy[i], src[i], sum[j][i]);
            }
        }
    }
    for (j, sum) in sum.iter().enumerate() {
        let acc: &mut [f32; B] = (&mut acc[(t0 + j) * g.wo + x0..][..B]).try_into().unwrap();
        for i in 0..B {
            acc[i] += sum[i];
        }
    }
}

/// All taps for output columns `x0..x0+B`, `G` at a time.
#[inline(always)]
fn grad_weight_strip<const FMA: bool, const B: usize, const G: usize>(
    g: &Geom,
    buf: &[f32],
    gy: &[f32],
    x0: usize,
    acc: &mut [f32],
) {
    let taps = g.taps.len();
    let full = taps / G * G;
    for t0 in (0..full).step_by(G) {
        grad_weight_taps::<FMA, B, G>(g, buf, gy, x0, t0, acc);
    }
    for t0 in full..taps {
        grad_weight_taps::<FMA, B, 1>(g, buf, gy, x0, t0, acc);
    }
}

/// Weight-gradient partial sums for one plane; `acc` is `kh*kw` rows of `wo`
/// (one sum per tap and output column). Columns go in strips of 16, 8, 4,
/// then 1 — disjoint, since a sum must not count a column twice.
#[inline(always)]
fn grad_weight_plane_impl<const FMA: bool>(g: &Geom, buf: &[f32], gy: &[f32], acc: &mut [f32]) {
    let mut x0 = 0;
    while x0 + 16 <= g.wo {
        grad_weight_strip::<FMA, 16, 3>(g, buf, gy, x0, acc);
        x0 += 16;
    }
    if x0 + 8 <= g.wo {
        grad_weight_strip::<FMA, 8, 3>(g, buf, gy, x0, acc);
        x0 += 8;
    }
    if x0 + 4 <= g.wo {
        grad_weight_strip::<FMA, 4, 3>(g, buf, gy, x0, acc);
        x0 += 4;
    }
    while x0 < g.wo {
        grad_weight_strip::<FMA, 1, 3>(g, buf, gy, x0, acc);
        x0 += 1;
    }
}

dispatch!(fwd_plane, fwd_plane_avx2, fwd_plane_impl,
    (g: &Geom, buf: &[f32], wk: &[f32], out: &mut [f32]));
dispatch!(grad_input_plane, grad_input_plane_avx2, grad_input_plane_impl,
    (g: &Geom, gy: &[f32], wk: &[f32], buf: &mut [f32]));
dispatch!(grad_weight_plane, grad_weight_plane_avx2, grad_weight_plane_impl,
    (g: &Geom, buf: &[f32], gy: &[f32], acc: &mut [f32]));

// ---------------------------------------------------------------------------
// Whole-tensor drivers (rayon over planes / channels)
// ---------------------------------------------------------------------------

fn forward(g: &Geom, x: &[f32], wt: &[f32]) -> Vec<f32> {
    let plane_out = g.ho * g.wo;
    let mut out = vec![0f32; g.n * g.c * plane_out];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(plane_out).enumerate().for_each_init(
        // Zeroed once: fill_phased only rewrites interior cells, so the
        // padding stays zero for every plane this buffer serves.
        || vec![0f32; g.buf_len()],
        |buf, (nc, out)| {
            let ch = nc % g.c;
            fill_phased(g, &x[nc * g.h * g.w..][..g.h * g.w], buf);
            fwd_plane(g, buf, &wt[ch * g.kh * g.kw..][..g.kh * g.kw], out);
        },
    );
    out
}

/// How the input gradient is computed for one geometry.
struct GradInputPlan<'a> {
    g: Geom,
    /// Stride 1, square kernel, `p <= K-1`: `dx = dy ⋆ flip(w)` with padding
    /// `K-1-p`, i.e. the forward kernel (register-blocked, written straight
    /// into `dx`) on this geometry. `None`: scatter through a phased buffer.
    transposed: Option<Geom>,
    /// `kh*kw` taps per channel; flipped when `transposed` is set.
    weights: Cow<'a, [f32]>,
}

impl<'a> GradInputPlan<'a> {
    fn new(g: &Geom, wt: &'a [f32]) -> Result<Self> {
        let taps = g.kh * g.kw;
        if g.s == 1 && g.kh == g.kw && g.p < g.kh {
            let t = Geom::new((g.n, g.c, g.ho, g.wo), (g.kh, g.kw), 1, g.kh - 1 - g.p)?;
            debug_assert_eq!((t.ho, t.wo), (g.h, g.w));
            let flipped = wt
                .chunks_exact(taps)
                .flat_map(|w| w.iter().rev().copied())
                .collect();
            return Ok(Self {
                g: g.clone(),
                transposed: Some(t),
                weights: Cow::Owned(flipped),
            });
        }
        Ok(Self {
            g: g.clone(),
            transposed: None,
            weights: Cow::Borrowed(wt),
        })
    }

    fn buf_len(&self) -> usize {
        self.transposed.as_ref().unwrap_or(&self.g).buf_len()
    }

    /// `dx` plane `(n, ch)` from its `dy` plane; `buf` holds `buf_len()` values
    /// and, on the transposed path, must keep zero padding between calls.
    fn plane(&self, ch: usize, gy: &[f32], buf: &mut [f32], dx: &mut [f32]) {
        let taps = self.g.kh * self.g.kw;
        let wk = &self.weights[ch * taps..][..taps];
        match &self.transposed {
            Some(t) => {
                fill_phased(t, gy, buf);
                fwd_plane(t, buf, wk, dx);
            }
            None => {
                grad_input_plane(&self.g, gy, wk, buf);
                // Gradient that landed on padding cells is dropped: those
                // inputs are constant zeros.
                extract_phased(&self.g, buf, dx);
            }
        }
    }
}

fn grad_input(g: &Geom, gy: &[f32], wt: &[f32]) -> Result<Vec<f32>> {
    let plan = GradInputPlan::new(g, wt)?;
    let (plane_in, plane_out) = (g.h * g.w, g.ho * g.wo);
    let mut dx = vec![0f32; g.n * g.c * plane_in];
    if dx.is_empty() {
        return Ok(dx);
    }
    dx.par_chunks_mut(plane_in).enumerate().for_each_init(
        || vec![0f32; plan.buf_len()],
        |buf, (nc, dx)| plan.plane(nc % g.c, &gy[nc * plane_out..][..plane_out], buf, dx),
    );
    Ok(dx)
}

fn grad_weight(g: &Geom, x: &[f32], gy: &[f32]) -> Vec<f32> {
    let taps = g.kh * g.kw;
    let mut dw = vec![0f32; g.c * taps];
    if dw.is_empty() {
        return dw;
    }
    // One task per channel: the batch sum stays inside a task, so no
    // cross-thread reduction is needed.
    dw.par_chunks_mut(taps).enumerate().for_each_init(
        || (vec![0f32; g.buf_len()], vec![0f32; taps * g.wo]),
        |(buf, acc), (ch, dw)| {
            acc.fill(0.0);
            for n in 0..g.n {
                let nc = n * g.c + ch;
                fill_phased(g, &x[nc * g.h * g.w..][..g.h * g.w], buf);
                grad_weight_plane(g, buf, &gy[nc * g.ho * g.wo..][..g.ho * g.wo], acc);
            }
            for (d, a) in dw.iter_mut().zip(acc.chunks_exact(g.wo)) {
                *d = a.iter().sum();
            }
        },
    );
    dw
}

// ---------------------------------------------------------------------------
// candle custom ops
// ---------------------------------------------------------------------------

/// Checks `w` is `[C, 1, Kh, Kw]` for `C` channels and returns `(Kh, Kw)`.
fn kernel_dims(l: &Layout, c: usize) -> Result<(usize, usize)> {
    let (co, ci, kh, kw) = dims4(l, "depthwise_conv2d", "weight")?;
    if co != c || ci != 1 {
        bail!(
            "depthwise_conv2d: weight must be [{c}, 1, K, K], got {:?}",
            l.dims()
        );
    }
    Ok((kh, kw))
}

/// Forward op: `x` (arg 1) ⋆ `w` (arg 2).
#[derive(Clone, Copy, Debug)]
struct DepthwiseConv {
    stride: usize,
    padding: usize,
}

impl CustomOp2 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xd = dims4(l1, "depthwise_conv2d", "input")?;
        let g = Geom::new(xd, kernel_dims(l2, xd.1)?, self.stride, self.padding)?;
        let (x, wt) = (f32_values(s1, l1)?, f32_values(s2, l2)?);
        let y = forward(&g, &x, &wt);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.c, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, wd) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        let (stride, padding) = (self.stride, self.padding);
        // Skip a gradient nobody will read (e.g. an input that tracks no graph).
        let dx = if x.track_op() {
            Some(grad_res.apply_op2_no_bwd(
                w,
                &DepthwiseGradInput {
                    stride,
                    padding,
                    h,
                    w: wd,
                },
            )?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(
                grad_res,
                &DepthwiseGradWeight {
                    stride,
                    padding,
                    kh,
                    kw,
                },
            )?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// Input gradient: `dy` (arg 1) and `w` (arg 2) → `dx [N, C, h, w]`.
#[derive(Clone, Copy, Debug)]
struct DepthwiseGradInput {
    stride: usize,
    padding: usize,
    /// Input spatial size (several sizes give the same output size).
    h: usize,
    w: usize,
}

impl CustomOp2 for DepthwiseGradInput {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, ho, wo) = dims4(l1, "depthwise_conv2d", "output gradient")?;
        let k = kernel_dims(l2, c)?;
        let g = Geom::new((n, c, self.h, self.w), k, self.stride, self.padding)?;
        if (g.ho, g.wo) != (ho, wo) {
            bail!(
                "depthwise_conv2d: output gradient is {ho}x{wo}, expected {}x{}",
                g.ho,
                g.wo
            );
        }
        let (gy, wt) = (f32_values(s1, l1)?, f32_values(s2, l2)?);
        let dx = grad_input(&g, &gy, &wt)?;
        Ok((CpuStorage::F32(dx), Shape::from((n, c, self.h, self.w))))
    }
}

/// Weight gradient: `x` (arg 1) and `dy` (arg 2) → `dw [C, 1, Kh, Kw]`.
#[derive(Clone, Copy, Debug)]
struct DepthwiseGradWeight {
    stride: usize,
    padding: usize,
    kh: usize,
    kw: usize,
}

impl CustomOp2 for DepthwiseGradWeight {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xd = dims4(l1, "depthwise_conv2d", "input")?;
        let g = Geom::new(xd, (self.kh, self.kw), self.stride, self.padding)?;
        if dims4(l2, "depthwise_conv2d", "output gradient")? != (g.n, g.c, g.ho, g.wo) {
            bail!(
                "depthwise_conv2d: output gradient is {:?}, expected {:?}",
                l2.dims(),
                [g.n, g.c, g.ho, g.wo]
            );
        }
        let (x, gy) = (f32_values(s1, l1)?, f32_values(s2, l2)?);
        let dw = grad_weight(&g, &x, &gy);
        Ok((CpuStorage::F32(dw), Shape::from((g.c, 1, self.kh, self.kw))))
    }
}

#[cfg(test)]
mod tests;
