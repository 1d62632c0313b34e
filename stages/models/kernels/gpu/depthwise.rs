//! Depthwise conv2d (`groups = C`, weight `[C, 1, Kh, Kw]`) as a sum over
//! kernel taps, with its own backward: O(Kh·Kw) launches per call, where
//! candle's CUDA path runs C single-channel convolutions and a `cat` (and its
//! backward C `narrow` gradients, each a full-size zero tensor).
//!
//! With `tap(ky, kx) [N, C, Ho, Wo]` the zero-padded input at rows
//! `ky + s·oy`, columns `kx + s·ox` (a strided view, `super::Phased`):
//!
//! * forward:         `y = Σ_(ky,kx) tap(ky, kx) · w[:, 0, ky, kx]`, the weight
//!   broadcast from `[1, C, 1, 1]`;
//! * input gradient:  the same sum, stride 1, over the zero-inserted, padded
//!   `dy` (as `super::conv`) with the kernel taps in reverse order;
//! * weight gradient: `dw[:, 0, ky, kx] = Σ_(n,oy,ox) dy · tap(ky, kx)`.
//!
//! Same function and shape rules as `kernels::depthwise` and candle's
//! `x.conv2d(w, padding, stride, 1, C)`.

use candle_core::{Result, Tensor, bail};

use super::{Phased, conv_out, dilate_pad, grad_input_pad, graft2};

/// candle's `x.conv2d(w, padding, stride, 1, C)` for `w [C, 1, Kh, Kw]`,
/// formulated for CUDA.
pub(crate) fn depthwise_conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (_, c, h, wd) = x.dims4()?;
    let (wc, one, kh, kw) = w.dims4()?;
    if (wc, one) != (c, 1) {
        bail!(
            "depthwise_conv2d: weight must be [{c}, 1, Kh, Kw], got {:?}",
            w.dims()
        );
    }
    let (s, p) = (stride, padding);
    let y = taps_sum(&x.detach(), &w.detach(), s, p, false)?;
    graft2("gpu-depthwise-conv2d", x, w, y, move |x, w, _, dy, need| {
        let (_, _, ho, wo) = dy.dims4()?;
        let dx = match need.0 {
            true => {
                let (top, bottom) = grad_input_pad(h, kh, s, p, ho);
                let (left, right) = grad_input_pad(wd, kw, s, p, wo);
                let z = dilate_pad(dy, s, (top, bottom, left, right))?;
                Some(taps_sum(&z, w, 1, 0, true)?)
            }
            false => None,
        };
        let dw = match need.1 {
            true => Some(weight_grad(x, dy, (kh, kw), s, p)?),
            false => None,
        };
        Ok((dx, dw))
    })
}

/// `Σ_taps tap · w_tap`: the depthwise correlation of `x` with `w`, or with
/// `w` rotated by 180° when `flipped`.
fn taps_sum(x: &Tensor, w: &Tensor, s: usize, p: usize, flipped: bool) -> Result<Tensor> {
    let (_, c, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let what = "depthwise_conv2d";
    let (ho, wo) = (conv_out(what, h, kh, s, p)?, conv_out(what, wd, kw, s, p)?);
    let taps = kh * kw;
    let phased = Phased::new(x, (kh, kw), s, p, (ho, wo))?;
    // [1, C, taps, 1]: tap t's weights are a [1, C, 1, 1] view.
    let wt = w.reshape((1, c, taps, 1))?;
    let mut sum: Option<Tensor> = None;
    for t in 0..taps {
        let k = if flipped { taps - 1 - t } else { t };
        let term = phased
            .tap(t / kw, t % kw)?
            .broadcast_mul(&wt.narrow(2, k, 1)?)?;
        sum = Some(match sum {
            None => term,
            Some(acc) => (acc + term)?,
        });
    }
    match sum {
        Some(y) => Ok(y),
        None => bail!("{what}: empty kernel"),
    }
}

/// `dw [C, 1, Kh, Kw]` for `y = depthwise(x, w)` given `dy [N, C, Ho, Wo]`.
fn weight_grad(
    x: &Tensor,
    dy: &Tensor,
    (kh, kw): (usize, usize),
    s: usize,
    p: usize,
) -> Result<Tensor> {
    let (_, c, ho, wo) = dy.dims4()?;
    let phased = Phased::new(x, (kh, kw), s, p, (ho, wo))?;
    let per_tap = (0..kh * kw)
        .map(|t| {
            (dy * phased.tap(t / kw, t % kw)?)?
                .sum_keepdim((0, 2, 3))?
                .reshape((c, 1))
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&per_tap, 1)?.reshape((c, 1, kh, kw))
}
