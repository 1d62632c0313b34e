//! The little dense linear algebra the fidelity measures need, in f64 and in
//! plain Rust: a row-major matrix, products of rows with rows (`A Bᵀ`), and
//! the eigendecomposition of a symmetric matrix (Householder reduction to
//! tridiagonal form, then the implicit QL algorithm: EISPACK's `tred2` and
//! `tql2` as JAMA writes them, public domain).
//!
//! Promises: every result is the same bytes on any thread count. Work is
//! split by rows (each output element is computed by one fixed sequence of
//! operations, whichever thread runs it), and dot products add four
//! interleaved partial sums in a fixed order.

use anyhow::{Result, bail, ensure};
use rayon::prelude::*;

/// A dense row-major matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Mat {
        Mat {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn from_fn(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f64) -> Mat {
        let mut data = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            data.extend((0..cols).map(|j| f(i, j)));
        }
        Mat { rows, cols, data }
    }

    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    /// The matrix of the given rows, in that order.
    pub fn select_rows(&self, rows: &[usize]) -> Mat {
        let mut data = Vec::with_capacity(rows.len() * self.cols);
        for &i in rows {
            data.extend_from_slice(self.row(i));
        }
        Mat {
            rows: rows.len(),
            cols: self.cols,
            data,
        }
    }

    pub fn transpose(&self) -> Mat {
        Mat::from_fn(self.cols, self.rows, |i, j| self.at(j, i))
    }

    /// Column means.
    pub fn column_means(&self) -> Vec<f64> {
        let mut m = vec![0.0; self.cols];
        for i in 0..self.rows {
            for (a, x) in m.iter_mut().zip(self.row(i)) {
                *a += x;
            }
        }
        m.iter_mut().for_each(|a| *a /= self.rows as f64);
        m
    }

    /// Each row minus `mean`.
    pub fn centred(&self, mean: &[f64]) -> Mat {
        let mut c = self.clone();
        for row in c.data.chunks_exact_mut(self.cols) {
            for (x, m) in row.iter_mut().zip(mean) {
                *x -= m;
            }
        }
        c
    }
}

/// x · y with four interleaved partial sums, added in a fixed order (the
/// compiler may not reorder one sum into lanes itself; four it can).
pub fn dot(x: &[f64], y: &[f64]) -> f64 {
    debug_assert_eq!(x.len(), y.len());
    let mut s = [0.0f64; 4];
    let (xc, yc) = (x.chunks_exact(4), y.chunks_exact(4));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for l in 0..4 {
            s[l] += a[l] * b[l];
        }
    }
    let mut tail = 0.0;
    for (a, b) in xr.iter().zip(yr) {
        tail += a * b;
    }
    ((s[0] + s[1]) + (s[2] + s[3])) + tail
}

/// `A Bᵀ`: every row of `a` dotted with every row of `b`.
pub fn mul_rows(a: &Mat, b: &Mat) -> Mat {
    assert_eq!(a.cols, b.cols, "mul_rows: inner dimensions");
    let mut out = Mat::zeros(a.rows, b.rows);
    if b.rows == 0 {
        return out;
    }
    out.data
        .par_chunks_mut(b.rows)
        .enumerate()
        .for_each(|(i, row)| {
            let ai = a.row(i);
            for (j, o) in row.iter_mut().enumerate() {
                *o = dot(ai, b.row(j));
            }
        });
    out
}

/// A symmetric matrix's eigenvalues (ascending) and, when asked for,
/// eigenvectors as the rows of `vectors` (row `i` belongs to value `i`).
pub struct SymmetricEigen {
    pub values: Vec<f64>,
    pub vectors: Option<Mat>,
}

/// Eigendecomposition of the symmetric matrix `a` (only its values are
/// trusted to be symmetric: the lower triangle is read). Without `vectors`
/// it skips the O(n³) accumulation of the transformations.
pub fn symmetric_eigen(a: &Mat, vectors: bool) -> Result<SymmetricEigen> {
    ensure!(
        a.rows == a.cols,
        "eigen: {}x{} is not square",
        a.rows,
        a.cols
    );
    if let Some(i) = a.data.iter().position(|x| !x.is_finite()) {
        bail!(
            "eigen: element ({}, {}) is {}",
            i / a.cols,
            i % a.cols,
            a.data[i]
        );
    }
    let n = a.rows;
    if n == 0 {
        return Ok(SymmetricEigen {
            values: vec![],
            vectors: vectors.then(|| Mat::zeros(0, 0)),
        });
    }
    let mut v: Vec<Vec<f64>> = (0..n).map(|i| a.row(i).to_vec()).collect();
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n];
    tred2(&mut v, &mut d, &mut e, vectors);
    // tql2 updates columns of V pairwise: as rows they are contiguous.
    let mut vt: Vec<Vec<f64>> = if vectors {
        (0..n).map(|j| (0..n).map(|k| v[k][j]).collect()).collect()
    } else {
        vec![]
    };
    drop(v);
    tql2(&mut d, &mut e, vectors.then_some(&mut vt))?;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| d[i].total_cmp(&d[j]).then(i.cmp(&j)));
    Ok(SymmetricEigen {
        values: order.iter().map(|&i| d[i]).collect(),
        vectors: vectors.then(|| {
            let mut m = Mat::zeros(n, n);
            for (r, &i) in order.iter().enumerate() {
                m.data[r * n..(r + 1) * n].copy_from_slice(&vt[i]);
            }
            m
        }),
    })
}

/// Householder reduction of the symmetric `v` to tridiagonal form: diagonal
/// in `d`, subdiagonal in `e[1..]`; with `accumulate`, `v` ends as the
/// orthogonal transformation.
fn tred2(v: &mut [Vec<f64>], d: &mut [f64], e: &mut [f64], accumulate: bool) {
    let n = d.len();
    d.copy_from_slice(&v[n - 1]);
    for i in (1..n).rev() {
        let mut scale = 0.0;
        let mut h = 0.0;
        for dk in &d[..i] {
            scale += dk.abs();
        }
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[i - 1][j];
                v[i][j] = 0.0;
                v[j][i] = 0.0;
            }
        } else {
            for dk in &mut d[..i] {
                *dk /= scale;
                h += *dk * *dk;
            }
            let mut f = d[i - 1];
            let mut g = h.sqrt();
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            e[..i].iter_mut().for_each(|x| *x = 0.0);
            for j in 0..i {
                f = d[j];
                v[j][i] = f;
                g = e[j] + v[j][j] * f;
                for k in j + 1..i {
                    g += v[k][j] * d[k];
                    e[k] += v[k][j] * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                f = d[j];
                g = e[j];
                for k in j..i {
                    v[k][j] -= f * e[k] + g * d[k];
                }
                d[j] = v[i - 1][j];
                v[i][j] = 0.0;
            }
        }
        d[i] = h;
    }
    if !accumulate {
        // The diagonal of the tridiagonal form is left on v's diagonal.
        for (j, dj) in d.iter_mut().enumerate() {
            *dj = v[j][j];
        }
        e[0] = 0.0;
        return;
    }
    for i in 0..n - 1 {
        v[n - 1][i] = v[i][i];
        v[i][i] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for (dk, row) in d.iter_mut().zip(v.iter()).take(i + 1) {
                *dk = row[i + 1] / h;
            }
            for j in 0..=i {
                let mut g = 0.0;
                for row in v.iter().take(i + 1) {
                    g += row[i + 1] * row[j];
                }
                for (row, dk) in v.iter_mut().zip(d.iter()).take(i + 1) {
                    row[j] -= g * dk;
                }
            }
        }
        for row in v.iter_mut().take(i + 1) {
            row[i + 1] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = v[n - 1][j];
        v[n - 1][j] = 0.0;
    }
    v[n - 1][n - 1] = 1.0;
    e[0] = 0.0;
}

/// Implicit QL iterations on the tridiagonal (`d`, `e`): eigenvalues into
/// `d`; with `vt` (the transformation's columns as rows), eigenvectors into
/// its rows.
fn tql2(d: &mut [f64], e: &mut [f64], mut vt: Option<&mut Vec<Vec<f64>>>) -> Result<()> {
    let n = d.len();
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0;
    let mut tst1: f64 = 0.0;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            let mut iter = 0;
            loop {
                iter += 1;
                if iter > 200 {
                    bail!("eigen: the QL iteration did not converge for eigenvalue {l} of {n}");
                }
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in &mut d[l + 2..] {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let (mut c, mut c2, mut c3) = (1.0, 1.0, 1.0);
                let el1 = e[l + 1];
                let (mut s, mut s2) = (0.0, 0.0);
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    if let Some(vt) = vt.as_deref_mut() {
                        let (lo, hi) = vt.split_at_mut(i + 1);
                        let (vi, vi1) = (&mut lo[i], &mut hi[0]);
                        for (a, b) in vi.iter_mut().zip(vi1.iter_mut()) {
                            let hk = *b;
                            *b = s * *a + c * hk;
                            *a = c * *a - s * hk;
                        }
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    Ok(())
}

/// Σ √max(λ, 0) over the eigenvalues of a symmetric positive semi-definite
/// matrix: the trace of its square root. Rounding leaves a rank-deficient
/// matrix's zero eigenvalues slightly negative; they count as zero.
pub fn trace_sqrt_psd(a: &Mat) -> Result<f64> {
    Ok(symmetric_eigen(a, false)?
        .values
        .iter()
        .map(|&l| l.max(0.0).sqrt())
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symmetric(n: usize) -> Mat {
        let b = Mat::from_fn(n, n, |i, j| ((i * 7 + j * 3) as f64 * 0.37).sin());
        let mut s = mul_rows(&b, &b);
        // A negative and a repeated direction besides the PSD part.
        for i in 0..n {
            s.data[i * n + i] -= 0.5;
        }
        s
    }

    #[test]
    fn eigen_reconstructs_the_matrix_with_orthonormal_vectors() {
        for n in [1, 2, 5, 17, 40] {
            let a = symmetric(n);
            let eig = symmetric_eigen(&a, true).unwrap();
            let v = eig.vectors.as_ref().unwrap();
            assert!(eig.values.windows(2).all(|w| w[0] <= w[1]), "ascending");
            let scaled = Mat::from_fn(n, n, |i, j| v.at(i, j) * eig.values[i]);
            // A = Σ λ_i v_i v_iᵀ = Vᵀ Λ V with vectors as rows.
            let vt = v.transpose();
            let recon = mul_rows(&vt, &scaled.transpose());
            let scale = a.data.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            for (x, y) in recon.data.iter().zip(&a.data) {
                assert!(
                    (x - y).abs() < 1e-12 * scale * n as f64,
                    "n {n}: {x} vs {y}"
                );
            }
            let gram = mul_rows(v, v);
            for i in 0..n {
                for j in 0..n {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((gram.at(i, j) - want).abs() < 1e-12, "n {n}: VVᵀ ({i},{j})");
                }
            }
            // Without vectors: the same values, to rounding.
            let values = symmetric_eigen(&a, false).unwrap().values;
            for (x, y) in values.iter().zip(&eig.values) {
                assert!(
                    (x - y).abs() < 1e-12 * scale * n as f64,
                    "n {n}: {x} vs {y}"
                );
            }
        }
    }

    #[test]
    fn eigen_of_a_known_matrix() {
        // [[2, 1], [1, 2]]: 1 and 3; diag(3, -1, 0) with a zero row.
        let a = Mat::from_fn(2, 2, |i, j| if i == j { 2.0 } else { 1.0 });
        let values = symmetric_eigen(&a, false).unwrap().values;
        assert!((values[0] - 1.0).abs() < 1e-15 && (values[1] - 3.0).abs() < 1e-15);
        let b = Mat::from_fn(3, 3, |i, j| match (i, j) {
            (0, 0) => 3.0,
            (1, 1) => -1.0,
            _ => 0.0,
        });
        assert_eq!(symmetric_eigen(&b, true).unwrap().values, [-1.0, 0.0, 3.0]);
        assert!((trace_sqrt_psd(&a).unwrap() - (1.0 + 3f64.sqrt())).abs() < 1e-15);
    }

    #[test]
    fn a_non_finite_element_is_an_error_not_a_hang() {
        let mut a = symmetric(3);
        a.data[4] = f64::NAN;
        let err = symmetric_eigen(&a, false).err().unwrap().to_string();
        assert!(err.contains("(1, 1) is NaN"), "{err}");
    }

    #[test]
    fn dot_and_products() {
        let x: Vec<f64> = (0..11).map(|i| i as f64).collect();
        assert_eq!(dot(&x, &x), 385.0);
        let a = Mat::from_fn(2, 3, |i, j| (i * 3 + j) as f64);
        let p = mul_rows(&a, &a);
        assert_eq!(p.data, [5.0, 14.0, 14.0, 50.0]);
        assert_eq!(a.transpose().row(2), [2.0, 5.0]);
        assert_eq!(a.column_means(), [1.5, 2.5, 3.5]);
    }
}
