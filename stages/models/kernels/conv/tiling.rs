//! Geometry of a convolution, how its work is cut into units whatever the
//! thread count, and the im2col / col2im gathers each unit runs; `conv.rs`
//! drives them.

use super::*;

// ---------------------------------------------------------------------------
// Geometry and work split
// ---------------------------------------------------------------------------

/// Floats per im2col scratch tile (1 MiB): small enough to stay in L2/L3
/// between im2col writing it and gemm packing it, large enough (hundreds of
/// columns at typical `K`) that gemm's per-call packing of the `[O, K]`
/// operand is amortised.
pub(super) const COL_BUDGET: usize = 1 << 18;

/// Columns a row tile is not cut below just to make more parallel units: a
/// thinner product re-packs the weight operand (and, for the weight gradient,
/// re-reads and re-writes the `[O, K]` sum) for too little work.
pub(super) const MIN_TILE_COLS: usize = 256;

/// Rows (`channels·Kh·Kw`) of the input-gradient product a channel group is
/// not cut below, for the same reason.
pub(super) const MIN_GROUP_ROWS: usize = 64;

/// Units a thin batch is cut into, and the most partial sums the weight
/// gradient keeps: a constant, not the thread count, so that the cut (and
/// with it every sum's order) is the same on any machine. Eight keeps 2–8
/// cores busy without gemm's help (and twice two cores, so an uneven last
/// unit does not idle one for long); more cores share each product through
/// gemm's threads.
pub(super) const UNITS: usize = 8;

/// Output columns (`N·Ho·Wo`, the weight gradient's summation depth) per
/// weight-gradient partial sum at least: each partial costs a zeroed `[O, K]`
/// buffer and a pass adding it up. For the CycleGAN's 256-channel residual
/// blocks at 32x32 and batch 1 (K = 2304, 1024 columns) 4 partials measured
/// ~3 ms (15%) slower per weight gradient than 2 on 2 cores, so they keep 2;
/// thin sums keep fewer partials and share each product through gemm's
/// threads instead.
pub(super) const PARTIAL_COLS: usize = 512;

/// One convolution, always in the forward direction: an "image" `[n, c, h, w]`
/// maps to an "output" `[n, o, ho, wo]` through a weight `[o, c, kh, kw]`.
/// (For a transposed convolution the image is its output.)
#[derive(Clone, Copy, Debug)]
pub(super) struct Geom {
    pub(super) n: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) o: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) s: usize,
    pub(super) p: usize,
    pub(super) ho: usize,
    pub(super) wo: usize,
}

impl Geom {
    pub(super) fn new(
        (n, c, h, w): (usize, usize, usize, usize),
        o: usize,
        (kh, kw): (usize, usize),
        s: usize,
        p: usize,
    ) -> Result<Self> {
        if s == 0 {
            bail!("conv2d: stride must be >= 1");
        }
        if kh == 0 || kw == 0 {
            bail!("conv2d: empty {kh}x{kw} kernel");
        }
        let (hp, wp) = (h + 2 * p, w + 2 * p);
        if hp < kh || wp < kw {
            bail!("conv2d: kernel {kh}x{kw} larger than padded input {hp}x{wp}");
        }
        Ok(Self {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            s,
            p,
            ho: (hp - kh) / s + 1,
            wo: (wp - kw) / s + 1,
        })
    }

    /// Depth of the products: rows of `col(x)`.
    pub(super) fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    pub(super) fn taps(&self) -> usize {
        self.kh * self.kw
    }

    pub(super) fn img_len(&self) -> usize {
        self.c * self.h * self.w
    }

    pub(super) fn pixels(&self) -> usize {
        self.ho * self.wo
    }

    /// 1x1, stride 1, no padding: `col(x)` is `x` itself (as `[C, H·W]`), so
    /// the products read and write the NCHW buffers directly.
    pub(super) fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.s == 1 && self.p == 0
    }
}

/// The output indices `o < out_len` whose tap at kernel offset `k` reads an
/// input index `s·o + k − p` inside `0..len`.
pub(super) fn valid_range(
    k: usize,
    s: usize,
    p: usize,
    len: usize,
    out_len: usize,
) -> Range<usize> {
    let lo = if k >= p { 0 } else { (p - k).div_ceil(s) };
    let hi = if len + p > k {
        ((len + p - 1 - k) / s + 1).min(out_len)
    } else {
        0
    };
    lo.min(hi)..hi
}

/// `part`-th of `parts` near-equal contiguous pieces of `0..len`.
pub(super) fn split(len: usize, parts: usize, part: usize) -> Range<usize> {
    len * part / parts..len * (part + 1) / parts
}

/// How work is cut: units to aim for and the im2col tile budget (both fix
/// the arithmetic), and threads to use (which only schedules it). A
/// parameter (not read inside the kernels) so tests can force every split.
#[derive(Clone, Copy, Debug)]
pub(super) struct Plan {
    pub(super) threads: usize,
    pub(super) units: usize,
    pub(super) budget: usize,
}

impl Plan {
    pub(super) fn current() -> Self {
        Self {
            threads: rayon::current_num_threads().max(1),
            units: UNITS,
            budget: COL_BUDGET,
        }
    }

    /// Units to aim for (never the thread count: see [`UNITS`]).
    pub(super) fn target_units(&self) -> usize {
        self.units.max(1)
    }

    pub(super) fn workers(&self, units: usize) -> usize {
        self.threads.min(units).max(1)
    }

    /// gemm's own parallelism inside each unit: none when the units keep every
    /// thread busy, else the spare threads per worker. (It changes only who
    /// computes which block of a product, not any sum's order.)
    pub(super) fn inner(&self, units: usize) -> Parallelism {
        if units >= self.threads {
            Parallelism::None
        } else {
            Parallelism::Rayon(self.threads.div_ceil(units.max(1)))
        }
    }

    /// Output rows per tile when a tile's scratch has `col_rows` rows per
    /// output column (0: no scratch), `items` batch items share the threads.
    /// Tiles are evened out so the last is not a sliver.
    pub(super) fn tile_rows(&self, g: &Geom, col_rows: usize, items: usize) -> usize {
        let want_tiles = self.target_units().div_ceil(items.max(1));
        let by_par =
            g.ho.div_ceil(want_tiles)
                .max(MIN_TILE_COLS.div_ceil(g.wo.max(1)));
        even_rows(g.ho, self.budget_rows(g, col_rows).min(by_par))
    }

    /// Output rows per tile that keep a scratch of `col_rows` rows per output
    /// column within the budget (at least one row; all rows for no scratch).
    pub(super) fn budget_rows(&self, g: &Geom, col_rows: usize) -> usize {
        let rows = match col_rows {
            0 => g.ho,
            r => self.budget / (r * g.wo.max(1)),
        };
        even_rows(g.ho, rows)
    }
}

/// Rows per tile for at most `rows` rows in each of the fewest tiles covering
/// `ho`, evened out so the last tile is not a sliver.
pub(super) fn even_rows(ho: usize, rows: usize) -> usize {
    let rows = rows.clamp(1, ho.max(1));
    ho.div_ceil(ho.div_ceil(rows).max(1)).max(1)
}

// ---------------------------------------------------------------------------
// im2col / col2im
// ---------------------------------------------------------------------------

/// `dst[j] = src[s·j]`.
#[inline(always)]
pub(super) fn gather(src: &[f32], s: usize, dst: &mut [f32]) {
    let len = dst.len();
    if len == 0 {
        return;
    }
    match s {
        1 => dst.copy_from_slice(&src[..len]),
        // Fixed-length slices and plain indexing let LLVM vectorise with
        // shuffles; the generic `step_by` loop stays scalar.
        2 => {
            let src = &src[..2 * len - 1];
            for (j, d) in dst.iter_mut().enumerate() {
                *d = src[2 * j];
            }
        }
        s => {
            for (d, &v) in dst.iter_mut().zip(src.iter().step_by(s)) {
                *d = v;
            }
        }
    }
}

/// `dst[s·j] += src[j]`.
#[inline(always)]
pub(super) fn scatter_add(src: &[f32], s: usize, dst: &mut [f32]) {
    let len = src.len();
    if len == 0 {
        return;
    }
    match s {
        1 => {
            for (d, &v) in dst[..len].iter_mut().zip(src) {
                *d += v;
            }
        }
        2 => {
            let dst = &mut dst[..2 * len - 1];
            for (j, &v) in src.iter().enumerate() {
                dst[2 * j] += v;
            }
        }
        s => {
            for (d, &v) in dst.iter_mut().step_by(s).zip(src) {
                *d += v;
            }
        }
    }
}

/// Where row `row = (c, ky, kx)` of `col(x)` reads: the channel, the output
/// rows and columns whose taps land inside the image, and the kernel offsets.
pub(super) struct ColRow {
    pub(super) c: usize,
    pub(super) ky: usize,
    pub(super) kx: usize,
    pub(super) ys: Range<usize>,
    pub(super) xs: Range<usize>,
}

impl ColRow {
    pub(super) fn new(g: &Geom, row: usize) -> Self {
        let (ky, kx) = ((row / g.kw) % g.kh, row % g.kw);
        Self {
            c: row / g.taps(),
            ky,
            kx,
            ys: valid_range(ky, g.s, g.p, g.h, g.ho),
            xs: valid_range(kx, g.s, g.p, g.w, g.wo),
        }
    }

    /// Offset in the channel plane of the input cell that output `(oy,
    /// xs.start)` reads, if that output row reads inside the image at all.
    pub(super) fn start(&self, g: &Geom, oy: usize) -> Option<usize> {
        (self.ys.contains(&oy) && !self.xs.is_empty())
            .then(|| (g.s * oy + self.ky - g.p) * g.w + g.s * self.xs.start + self.kx - g.p)
    }
}

/// Fills `col` (`[rows of col(x), |oys|·wo]`) with `col(x)` for output rows
/// `oys` of one item `img` (`[c, h, w]`).
pub(super) fn im2col(g: &Geom, img: &[f32], oys: Range<usize>, col: &mut [f32]) {
    let plane = g.h * g.w;
    for (row, crow) in col.chunks_exact_mut(oys.len() * g.wo).enumerate() {
        let cr = ColRow::new(g, row);
        let src = &img[cr.c * plane..][..plane];
        for (oy, dst) in oys.clone().zip(crow.chunks_exact_mut(g.wo)) {
            match cr.start(g, oy) {
                None => dst.fill(0.0),
                Some(at) => {
                    dst[..cr.xs.start].fill(0.0);
                    dst[cr.xs.end..].fill(0.0);
                    gather(&src[at..], g.s, &mut dst[cr.xs.clone()]);
                }
            }
        }
    }
}

/// Adds every entry of `col` (`[cg·kh·kw, |oys|·wo]`, rows `(c, ky, kx)` for
/// `cg` channels) onto the input cell of `dx` (`[cg, h, w]`) that [`im2col`]
/// copies it from. Entries on padding are dropped: those inputs are constants.
pub(super) fn col2im(g: &Geom, col: &[f32], oys: Range<usize>, dx: &mut [f32]) {
    let plane = g.h * g.w;
    for (row, crow) in col.chunks_exact(oys.len() * g.wo).enumerate() {
        let cr = ColRow::new(g, row);
        let dst = &mut dx[cr.c * plane..][..plane];
        for (oy, src) in oys.clone().zip(crow.chunks_exact(g.wo)) {
            if let Some(at) = cr.start(g, oy) {
                scatter_add(&src[cr.xs.clone()], g.s, &mut dst[at..]);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// gemm
// ---------------------------------------------------------------------------

/// An output buffer that parallel workers write into, each through
/// [`gemm_into`] into cells no other worker touches.
#[derive(Clone, Copy)]
pub(super) struct SharedDst {
    pub(super) ptr: *mut f32,
    pub(super) len: usize,
}

// SAFETY: a plain pointer to a buffer that outlives the workers (they run
// inside a rayon call that borrows it); disjointness of the writes is the
// obligation of each `gemm_into` call site.
unsafe impl Send for SharedDst {}
unsafe impl Sync for SharedDst {}

impl SharedDst {
    /// Pointer and length, for [`gemm_into`]. (A method, so that closures
    /// capture the whole `Sync` struct rather than its raw-pointer field.)
    pub(super) fn raw(&self) -> (*mut f32, usize) {
        (self.ptr, self.len)
    }
}

// ---------------------------------------------------------------------------
