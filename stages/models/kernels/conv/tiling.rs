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
    /// Padding by reflection (`torch.nn.ReflectionPad2d(p)` then a
    /// convolution without padding) instead of zeros.
    pub(super) reflect: bool,
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
            reflect: false,
            ho: (hp - kh) / s + 1,
            wo: (wp - kw) / s + 1,
        })
    }

    /// The same convolution with its padding made by reflection when
    /// `reflect`: the image's edge row or column is not repeated, so the
    /// padding must be smaller than the image (PyTorch's rule).
    pub(super) fn padded_by(self, reflect: bool) -> Result<Self> {
        if reflect && (self.p >= self.h || self.p >= self.w) {
            bail!(
                "conv2d: reflection padding {} must be smaller than the {}x{} input",
                self.p,
                self.h,
                self.w
            );
        }
        Ok(Self { reflect, ..self })
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
    /// The image row that output row `oy` reads through this kernel row:
    /// `None` where it falls on zero padding.
    pub(super) fn src_row(&self, g: &Geom, oy: usize) -> Option<usize> {
        if g.reflect {
            Some(reflect(g.s * oy + self.ky, g.p, g.h))
        } else {
            self.ys.contains(&oy).then(|| g.s * oy + self.ky - g.p)
        }
    }

    /// Output columns outside `xs`, whose taps fall on the padding.
    pub(super) fn edges(&self, g: &Geom) -> impl Iterator<Item = usize> {
        (0..self.xs.start).chain(self.xs.end..g.wo)
    }
}

/// The rows of `col(x)` in order, `(c, ky, kx)` with `kx` fastest, from
/// per-offset tables of the valid ranges: no divisions per row (deriving
/// each row from its index took ~2% of a CycleGAN step).
pub(super) struct ColRows {
    ys: Vec<Range<usize>>,
    xs: Vec<Range<usize>>,
    next: (usize, usize, usize),
}

impl ColRows {
    pub(super) fn new(g: &Geom) -> Self {
        Self {
            ys: (0..g.kh)
                .map(|ky| valid_range(ky, g.s, g.p, g.h, g.ho))
                .collect(),
            xs: (0..g.kw)
                .map(|kx| valid_range(kx, g.s, g.p, g.w, g.wo))
                .collect(),
            next: (0, 0, 0),
        }
    }
}

impl Iterator for ColRows {
    type Item = ColRow;

    fn next(&mut self) -> Option<ColRow> {
        let (c, ky, kx) = self.next;
        self.next = if kx + 1 < self.xs.len() {
            (c, ky, kx + 1)
        } else if ky + 1 < self.ys.len() {
            (c, ky + 1, 0)
        } else {
            (c + 1, 0, 0)
        };
        Some(ColRow {
            c,
            ky,
            kx,
            ys: self.ys[ky].clone(),
            xs: self.xs[kx].clone(),
        })
    }
}

/// The image index that padded index `padded` (image index + `p`) reads
/// when the padding reflects the image about its edge cells: `-i` before
/// the start, `2(len − 1) − i` past the end. Needs `p < len`.
#[inline]
pub(super) fn reflect(padded: usize, p: usize, len: usize) -> usize {
    if padded < p {
        p - padded
    } else if padded - p >= len {
        2 * (len - 1) + p - padded
    } else {
        padded - p
    }
}

/// Fills `col` (`[rows of col(x), |oys|·wo]`) with `col(x)` for output rows
/// `oys` of one item `img` (`[c, h, w]`).
pub(super) fn im2col(g: &Geom, img: &[f32], oys: Range<usize>, col: &mut [f32]) {
    let plane = g.h * g.w;
    for (cr, crow) in ColRows::new(g).zip(col.chunks_exact_mut(oys.len() * g.wo)) {
        let src = &img[cr.c * plane..][..plane];
        for (oy, dst) in oys.clone().zip(crow.chunks_exact_mut(g.wo)) {
            let Some(iy) = cr.src_row(g, oy) else {
                dst.fill(0.0);
                continue;
            };
            let src = &src[iy * g.w..][..g.w];
            if !cr.xs.is_empty() {
                let at = g.s * cr.xs.start + cr.kx - g.p;
                gather(&src[at..], g.s, &mut dst[cr.xs.clone()]);
            }
            if g.reflect {
                for ox in cr.edges(g) {
                    dst[ox] = src[reflect(g.s * ox + cr.kx, g.p, g.w)];
                }
            } else {
                dst[..cr.xs.start].fill(0.0);
                dst[cr.xs.end..].fill(0.0);
            }
        }
    }
}

/// Adds every entry of `col` (`[cg·kh·kw, |oys|·wo]`, rows `(c, ky, kx)` for
/// `cg` channels) onto the input cell of `dx` (`[cg, h, w]`) that [`im2col`]
/// copies it from. Entries on zero padding are dropped (those inputs are
/// constants); reflected ones go to the cell they mirror.
pub(super) fn col2im(g: &Geom, col: &[f32], oys: Range<usize>, dx: &mut [f32]) {
    let plane = g.h * g.w;
    for (cr, crow) in ColRows::new(g).zip(col.chunks_exact(oys.len() * g.wo)) {
        let dst = &mut dx[cr.c * plane..][..plane];
        for (oy, src) in oys.clone().zip(crow.chunks_exact(g.wo)) {
            let Some(iy) = cr.src_row(g, oy) else {
                continue;
            };
            let dst = &mut dst[iy * g.w..][..g.w];
            if !cr.xs.is_empty() {
                let at = g.s * cr.xs.start + cr.kx - g.p;
                scatter_add(&src[cr.xs.clone()], g.s, &mut dst[at..]);
            }
            if g.reflect {
                for ox in cr.edges(g) {
                    dst[reflect(g.s * ox + cr.kx, g.p, g.w)] += src[ox];
                }
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
