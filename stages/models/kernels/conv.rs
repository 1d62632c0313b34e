//! Dense 2-D convolution and transposed convolution for candle on CPU, with
//! their own backward, as im2col + `gemm` products.
//!
//! candle 0.11 runs a CPU `conv2d` forward as a direct loop, and its input
//! gradient — and `conv_transpose2d`, forward and all — through a direct-loop
//! `conv_transpose2d`; a CycleGAN training step (ResNet generator, PatchGAN
//! discriminator) was ~8x slower than PyTorch on the same cores. Here every
//! convolution is a matrix product with the `gemm` crate (the one candle's
//! matmul calls). For one batch item, with `K = C·Kh·Kw` and `col(x)` the
//! `[K, Ho·Wo]` im2col matrix of the input `x [C, H, W]` (row `(c, ky, kx)`,
//! column `(oy, ox)` holds `x[c, s·oy+ky−p, s·ox+kx−p]`, zero in the padding):
//!
//! * forward:         `y  = W · col(x)`                  (`[O, K]·[K, Ho·Wo]`),
//! * input gradient:  `dx = col2im(Wᵀ · dy)`             (`[K, O]·[O, Ho·Wo]`, then
//!   every column entry is added back onto the input cell it was copied from),
//! * weight gradient: `dW = Σ_n dy_n · col(x_n)ᵀ`        (`[O, Ho·Wo]·[Ho·Wo, K]`),
//!   accumulated in place (gemm's `read_dst`).
//!
//! A transposed convolution is the input gradient of the convolution that
//! maps its output back to its input, so it reuses the same three kernels:
//! its forward is the input-gradient kernel, its input gradient the forward
//! kernel, and its weight gradient the weight-gradient kernel with the roles
//! of input and output swapped. Three custom ops cover both functions.
//!
//! Promises:
//! * [`conv2d`] computes candle's `x.conv2d(w, padding, stride, 1, 1)` (NCHW,
//!   weight `[O, C, Kh, Kw]`, no bias, output `(H + 2p − Kh)/s + 1`) and
//!   [`conv_transpose2d`] candle's `x.conv_transpose2d(w, padding,
//!   output_padding, stride, 1)` (weight `[Cin, Cout, Kh, Kw]`, output
//!   `(H − 1)·s − 2p + Kh + output_padding`), forward and both gradients, to
//!   f32 rounding (the summation order differs). [`conv2d_reflect`] is
//!   `conv2d` of the input padded by reflection (PyTorch's
//!   `ReflectionPad2d` + `Conv2d(padding=0)`), without building the padded
//!   tensor: the gathers read the mirrored cells, and the input gradient adds
//!   their terms back onto them.
//! * The fast path is taken only on CPU with F32 input and weight and while
//!   [`fast_kernels_enabled`](super::fast_kernels_enabled); CUDA tensors take
//!   `gpu::conv`'s formulations, BF16/F16 CPU tensors this path in F32 with
//!   the result rounded back, anything else (Metal, F64, or the switch off)
//!   candle's own op (`kernels::path` decides).
//! * Gradients are first order: the backward ops are not themselves
//!   differentiable (no double backward through these ops). A gradient whose
//!   argument tracks no graph (e.g. the image fed to the first layer) is not
//!   computed.
//! * Any input layout is accepted (non-contiguous tensors are gathered).
//! * Unlike candle 0.11's conv2d backward, which takes the transposed conv's
//!   `output_padding` from the height alone and fails when
//!   `(H + 2p − Kh) mod s ≠ (W + 2p − Kw) mod s`, every shape the forward
//!   accepts has gradients.
//! * `output_padding` must be smaller than `stride` (PyTorch's rule; the
//!   extra rows would receive nothing).
//! * Scratch memory is bounded: an im2col tile holds about `COL_BUDGET`
//!   floats (at least one output row), one per rayon task; the weight
//!   gradient keeps at most `UNITS` `[O, K]` partial sums (fewer for thin
//!   sums, see `PARTIAL_COLS`).
//! * The result depends on the shapes only, never on the number of threads:
//!   every cut below is fixed by the problem's shape, and partial sums are
//!   added in a fixed order, so a stage run on 1 core and on 16 writes the
//!   same bytes. (gemm's own threads only share out blocks of the output;
//!   `cpu::tests` checks that bitwise.)
//!
//! Parallelism: work is cut into units — (batch item, tile of output rows)
//! for the forward and the weight gradient, (batch item, group of input
//! channels) for the input gradient, whose column-to-image scatter overlaps
//! between row tiles but never between channels. Thin batches (CycleGAN
//! trains with batch 1) are cut into about `UNITS` units, whatever the thread
//! count. The forward and the input gradient write disjoint outputs per unit,
//! so their units are dealt out in contiguous runs, one run per rayon worker,
//! each with one scratch buffer. The weight gradient sums its units in at
//! most `UNITS` fixed contiguous runs (fewer when `N·Ho·Wo` is short), one
//! `[O, K]` partial sum each, then adds the partials in run order. When there
//! are fewer units than threads (small feature maps, many cores), gemm's own
//! rayon parallelism splits each product.

use super::cpu::{Mat, dims4, f32_values, gemm_into, matmul};
use std::ops::Range;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{Path, gpu, path, widen};

mod tiling;
use tiling::*;

/// y = conv2d(x [N, C, H, W], w [O, C, Kh, Kw]) with stride and symmetric zero
/// padding, no bias: `[N, O, (H+2p−Kh)/s+1, (W+2p−Kw)/s+1]`.
///
/// Same function as candle's `x.conv2d(w, padding, stride, 1, 1)`.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    match path(&[x, w]) {
        Path::Cpu => {}
        Path::Formulation => return gpu::conv::conv2d(x, w, stride, padding),
        Path::Candle => return x.conv2d(w, padding, stride, 1, 1),
        Path::Widened => {
            return conv2d(&widen(x)?, &widen(w)?, stride, padding)?.to_dtype(x.dtype());
        }
    }
    // `contiguous` is a no-op (same tensor, same gradient node) when the
    // layout already is; otherwise it is a differentiable copy.
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        ConvFwd {
            stride,
            padding,
            reflect: false,
        },
    )
}

/// y = conv2d(reflection_pad2d(x, padding), w, stride) without building the
/// padded tensor: im2col reads the mirrored cells, and col2im adds their
/// gradient back onto them. The generator's 7x7 and residual 3x3 convs pad
/// by reflection; the separate pad was two gathers forward and two
/// zero-filled `index_add`s backward per layer. Needs `padding < H, W`.
///
/// Same values as `conv2d(&reflection_pad2d(x, padding)?, w, stride, 0)`
/// (forward bit for bit: the same im2col matrix), which is what the other
/// paths run.
pub fn conv2d_reflect(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    match path(&[x, w]) {
        Path::Cpu => {}
        Path::Widened => {
            return conv2d_reflect(&widen(x)?, &widen(w)?, stride, padding)?.to_dtype(x.dtype());
        }
        Path::Formulation | Path::Candle => {
            return conv2d(&gpu::norm::reflection_pad2d(x, padding)?, w, stride, 0);
        }
    }
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        ConvFwd {
            stride,
            padding,
            reflect: true,
        },
    )
}

/// y = conv_transpose2d(x [N, Cin, H, W], w [Cin, Cout, Kh, Kw]) (PyTorch's
/// weight layout), no bias: `[N, Cout, (H−1)s − 2p + Kh + op, (W−1)s − 2p + Kw + op]`.
///
/// Same function as candle's `x.conv_transpose2d(w, padding, output_padding, stride, 1)`.
pub fn conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    output_padding: usize,
) -> Result<Tensor> {
    match path(&[x, w]) {
        Path::Cpu => {}
        Path::Formulation => {
            return gpu::conv::conv_transpose2d(x, w, stride, padding, output_padding);
        }
        Path::Candle => return x.conv_transpose2d(w, padding, output_padding, stride, 1),
        Path::Widened => {
            return conv_transpose2d(&widen(x)?, &widen(w)?, stride, padding, output_padding)?
                .to_dtype(x.dtype());
        }
    }
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    if h == 0 || wd == 0 {
        bail!("conv_transpose2d: empty {h}x{wd} input");
    }
    if output_padding >= stride.max(1) {
        bail!(
            "conv_transpose2d: output_padding {output_padding} must be smaller than stride {stride}"
        );
    }
    // Output size; "(H−1)s + K + op < 2p" would be an empty output.
    let out = |i: usize, k: usize| ((i - 1) * stride + k + output_padding).checked_sub(2 * padding);
    let (Some(ho), Some(wo)) = (out(h, kh), out(wd, kw)) else {
        bail!(
            "conv_transpose2d: padding {padding} too large for a {h}x{wd} input and {kh}x{kw} kernel"
        );
    };
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        ConvData {
            stride,
            padding,
            reflect: false,
            h: ho,
            w: wo,
        },
    )
}

// The three kernels (whole tensors)
// ---------------------------------------------------------------------------

/// Runs `work(run)` for each of `workers` near-equal contiguous runs of
/// `0..units`, in parallel (one rayon task per run, so a worker allocates its
/// scratch once, not once per unit).
fn for_workers(units: usize, workers: usize, work: impl Fn(Range<usize>) + Sync) {
    if workers <= 1 {
        work(0..units);
    } else {
        (0..workers)
            .into_par_iter()
            .for_each(|i| work(split(units, workers, i)));
    }
}

/// Forward: `out[n] = W · col(img[n])`, `[n, o, ho, wo]`. `wt` is `[o, K]`.
fn conv_forward(g: &Geom, img: &[f32], wt: &[f32], plan: Plan) -> Vec<f32> {
    let (k, pix) = (g.k(), g.pixels());
    let mut out = vec![0f32; g.n * g.o * pix];
    if out.is_empty() {
        return out;
    }
    let rows = plan.tile_rows(g, if g.pointwise() { 0 } else { k }, g.n);
    let tiles = g.ho.div_ceil(rows);
    let units = g.n * tiles;
    let par = plan.inner(units);
    let lhs = Mat {
        data: wt,
        rs: k,
        cs: 1,
    };
    let dst = SharedDst {
        ptr: out.as_mut_ptr(),
        len: out.len(),
    };
    for_workers(units, plan.workers(units), |run| {
        let mut col = if g.pointwise() {
            Vec::new()
        } else {
            vec![0f32; k * rows * g.wo]
        };
        for u in run {
            let (n, t) = (u / tiles, u % tiles);
            let oys = t * rows..((t + 1) * rows).min(g.ho);
            let (p0, pt) = (oys.start * g.wo, oys.len() * g.wo);
            let img = &img[n * g.img_len()..][..g.img_len()];
            let rhs = if g.pointwise() {
                Mat {
                    data: &img[p0..],
                    rs: pix,
                    cs: 1,
                }
            } else {
                im2col(g, img, oys, &mut col[..k * pt]);
                Mat {
                    data: &col[..k * pt],
                    rs: pt,
                    cs: 1,
                }
            };
            // SAFETY: `out` outlives this call; unit (n, t) is the only one
            // writing columns p0..p0+pt of item n's rows, and the operands are
            // other buffers.
            unsafe {
                gemm_into(
                    dst.raw(),
                    n * g.o * pix + p0,
                    pix,
                    (g.o, pt, k),
                    false,
                    lhs,
                    rhs,
                    par,
                )
            };
        }
    });
    out
}

/// Weight gradient: `dW = Σ_n dy[n] · col(img[n])ᵀ`, `[o, K]`. The (item, row
/// tile) units are summed in at most `plan.units` fixed contiguous runs (at
/// least `PARTIAL_COLS` columns each), one partial sum per run (in
/// parallel), and the partials are added in run order: the same sums in the
/// same order on any number of threads.
fn conv_grad_weight(g: &Geom, img: &[f32], gy: &[f32], plan: Plan) -> Vec<f32> {
    let (k, pix) = (g.k(), g.pixels());
    let mut dw = vec![0f32; g.o * k];
    if dw.is_empty() || g.n * pix == 0 {
        return dw; // nothing to compute, or an empty sum
    }
    let rows = plan.tile_rows(g, if g.pointwise() { 0 } else { k }, g.n);
    let tiles = g.ho.div_ceil(rows);
    let units = g.n * tiles;
    let partials = units
        .min(plan.target_units())
        .min(g.n * pix / PARTIAL_COLS)
        .max(1);
    let par = plan.inner(partials);
    let sum_run = |run: Range<usize>, acc: &mut [f32]| {
        let mut col = if g.pointwise() {
            Vec::new()
        } else {
            vec![0f32; k * rows * g.wo]
        };
        for u in run {
            let (n, t) = (u / tiles, u % tiles);
            let oys = t * rows..((t + 1) * rows).min(g.ho);
            let (p0, pt) = (oys.start * g.wo, oys.len() * g.wo);
            let img = &img[n * g.img_len()..][..g.img_len()];
            // dy[n][:, tile] is [o, pt] row-major; col(x)ᵀ is col(x) read
            // column-wise.
            let lhs = Mat {
                data: &gy[n * g.o * pix + p0..],
                rs: pix,
                cs: 1,
            };
            let rhs = if g.pointwise() {
                Mat {
                    data: &img[p0..],
                    rs: 1,
                    cs: pix,
                }
            } else {
                im2col(g, img, oys, &mut col[..k * pt]);
                Mat {
                    data: &col[..k * pt],
                    rs: 1,
                    cs: pt,
                }
            };
            matmul(acc, k, (g.o, k, pt), true, lhs, rhs, par);
        }
    };
    if partials == 1 {
        sum_run(0..units, &mut dw);
        return dw;
    }
    // The first run sums straight into `dw`.
    let mut extra = vec![vec![0f32; g.o * k]; partials - 1];
    std::iter::once(&mut dw[..])
        .chain(extra.iter_mut().map(|v| &mut v[..]))
        .collect::<Vec<_>>()
        .into_par_iter()
        .enumerate()
        .for_each(|(i, acc)| sum_run(split(units, partials, i), acc));
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

/// Input gradient: `dx[n] = col2im(Wᵀ · dy[n])`, `[n, c, h, w]`. Units are
/// (item, group of input channels): a channel's cells receive only its own
/// rows of `Wᵀ · dy`, so units write disjoint, contiguous parts of `dx`, while
/// the row tiles inside a unit (whose scatters overlap) run in turn.
fn conv_grad_input(g: &Geom, gy: &[f32], wt: &[f32], plan: Plan) -> Vec<f32> {
    let (k, pix, taps, plane) = (g.k(), g.pixels(), g.taps(), g.h * g.w);
    let mut dx = vec![0f32; g.n * g.c * plane];
    if dx.is_empty() || g.o * pix == 0 {
        return dx; // nothing to compute, or an empty sum
    }
    // Groups may be unequal (3 channels on 2 threads: 1 and 2); that measured
    // faster than one group split by gemm's own threads, which was erratic.
    let max_groups = (g.c * taps / MIN_GROUP_ROWS).clamp(1, g.c);
    let groups = plan.target_units().div_ceil(g.n).min(max_groups);
    let units = g.n * groups;
    let par = plan.inner(units);
    let workers = plan.workers(units);
    let channels = |u: usize| split(g.c, groups, u % groups);
    // Offset in `dx` where unit `u` (or, for u = units, the end) starts.
    let total = dx.len();
    let start = |u: usize| match u {
        u if u == units => total,
        u => (u / groups * g.c + channels(u).start) * plane,
    };
    let max_cg = g.c.div_ceil(groups);
    // Tiles here only bound the scratch: they run in turn. Their height sets
    // the order in which an input cell's terms are added (tile by tile), so
    // it, like `groups`, must not depend on the thread count.
    let rows = plan.budget_rows(g, max_cg * taps);
    // Cut `dx` into the workers' contiguous runs.
    let mut runs = Vec::with_capacity(workers);
    let mut rest = &mut dx[..];
    let mut at = 0;
    for i in 0..workers {
        let run = split(units, workers, i);
        let end = start(run.end);
        let (head, tail) = rest.split_at_mut(end - at);
        runs.push((run, head));
        rest = tail;
        at = end;
    }
    runs.into_par_iter().for_each(|(run, out)| {
        let mut colg = if g.pointwise() {
            Vec::new()
        } else {
            vec![0f32; max_cg * taps * rows * g.wo]
        };
        let base = start(run.start);
        for u in run {
            let cs = channels(u);
            let dxg = &mut out[start(u) - base..][..cs.len() * plane];
            let gy = &gy[u / groups * g.o * pix..][..g.o * pix];
            let m = cs.len() * taps;
            // Rows (c, ky, kx) of Wᵀ for this group: W read column-wise.
            let lhs = Mat {
                data: &wt[cs.start * taps..],
                rs: 1,
                cs: k,
            };
            if g.pointwise() {
                let rhs = Mat {
                    data: gy,
                    rs: pix,
                    cs: 1,
                };
                matmul(dxg, pix, (m, pix, g.o), false, lhs, rhs, par);
                continue;
            }
            for oy0 in (0..g.ho).step_by(rows) {
                let oys = oy0..(oy0 + rows).min(g.ho);
                let (p0, pt) = (oy0 * g.wo, oys.len() * g.wo);
                let rhs = Mat {
                    data: &gy[p0..],
                    rs: pix,
                    cs: 1,
                };
                let colg = &mut colg[..m * pt];
                matmul(colg, pt, (m, pt, g.o), false, lhs, rhs, par);
                col2im(g, colg, oys, dxg);
            }
        }
    });
    dx
}

// ---------------------------------------------------------------------------
// candle custom ops
// ---------------------------------------------------------------------------

/// Convolution `x` (arg 1, `[n, c, h, w]`) ⋆ `w` (arg 2, `[o, c, kh, kw]`).
/// Also the input gradient of a transposed convolution.
#[derive(Clone, Copy, Debug)]
struct ConvFwd {
    stride: usize,
    padding: usize,
    reflect: bool,
}

impl CustomOp2 for ConvFwd {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xd = dims4(l1, "conv2d", "input")?;
        let (o, c, kh, kw) = dims4(l2, "conv2d", "weight")?;
        if c != xd.1 {
            bail!(
                "conv2d: input has {} channels, weight {:?} expects {c}",
                xd.1,
                l2.dims()
            );
        }
        let g = Geom::new(xd, o, (kh, kw), self.stride, self.padding)?.padded_by(self.reflect)?;
        let (x, wt) = (f32_values(s1, l1)?, f32_values(s2, l2)?);
        let y = conv_forward(&g, &x, &wt, Plan::current());
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.ho, g.wo))))
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
        let (stride, padding, reflect) = (self.stride, self.padding, self.reflect);
        // Skip a gradient nobody will read (e.g. an image that tracks no graph).
        let dx = if x.track_op() {
            Some(grad_res.apply_op2_no_bwd(
                w,
                &ConvData {
                    stride,
                    padding,
                    reflect,
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
                &ConvGradWeight {
                    stride,
                    padding,
                    reflect,
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

/// The input gradient of a convolution, i.e. a transposed convolution: `dy`
/// (arg 1, `[n, o, ho, wo]`) and `w` (arg 2, `[o, c, kh, kw]`) → `[n, c, h, w]`.
#[derive(Clone, Copy, Debug)]
struct ConvData {
    stride: usize,
    padding: usize,
    reflect: bool,
    /// Image size: several give the same `ho x wo` (stride > 1).
    h: usize,
    w: usize,
}

impl CustomOp2 for ConvData {
    fn name(&self) -> &'static str {
        "conv-transpose2d-gemm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, o, ho, wo) = dims4(l1, "conv2d", "input")?;
        let (wo_, c, kh, kw) = dims4(l2, "conv2d", "weight")?;
        if wo_ != o {
            bail!(
                "conv_transpose2d: input has {o} channels, weight {:?} expects {wo_}",
                l2.dims()
            );
        }
        let g = Geom::new(
            (n, c, self.h, self.w),
            o,
            (kh, kw),
            self.stride,
            self.padding,
        )?
        .padded_by(self.reflect)?;
        if (g.ho, g.wo) != (ho, wo) {
            bail!(
                "conv_transpose2d: {ho}x{wo} input does not map onto {}x{} (maps from {}x{})",
                self.h,
                self.w,
                g.ho,
                g.wo
            );
        }
        let (gy, wt) = (f32_values(s1, l1)?, f32_values(s2, l2)?);
        let dx = conv_grad_input(&g, &gy, &wt, Plan::current());
        Ok((CpuStorage::F32(dx), Shape::from((n, c, self.h, self.w))))
    }

    /// As a transposed convolution `x ⋆ᵀ w`: its input gradient is the
    /// convolution of the output gradient, its weight gradient the
    /// convolution's weight gradient with image and output swapped.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, kh, kw) = w.dims4()?;
        let (stride, padding, reflect) = (self.stride, self.padding, self.reflect);
        let dx = if x.track_op() {
            Some(grad_res.apply_op2_no_bwd(
                w,
                &ConvFwd {
                    stride,
                    padding,
                    reflect,
                },
            )?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(grad_res.apply_op2_no_bwd(
                x,
                &ConvGradWeight {
                    stride,
                    padding,
                    reflect,
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

/// Weight gradient of a convolution: image (arg 1, `[n, c, h, w]`) and output
/// gradient (arg 2, `[n, o, ho, wo]`) → `[o, c, kh, kw]`.
#[derive(Clone, Copy, Debug)]
struct ConvGradWeight {
    stride: usize,
    padding: usize,
    reflect: bool,
    kh: usize,
    kw: usize,
}

impl CustomOp2 for ConvGradWeight {
    fn name(&self) -> &'static str {
        "conv2d-gemm-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xd = dims4(l1, "conv2d", "input")?;
        let (n, o, ho, wo) = dims4(l2, "conv2d", "output gradient")?;
        let g = Geom::new(xd, o, (self.kh, self.kw), self.stride, self.padding)?
            .padded_by(self.reflect)?;
        if (n, ho, wo) != (g.n, g.ho, g.wo) {
            bail!(
                "conv2d: output gradient is {:?}, expected {:?}",
                l2.dims(),
                [g.n, o, g.ho, g.wo]
            );
        }
        let (x, gy) = (f32_values(s1, l1)?, f32_values(s2, l2)?);
        let dw = conv_grad_weight(&g, &x, &gy, Plan::current());
        Ok((CpuStorage::F32(dw), Shape::from((o, g.c, self.kh, self.kw))))
    }
}

#[cfg(test)]
mod tests;
