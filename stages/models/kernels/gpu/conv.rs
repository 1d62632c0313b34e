//! Dense conv2d and conv_transpose2d from candle's im2col + gemm `conv2d` and
//! `matmul` only (never candle's `conv_transpose2d`), with their own backward.
//!
//! For a convolution of `x [N, C, H, W]` with `w [O, C, Kh, Kw]`, stride `s`,
//! padding `p`, output `dy`'s shape `[N, O, Ho, Wo]`:
//!
//! * forward: candle's `conv2d`, cut into batch chunks (or, when one item is
//!   too big, output-row chunks of an explicitly padded item) so that no
//!   im2col buffer exceeds the budget ([`super::COL_BUDGET`]);
//! * input gradient: `dx = conv2d(z, flip(w)ᵀ)`, stride 1, where `z` is `dy`
//!   with `s − 1` zeros between values and `Kh − 1 − p` zeros (top/left)
//!   around it (`super::grad_input_pad`), `flip(w)ᵀ [C, O, Kh, Kw]` the
//!   kernel rotated by 180° with its channel axes swapped;
//! * weight gradient: for each kernel tap `(ky, kx)`,
//!   `dw[:, :, ky, kx] = dyᵀ · tap(ky, kx)` (`[O, N·Ho·Wo]·[N·Ho·Wo, C]`), where
//!   the tap is the padded input at rows `ky + s·oy`, columns `kx + s·ox` (a
//!   strided view, `super::Phased`); taps are copied side by side in groups
//!   and each group is one matrix product, batch chunks summed, so the buffer
//!   stays within the budget (candle's formulation, a `conv2d` with `dy` as
//!   kernel, builds one `C·Kh·Kw·N·Ho·Wo` im2col);
//! * `conv_transpose2d` is the input gradient of the convolution mapping its
//!   output back to its input, so its forward is the input-gradient formula,
//!   its input gradient the forward and its weight gradient the weight
//!   gradient with input and output swapped.
//!
//! Same functions and shape rules as `kernels::conv` (and candle's ops): see
//! there. `_with` variants take the budget, so tests reach the cut paths.

use candle_core::{Result, Tensor, bail};

use super::{COL_BUDGET, Phased, conv_out, dilate_pad, flip_hw, grad_input_pad, graft2};

/// candle's `x.conv2d(w, padding, stride, 1, 1)`, formulated for CUDA.
pub(crate) fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_with(x, w, stride, padding, COL_BUDGET)
}

/// candle's `x.conv_transpose2d(w, padding, output_padding, stride, 1)`
/// (weight `[Cin, Cout, Kh, Kw]`), formulated for CUDA.
pub(crate) fn conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    output_padding: usize,
) -> Result<Tensor> {
    conv_transpose2d_with(x, w, stride, padding, output_padding, COL_BUDGET)
}

/// [`conv2d`] with im2col buffers of at most `budget` values.
pub(crate) fn conv2d_with(
    x: &Tensor,
    w: &Tensor,
    s: usize,
    p: usize,
    budget: usize,
) -> Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let y = forward(&x.detach(), &w.detach(), s, p, budget)?;
    graft2("gpu-conv2d", x, w, y, move |x, w, _, dy, need| {
        let dx = match need.0 {
            true => Some(input_grad(dy, w, (h, wd), s, p, budget)?),
            false => None,
        };
        let dw = match need.1 {
            true => Some(weight_grad(x, dy, (kh, kw), s, p, budget)?),
            false => None,
        };
        Ok((dx, dw))
    })
}

/// [`conv_transpose2d`] with im2col buffers of at most `budget` values.
pub(crate) fn conv_transpose2d_with(
    x: &Tensor,
    w: &Tensor,
    s: usize,
    p: usize,
    op: usize,
    budget: usize,
) -> Result<Tensor> {
    let (_, ci, h, wd) = x.dims4()?;
    let (wci, _, kh, kw) = w.dims4()?;
    if wci != ci {
        bail!(
            "conv_transpose2d: weight {:?} for {ci} input channels",
            w.dims()
        );
    }
    if h == 0 || wd == 0 {
        bail!("conv_transpose2d: empty {h}x{wd} input");
    }
    if op >= s.max(1) {
        bail!("conv_transpose2d: output_padding {op} must be smaller than stride {s}");
    }
    let out = |i: usize, k: usize| ((i - 1) * s + k + op).checked_sub(2 * p);
    let (Some(ho), Some(wo)) = (out(h, kh), out(wd, kw)) else {
        bail!("conv_transpose2d: padding {p} too large for a {h}x{wd} input and {kh}x{kw} kernel");
    };
    let y = input_grad(&x.detach(), &w.detach(), (ho, wo), s, p, budget)?;
    graft2("gpu-conv-transpose2d", x, w, y, move |x, w, _, dy, need| {
        let dx = match need.0 {
            true => Some(forward(dy, w, s, p, budget)?),
            false => None,
        };
        let dw = match need.1 {
            true => Some(weight_grad(dy, x, (kh, kw), s, p, budget)?),
            false => None,
        };
        Ok((dx, dw))
    })
}

/// `conv2d(x, w)` (no graph) with no im2col above `budget` values, unless
/// one output row of one item needs more.
pub(crate) fn forward(x: &Tensor, w: &Tensor, s: usize, p: usize, budget: usize) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (_, wc, kh, kw) = w.dims4()?;
    if wc != c {
        bail!("conv2d: weight {:?} for {c} input channels", w.dims());
    }
    let (ho, wo) = (
        conv_out("conv2d", h, kh, s, p)?,
        conv_out("conv2d", wd, kw, s, p)?,
    );
    // candle's im2col for one item: a row of C·Kh·Kw values per output pixel.
    let per_row = c * kh * kw * wo;
    let rows = match forward_cut(n, per_row, ho, budget) {
        Cut::Whole => return x.conv2d(w, p, s, 1, 1),
        Cut::Items(step) => {
            let parts = (0..n)
                .step_by(step)
                .map(|i| x.narrow(0, i, step.min(n - i))?.conv2d(w, p, s, 1, 1))
                .collect::<Result<Vec<_>>>()?;
            return Tensor::cat(&parts, 0);
        }
        Cut::Rows(rows) => rows,
    };
    // One item is too big: runs of output rows, each from the input rows it
    // reads, padded explicitly so that every run is a padding-0 convolution.
    let xp = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
    let items = (0..n)
        .map(|i| {
            let item = xp.narrow(0, i, 1)?;
            let runs = (0..ho)
                .step_by(rows)
                .map(|r| {
                    let len = rows.min(ho - r);
                    item.narrow(2, r * s, (len - 1) * s + kh)?
                        .conv2d(w, 0, s, 1, 1)
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&runs, 2)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&items, 0)
}

/// How [`forward`] splits a convolution of `n` items, `ho` output rows of
/// `per_row` im2col values each, so that no im2col exceeds `budget` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cut {
    /// One `conv2d`.
    Whole,
    /// Runs of this many items.
    Items(usize),
    /// One item at a time, in runs of this many output rows (at least one,
    /// even when a single row exceeds the budget).
    Rows(usize),
}

pub(crate) fn forward_cut(n: usize, per_row: usize, ho: usize, budget: usize) -> Cut {
    let per_item = per_row * ho;
    if n * per_item <= budget {
        Cut::Whole
    } else if per_item <= budget {
        Cut::Items(budget / per_item)
    } else {
        Cut::Rows((budget / per_row).max(1))
    }
}

/// How [`weight_grad`] groups its work: `(items, taps)` per matrix product,
/// whose right operand holds `items · taps · per_item` values (`per_item =
/// C·Ho·Wo`, one tap of one item): within `budget` unless one tap of one item
/// alone exceeds it.
pub(crate) fn weight_grad_cut(
    n: usize,
    per_item: usize,
    taps: usize,
    budget: usize,
) -> (usize, usize) {
    let per_item = per_item.max(1);
    let items = (budget / per_item).clamp(1, n.max(1));
    (items, (budget / (per_item * items)).clamp(1, taps.max(1)))
}

/// The gradient with respect to the input `[N, C, H, W]` (`hw = (H, W)`) of
/// `conv2d(x, w)`, stride `s`, padding `p`, given the output gradient `dy`.
pub(crate) fn input_grad(
    dy: &Tensor,
    w: &Tensor,
    (h, wd): (usize, usize),
    s: usize,
    p: usize,
    budget: usize,
) -> Result<Tensor> {
    let (_, _, ho, wo) = dy.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let wt = flip_hw(w)?.transpose(0, 1)?.contiguous()?;
    let (top, bottom) = grad_input_pad(h, kh, s, p, ho);
    let (left, right) = grad_input_pad(wd, kw, s, p, wo);
    if s == 1 && top >= 0 && [bottom, left, right].iter().all(|&q| q == top) {
        // candle's own (symmetric) padding saves the copies.
        return forward(dy, &wt, 1, top as usize, budget);
    }
    let z = dilate_pad(dy, s, (top, bottom, left, right))?;
    forward(&z, &wt, 1, 0, budget)
}

/// The gradient `[O, C, Kh, Kw]` with respect to the weight of `conv2d(x, w)`,
/// stride `s`, padding `p`, given the output gradient `dy [N, O, Ho, Wo]`.
pub(crate) fn weight_grad(
    x: &Tensor,
    dy: &Tensor,
    (kh, kw): (usize, usize),
    s: usize,
    p: usize,
    budget: usize,
) -> Result<Tensor> {
    let (n, c, _, _) = x.dims4()?;
    let (_, o, ho, wo) = dy.dims4()?;
    let taps = kh * kw;
    // Channels first, so that a tap is a [C, N, Ho, Wo] block: C rows of the
    // product's right operand.
    let phased = Phased::new(&x.transpose(0, 1)?, (kh, kw), s, p, (ho, wo))?;
    let dyt = dy.transpose(0, 1)?.contiguous()?; // [O, N, Ho, Wo]
    if n == 0 {
        return Tensor::zeros((o, c, kh, kw), dy.dtype(), dy.device());
    }
    let (items, group) = weight_grad_cut(n, c * ho * wo, taps, budget);
    let mut total: Option<Tensor> = None;
    for start in (0..n).step_by(items) {
        let len = items.min(n - start);
        let cols_n = len * ho * wo;
        let lhs = dyt.narrow(1, start, len)?.reshape((o, cols_n))?;
        let chunk = phased.narrow_second(start, len)?;
        let parts = (0..taps)
            .step_by(group)
            .map(|t0| {
                let views = (t0..taps.min(t0 + group))
                    .map(|t| chunk.tap(t / kw, t % kw))
                    .collect::<Result<Vec<_>>>()?;
                let rows = views.len() * c;
                let cols = Tensor::cat(&views, 0)?.reshape((rows, cols_n))?;
                lhs.matmul(&cols.t()?) // [O, g·C]
            })
            .collect::<Result<Vec<_>>>()?;
        let part = Tensor::cat(&parts, 1)?; // [O, Kh·Kw·C], tap-major
        total = Some(match total {
            None => part,
            Some(t) => (t + part)?,
        });
    }
    let Some(total) = total else {
        bail!("conv2d: no weight-gradient terms");
    };
    total
        .reshape((o, taps, c))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((o, c, kh, kw))
}
