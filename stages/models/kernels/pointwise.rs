//! Pointwise (1x1) convolution for candle on CPU, with its own backward.
//!
//! EfficientNet's expand, project and head convolutions are 1x1: per batch
//! item a matrix product `y[b] = w · x[b]` (`[O, C]·[C, H·W]`), about 90% of
//! the network's FLOPs. Written as `w.broadcast_matmul(x)`, candle's forward is
//! fine, but its backward computes the weight gradient as a batch of `B`
//! products `dy[b]·x[b]ᵀ`, materialises them as `[B, O, C]` and reduces over
//! `B` with its strided `sum_keepdim`, which alone took ~20% of a B0 training
//! step. This module is a candle custom op whose backward runs the three
//! products directly with the `gemm` crate (the one candle itself calls):
//!
//! * forward:         `y[b]  = w · x[b]`             (`[O, C]·[C, HW]`),
//! * input gradient:  `dx[b] = wᵀ · dy[b]`           (`[C, O]·[O, HW]`),
//! * weight gradient: `dw    = Σ_b dy[b] · x[b]ᵀ`    (`[O, HW]·[HW, C]`), accumulated
//!   in place into one `[O, C]` buffer (gemm's `read_dst`), never `[B, O, C]`.
//!
//! Promises:
//! * [`pointwise_conv2d`] computes the same function as candle's
//!   `w.reshape((O, C)).broadcast_matmul(x.reshape((B, C, H·W)))` reshaped to
//!   `[B, O, H, W]` (= `x.conv2d(w, 0, 1, 1, 1)`, no bias), forward and both
//!   gradients, to f32 rounding (the summation order differs).
//! * The fast path is taken only on CPU with F32 input and weight and while
//!   [`fast_kernels_enabled`](super::fast_kernels_enabled) (`kernels::path`);
//!   BF16/F16 CPU tensors take this path in F32 with the result rounded back;
//!   anything else (CUDA, Metal, F64, or the switch off) runs exactly that
//!   candle formulation, a cuBLAS product on GPUs, and the reference. (In
//!   BF16 on CUDA, candle's backward sums the `B` per-item weight gradients
//!   in BF16: `B` terms, not `B·H·W`.)
//! * Gradients are first order: the backward ops are not themselves
//!   differentiable (no double backward through this op).
//! * Any layout is accepted (non-contiguous inputs and output gradients are
//!   made contiguous). The weight may be `[O, C, 1, 1]` or `[O, C]`; its
//!   gradient has the same shape.
//!
//! Design: all three products are row-major `gemm` calls on strided views of
//! the NCHW buffers (`wᵀ` and `x[b]ᵀ` are just other strides), so nothing is
//! transposed in memory. When `H·W` is small (late EfficientNet stages: 7x7
//! down to 1x1 at 224 px, 4x4 and 2x2 at 64 px) a product per batch item is
//! too thin for gemm to run well (it re-packs the whole `[O, C]` operand for
//! every few columns, and the weight gradient re-reads and re-writes all of
//! `dw` for every `H·W`-deep update; measured 2–3x slower at 2x2), so items
//! are taken in groups of `g` with `g·H·W ≈` `GROUP_COLS`: a group's
//! `[g, R, HW]` slab is copied to a `[R, g·HW]` scratch matrix (a few hundred
//! KiB at most, reused) and multiplied once.
//!
//! Threads: forward and input gradient run groups in parallel with rayon,
//! threads beyond one per group sharing each product through gemm's own rayon
//! parallelism. The weight gradient splits the batch into at most `UNITS`
//! fixed runs of groups, each summed into its own `[O, C]` partial (in
//! parallel), when the batch is long enough to amortise adding them up (see
//! `PARTIAL_COLS`), and otherwise accumulates every group into `dw` with
//! gemm-threaded products; either way at most `UNITS` `[O, C]` buffers exist.
//!
//! The result depends on the shapes only, never on the number of threads:
//! groups and runs are fixed by the shape (`UNITS`, not the thread count),
//! partials are added in run order, and gemm's own threads only share out
//! blocks of each product (`cpu::tests` checks that bitwise).

use super::cpu::{Mat, f32_values, matmul};

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{Path, path, widen};

/// y = w · x per pixel: x [B, C, H, W], w [O, C, 1, 1] or [O, C]; y [B, O, H, W]. No bias.
pub fn pointwise_conv2d(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let o = weight_rows(w.dims(), c)?;
    match path(&[x, w]) {
        Path::Cpu => {}
        Path::Widened => return pointwise_conv2d(&widen(x)?, &widen(w)?)?.to_dtype(x.dtype()),
        // Elsewhere (CUDA included) the candle formulation: a cuBLAS product.
        Path::Formulation | Path::Candle => {
            return w
                .reshape((o, c))?
                .broadcast_matmul(&x.reshape((b, c, h * wd))?)?
                .reshape((b, o, h, wd));
        }
    }
    // `contiguous` is a no-op (same tensor, same gradient node) when the
    // layout already is; otherwise it is a differentiable copy.
    x.contiguous()?.apply_op2(&w.contiguous()?, PointwiseConv)
}

/// `O` for a weight `[O, C, 1, 1]` or `[O, C]` that matches `c` input channels.
fn weight_rows(dims: &[usize], c: usize) -> Result<usize> {
    match *dims {
        [o, wc] | [o, wc, 1, 1] if wc == c => Ok(o),
        _ => bail!("pointwise_conv2d: weight must be [O, {c}, 1, 1] or [O, {c}], got {dims:?}"),
    }
}

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

/// Columns per gemm the grouping aims for: enough that gemm's packing of the
/// `[O, C]` operand and the weight gradient's re-reads of `dw` are amortised
/// (per-item products at 2x2 were 2–3x slower; targets of 64–512 columns
/// measured alike there), few enough that items already this wide skip the
/// copies, which cost ~25% at 8x8 with 40 channels (copying a value costs
/// about as much as ~10 of gemm's multiply-adds).
const GROUP_COLS: usize = 64;

/// Groups are made smaller so that a batch makes about `UNITS` of them, but
/// not below this many columns (thinner products run far below gemm's peak).
const MIN_GROUP_COLS: usize = 16;

/// Groups a batch is cut into at least (where columns allow), and the most
/// weight-gradient partial sums: a constant, not the thread count, so that
/// the products' shapes (gemm blocks a sum by its product's shape) and the
/// order of the partial sums are the same on any machine. Eight keeps 2–8
/// cores busy; more share each product through gemm's threads.
const UNITS: usize = 8;

/// The weight gradient keeps `P` `[O, C]` partial sums (then adds them up)
/// only while every partial covers at least this many columns (`B·HW / P`),
/// so the reduction stays a small fraction of the products' work; beyond
/// that, threads share each product through gemm.
const PARTIAL_COLS: usize = 256;

/// Problem size for one op: `b` items of `[c, hw]` in, `[o, hw]` out.
#[derive(Clone, Copy, Debug)]
struct Geom {
    b: usize,
    c: usize,
    o: usize,
    hw: usize,
}

impl Geom {
    /// Batch items per gemm: 1 when an item alone is wide enough (then no
    /// copies are made), else enough for ~`GROUP_COLS` columns.
    fn wide_group(&self) -> usize {
        GROUP_COLS.div_ceil(self.hw.max(1)).clamp(1, self.b.max(1))
    }

    /// Batch items per gemm of the forward and the input gradient, whose
    /// groups are their parallel units: [`Geom::wide_group`], fewer when that
    /// makes fewer than `UNITS` groups, down to `MIN_GROUP_COLS` columns. A
    /// function of the shape alone.
    fn group(&self) -> usize {
        let hw = self.hw.max(1);
        let per_unit = self.b.div_ceil(UNITS);
        // MIN_GROUP_COLS ≤ GROUP_COLS, so this never exceeds the wide group.
        self.wide_group()
            .min(per_unit)
            .max(MIN_GROUP_COLS.div_ceil(hw))
            .clamp(1, self.b.max(1))
    }
}

/// gemm's own threading for a product that `threads` threads share.
fn gemm_parallelism(threads: usize) -> Parallelism {
    if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// Copies the items of `src` (`[g, rows, hw]`) to `dst` as `[rows, g·hw]`:
/// row `r` holds the `r`-th rows of the items side by side.
fn pack(src: &[f32], rows: usize, hw: usize, dst: &mut [f32]) {
    let g = src.len() / (rows * hw);
    for (r, row) in dst.chunks_exact_mut(g * hw).take(rows).enumerate() {
        for (j, seg) in row.chunks_exact_mut(hw).enumerate() {
            let at = (j * rows + r) * hw;
            seg.copy_from_slice(&src[at..at + hw]);
        }
    }
}

/// The inverse of [`pack`]: `src` `[rows, g·hw]` to `dst` `[g, rows, hw]`.
fn unpack(src: &[f32], rows: usize, hw: usize, dst: &mut [f32]) {
    let g = dst.len() / (rows * hw);
    for (r, row) in src.chunks_exact(g * hw).take(rows).enumerate() {
        for (j, seg) in row.chunks_exact(hw).enumerate() {
            let at = (j * rows + r) * hw;
            dst[at..at + hw].copy_from_slice(seg);
        }
    }
}

/// `out[i] = a · input[i]` for every item, with `geom = { b: items, c: k, o:
/// m, hw }`: `a` is `[m, k]`, `input` `[items, k, hw]`, the result `[items, m,
/// hw]`. The forward (`a = w`) and the input gradient (`a = wᵀ`, a strided
/// view) are both this.
fn left_mul(a: Mat, geom: &Geom, input: &[f32]) -> Vec<f32> {
    let (items, k, m, hw) = (geom.b, geom.c, geom.o, geom.hw);
    // Zeroed allocation is free for large buffers (fresh pages from the OS
    // come zeroed); gemm overwrites it anyway.
    let mut out = vec![0f32; items * m * hw];
    if out.is_empty() || k == 0 {
        return out; // nothing to compute, or an empty sum
    }
    let threads = rayon::current_num_threads();
    let g = geom.group();
    // Groups run in parallel; threads left over (fewer groups than threads)
    // share each group's product through gemm.
    let inner = gemm_parallelism(threads / items.div_ceil(g));
    out.par_chunks_mut(g * m * hw)
        .zip(input.par_chunks(g * k * hw))
        .for_each_init(Vec::new, |scratch, (out, input)| {
            let cols = input.len() / k;
            if cols == hw {
                // One item: gemm straight from the NCHW buffers.
                let rhs = Mat::new(input, hw, 1);
                matmul(out, hw, (m, hw, k), false, a, rhs, inner);
                return;
            }
            scratch.resize((k + m) * cols, 0.0);
            let (packed_in, packed_out) = scratch.split_at_mut(k * cols);
            pack(input, k, hw, packed_in);
            let rhs = Mat::new(packed_in, cols, 1);
            matmul(packed_out, cols, (m, cols, k), false, a, rhs, inner);
            unpack(packed_out, m, hw, out);
        });
    out
}

/// Writes `Σ dy[b] · x[b]ᵀ` over the items of `x` (`[n, c, hw]`) and `dy`
/// (`[n, o, hw]`) to `dw` (`[o, c]`), `g` items per product, each product
/// accumulated onto the ones before in place.
fn sum_grad_weight(geom: &Geom, g: usize, x: &[f32], dy: &[f32], dw: &mut [f32], par: Parallelism) {
    let Geom { c, o, hw, .. } = *geom;
    let mut scratch = Vec::new();
    // The first product overwrites `dw`, the others add to it.
    let mut accumulate = false;
    for (xg, dyg) in x.chunks(g * c * hw).zip(dy.chunks(g * o * hw)) {
        let cols = xg.len() / c;
        let (lhs, rhs) = if cols == hw {
            // dy[b] is [o, hw] row-major; x[b]ᵀ is x[b] read column-wise.
            (Mat::new(dyg, hw, 1), Mat::new(xg, 1, hw))
        } else {
            scratch.resize((o + c) * cols, 0.0);
            let (pdy, px) = scratch.split_at_mut(o * cols);
            pack(dyg, o, hw, pdy);
            pack(xg, c, hw, px);
            (Mat::new(pdy, cols, 1), Mat::new(px, 1, cols))
        };
        matmul(dw, c, (o, c, cols), accumulate, lhs, rhs, par);
        accumulate = true;
    }
}

/// `dw = Σ_b dy[b] · x[b]ᵀ`, `[o, c]`, accumulated in place product by
/// product: one sum with gemm-threaded products when the batch is thin,
/// otherwise one partial sum per fixed run of groups (in parallel), added up
/// in run order at the end (at most `UNITS` `[O, C]` buffers, never
/// `[B, O, C]`). The runs depend on the shape alone.
fn grad_weight(geom: &Geom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let Geom { b, c, o, hw } = *geom;
    let mut dw = vec![0f32; o * c];
    if dw.is_empty() || b * hw == 0 {
        return dw; // nothing to compute, or an empty sum
    }
    let threads = rayon::current_num_threads();
    // Groups are the products' depth here, not parallel units (partial sums
    // and gemm's threads are): thinner ones would re-read and re-write `dw`
    // more often (at 2x2, 16-column groups measured ~1.5x slower than 64).
    let g = geom.wide_group();
    let groups = b.div_ceil(g);
    let partials = UNITS.min(groups).min(b * hw / PARTIAL_COLS).max(1);
    let inner = gemm_parallelism(threads / partials);
    if partials == 1 {
        sum_grad_weight(geom, g, x, dy, &mut dw, inner);
        return dw;
    }
    // Contiguous runs of whole groups, one per partial sum; the first sums
    // straight into `dw`.
    let per_partial = groups.div_ceil(partials) * g;
    let mut extra = vec![vec![0f32; o * c]; b.div_ceil(per_partial) - 1];
    let sums = std::iter::once(&mut dw[..]).chain(extra.iter_mut().map(|v| &mut v[..]));
    sums.collect::<Vec<_>>()
        .into_par_iter()
        .zip(x.par_chunks(per_partial * c * hw))
        .zip(dy.par_chunks(per_partial * o * hw))
        .for_each(|((sum, xp), dyp)| sum_grad_weight(geom, g, xp, dyp, sum, inner));
    // dw += extra[0] + extra[1] + …, left to right for every value; chunks
    // of `dw` only share the adding out.
    const CHUNK: usize = 1 << 12;
    dw.par_chunks_mut(CHUNK).enumerate().for_each(|(i, d)| {
        for e in &extra {
            for (acc, v) in d.iter_mut().zip(&e[i * CHUNK..]) {
                *acc += v;
            }
        }
    });
    dw
}

// ---------------------------------------------------------------------------
// candle custom ops
// ---------------------------------------------------------------------------

fn dims4(l: &Layout, what: &str) -> Result<(usize, usize, usize, usize)> {
    match *l.dims() {
        [n, c, h, w] => Ok((n, c, h, w)),
        ref d => bail!("pointwise_conv2d: {what} must be [N, C, H, W], got {d:?}"),
    }
}

/// Forward op: `x` (arg 1), `w` (arg 2) → `y [B, O, H, W]`.
#[derive(Clone, Copy, Debug)]
struct PointwiseConv;

impl CustomOp2 for PointwiseConv {
    fn name(&self) -> &'static str {
        "pointwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, wd) = dims4(l1, "input")?;
        let o = weight_rows(l2.dims(), c)?;
        let (x, wt) = (f32_values(s1, l1)?, f32_values(s2, l2)?);
        let geom = Geom {
            b,
            c,
            o,
            hw: h * wd,
        };
        let y = left_mul(Mat::new(&wt, c, 1), &geom, &x);
        Ok((CpuStorage::F32(y), Shape::from((b, o, h, wd))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Skip a gradient nobody will read (e.g. an input that tracks no graph).
        let dx = if x.track_op() {
            Some(grad_res.apply_op2_no_bwd(w, &PointwiseGradInput)?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let op = PointwiseGradWeight {
                weight_4d: w.rank() == 4,
            };
            Some(x.apply_op2_no_bwd(grad_res, &op)?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// Input gradient: `dy` (arg 1), `w` (arg 2) → `dx [B, C, H, W] = wᵀ · dy`.
#[derive(Clone, Copy, Debug)]
struct PointwiseGradInput;

impl CustomOp2 for PointwiseGradInput {
    fn name(&self) -> &'static str {
        "pointwise-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, o, h, wd) = dims4(l1, "output gradient")?;
        let c = match *l2.dims() {
            [wo, c] | [wo, c, 1, 1] if wo == o => c,
            ref d => bail!("pointwise_conv2d: output gradient has {o} channels, weight is {d:?}"),
        };
        let (dy, wt) = (f32_values(s1, l1)?, f32_values(s2, l2)?);
        // wᵀ without a copy: element (i, j) of wᵀ is w[j, i] at j·c + i.
        // As a product `[c, o]·[o, hw]` per item.
        let geom = Geom {
            b,
            c: o,
            o: c,
            hw: h * wd,
        };
        let dx = left_mul(Mat::new(&wt, 1, c), &geom, &dy);
        Ok((CpuStorage::F32(dx), Shape::from((b, c, h, wd))))
    }
}

/// Weight gradient: `x` (arg 1), `dy` (arg 2) → `dw = Σ_b dy[b]·x[b]ᵀ`, as
/// `[O, C, 1, 1]` or `[O, C]` like the weight.
#[derive(Clone, Copy, Debug)]
struct PointwiseGradWeight {
    weight_4d: bool,
}

impl CustomOp2 for PointwiseGradWeight {
    fn name(&self) -> &'static str {
        "pointwise-conv2d-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, wd) = dims4(l1, "input")?;
        let (db, o, dh, dwd) = dims4(l2, "output gradient")?;
        if (db, dh, dwd) != (b, h, wd) {
            bail!(
                "pointwise_conv2d: output gradient is {:?}, input {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let (x, dy) = (f32_values(s1, l1)?, f32_values(s2, l2)?);
        let geom = Geom {
            b,
            c,
            o,
            hw: h * wd,
        };
        let dw = grad_weight(&geom, &x, &dy);
        let shape = if self.weight_4d {
            Shape::from((o, c, 1, 1))
        } else {
            Shape::from((o, c))
        };
        Ok((CpuStorage::F32(dw), shape))
    }
}

#[cfg(test)]
mod tests;
