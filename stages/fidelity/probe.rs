//! The classifier two-sample test (Lopez-Paz & Oquab 2017): a linear probe
//! learns to tell synthetic images (label 1) from real ones (label 0) on
//! their features, and its cross-validated ROC-AUC says how distinguishable
//! the sets are: 0.5 = not at all, 1 = perfectly.
//!
//! The probe is L2-regularised logistic regression on features standardised
//! with the training folds' mean and standard deviation, each class weighted
//! to half the loss (the sets differ in size), fitted by L-BFGS with a
//! backtracking line search from zero: a strictly convex problem, so the
//! solution does not depend on the start, and every step is a fixed sequence
//! of f64 operations (same bytes on any thread count). Folds are stratified:
//! each class is shuffled by the seed and dealt round-robin.

use anyhow::{Result, ensure};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use super::linalg::{Mat, dot};

#[derive(Clone, Debug)]
pub struct ProbeConfig {
    pub folds: usize,
    /// λ in Σ cᵢ logloss(i) + λ/2 |w|² (Σ cᵢ = 1).
    pub l2: f64,
    pub seed: u64,
    pub max_iterations: usize,
}

/// What the test found.
#[derive(Clone, Debug, Serialize)]
pub struct TwoSample {
    /// Mean of the folds' held-out ROC-AUCs.
    pub auc: f64,
    /// Their standard deviation (ddof 0).
    pub auc_std: f64,
    pub fold_aucs: Vec<f64>,
    pub folds: usize,
    pub l2: f64,
    /// L-BFGS iterations per fold.
    pub iterations: Vec<usize>,
    /// Whether every fold reached the gradient tolerance.
    pub converged: bool,
}

/// Fold of each row of a class of `n`, stratified and seeded.
fn fold_of(n: usize, folds: usize, seed: u64, stream: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    order.shuffle(&mut rng);
    let mut fold = vec![0; n];
    for (pos, &i) in order.iter().enumerate() {
        fold[i] = pos % folds;
    }
    fold
}

/// Cross-validated ROC-AUC of a probe telling `synthetic` from `real`.
pub fn two_sample_test(real: &Mat, synthetic: &Mat, cfg: &ProbeConfig) -> Result<TwoSample> {
    ensure!(real.cols == synthetic.cols, "probe: feature widths differ");
    ensure!(cfg.folds >= 2, "probe: at least 2 folds");
    ensure!(
        real.rows >= cfg.folds && synthetic.rows >= cfg.folds,
        "the two-sample test needs at least {} images per set (one per fold), not {} real and {} synthetic",
        cfg.folds,
        real.rows,
        synthetic.rows
    );
    let rows: Vec<(&[f64], bool, usize)> = {
        let (fr, fs) = (
            fold_of(real.rows, cfg.folds, cfg.seed, 0),
            fold_of(synthetic.rows, cfg.folds, cfg.seed, 1),
        );
        (0..real.rows)
            .map(|i| (real.row(i), false, fr[i]))
            .chain((0..synthetic.rows).map(|i| (synthetic.row(i), true, fs[i])))
            .collect()
    };
    let mut fold_aucs = Vec::with_capacity(cfg.folds);
    let mut iterations = Vec::with_capacity(cfg.folds);
    let mut converged = true;
    for f in 0..cfg.folds {
        type Row<'r> = &'r (&'r [f64], bool, usize);
        let (train, test): (Vec<Row>, Vec<Row>) = rows.iter().partition(|r| r.2 != f);
        let x: Vec<&[f64]> = train.iter().map(|r| r.0).collect();
        let (mean, scale) = standardiser(&x);
        let standardise = |rows: &[Row]| {
            Mat::from_fn(rows.len(), real.cols, |i, j| {
                (rows[i].0[j] - mean[j]) / scale[j]
            })
        };
        let problem = Logistic::new(
            standardise(&train),
            train.iter().map(|r| r.1).collect(),
            cfg.l2,
        );
        let fit = lbfgs(&problem, cfg.max_iterations);
        converged &= fit.converged;
        iterations.push(fit.iterations);
        let xt = standardise(&test);
        let scores: Vec<f64> = (0..xt.rows)
            .map(|i| dot(xt.row(i), &fit.w[..xt.cols]) + fit.w[xt.cols])
            .collect();
        let labels: Vec<bool> = test.iter().map(|r| r.1).collect();
        fold_aucs.push(roc_auc(&scores, &labels));
    }
    let n = fold_aucs.len() as f64;
    let auc = fold_aucs.iter().sum::<f64>() / n;
    let var = fold_aucs.iter().map(|a| (a - auc) * (a - auc)).sum::<f64>() / n;
    Ok(TwoSample {
        auc,
        auc_std: var.sqrt(),
        fold_aucs,
        folds: cfg.folds,
        l2: cfg.l2,
        iterations,
        converged,
    })
}

/// ROC-AUC of `scores` for `labels` (both classes present: every fold
/// holds at least one image of each): the Mann–Whitney U of the positives
/// over (p n), tied scores sharing their mean rank. (`evaluate` has its own;
/// a stage upstream of it does not borrow a downstream stage's code.)
fn roc_auc(scores: &[f64], labels: &[bool]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        let mean_rank = (start + 1 + end) as f64 / 2.0;
        rank_sum += mean_rank * order[start..end].iter().filter(|&&i| labels[i]).count() as f64;
        start = end;
    }
    let p = labels.iter().filter(|&&t| t).count() as f64;
    let n = labels.len() as f64 - p;
    (rank_sum - p * (p + 1.0) / 2.0) / (p * n)
}

/// Per-feature mean and standard deviation (1 where a feature is constant).
fn standardiser(x: &[&[f64]]) -> (Vec<f64>, Vec<f64>) {
    let d = x[0].len();
    let n = x.len() as f64;
    let mut mean = vec![0.0; d];
    for r in x {
        for (m, v) in mean.iter_mut().zip(r.iter()) {
            *m += v;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0.0; d];
    for r in x {
        for ((s, v), m) in var.iter_mut().zip(r.iter()).zip(&mean) {
            *s += (v - m) * (v - m);
        }
    }
    let scale = var
        .iter()
        .map(|s| {
            let sd = (s / n).sqrt();
            if sd > 0.0 { sd } else { 1.0 }
        })
        .collect();
    (mean, scale)
}

/// Weighted, L2-regularised logistic loss over standardised rows; the
/// parameters are the weights then the (unpenalised) bias.
pub struct Logistic {
    x: Mat,
    /// x transposed: the gradient's sums run along its rows.
    xt: Mat,
    y: Vec<bool>,
    /// Per-row weight: 1 / (2 × its class's count).
    c: Vec<f64>,
    l2: f64,
}

impl Logistic {
    pub fn new(x: Mat, y: Vec<bool>, l2: f64) -> Logistic {
        let pos = y.iter().filter(|&&t| t).count() as f64;
        let neg = y.len() as f64 - pos;
        let c = y.iter().map(|&t| 0.5 / if t { pos } else { neg }).collect();
        Logistic {
            xt: x.transpose(),
            x,
            y,
            c,
            l2,
        }
    }

    fn dim(&self) -> usize {
        self.x.cols + 1
    }

    /// Loss and gradient at `p`.
    pub fn eval(&self, p: &[f64]) -> (f64, Vec<f64>) {
        let d = self.x.cols;
        let (w, b) = (&p[..d], p[d]);
        let z: Vec<f64> = (0..self.x.rows)
            .into_par_iter()
            .map(|i| dot(self.x.row(i), w) + b)
            .collect();
        let mut loss = 0.0;
        let mut r = vec![0.0; z.len()];
        for i in 0..z.len() {
            let (zi, t) = (z[i], self.y[i]);
            // softplus(z) - t z, stably.
            let softplus = zi.max(0.0) + (-zi.abs()).exp().ln_1p();
            loss += self.c[i] * (softplus - if t { zi } else { 0.0 });
            let sigmoid = if zi >= 0.0 {
                1.0 / (1.0 + (-zi).exp())
            } else {
                let e = zi.exp();
                e / (1.0 + e)
            };
            r[i] = self.c[i] * (sigmoid - if t { 1.0 } else { 0.0 });
        }
        loss += 0.5 * self.l2 * dot(w, w);
        let mut g: Vec<f64> = (0..d)
            .into_par_iter()
            .map(|j| dot(self.xt.row(j), &r) + self.l2 * w[j])
            .collect();
        g.push(r.iter().sum());
        (loss, g)
    }
}

pub struct Fit {
    pub w: Vec<f64>,
    pub loss: f64,
    pub iterations: usize,
    pub converged: bool,
}

/// Minimises `problem` from zero with L-BFGS (10 pairs), Armijo
/// backtracking; stops when the largest gradient component is below 1e-8.
pub fn lbfgs(problem: &Logistic, max_iterations: usize) -> Fit {
    const MEMORY: usize = 10;
    const TOLERANCE: f64 = 1e-8;
    let n = problem.dim();
    let mut p = vec![0.0; n];
    let (mut loss, mut g) = problem.eval(&p);
    let mut pairs: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> =
        std::collections::VecDeque::new();
    let inf_norm = |v: &[f64]| v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let mut iterations = 0;
    while iterations < max_iterations && inf_norm(&g) > TOLERANCE {
        iterations += 1;
        // Two-loop recursion: direction = -H g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(pairs.len());
        for (s, y, rho) in pairs.iter().rev() {
            let a = rho * dot(s, &q);
            q.iter_mut().zip(y).for_each(|(qi, yi)| *qi -= a * yi);
            alphas.push(a);
        }
        let gamma = match pairs.back() {
            Some((s, y, _)) => dot(s, y) / dot(y, y),
            // First step: unit length.
            None => 1.0 / dot(&g, &g).sqrt(),
        };
        q.iter_mut().for_each(|v| *v *= gamma);
        for ((s, y, rho), a) in pairs.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &q);
            q.iter_mut().zip(s).for_each(|(qi, si)| *qi += (a - b) * si);
        }
        let mut direction: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot(&g, &direction);
        if slope >= 0.0 {
            // Not a descent direction (rounding): restart from steepest descent.
            pairs.clear();
            direction = g.iter().map(|v| -v).collect();
            slope = -dot(&g, &g);
        }
        let mut step = 1.0;
        let (next, next_loss, next_g) = loop {
            let trial: Vec<f64> = p
                .iter()
                .zip(&direction)
                .map(|(a, b)| a + step * b)
                .collect();
            let (l, gr) = problem.eval(&trial);
            if l <= loss + 1e-4 * step * slope || step < 1e-20 {
                break (trial, l, gr);
            }
            step *= 0.5;
        };
        let s: Vec<f64> = next.iter().zip(&p).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = next_g.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        let stalled = next_loss >= loss && step < 1e-20;
        p = next;
        loss = next_loss;
        g = next_g;
        if stalled {
            break;
        }
        if sy > 1e-16 {
            if pairs.len() == MEMORY {
                pairs.pop_front();
            }
            pairs.push_back((s, y, 1.0 / sy));
        }
    }
    Fit {
        converged: inf_norm(&g) <= TOLERANCE,
        w: p,
        loss,
        iterations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform in [-1, 1) from a float: the shader hash.
    fn noise(a: f64) -> f64 {
        let v = a.sin() * 43758.5453;
        2.0 * (v - v.floor()) - 1.0
    }

    fn cloud(n: usize, d: usize, salt: f64, shift: f64) -> Mat {
        Mat::from_fn(n, d, |i, j| {
            noise(salt + 0.37 * i as f64 + 0.113 * j as f64 * (1.0 + i as f64 * 0.01))
                + if j == 0 { shift } else { 0.0 }
        })
    }

    fn cfg() -> ProbeConfig {
        ProbeConfig {
            folds: 5,
            l2: 1e-2,
            seed: 3,
            max_iterations: 500,
        }
    }

    #[test]
    fn auc_counts_pairs_and_ties_count_one_half() {
        // Positives 0.9, 0.5, 0.4; negatives 0.5, 0.1: pairs won 2 + 1.5 + 1 of 6.
        let auc = roc_auc(
            &[0.9, 0.5, 0.5, 0.1, 0.4],
            &[true, true, false, false, true],
        );
        assert!((auc - 4.5 / 6.0).abs() < 1e-15, "{auc}");
        assert_eq!(roc_auc(&[0.0, 1.0], &[true, false]), 0.0);
    }

    #[test]
    fn the_gradient_is_the_loss_derivative() {
        let x = cloud(30, 4, 1.0, 0.5);
        let y: Vec<bool> = (0..30).map(|i| i % 3 == 0).collect();
        let problem = Logistic::new(x, y, 0.1);
        let p = [0.3, -0.2, 0.5, 0.1, -0.4];
        let (_, g) = problem.eval(&p);
        for k in 0..p.len() {
            let h = 1e-6;
            let (mut up, mut down) = (p, p);
            up[k] += h;
            down[k] -= h;
            let numeric = (problem.eval(&up).0 - problem.eval(&down).0) / (2.0 * h);
            assert!((numeric - g[k]).abs() < 1e-8, "∂{k}: {numeric} vs {}", g[k]);
        }
        // The loss at zero is ln 2 whatever the weights.
        assert!((problem.eval(&[0.0; 5]).0 - 2f64.ln()).abs() < 1e-15);
    }

    #[test]
    fn lbfgs_reaches_the_minimum() {
        let x = cloud(60, 6, 2.0, 0.0);
        let y: Vec<bool> = (0..60)
            .map(|i| x.at(i, 0) + 0.5 * x.at(i, 1) > 0.1)
            .collect();
        let problem = Logistic::new(x, y, 1e-3);
        let fit = lbfgs(&problem, 1000);
        assert!(fit.converged, "{} iterations", fit.iterations);
        // A minimum: nudging any coordinate does not lower the loss.
        for k in 0..fit.w.len() {
            for h in [1e-4, -1e-4] {
                let mut q = fit.w.clone();
                q[k] += h;
                assert!(problem.eval(&q).0 >= fit.loss - 1e-15);
            }
        }
    }

    #[test]
    fn separated_sets_score_near_one_and_identical_distributions_near_one_half() {
        let real = cloud(60, 8, 0.0, 0.0);
        let far = cloud(90, 8, 5.0, 3.0);
        let t = two_sample_test(&real, &far, &cfg()).unwrap();
        assert!(t.auc > 0.99 && t.converged, "{t:?}");
        let same = cloud(90, 8, 5.0, 0.0);
        let t = two_sample_test(&real, &same, &cfg()).unwrap();
        assert!((t.auc - 0.5).abs() < 0.15, "{t:?}");
        assert_eq!(t.fold_aucs.len(), 5);
        // A shift along one feature of half the spread: in between.
        let near = cloud(90, 8, 5.0, 0.5);
        let mid = two_sample_test(&real, &near, &cfg()).unwrap();
        assert!(mid.auc > 0.6 && mid.auc < 0.95, "{mid:?}");
        // Seeded: the same bits again, other folds with another seed.
        let again = two_sample_test(&real, &near, &cfg()).unwrap();
        assert_eq!(mid.auc.to_bits(), again.auc.to_bits());
        let other = two_sample_test(&real, &near, &ProbeConfig { seed: 4, ..cfg() }).unwrap();
        assert_ne!(mid.fold_aucs, other.fold_aucs);
    }

    #[test]
    fn folds_are_stratified_and_too_few_images_is_an_error() {
        let f = fold_of(23, 5, 0, 0);
        for k in 0..5 {
            let n = f.iter().filter(|&&x| x == k).count();
            assert!(n == 4 || n == 5, "fold {k}: {n}");
        }
        let err = two_sample_test(&cloud(3, 2, 0.0, 0.0), &cloud(10, 2, 1.0, 0.0), &cfg())
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 5 images per set"), "{err}");
    }
}
