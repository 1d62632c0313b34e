//! Distances between two sets of feature vectors (rows of a [`Mat`]): the
//! Fréchet distance between Gaussians fitted to them, the kernel inception
//! distance's unbiased MMD², and k-NN precision and recall.
//!
//! - Fréchet distance (Heusel et al. 2017): |μ₁-μ₂|² + tr Σ₁ + tr Σ₂ −
//!   2 tr (Σ₁^½ Σ₂ Σ₁^½)^½, covariances with n-1. The last trace is the sum
//!   of the square roots of a symmetric PSD matrix's eigenvalues, never a
//!   general matrix square root: with centred data A (n₁×d) and B (n₂×d) it
//!   equals the nuclear norm of A Bᵀ over √((n₁-1)(n₂-1)), so when a set has
//!   fewer images than features (the usual case here) the eigenproblem is
//!   min(n₁, n₂)-sized and exact for the rank-deficient covariances that make
//!   `sqrtm(Σ₁Σ₂)` unstable; otherwise it is d-sized, D^½ Vᵀ Σ₂ V D^½ with
//!   Σ₁ = V D Vᵀ.
//! - KID (Bińkowski et al. 2018): unbiased MMD² with the kernel
//!   k(x, y) = (x·y/d + 1)³, over `subsets` random subsets of `m` rows of each
//!   set (without replacement), mean and standard deviation (ddof 0, as
//!   torch-fidelity and clean-fid report it).
//! - Precision and recall (Kynkäänniemi et al. 2019): a sample is inside a
//!   set's manifold when it lies within some member's distance to that
//!   member's k-th nearest neighbour (itself excluded). Precision: the share
//!   of the other set inside the real manifold; recall: the share of the
//!   real set inside the other's.
//!
//! Everything is f64 and the same bytes on any thread count (see `linalg`).

use anyhow::{Result, ensure};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::linalg::{Mat, dot, mul_rows, symmetric_eigen, trace_sqrt_psd};

/// The Fréchet distance and its parts.
#[derive(Clone, Debug, Serialize)]
pub struct Frechet {
    pub distance: f64,
    /// |μ₁ - μ₂|².
    pub mean_term: f64,
    /// tr Σ₁ + tr Σ₂ - 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½.
    pub covariance_term: f64,
}

/// Fréchet distance between Gaussians fitted to the rows of `x` and `y`.
pub fn frechet_distance(x: &Mat, y: &Mat) -> Result<Frechet> {
    ensure!(
        x.cols == y.cols,
        "Fréchet distance: {} vs {} features",
        x.cols,
        y.cols
    );
    ensure!(
        x.rows >= 2 && y.rows >= 2,
        "Fréchet distance needs at least 2 samples per set (covariances), not {} and {}",
        x.rows,
        y.rows
    );
    let (mx, my) = (x.column_means(), y.column_means());
    let mean_term: f64 = mx.iter().zip(&my).map(|(a, b)| (a - b) * (a - b)).sum();
    let (a, b) = (x.centred(&mx), y.centred(&my));
    let (n1, n2) = ((x.rows - 1) as f64, (y.rows - 1) as f64);
    let trace = |m: &Mat, n: f64| m.data.iter().map(|v| v * v).sum::<f64>() / n;
    let (tr1, tr2) = (trace(&a, n1), trace(&b, n2));
    let cross = trace_sqrt_cross(&a, &b)?;
    let covariance_term = tr1 + tr2 - 2.0 * cross;
    Ok(Frechet {
        distance: mean_term + covariance_term,
        mean_term,
        covariance_term,
    })
}

/// tr (Σ₁^½ Σ₂ Σ₁^½)^½ for centred data `a`, `b` (Σ = rows ᵀ rows / (n-1)).
fn trace_sqrt_cross(a: &Mat, b: &Mat) -> Result<f64> {
    let (n1, n2, d) = (a.rows, b.rows, a.cols);
    let norm = ((n1 - 1) as f64 * (n2 - 1) as f64).sqrt();
    if n1.min(n2) < d {
        trace_sqrt_cross_by_samples(a, b, norm)
    } else {
        trace_sqrt_cross_by_features(a, b)
    }
}

/// Via the samples: the singular values of C = A Bᵀ (n₁×n₂) are the square
/// roots of the eigenvalues of the smaller of C Cᵀ and Cᵀ C; the non-zero
/// eigenvalues of Σ₁Σ₂ are those of C Cᵀ / ((n₁-1)(n₂-1)).
///
/// Centring leaves every A with the null direction (1, ..., 1), which
/// rounding turns into an eigenvalue of about ε λ_max, and its square root
/// (√ε σ_max) into an error of 1e-8 relative: so the rows are first rotated
/// into the complement of that direction (see [`drop_mean_direction`]).
fn trace_sqrt_cross_by_samples(a: &Mat, b: &Mat, norm: f64) -> Result<f64> {
    let c = mul_rows(&drop_mean_direction(a), &drop_mean_direction(b));
    let gram = if c.rows <= c.cols {
        mul_rows(&c, &c)
    } else {
        let ct = c.transpose();
        mul_rows(&ct, &ct)
    };
    Ok(trace_sqrt_psd(&gram)? / norm)
}

/// `Qᵀ A` for an orthonormal basis Q (n × n-1) of the vectors orthogonal to
/// (1, ..., 1): the Householder reflection H = I - 2 v vᵀ / vᵀv with
/// v = 1 + √n e₁ maps 1 to -√n e₁, so rows 2..n of H A are Qᵀ A. For centred
/// A, (Qᵀ A)ᵀ (Qᵀ A) = Aᵀ A: the same covariance, one row fewer, and no null
/// direction made of rounding.
fn drop_mean_direction(a: &Mat) -> Mat {
    let n = a.rows;
    let sqrt_n = (n as f64).sqrt();
    // vᵀ v = 2n + 2√n; v = 1 everywhere but v₀ = 1 + √n.
    let vv = 2.0 * n as f64 + 2.0 * sqrt_n;
    let mut vta = vec![0.0; a.cols];
    for i in 0..n {
        let vi = if i == 0 { 1.0 + sqrt_n } else { 1.0 };
        for (t, x) in vta.iter_mut().zip(a.row(i)) {
            *t += vi * x;
        }
    }
    let mut out = Mat::zeros(n - 1, a.cols);
    for i in 1..n {
        for ((o, x), t) in out.data[(i - 1) * a.cols..i * a.cols]
            .iter_mut()
            .zip(a.row(i))
            .zip(&vta)
        {
            *o = x - 2.0 * t / vv;
        }
    }
    out
}

/// Via the features: Σ₁ = V D Vᵀ, then the eigenvalues of
/// W Σ₂ Wᵀ with W = D^½ V (eigenvectors as rows) are those of Σ₁^½ Σ₂ Σ₁^½.
fn trace_sqrt_cross_by_features(a: &Mat, b: &Mat) -> Result<f64> {
    let covariance = |m: &Mat| {
        let t = m.transpose();
        let mut s = mul_rows(&t, &t);
        let n = (m.rows - 1) as f64;
        s.data.iter_mut().for_each(|v| *v /= n);
        s
    };
    let (s1, s2) = (covariance(a), covariance(b));
    let eig = symmetric_eigen(&s1, true)?;
    let mut w = eig.vectors.expect("asked for vectors");
    let d = w.cols;
    for (i, l) in eig.values.iter().enumerate() {
        let r = l.max(0.0).sqrt();
        w.data[i * d..(i + 1) * d].iter_mut().for_each(|v| *v *= r);
    }
    // (W Σ₂) Wᵀ; Σ₂ is symmetric, so W Σ₂ is W's rows against Σ₂'s rows.
    let ws = mul_rows(&w, &s2);
    trace_sqrt_psd(&mul_rows(&ws, &w))
}

/// Dot products of every row of `x` with every row of `y`, and the squared
/// norms of the rows: what the kernel and the distances are built from.
pub struct Products {
    pub dots: Mat,
    pub x_norms: Vec<f64>,
    pub y_norms: Vec<f64>,
}

impl Products {
    pub fn new(x: &Mat, y: &Mat) -> Products {
        let norms = |m: &Mat| (0..m.rows).map(|i| dot(m.row(i), m.row(i))).collect();
        Products {
            dots: mul_rows(x, y),
            x_norms: norms(x),
            y_norms: norms(y),
        }
    }

    /// Squared Euclidean distance (never below 0, which rounding could give).
    pub fn distance2(&self, i: usize, j: usize) -> f64 {
        (self.x_norms[i] + self.y_norms[j] - 2.0 * self.dots.at(i, j)).max(0.0)
    }

    /// (x·y/d + 1)³.
    pub fn kernel(&self, i: usize, j: usize, d: usize) -> f64 {
        (self.dots.at(i, j) / d as f64 + 1.0).powi(3)
    }
}

/// The three kernel matrices of two sets.
pub struct Kernels {
    xx: Mat,
    yy: Mat,
    xy: Mat,
}

impl Kernels {
    pub fn new(xx: &Products, yy: &Products, xy: &Products, d: usize) -> Kernels {
        let k = |p: &Products| Mat::from_fn(p.dots.rows, p.dots.cols, |i, j| p.kernel(i, j, d));
        Kernels {
            xx: k(xx),
            yy: k(yy),
            xy: k(xy),
        }
    }

    /// Unbiased MMD² between the rows `xi` of x and `yi` of y (each without
    /// repeats, at least two).
    pub fn mmd2_unbiased(&self, xi: &[usize], yi: &[usize]) -> f64 {
        let within = |k: &Mat, idx: &[usize]| {
            let mut s = 0.0;
            for &i in idx {
                for &j in idx {
                    if i != j {
                        s += k.at(i, j);
                    }
                }
            }
            let n = idx.len() as f64;
            s / (n * (n - 1.0))
        };
        let mut cross = 0.0;
        for &i in xi {
            for &j in yi {
                cross += self.xy.at(i, j);
            }
        }
        within(&self.xx, xi) + within(&self.yy, yi)
            - 2.0 * cross / (xi.len() as f64 * yi.len() as f64)
    }
}

/// KID over random subsets: the MMD² per subset, their mean and std.
#[derive(Clone, Debug, Serialize)]
pub struct Kid {
    pub mean: f64,
    pub std: f64,
    /// Rows per subset actually used: `subset_size` capped by both set sizes.
    pub subset_size: usize,
    pub subsets: usize,
}

/// `subsets` draws of `min(subset_size, n_x, n_y)` rows of each set without
/// replacement (a partial Fisher–Yates shuffle from `rng`), x then y.
pub fn kid(
    kernels: &Kernels,
    n_x: usize,
    n_y: usize,
    subsets: usize,
    subset_size: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Kid> {
    let m = subset_size.min(n_x).min(n_y);
    ensure!(
        m >= 2,
        "KID needs at least 2 images per set, not {n_x} and {n_y}"
    );
    ensure!(subsets >= 1, "KID needs at least one subset");
    let draw = |n: usize, rng: &mut ChaCha8Rng| {
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..m {
            let j = rng.random_range(i..n);
            idx.swap(i, j);
        }
        idx.truncate(m);
        idx
    };
    let values: Vec<f64> = (0..subsets)
        .map(|_| {
            let xi = draw(n_x, rng);
            let yi = draw(n_y, rng);
            kernels.mmd2_unbiased(&xi, &yi)
        })
        .collect();
    let mean = values.iter().sum::<f64>() / subsets as f64;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / subsets as f64;
    Ok(Kid {
        mean,
        std: var.sqrt(),
        subset_size: m,
        subsets,
    })
}

/// k-NN precision and recall of `y` against the real set `x`.
#[derive(Clone, Debug, Serialize)]
pub struct PrecisionRecall {
    pub precision: f64,
    pub recall: f64,
    pub k: usize,
}

/// Squared distance from each row to its k-th nearest other row, from the
/// set's products with itself.
fn knn_radii2(own: &Products, k: usize) -> Vec<f64> {
    let n = own.dots.rows;
    (0..n)
        .map(|i| {
            let mut d: Vec<f64> = (0..n).map(|j| own.distance2(i, j)).collect();
            // Index k: the zero distance to itself sorts first.
            *d.select_nth_unstable_by(k, f64::total_cmp).1
        })
        .collect()
}

pub fn precision_recall(
    xx: &Products,
    yy: &Products,
    xy: &Products,
    k: usize,
) -> Result<PrecisionRecall> {
    let (nx, ny) = (xx.dots.rows, yy.dots.rows);
    ensure!(
        k >= 1 && nx > k && ny > k,
        "precision/recall with k = {k} needs more than k images per set, not {nx} and {ny}"
    );
    let (rx, ry) = (knn_radii2(xx, k), knn_radii2(yy, k));
    let inside_x = (0..ny)
        .filter(|&j| (0..nx).any(|i| xy.distance2(i, j) <= rx[i]))
        .count();
    let inside_y = (0..nx)
        .filter(|&i| (0..ny).any(|j| xy.distance2(i, j) <= ry[j]))
        .count();
    Ok(PrecisionRecall {
        precision: inside_x as f64 / ny as f64,
        recall: inside_y as f64 / nx as f64,
        k,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// The feature matrices of tests/reference/fidelity_reference.py.
    fn features(n: usize, d: usize, phase: f64, shift: f64) -> Mat {
        Mat::from_fn(n, d, |i, j| {
            let (i, j) = (i as f64, j as f64);
            (0.9 * i + 1.7 * j + phase).sin()
                + 0.5 * (0.31 * i * j + 0.2 * j).cos()
                + 0.25 * (2.3 * i + phase * j).sin() * (0.7 * j).cos()
                + shift * (0.5 + 0.1 * j)
        })
    }

    /// Rows of independent-looking uniforms in [-1, 1) (the shader hash).
    fn uniform(n: usize, d: usize, salt: f64) -> Mat {
        Mat::from_fn(n, d, |i, j| {
            let v = (salt + 0.37 * i as f64 + 0.113 * j as f64 * (1.0 + 0.01 * i as f64)).sin()
                * 43758.5453;
            2.0 * (v - v.floor()) - 1.0
        })
    }

    fn all(n: usize) -> Vec<usize> {
        (0..n).collect()
    }

    struct Case {
        x: Mat,
        y: Mat,
    }

    impl Case {
        fn products(&self) -> (Products, Products, Products) {
            (
                Products::new(&self.x, &self.x),
                Products::new(&self.y, &self.y),
                Products::new(&self.x, &self.y),
            )
        }
    }

    /// Case A: more samples than features (the eigenproblem is d-sized);
    /// case B: fewer (it is sample-sized).
    fn case_a() -> Case {
        Case {
            x: features(40, 6, 0.3, 0.0),
            y: features(50, 6, 1.1, 0.4),
        }
    }

    fn case_b() -> Case {
        Case {
            x: features(20, 64, 0.3, 0.0),
            y: features(30, 64, 0.8, 0.1),
        }
    }

    fn close(got: f64, want: f64, what: &str) {
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{what}: {got} vs reference {want}"
        );
    }

    /// Numbers printed by `python3 tests/reference/fidelity_reference.py`
    /// (numpy 2.x, scipy 1.x: FD with scipy.linalg.sqrtm; MMD² and
    /// precision/recall on the full sets from scipy's cdist).
    #[test]
    fn fd_kid_and_precision_recall_match_the_numpy_scipy_reference() {
        for (name, case, fd, mmd2, precision, recall) in [
            ("A", case_a(), REF_A.0, REF_A.1, REF_A.2, REF_A.3),
            ("B", case_b(), REF_B.0, REF_B.1, REF_B.2, REF_B.3),
        ] {
            let f = frechet_distance(&case.x, &case.y).unwrap();
            close(f.distance, fd, &format!("case {name} FD"));
            let (xx, yy, xy) = case.products();
            let kernels = Kernels::new(&xx, &yy, &xy, case.x.cols);
            close(
                kernels.mmd2_unbiased(&all(case.x.rows), &all(case.y.rows)),
                mmd2,
                &format!("case {name} MMD²"),
            );
            let pr = precision_recall(&xx, &yy, &xy, 3).unwrap();
            close(pr.precision, precision, &format!("case {name} precision"));
            close(pr.recall, recall, &format!("case {name} recall"));
        }
    }

    // (FD, unbiased MMD², precision, recall), pasted from the reference script.
    const REF_A: (f64, f64, f64, f64) = (0.6924590010891691, 0.34032470031277695, 0.9, 0.875);
    const REF_B: (f64, f64, f64, f64) = (
        16.27506638080183,
        0.44647364501138176,
        0.8333333333333334,
        0.4,
    );

    #[test]
    fn both_fd_routes_agree() {
        for case in [case_a(), case_b()] {
            let (mx, my) = (case.x.column_means(), case.y.column_means());
            let (a, b) = (case.x.centred(&mx), case.y.centred(&my));
            let norm = (((a.rows - 1) * (b.rows - 1)) as f64).sqrt();
            let by_samples = trace_sqrt_cross_by_samples(&a, &b, norm).unwrap();
            let by_features = trace_sqrt_cross_by_features(&a, &b).unwrap();
            // The feature route takes √ of rounding-level eigenvalues of the
            // rank-deficient case B, hence the looser bound there.
            assert!(
                (by_samples - by_features).abs() < 1e-6 * by_samples,
                "{by_samples} vs {by_features}"
            );
        }
    }

    #[test]
    fn fd_of_a_set_with_itself_is_zero_and_grows_with_a_shift() {
        for case in [case_a(), case_b()] {
            let own = frechet_distance(&case.x, &case.x).unwrap();
            assert!(own.distance.abs() < 1e-12, "FD(x, x) = {}", own.distance);
            let mut last = 0.0;
            for s in [0.1, 0.5, 2.0] {
                let mut shifted = case.x.clone();
                shifted.data.iter_mut().for_each(|v| *v += s);
                let f = frechet_distance(&case.x, &shifted).unwrap();
                // A pure shift moves only the means: FD = d s².
                close(f.distance, case.x.cols as f64 * s * s, "FD of a shift");
                assert!(f.distance > last);
                last = f.distance;
            }
        }
    }

    #[test]
    fn kid_over_full_subsets_is_the_full_mmd2_and_subsets_vary() {
        let case = Case {
            x: features(30, 8, 0.3, 0.0),
            y: features(30, 8, 1.1, 0.4),
        };
        let (xx, yy, xy) = case.products();
        let k = Kernels::new(&xx, &yy, &xy, 8);
        let full = k.mmd2_unbiased(&all(30), &all(30));
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let whole = kid(&k, 30, 30, 5, 100, &mut rng).unwrap();
        assert_eq!(whole.subset_size, 30);
        close(whole.mean, full, "KID of full subsets");
        assert!(whole.std < 1e-12, "{}", whole.std);
        let part = kid(&k, 30, 30, 20, 10, &mut ChaCha8Rng::seed_from_u64(0)).unwrap();
        assert!(part.std > 0.0 && part.mean.is_finite());
        let again = kid(&k, 30, 30, 20, 10, &mut ChaCha8Rng::seed_from_u64(0)).unwrap();
        assert_eq!(part.mean.to_bits(), again.mean.to_bits(), "seeded");
        // Two independent samples of one distribution: the unbiased
        // estimate is centred on 0 (the biased one would sit well above).
        let (u, v) = (uniform(200, 8, 0.0), uniform(200, 8, 7.0));
        let (uu, vv, uv) = (
            Products::new(&u, &u),
            Products::new(&v, &v),
            Products::new(&u, &v),
        );
        let same = Kernels::new(&uu, &vv, &uv, 8);
        let s = kid(&same, 200, 200, 50, 50, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        // The biased (V-statistic) estimate of 50-row subsets would exceed
        // it by about 2 (E k(x, x) - E k(x, x')) / 50.
        let diag = (0..200).map(|i| uu.kernel(i, i, 8)).sum::<f64>() / 200.0;
        let off = (0..200)
            .flat_map(|i| (0..200).map(move |j| (i, j)))
            .map(|(i, j)| uv.kernel(i, j, 8))
            .sum::<f64>()
            / 40000.0;
        let v_bias = 2.0 * (diag - off) / 50.0;
        assert!(v_bias > 0.04, "{v_bias}");
        assert!(
            s.mean.abs() < v_bias / 3.0,
            "{s:?} vs V-statistic bias {v_bias}"
        );
        // Shifted by one unit along every feature: clearly positive.
        let mut w = v.clone();
        w.data.iter_mut().for_each(|x| *x += 1.0);
        let (ww, uw) = (Products::new(&w, &w), Products::new(&u, &w));
        let apart = Kernels::new(&uu, &ww, &uw, 8);
        let a = kid(&apart, 200, 200, 50, 50, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        assert!(a.mean > 10.0 * s.std, "{a:?}");
    }

    #[test]
    fn precision_and_recall_of_a_set_with_itself_are_one() {
        let x = features(25, 5, 0.3, 0.0);
        let p = Products::new(&x, &x);
        let pr = precision_recall(&p, &p, &p, 3).unwrap();
        assert_eq!((pr.precision, pr.recall), (1.0, 1.0));
        // Far away: nothing inside either manifold.
        let mut far = x.clone();
        far.data.iter_mut().for_each(|v| *v += 100.0);
        let (yy, xy) = (Products::new(&far, &far), Products::new(&x, &far));
        let pr = precision_recall(&p, &yy, &xy, 3).unwrap();
        assert_eq!((pr.precision, pr.recall), (0.0, 0.0));
    }
}
