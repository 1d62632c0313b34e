//! CPU helpers shared by the kernels: reading a tensor's values whatever its
//! layout, checking 4-D shapes, and bounds-checked gemm on strided views.

use std::borrow::Cow;

use candle_core::{CpuStorage, Layout, Result, bail};
use gemm::Parallelism;

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

/// A read-only matrix operand: element `(i, j)` at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    pub fn new(data: &'a [f32], rs: usize, cs: usize) -> Self {
        Self { data, rs, cs }
    }

    /// Whether every element of a `rows x cols` view lies inside `data`.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `dst[at + i·dst_rs + j] = Σ_l lhs(i, l)·rhs(l, j)` for `i < m`, `j < n`,
/// `l < k` (`+=` when `accumulate`).
///
/// # Safety
/// `dst` is valid for reads and writes of `len` floats, and while the call
/// runs nothing else reads or writes the cells it writes (in particular
/// neither operand overlaps them). Everything else is checked here.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_into(
    (dst, len): (*mut f32, usize),
    at: usize,
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst_rs >= n && at + (m - 1) * dst_rs + n <= len && lhs.fits(m, k) && rhs.fits(k, n),
        "gemm operand out of bounds"
    );
    // SAFETY: the views are in bounds (checked above); dst rows do not overlap
    // (dst_rs ≥ n); exclusive access to the written cells is the caller's
    // contract.
    unsafe {
        if k == 0 {
            // An empty sum; gemm is not asked to handle it.
            if !accumulate {
                for i in 0..m {
                    std::slice::from_raw_parts_mut(dst.add(at + i * dst_rs), n).fill(0.0);
                }
            }
            return;
        }
        gemm::gemm(
            m,
            n,
            k,
            dst.add(at),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            // dst = alpha·dst + beta·lhs·rhs; alpha is ignored unless read_dst.
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// [`gemm_into`] a slice at offset 0 (safe: the slice is exclusively borrowed).
pub fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    mnk: (usize, usize, usize),
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    parallelism: Parallelism,
) {
    // SAFETY: `dst` is a unique borrow, so no operand or thread aliases it.
    unsafe {
        gemm_into(
            (dst.as_mut_ptr(), dst.len()),
            0,
            dst_rs,
            mnk,
            accumulate,
            lhs,
            rhs,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::testing::THREADS;

    /// The kernels (and candle's matmul) hand gemm `Parallelism::Rayon(t)`
    /// with `t` from the thread count, trusting that gemm's threads only share
    /// out blocks of the output: each output's depth is blocked by the
    /// product's shape and the cache sizes, never by `t`. This checks that
    /// trust bitwise, for shapes above gemm's threading threshold, depths
    /// either side of its 512-deep blocks, strided (transposed) operands,
    /// accumulation into the destination, and thin and tiny products (gemv and
    /// small-matrix paths).
    #[test]
    fn gemm_results_do_not_depend_on_its_thread_count() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for &(m, n, k, transposed) in &[
            (256, 1024, 576, false),
            (64, 4096, 27, false),
            (256, 2304, 1024, true),
            (48, 75, 600, false),
            (1280, 16, 320, true),
            (200, 1, 700, false),
            (7, 9, 1100, true),
        ] {
            let v = |rng: &mut ChaCha8Rng, len: usize| -> Vec<f32> {
                (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
            };
            let (a, b, init) = (v(&mut rng, m * k), v(&mut rng, k * n), v(&mut rng, m * n));
            // `transposed`: the lhs is stored `[k, m]` and read column-wise.
            let lhs = if transposed {
                Mat::new(&a, 1, m)
            } else {
                Mat::new(&a, k, 1)
            };
            let rhs = Mat::new(&b, n, 1);
            let product = |par: Parallelism, accumulate: bool| {
                let mut dst = init.clone();
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(match par {
                        Parallelism::Rayon(t) => t,
                        Parallelism::None => 1,
                    })
                    .build()
                    .unwrap();
                pool.install(|| matmul(&mut dst, n, (m, n, k), accumulate, lhs, rhs, par));
                dst.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            };
            for accumulate in [false, true] {
                let want = product(Parallelism::None, accumulate);
                for t in THREADS {
                    assert!(
                        product(Parallelism::Rayon(t), accumulate) == want,
                        "{m}x{n}x{k} transposed {transposed} accumulate {accumulate}: \
                         Rayon({t}) differs from None"
                    );
                }
            }
        }
    }
}
