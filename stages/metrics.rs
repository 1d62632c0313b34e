//! Binary-classification metrics for `evaluate` (and the validation AUC of
//! `train_classifier`): ROC-AUC, the ROC curve, average precision (PR-AUC),
//! sensitivity at a fixed specificity, a stratified bootstrap confidence
//! interval for ROC-AUC, and mean/std over seeds. A top-level module of its
//! own so that a classifier's code identity holds these functions and not the
//! whole report: editing a figure re-runs `evaluate` only.
//!
//! Promises:
//! - Scores are "probability of malignant" (higher = more malignant); labels
//!   are `true` for malignant. Only the order of scores matters.
//! - Tied scores form one threshold: ROC-AUC counts a tied
//!   positive/negative pair as 1/2 (Mann–Whitney with average ranks), the
//!   ROC curve moves diagonally through a tie, and average precision takes
//!   one precision per distinct threshold, as scikit-learn's
//!   `roc_auc_score` / `average_precision_score` do.
//! - Every metric is O(n log n) and refuses, with a [`MetricError`], empty
//!   input, mismatched lengths, a NaN score and input with only one class
//!   (a test split without malignant cases is a data bug, not a 0.5).
//! - The bootstrap is deterministic for a given seed (ChaCha8).

use std::cmp::Ordering;
use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Why a metric cannot be computed.
#[derive(Clone, Debug, PartialEq)]
pub enum MetricError {
    Empty,
    LengthMismatch {
        scores: usize,
        labels: usize,
    },
    /// `metric` is the human name ("ROC-AUC", ...) so the message says which
    /// computation refused.
    OneClass {
        metric: &'static str,
        positives: usize,
        n: usize,
    },
    NanScore {
        index: usize,
    },
    BadParameter(String),
}

impl fmt::Display for MetricError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricError::Empty => write!(f, "no predictions to score"),
            MetricError::LengthMismatch { scores, labels } => {
                write!(f, "{scores} scores but {labels} labels")
            }
            MetricError::OneClass {
                metric,
                positives,
                n,
            } => {
                write!(
                    f,
                    "{metric} needs both classes: {positives} positives among {n}"
                )
            }
            MetricError::NanScore { index } => write!(f, "score {index} is NaN"),
            MetricError::BadParameter(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for MetricError {}

/// A confidence interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
}

/// Checks the input and returns (positives, negatives).
pub(super) fn check(
    scores: &[f64],
    labels: &[bool],
    metric: &'static str,
) -> Result<(usize, usize), MetricError> {
    if scores.len() != labels.len() {
        return Err(MetricError::LengthMismatch {
            scores: scores.len(),
            labels: labels.len(),
        });
    }
    if scores.is_empty() {
        return Err(MetricError::Empty);
    }
    if let Some(index) = scores.iter().position(|s| s.is_nan()) {
        return Err(MetricError::NanScore { index });
    }
    let positives = labels.iter().filter(|&&l| l).count();
    if positives == 0 || positives == labels.len() {
        return Err(MetricError::OneClass {
            metric,
            positives,
            n: labels.len(),
        });
    }
    Ok((positives, labels.len() - positives))
}

/// One distinct score threshold: how many positives and negatives score
/// exactly at it.
struct Tie {
    tp: usize,
    fp: usize,
}

/// Distinct thresholds from the highest score down, so cumulative sums give
/// the confusion counts of "predict malignant when score >= threshold".
/// Input must have passed [`check`] (no NaN, so `total_cmp` and `==` agree
/// except for -0.0 vs 0.0, which must tie).
fn ties_descending(scores: &[f64], labels: &[bool]) -> Vec<Tie> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap_or(Ordering::Equal));
    let mut ties: Vec<Tie> = Vec::new();
    let mut last = f64::NAN;
    for i in order {
        if ties.is_empty() || scores[i] != last {
            ties.push(Tie { tp: 0, fp: 0 });
            last = scores[i];
        }
        let tie = ties.last_mut().expect("pushed above");
        if labels[i] { tie.tp += 1 } else { tie.fp += 1 }
    }
    ties
}

/// Area under the ROC curve: the probability that a random malignant case
/// scores above a random benign one, ties counting 1/2.
///
/// Computed from the rank sum of the positives (average ranks for ties),
/// independently of [`roc_curve`], so the two cross-check each other.
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> Result<f64, MetricError> {
    let (p, n) = check(scores, labels, "ROC-AUC")?;
    Ok(auc_by_ranks(scores, labels, p, n))
}

/// The Mann–Whitney U of the positives over (p * n); input already checked.
pub(super) fn auc_by_ranks(scores: &[f64], labels: &[bool], p: usize, n: usize) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[a].partial_cmp(&scores[b]).unwrap_or(Ordering::Equal));
    let mut positive_rank_sum = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        // 1-based ranks start+1 ..= end share their mean.
        let average_rank = (start + 1 + end) as f64 / 2.0;
        let tied_positives = order[start..end].iter().filter(|&&i| labels[i]).count();
        positive_rank_sum += average_rank * tied_positives as f64;
        start = end;
    }
    let (p, n) = (p as f64, n as f64);
    (positive_rank_sum - p * (p + 1.0) / 2.0) / (p * n)
}

/// ROC points (false positive rate, true positive rate), one per distinct
/// threshold from the highest score down, starting at (0, 0) and ending at
/// (1, 1). A threshold shared by positives and negatives is one diagonal
/// step, so the trapezoid area under these points equals [`roc_auc`].
pub fn roc_curve(scores: &[f64], labels: &[bool]) -> Result<Vec<(f64, f64)>, MetricError> {
    let (p, n) = check(scores, labels, "ROC curve")?;
    Ok(roc_points(&ties_descending(scores, labels), p, n))
}

fn roc_points(ties: &[Tie], p: usize, n: usize) -> Vec<(f64, f64)> {
    let mut points = Vec::with_capacity(ties.len() + 1);
    points.push((0.0, 0.0));
    let (mut tp, mut fp) = (0, 0);
    for tie in ties {
        tp += tie.tp;
        fp += tie.fp;
        points.push((fp as f64 / n as f64, tp as f64 / p as f64));
    }
    points
}

/// Average precision, scikit-learn's `average_precision_score`: the sum over
/// distinct thresholds of (recall gained) x (precision at that threshold).
/// No interpolation, so it is not the trapezoid area under the PR curve.
pub fn average_precision(scores: &[f64], labels: &[bool]) -> Result<f64, MetricError> {
    let (p, _) = check(scores, labels, "average precision")?;
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut ap = 0.0;
    for tie in ties_descending(scores, labels) {
        tp += tie.tp;
        fp += tie.fp;
        if tie.tp > 0 {
            ap += (tie.tp as f64 / p as f64) * (tp as f64 / (tp + fp) as f64);
        }
    }
    Ok(ap)
}

/// The highest sensitivity (TPR) over the thresholds whose specificity
/// (1 - FPR) is at least `specificity`. Only real thresholds count: no
/// interpolation between ROC points, so the answer is achievable by a cut-off.
/// The "reject everything" threshold always qualifies, so the result is 0 at
/// worst.
pub fn sensitivity_at_specificity(
    scores: &[f64],
    labels: &[bool],
    specificity: f64,
) -> Result<f64, MetricError> {
    if !(0.0..=1.0).contains(&specificity) {
        return Err(MetricError::BadParameter(format!(
            "specificity must be in [0, 1], got {specificity}"
        )));
    }
    let (p, n) = check(scores, labels, "sensitivity at specificity")?;
    // Tolerance so that a target computed as, say, 1.0 - 0.1 still admits
    // exactly 90% specificity.
    let min_specificity = specificity - 1e-12;
    let mut best = 0.0;
    for (fpr, tpr) in roc_points(&ties_descending(scores, labels), p, n) {
        if 1.0 - fpr < min_specificity {
            break; // FPR only grows from here
        }
        best = tpr;
    }
    Ok(best)
}

/// Percentile confidence interval for ROC-AUC at `level` (e.g. 0.95) from a
/// stratified bootstrap: each resample draws the positives and the negatives
/// separately, with replacement, keeping both class counts, so every resample
/// has both classes and the same prevalence as the test set.
///
/// Quantiles interpolate linearly between order statistics (NumPy's
/// default). Same inputs and seed give the same interval.
pub fn bootstrap_auc_ci(
    scores: &[f64],
    labels: &[bool],
    resamples: usize,
    level: f64,
    seed: u64,
) -> Result<Interval, MetricError> {
    if resamples == 0 {
        return Err(MetricError::BadParameter(
            "bootstrap needs at least one resample".into(),
        ));
    }
    if !(level > 0.0 && level < 1.0) {
        return Err(MetricError::BadParameter(format!(
            "confidence level must be in (0, 1), got {level}"
        )));
    }
    let (p, n) = check(scores, labels, "ROC-AUC")?;
    let positives: Vec<f64> = scores
        .iter()
        .zip(labels)
        .filter(|(_, l)| **l)
        .map(|(s, _)| *s)
        .collect();
    let negatives: Vec<f64> = scores
        .iter()
        .zip(labels)
        .filter(|(_, l)| !**l)
        .map(|(s, _)| *s)
        .collect();
    // The resample's labels never change: positives first, then negatives.
    let resample_labels: Vec<bool> = (0..p + n).map(|i| i < p).collect();
    let mut resample = vec![0.0; p + n];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut aucs = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        for slot in &mut resample[..p] {
            *slot = positives[rng.random_range(0..p)];
        }
        for slot in &mut resample[p..] {
            *slot = negatives[rng.random_range(0..n)];
        }
        aucs.push(auc_by_ranks(&resample, &resample_labels, p, n));
    }
    aucs.sort_unstable_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0;
    Ok(Interval {
        low: quantile_sorted(&aucs, tail),
        high: quantile_sorted(&aucs, 1.0 - tail),
    })
}

/// Linear interpolation between order statistics of a sorted, non-empty slice.
pub(super) fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = (below + 1).min(sorted.len() - 1);
    let fraction = position - below as f64;
    sorted[below] + (sorted[above] - sorted[below]) * fraction
}

/// Mean and sample standard deviation (n - 1 denominator). One value has
/// std 0; no values give (NaN, NaN) so an empty arm cannot pass for a result.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    match xs.len() {
        0 => (f64::NAN, f64::NAN),
        1 => (xs[0], 0.0),
        len => {
            let mean = xs.iter().sum::<f64>() / len as f64;
            let variance = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (len - 1) as f64;
            (mean, variance.sqrt())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(xs: &[u8]) -> Vec<bool> {
        xs.iter().map(|&x| x == 1).collect()
    }

    fn trapezoid(points: &[(f64, f64)]) -> f64 {
        points
            .windows(2)
            .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
            .sum()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn perfect_inverted_and_tied() {
        let y = labels(&[0, 0, 1, 1]);
        assert_eq!(roc_auc(&[0.1, 0.2, 0.8, 0.9], &y).unwrap(), 1.0);
        assert_eq!(roc_auc(&[0.9, 0.8, 0.2, 0.1], &y).unwrap(), 0.0);
        assert_eq!(roc_auc(&[0.5; 4], &y).unwrap(), 0.5);
        assert_eq!(
            roc_curve(&[0.5; 4], &y).unwrap(),
            vec![(0.0, 0.0), (1.0, 1.0)]
        );
    }

    #[test]
    fn sklearn_documented_example() {
        // scikit-learn's docstring example for roc_auc_score /
        // average_precision_score: AUC 0.75, AP 0.8333...
        let y = labels(&[0, 0, 1, 1]);
        let s = [0.1, 0.4, 0.35, 0.8];
        assert!(close(roc_auc(&s, &y).unwrap(), 0.75));
        assert!(close(
            average_precision(&s, &y).unwrap(),
            0.5 * 1.0 + 0.5 * 2.0 / 3.0
        ));
        assert_eq!(
            roc_curve(&s, &y).unwrap(),
            vec![(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]
        );
    }

    #[test]
    fn hand_case_with_a_tie() {
        // scores [0.1, 0.4, 0.35, 0.8, 0.4], labels [0, 0, 1, 1, 1]:
        // positives {0.35, 0.8, 0.4}, negatives {0.1, 0.4}.
        // Pairs (pos vs neg): 0.35>0.1 (1), 0.35<0.4 (0), 0.8>0.1 (1),
        // 0.8>0.4 (1), 0.4>0.1 (1), 0.4=0.4 (1/2) -> 4.5 / 6 = 0.75.
        // Ranks ascending: 0.1->1, 0.35->2, 0.4,0.4->3.5 each, 0.8->5;
        // positive rank sum 2 + 3.5 + 5 = 10.5, U = 10.5 - 3*4/2 = 4.5. Same.
        // ROC from the top: 0.8 (+P) -> (0, 1/3); 0.4 (+P +N, diagonal)
        // -> (1/2, 2/3); 0.35 (+P) -> (1/2, 1); 0.1 (+N) -> (1, 1).
        // AP: thresholds adding positives: 0.8 precision 1/1, 0.4 precision
        // 2/3, 0.35 precision 3/4, each adding recall 1/3:
        // (1 + 2/3 + 3/4) / 3 = 29/36.
        let y = labels(&[0, 0, 1, 1, 1]);
        let s = [0.1, 0.4, 0.35, 0.8, 0.4];
        assert!(close(roc_auc(&s, &y).unwrap(), 0.75));
        let curve = roc_curve(&s, &y).unwrap();
        let expected = [
            (0.0, 0.0),
            (0.0, 1.0 / 3.0),
            (0.5, 2.0 / 3.0),
            (0.5, 1.0),
            (1.0, 1.0),
        ];
        assert_eq!(curve.len(), expected.len());
        for (got, want) in curve.iter().zip(expected) {
            assert!(close(got.0, want.0) && close(got.1, want.1), "{curve:?}");
        }
        assert!(close(trapezoid(&curve), 0.75));
        assert!(close(average_precision(&s, &y).unwrap(), 29.0 / 36.0));
    }

    #[test]
    fn trapezoid_under_curve_equals_auc_on_random_data_with_ties() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..50 {
            let len = rng.random_range(2..300);
            // Coarse scores so that ties are common.
            let s: Vec<f64> = (0..len)
                .map(|_| (rng.random_range(0..20) as f64) / 20.0)
                .collect();
            let mut y: Vec<bool> = (0..len).map(|_| rng.random_bool(0.3)).collect();
            y[0] = true;
            y[1] = false;
            let auc = roc_auc(&s, &y).unwrap();
            let curve = roc_curve(&s, &y).unwrap();
            assert_eq!(curve.first(), Some(&(0.0, 0.0)));
            assert_eq!(curve.last(), Some(&(1.0, 1.0)));
            assert!(
                (trapezoid(&curve) - auc).abs() < 1e-9,
                "{} vs {auc}",
                trapezoid(&curve)
            );
        }
    }

    #[test]
    fn matches_scikit_learn_on_a_random_case() {
        // 200 items (40 positive, 78 distinct scores) printed by
        // `PRINT_RANDOM_CASE=1 cargo test -- --nocapture`, scored by
        // scikit-learn 1.9.1: roc_auc_score(y, s), average_precision_score(y,
        // s), and max(tpr[fpr <= 0.1]) from roc_curve(y, s,
        // drop_intermediate=False).
        let (s, y) = random_case();
        let (auc, ap, sensitivity) = SKLEARN_RANDOM_CASE;
        assert!((roc_auc(&s, &y).unwrap() - auc).abs() < 1e-12);
        assert!((average_precision(&s, &y).unwrap() - ap).abs() < 1e-12);
        assert!((sensitivity_at_specificity(&s, &y, 0.9).unwrap() - sensitivity).abs() < 1e-12);
    }

    /// Scores rounded to 2 decimals (ties happen) with a weak signal.
    fn random_case() -> (Vec<f64>, Vec<bool>) {
        let mut rng = ChaCha8Rng::seed_from_u64(2024);
        let y: Vec<bool> = (0..200).map(|_| rng.random_bool(0.25)).collect();
        let s: Vec<f64> = y
            .iter()
            .map(|&l| {
                let raw: f64 = rng.random::<f64>() * 0.8 + if l { 0.2 } else { 0.0 };
                (raw * 100.0).round() / 100.0
            })
            .collect();
        if std::env::var_os("PRINT_RANDOM_CASE").is_some() {
            println!("y = {:?}", y.iter().map(|&l| l as u8).collect::<Vec<_>>());
            println!("s = {s:?}");
        }
        (s, y)
    }

    const SKLEARN_RANDOM_CASE: (f64, f64, f64) = (0.7962499999999999, 0.611651669234606, 0.575);

    #[test]
    fn errors() {
        let one_class = roc_auc(&[0.5; 40], &[false; 40]).unwrap_err();
        assert_eq!(
            one_class.to_string(),
            "ROC-AUC needs both classes: 0 positives among 40"
        );
        assert!(matches!(roc_auc(&[], &[]), Err(MetricError::Empty)));
        assert!(matches!(
            roc_auc(&[0.1], &[true, false]),
            Err(MetricError::LengthMismatch { .. })
        ));
        assert_eq!(
            roc_auc(&[0.1, f64::NAN], &[true, false]),
            Err(MetricError::NanScore { index: 1 })
        );
        assert!(average_precision(&[0.1, 0.2], &[true, true]).is_err());
        assert!(roc_curve(&[f64::NAN, 0.2], &[true, false]).is_err());
        assert!(sensitivity_at_specificity(&[0.1, 0.2], &[false, true], 1.5).is_err());
        assert!(bootstrap_auc_ci(&[0.1, 0.2], &[false, true], 0, 0.95, 1).is_err());
        assert!(bootstrap_auc_ci(&[0.1, 0.2], &[false, true], 10, 1.0, 1).is_err());
    }

    #[test]
    fn sensitivity_at_90_specificity_by_hand() {
        // 10 negatives, 5 positives. 90% specificity allows 1 false positive.
        // From the top: 0.99 P, 0.97 P, 0.95 N (FP 1), 0.92 P (TP 3),
        // 0.90 N (FP 2: too many). Best: 3/5 = 0.6. At 100% specificity
        // only the two positives above the first negative count: 0.4.
        let negatives = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95];
        let positives = [0.3, 0.85, 0.92, 0.97, 0.99];
        let s: Vec<f64> = negatives.iter().chain(&positives).copied().collect();
        let y: Vec<bool> = (0..15).map(|i| i >= 10).collect();
        assert!(close(sensitivity_at_specificity(&s, &y, 0.9).unwrap(), 0.6));
        assert!(close(
            sensitivity_at_specificity(&s, &y, 1.0 - 0.1).unwrap(),
            0.6
        ));
        assert!(close(sensitivity_at_specificity(&s, &y, 1.0).unwrap(), 0.4));
        assert!(close(sensitivity_at_specificity(&s, &y, 0.0).unwrap(), 1.0));
        // A tie cannot be split: if the 0.92 positive scored 0.90, tied with
        // a negative, reaching it costs a second false positive: 0.4.
        let mut tied = s.clone();
        tied[12] = 0.9;
        assert!(close(
            sensitivity_at_specificity(&tied, &y, 0.9).unwrap(),
            0.4
        ));
    }

    #[test]
    fn bootstrap_is_deterministic_and_brackets_the_estimate() {
        let (s, y) = random_case();
        let a = bootstrap_auc_ci(&s, &y, 500, 0.95, 11).unwrap();
        let b = bootstrap_auc_ci(&s, &y, 500, 0.95, 11).unwrap();
        let c = bootstrap_auc_ci(&s, &y, 500, 0.95, 12).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let auc = roc_auc(&s, &y).unwrap();
        assert!(a.low < auc && auc < a.high, "{a:?} vs {auc}");
        assert!(a.high - a.low > 0.02 && a.high - a.low < 0.4, "{a:?}");
        // A narrower level gives a narrower interval from the same draws.
        let narrow = bootstrap_auc_ci(&s, &y, 500, 0.5, 11).unwrap();
        assert!(narrow.low >= a.low && narrow.high <= a.high);
    }

    #[test]
    fn quantiles_interpolate() {
        let xs = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile_sorted(&xs, 0.0), 1.0);
        assert_eq!(quantile_sorted(&xs, 0.5), 3.0);
        assert_eq!(quantile_sorted(&xs, 0.125), 1.5);
        assert_eq!(quantile_sorted(&xs, 1.0), 5.0);
        assert_eq!(quantile_sorted(&[7.0], 0.975), 7.0);
    }

    #[test]
    fn mean_and_sample_std() {
        assert_eq!(mean_std(&[0.7]), (0.7, 0.0));
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert!(close(m, 2.5) && close(s, (5.0f64 / 3.0).sqrt()));
        assert!(mean_std(&[]).0.is_nan());
    }
}
