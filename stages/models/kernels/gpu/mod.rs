//! GPU-fast formulations of the models' hot ops: each op written only with
//! operations that are fast on candle 0.11's CUDA backend, with its own
//! backward where autograd through the composition (or candle's own backward)
//! would be slow. `kernels::path` sends CUDA tensors here; set
//! `MELANOFLOW_GPU_OPS=candle` (or call `kernels::set_gpu_formulations(false)`)
//! to run candle's own ops instead.
//!
//! Why: on CUDA, candle 0.11 runs `conv_transpose2d` (every ConvT layer and
//! every conv2d's input gradient) as a direct-loop kernel; a grouped conv with
//! `groups = C` as C single-group convs plus a `cat` (each `narrow`'s backward
//! a full-size zero tensor: 10^5+ launches per EfficientNet step); a conv's
//! weight gradient as one im2col of `C·Kh·Kw·N·Ho·Wo` values, whose launch
//! grid is a `u32` (the CycleGAN's 7x7 head at 224 px overflows from batch
//! ~28); and reflection padding and instance norm upload or build constants on
//! every call. The building blocks used instead: candle's im2col + cuBLAS
//! `conv2d` and `matmul`, strided views (`narrow`, `squeeze`, `transpose`),
//! elementwise and broadcast ops, zero padding (`cat` with device-side zeros),
//! `index_select` with cached index tensors, `sum_keepdim`/`mean_keepdim`.
//!
//! * `conv`: conv2d forward (batch or rows cut so no im2col exceeds
//!   [`COL_BUDGET`] values); its input gradient as a `conv2d` of the
//!   zero-inserted, padded output gradient with the flipped, transposed kernel;
//!   its weight gradient as matrix products over groups of kernel taps, each
//!   tap a strided view of the padded input (no buffer above [`COL_BUDGET`]
//!   values beyond one item's input); `conv_transpose2d` as the same three
//!   with the roles swapped, so candle's `conv_transpose2d` never runs.
//! * `depthwise`: `groups = C` as a sum over the `Kh·Kw` strided taps of the
//!   padded input times per-channel weights broadcast from `[1, C, 1, 1]`:
//!   O(Kh·Kw) launches, not O(C), forward and both gradients.
//! * `norm`: instance norm (mean/variance reductions and broadcasts, no
//!   constant tensors, backward in closed form) and reflection padding
//!   (`index_select` with index tensors cached per device and size).
//!
//! Promises:
//! * Every function here runs on any device (that is how they are tested: on
//!   CPU, against the CPU kernels and candle's ops, forward and gradients, to
//!   1e-5 relative in f32) and any float dtype.
//! * Same functions as candle's ops, same shape rules and errors as the CPU
//!   kernels: `output_padding < stride`, first-order gradients only, and a
//!   gradient is computed only for an argument that tracks a graph.
//! * No per-call host-to-device uploads: the only index tensors (kernel flips,
//!   reflection indices) are built once per (device, size) and cached.
//! * Results are deterministic for a given device and shape except where the
//!   backend's own reductions are not (cuBLAS and candle's CUDA reductions
//!   are deterministic for a fixed shape).
//!
//! A custom backward is attached by a "graft" op: the forward result `y` is
//! computed from detached inputs, then a candle custom op with the inputs as
//! arguments copies `y` (one device copy) and carries the backward closure.
//! (candle's API has no way to attach a backward to an existing tensor.)

pub(crate) mod conv;
pub(crate) mod depthwise;
pub(crate) mod norm;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, DeviceLocation, Layout, MetalStorage, Result,
    Shape, Tensor,
};

/// Most values an im2col buffer (or a group of weight-gradient taps) may
/// hold: 2^28 f32 is 1 GiB, far from candle's `u32` launch-grid limit.
pub(crate) const COL_BUDGET: usize = 1 << 28;

// ---------------------------------------------------------------------------
// Attaching a backward to a computed tensor
// ---------------------------------------------------------------------------

/// The gradients of a two-argument op: `(a, b, y, dy, need) -> (da, db)`,
/// where `need` says which of `a`, `b` track a graph (the others' gradients
/// are not wanted and need not be computed).
type Grads2 = dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor, (bool, bool)) -> Result<(Option<Tensor>, Option<Tensor>)>
    + Send
    + Sync;

/// The gradient of a one-argument op: `(a, y, dy) -> da`.
type Grads1 = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync;

/// `y` (computed from detached `a` and `b`) as a function of `a` and `b`
/// whose backward is `grads`. Without a graph to join, `y` itself.
pub(crate) fn graft2(
    name: &'static str,
    a: &Tensor,
    b: &Tensor,
    y: Tensor,
    grads: impl Fn(
        &Tensor,
        &Tensor,
        &Tensor,
        &Tensor,
        (bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>)>
    + Send
    + Sync
    + 'static,
) -> Result<Tensor> {
    if !(a.track_op() || b.track_op()) {
        return Ok(y);
    }
    a.apply_op3(
        b,
        &y,
        Graft2 {
            name,
            grads: Arc::new(grads),
        },
    )
}

/// [`graft2`] for one argument.
pub(crate) fn graft1(
    name: &'static str,
    a: &Tensor,
    y: Tensor,
    grad: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !a.track_op() {
        return Ok(y);
    }
    a.apply_op2(
        &y,
        Graft1 {
            name,
            grad: Arc::new(grad),
        },
    )
}

struct Graft2 {
    name: &'static str,
    grads: Arc<Grads2>,
}

struct Graft1 {
    name: &'static str,
    grad: Arc<Grads1>,
}

/// A copy of the values of `s` under `l`, contiguous, on the same device.
fn copy_of<S>(s: &S, l: &Layout) -> Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let shape = l.shape().clone();
    // SAFETY: `copy_strided_src` writes every element of the new storage.
    let mut dst = unsafe { s.device().alloc_uninit(&shape, s.dtype())? };
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok((dst, shape))
}

impl CustomOp3 for Graft2 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_of(y, l)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        y: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        copy_of(y, l)
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        y: &MetalStorage,
        l: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        copy_of(y, l)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: the backward is not itself differentiated, so building
        // its graph would only hold memory.
        let need = (a.track_op(), b.track_op());
        let (da, db) = (self.grads)(&a.detach(), &b.detach(), &y.detach(), &dy.detach(), need)?;
        Ok((
            da.filter(|_| a.track_op()),
            db.filter(|_| b.track_op()),
            None,
        ))
    }
}

impl CustomOp2 for Graft1 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_of(y, l)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        y: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        copy_of(y, l)
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        y: &MetalStorage,
        l: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        copy_of(y, l)
    }

    fn bwd(
        &self,
        a: &Tensor,
        _: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let da = (self.grad)(&a.detach(), &y.detach(), &dy.detach())?;
        Ok((Some(da), None))
    }
}

// ---------------------------------------------------------------------------
// Cached index tensors
// ---------------------------------------------------------------------------

/// An index tensor the formulations gather with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Index {
    /// `n-1, n-2, ..., 0`.
    Reverse(usize),
    /// Reflection padding of `n` positions by `pad` on each side:
    /// `pad, pad-1, ..., 1, 0, 1, ..., n-1, n-2, ..., n-1-pad`.
    Reflect { n: usize, pad: usize },
}

impl Index {
    fn values(self) -> Vec<u32> {
        match self {
            Index::Reverse(n) => (0..n as u32).rev().collect(),
            Index::Reflect { n, pad } => (0..n + 2 * pad)
                .map(|i| {
                    let j = i as i64 - pad as i64;
                    let last = n as i64 - 1;
                    let j = if j < 0 {
                        -j
                    } else if j > last {
                        2 * last - j
                    } else {
                        j
                    };
                    j as u32
                })
                .collect(),
        }
    }
}

type IndexCache = Mutex<HashMap<(DeviceLocation, Index), Tensor>>;

/// Index tensors already on a device, so no call uploads one twice. Keyed by
/// location; an entry made for another handle on the same location (candle
/// CUDA devices opened twice) is replaced, since candle refuses to mix them.
static INDICES: std::sync::LazyLock<IndexCache> = std::sync::LazyLock::new(Default::default);

/// The U32 tensor of `index`'s values on `device`, uploaded once.
pub(crate) fn cached_index(index: Index, device: &candle_core::Device) -> Result<Tensor> {
    let mut cache = INDICES.lock().unwrap_or_else(|e| e.into_inner());
    let key = (device.location(), index);
    if let Some(t) = cache.get(&key)
        && t.device().same_device(device)
    {
        return Ok(t.clone());
    }
    let values = index.values();
    let len = values.len();
    let t = Tensor::from_vec(values, len, device)?;
    cache.insert(key, t.clone());
    Ok(t)
}

// ---------------------------------------------------------------------------
// Shapes and views shared by the formulations
// ---------------------------------------------------------------------------

/// Output size of a convolution along one dimension, or an error naming `op`.
pub(crate) fn conv_out(op: &str, n: usize, k: usize, s: usize, p: usize) -> Result<usize> {
    if s == 0 {
        candle_core::bail!("{op}: stride must be at least 1");
    }
    match (n + 2 * p).checked_sub(k) {
        Some(d) => Ok(d / s + 1),
        None => candle_core::bail!("{op}: {k}-wide kernel larger than the padded input {n}+2*{p}"),
    }
}

/// `t` with `lo` zeros before and `hi` after along `dim`; a negative amount
/// removes that many entries instead.
fn pad_or_crop(t: &Tensor, dim: usize, lo: isize, hi: isize) -> Result<Tensor> {
    let t = if lo < 0 || hi < 0 {
        let n = t.dim(dim)? as isize;
        let start = (-lo).max(0);
        let len = n - start - (-hi).max(0);
        t.narrow(dim, start as usize, len.max(0) as usize)?
    } else {
        t.clone()
    };
    t.pad_with_zeros(dim, lo.max(0) as usize, hi.max(0) as usize)
}

/// `t [N, C, H, W]` with `s − 1` zeros inserted between neighbouring values
/// along H and W, then `pad = (top, bottom, left, right)` zeros added (or,
/// when negative, values removed) at the edges: the input of a transposed
/// convolution written as a convolution. Four zero-padding copies, no index.
pub(crate) fn dilate_pad(
    t: &Tensor,
    s: usize,
    pad: (isize, isize, isize, isize),
) -> Result<Tensor> {
    let (n, c, h, w) = t.dims4()?;
    let (top, mut bottom, left, mut right) = pad;
    let t = if s > 1 {
        // [N, C, H, 1, W, 1] padded to [N, C, H, s, W, s] is the dilated
        // tensor followed by s − 1 zeros in each dimension.
        let d = t
            .reshape((n, c, h, 1, w, 1))?
            .pad_with_zeros(5, 0, s - 1)?
            .pad_with_zeros(3, 0, s - 1)?
            .reshape((n, c, h * s, w * s))?;
        bottom -= s as isize - 1;
        right -= s as isize - 1;
        d
    } else {
        t.clone()
    };
    pad_or_crop(&pad_or_crop(&t, 2, top, bottom)?, 3, left, right)
}

/// The zero-padded `x [A, B, H, W]` laid out by stride phase, from which
/// every kernel tap of a `kh x kw`, stride `s`, padding `p` convolution with
/// an `ho x wo` output is a strided view ([`Phased::tap`]).
pub(crate) struct Phased {
    /// `[A, B, Hq, s, Wq, s]`: padded row `s·q + φ` at `[.., q, φ, ..]`.
    t: Tensor,
    s: usize,
    ho: usize,
    wo: usize,
}

impl Phased {
    pub(crate) fn new(
        x: &Tensor,
        (kh, kw): (usize, usize),
        s: usize,
        p: usize,
        (ho, wo): (usize, usize),
    ) -> Result<Self> {
        let (a, b, h, w) = x.dims4()?;
        // Tap `ky` reads padded rows `ky + s·oy`, `oy < ho`: phase `ky % s`,
        // quotient rows `ky / s .. ky / s + ho`.
        let (hq, wq) = ((kh - 1) / s + ho, (kw - 1) / s + wo);
        let bottom = (s * hq) as isize - (h + p) as isize;
        let right = (s * wq) as isize - (w + p) as isize;
        let padded = pad_or_crop(
            &pad_or_crop(x, 2, p as isize, bottom)?,
            3,
            p as isize,
            right,
        )?;
        let t = padded.contiguous()?.reshape((a, b, hq, s, wq, s))?;
        Ok(Phased { t, s, ho, wo })
    }

    /// `[A, B, ho, wo]`: the padded input at rows `ky + s·oy`, columns
    /// `kx + s·ox` (a view; no copy).
    pub(crate) fn tap(&self, ky: usize, kx: usize) -> Result<Tensor> {
        let s = self.s;
        self.t
            .narrow(5, kx % s, 1)?
            .squeeze(5)?
            .narrow(4, kx / s, self.wo)?
            .narrow(3, ky % s, 1)?
            .squeeze(3)?
            .narrow(2, ky / s, self.ho)
    }

    /// Items `start .. start + len` of the second dimension.
    pub(crate) fn narrow_second(&self, start: usize, len: usize) -> Result<Phased> {
        Ok(Phased {
            t: self.t.narrow(1, start, len)?,
            s: self.s,
            ho: self.ho,
            wo: self.wo,
        })
    }
}

/// `w [A, B, Kh, Kw]` rotated by 180° in its last two dimensions (one cached
/// gather: reversing the flat `Kh·Kw` index reverses both).
pub(crate) fn flip_hw(w: &Tensor) -> Result<Tensor> {
    let (a, b, kh, kw) = w.dims4()?;
    let rev = cached_index(Index::Reverse(kh * kw), w.device())?;
    w.reshape((a, b, kh * kw))?
        .index_select(&rev, 2)?
        .reshape((a, b, kh, kw))
}

/// Padding `(lo, hi)` along one dimension that turns the gradient `dy` (length
/// `o`, from a stride `s`, padding `p`, kernel `k` convolution of an input of
/// length `n`), once dilated by `s`, into the input of the stride-1
/// convolution with the flipped kernel that yields the input gradient (length
/// `n`): `dx[i] = Σ_j z[i + j] · w[k − 1 − j]`, `z[lo + s·o'] = dy[o']`.
pub(crate) fn grad_input_pad(n: usize, k: usize, s: usize, p: usize, o: usize) -> (isize, isize) {
    let lo = k as isize - 1 - p as isize;
    let hi = n as isize + p as isize - ((o as isize - 1) * s as isize) - 1;
    (lo, hi)
}
