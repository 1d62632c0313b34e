//! Instance normalisation and reflection padding without per-call constants.
//!
//! * [`instance_norm`]: per (item, channel) over (H, W), biased variance, no
//!   affine parameters (PyTorch `InstanceNorm2d(affine=False)`). Forward: two
//!   mean reductions and broadcasts; backward in closed form,
//!   `dx = invstd · (dy − mean(dy) − y · mean(dy · y))` (`y` the output), so
//!   autograd does not walk the ~10-op forward chain, and nothing is built
//!   from host values (the path it replaces on CUDA, BatchNorm's candle ops,
//!   made a ones and a zeros tensor per call). Half-precision inputs are
//!   normalised in F32, as candle_nn does.
//! * [`reflection_pad2d`]: two `index_select`s whose index tensors are cached
//!   per (device, size, padding) (`super::cached_index`), where building them
//!   uploaded two fresh tensors per call. The gather copies values exactly,
//!   so it gives the same bytes as any other gather of the same indices.

use candle_core::{Result, Tensor, bail};

use super::super::accumulation_dtype;
use super::{Index, cached_index, graft1};

/// Instance norm of `x [N, C, H, W]` with `eps` inside the square root.
/// Needs `H·W ≥ 2`, as the CPU kernel (BatchNorm's training mode) does.
pub(crate) fn instance_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h * w < 2 {
        bail!(
            "instance_norm: need more than one value per channel, got input {:?}",
            x.dims()
        );
    }
    let dtype = x.dtype();
    let internal = accumulation_dtype(dtype);
    let xi = x.detach().to_dtype(internal)?;
    let mean = xi.mean_keepdim((2, 3))?;
    let xc = xi.broadcast_sub(&mean)?;
    let invstd = (xc.sqr()?.mean_keepdim((2, 3))? + eps)?.sqrt()?.recip()?;
    let y = xc.broadcast_mul(&invstd)?.to_dtype(dtype)?;
    graft1("gpu-instance-norm", x, y, move |_, y, dy| {
        let (y, dy) = (y.to_dtype(internal)?, dy.to_dtype(internal)?);
        let dy_mean = dy.mean_keepdim((2, 3))?;
        let dy_y_mean = (&dy * &y)?.mean_keepdim((2, 3))?;
        dy.broadcast_sub(&dy_mean)?
            .sub(&y.broadcast_mul(&dy_y_mean)?)?
            .broadcast_mul(&invstd)?
            .to_dtype(dtype)
    })
}

/// `x [B, C, H, W]` padded by reflection by `p` on every side (the edge value
/// is not repeated), like `torch.nn.ReflectionPad2d(p)`; needs `p < H` and
/// `p < W`. Differentiable (candle's `index_select` backward, an `index_add`).
pub(crate) fn reflection_pad2d(x: &Tensor, p: usize) -> Result<Tensor> {
    if p == 0 {
        return Ok(x.clone());
    }
    let (_, _, h, w) = x.dims4()?;
    if p >= h || p >= w {
        bail!("reflection_pad2d: padding {p} must be smaller than the {h}x{w} input");
    }
    let dev = x.device();
    let cols = cached_index(Index::Reflect { n: w, pad: p }, dev)?;
    let rows = cached_index(Index::Reflect { n: h, pad: p }, dev)?;
    x.contiguous()?
        .index_select(&cols, 3)?
        .index_select(&rows, 2)
}
