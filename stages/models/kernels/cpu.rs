//! CPU storage helpers shared by the kernels: reading a tensor's values
//! whatever its layout, and checking 4-D shapes.

use std::borrow::Cow;

use candle_core::{CpuStorage, Layout, Result, bail};

/// The values of an F32 CPU tensor in row-major order, borrowed when the
/// layout is contiguous, gathered otherwise (whole runs at a time where the
/// trailing dims are contiguous).
pub fn f32_values<'a>(s: &'a CpuStorage, l: &Layout) -> Result<Cow<'a, [f32]>> {
    let data = s.as_slice::<f32>()?;
    if let Some((start, end)) = l.contiguous_offsets() {
        return Ok(Cow::Borrowed(&data[start..end]));
    }
    let (dims, strides) = (l.dims(), l.stride());
    // Trailing dims that are laid out densely form one run of `run` values.
    let (mut outer, mut run) = (dims.len(), 1);
    while outer > 0 && (strides[outer - 1] == run || dims[outer - 1] == 1) {
        run *= dims[outer - 1];
        outer -= 1;
    }
    let count = l.shape().elem_count();
    let mut out = Vec::with_capacity(count);
    if count == 0 {
        return Ok(Cow::Owned(out));
    }
    let mut idx = vec![0usize; outer];
    let mut off = l.start_offset();
    for _ in 0..count / run {
        out.extend_from_slice(&data[off..off + run]);
        // Odometer increment over the strided outer index.
        for d in (0..outer).rev() {
            idx[d] += 1;
            off += strides[d];
            if idx[d] < dims[d] {
                break;
            }
            off -= strides[d] * dims[d];
            idx[d] = 0;
        }
    }
    Ok(Cow::Owned(out))
}

/// `(N, C, H, W)` of a 4-D layout; `op` and `what` name the offending tensor.
pub fn dims4(l: &Layout, op: &str, what: &str) -> Result<(usize, usize, usize, usize)> {
    match *l.dims() {
        [a, b, c, d] => Ok((a, b, c, d)),
        ref dims => bail!("{op}: {what} must be 4-D, got {dims:?}"),
    }
}
