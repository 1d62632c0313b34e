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
mod tests {
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
        let xt = Var::from_tensor(&x.as_tensor().transpose(2, 3).unwrap().contiguous().unwrap())
            .unwrap();
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
}
