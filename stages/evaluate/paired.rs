//! Paired comparison of two classifiers scored on the same test images:
//! DeLong's test for two correlated ROC curves, a paired stratified
//! bootstrap of the AUC difference, and Holm's correction over several
//! comparisons.
//!
//! Promises:
//! - Input: two score vectors `a`, `b` and one label vector, index i being
//!   the same test image in all three. The difference is always
//!   AUC(a) - AUC(b). Input is refused like the single-arm metrics (empty,
//!   mismatched lengths, NaN, one class), and DeLong also needs at least two
//!   positives and two negatives (its variance has n - 1 denominators).
//! - DeLong (DeLong, DeLong & Clarke-Pearson 1988, Biometrics 44:837) with
//!   the O(n log n) midrank computation of Sun & Xu (2014, IEEE Signal
//!   Processing Letters 21:1389): ties count 1/2, so the AUCs equal
//!   `metrics::roc_auc`. The variance of the difference is computed from the
//!   per-image differences of the structural components, which is the usual
//!   `[1, -1] S [1, -1]'` algebraically, but exactly zero for identical
//!   scores and never negative. A zero variance with zero difference gives
//!   z = 0 and p = 1; with a non-zero difference, z = ±inf and p = 0.
//! - The p-value is two-sided normal, the interval difference ± z_0.975 se.
//! - The bootstrap resamples positives and negatives separately (both class
//!   counts kept), with the same drawn images for both arms; it is
//!   sequential from one ChaCha8 stream, so the same inputs and seed give the
//!   same bytes on any machine and thread count.

use std::cmp::Ordering;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::metrics::{Interval, MetricError, auc_by_ranks, check, quantile_sorted};

/// The 0.975 quantile of the standard normal: 95% two-sided intervals.
pub const Z_975: f64 = 1.959_963_984_540_054;

/// DeLong's test of AUC(a) = AUC(b).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeLong {
    pub auc_a: f64,
    pub auc_b: f64,
    /// AUC(a) - AUC(b).
    pub difference: f64,
    /// Estimated variance of the difference.
    pub variance: f64,
    pub se: f64,
    /// difference / se; 0 when both are 0, ±inf when only se is.
    pub z: f64,
    /// Two-sided.
    pub p: f64,
    /// 95%: difference ± 1.96 se.
    pub ci: Interval,
}

/// The paired bootstrap of AUC(a) - AUC(b).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairedBootstrap {
    /// 95% percentile interval (quantiles interpolated as NumPy's default).
    pub ci: Interval,
    /// Two-sided: `min(1, 2 (1 + min(#{d* <= 0}, #{d* >= 0})) / (R + 1))`
    /// over the R resampled differences d*: how often the resamples fall on
    /// the far side of zero, with the +1 that keeps a p-value from being 0.
    pub p: f64,
    pub resamples: usize,
}

/// 1-based ranks, ties sharing their mean ("midranks").
fn midranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_unstable_by(|&i, &j| x[i].partial_cmp(&x[j]).unwrap_or(Ordering::Equal));
    let mut ranks = vec![0.0; x.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && x[order[end]] == x[order[start]] {
            end += 1;
        }
        let mean = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = mean;
        }
        start = end;
    }
    ranks
}

/// DeLong's structural components of one score vector: per positive, the
/// fraction of negatives it outscores (V10); per negative, the fraction of
/// positives that outscore it (V01); ties count 1/2. Both in input order.
struct Components {
    v10: Vec<f64>,
    v01: Vec<f64>,
}

fn components(scores: &[f64], labels: &[bool]) -> Components {
    let positives: Vec<f64> = (0..scores.len())
        .filter(|&i| labels[i])
        .map(|i| scores[i])
        .collect();
    let negatives: Vec<f64> = (0..scores.len())
        .filter(|&i| !labels[i])
        .map(|i| scores[i])
        .collect();
    let (m, n) = (positives.len() as f64, negatives.len() as f64);
    let (all, pos, neg) = (midranks(scores), midranks(&positives), midranks(&negatives));
    // A positive's rank among all minus its rank among the positives counts
    // the negatives below it (ties 1/2); likewise for negatives.
    let (mut v10, mut v01) = (Vec::new(), Vec::new());
    let (mut i_pos, mut i_neg) = (0, 0);
    for (i, &label) in labels.iter().enumerate() {
        if label {
            v10.push((all[i] - pos[i_pos]) / n);
            i_pos += 1;
        } else {
            v01.push(1.0 - (all[i] - neg[i_neg]) / m);
            i_neg += 1;
        }
    }
    Components { v10, v01 }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Sample variance (n - 1 denominator); at least two values.
fn sample_variance(xs: &[f64]) -> f64 {
    let m = mean(xs);
    xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64
}

/// Checks two paired score vectors against one label vector; returns
/// (positives, negatives).
fn check_pair(a: &[f64], b: &[f64], labels: &[bool]) -> Result<(usize, usize), MetricError> {
    if a.len() != b.len() {
        return Err(MetricError::BadParameter(format!(
            "paired comparison needs the same test images: {} scores against {}",
            a.len(),
            b.len()
        )));
    }
    check(b, labels, "paired ROC-AUC")?;
    check(a, labels, "paired ROC-AUC")
}

/// DeLong's test of AUC(a) = AUC(b) on the same test images.
pub fn delong(a: &[f64], b: &[f64], labels: &[bool]) -> Result<DeLong, MetricError> {
    let (m, n) = check_pair(a, b, labels)?;
    if m < 2 || n < 2 {
        return Err(MetricError::BadParameter(format!(
            "DeLong's test needs at least 2 positives and 2 negatives, got {m} and {n}"
        )));
    }
    let (ca, cb) = (components(a, labels), components(b, labels));
    let (auc_a, auc_b) = (mean(&ca.v10), mean(&cb.v10));
    let d10: Vec<f64> = ca.v10.iter().zip(&cb.v10).map(|(x, y)| x - y).collect();
    let d01: Vec<f64> = ca.v01.iter().zip(&cb.v01).map(|(x, y)| x - y).collect();
    let variance = sample_variance(&d10) / m as f64 + sample_variance(&d01) / n as f64;
    let se = variance.sqrt();
    let difference = auc_a - auc_b;
    let z = if se > 0.0 {
        difference / se
    } else if difference == 0.0 {
        0.0
    } else {
        f64::INFINITY.copysign(difference)
    };
    Ok(DeLong {
        auc_a,
        auc_b,
        difference,
        variance,
        se,
        z,
        p: two_sided_normal_p(z),
        ci: Interval {
            low: difference - Z_975 * se,
            high: difference + Z_975 * se,
        },
    })
}

/// Paired stratified bootstrap of AUC(a) - AUC(b): each resample draws the
/// positives, then the negatives, with replacement, and scores both arms on
/// the same drawn images.
pub fn paired_bootstrap(
    a: &[f64],
    b: &[f64],
    labels: &[bool],
    resamples: usize,
    seed: u64,
) -> Result<PairedBootstrap, MetricError> {
    if resamples == 0 {
        return Err(MetricError::BadParameter(
            "bootstrap needs at least one resample".into(),
        ));
    }
    let (m, n) = check_pair(a, b, labels)?;
    let positives: Vec<usize> = (0..labels.len()).filter(|&i| labels[i]).collect();
    let negatives: Vec<usize> = (0..labels.len()).filter(|&i| !labels[i]).collect();
    // Resample layout: positives first, then negatives, so labels are fixed.
    let resample_labels: Vec<bool> = (0..m + n).map(|i| i < m).collect();
    let (mut ra, mut rb) = (vec![0.0; m + n], vec![0.0; m + n]);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut differences = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        for slot in 0..m + n {
            let image = if slot < m {
                positives[rng.random_range(0..m)]
            } else {
                negatives[rng.random_range(0..n)]
            };
            ra[slot] = a[image];
            rb[slot] = b[image];
        }
        differences.push(
            auc_by_ranks(&ra, &resample_labels, m, n) - auc_by_ranks(&rb, &resample_labels, m, n),
        );
    }
    let at_or_below = differences.iter().filter(|&&d| d <= 0.0).count();
    let at_or_above = differences.iter().filter(|&&d| d >= 0.0).count();
    let p = (2.0 * (1 + at_or_below.min(at_or_above)) as f64 / (resamples + 1) as f64).min(1.0);
    differences.sort_unstable_by(f64::total_cmp);
    Ok(PairedBootstrap {
        ci: Interval {
            low: quantile_sorted(&differences, 0.025),
            high: quantile_sorted(&differences, 0.975),
        },
        p,
        resamples,
    })
}

/// Holm's step-down adjustment of p-values (family-wise error control):
/// sorted ascending, the i-th smallest (0-based) is multiplied by k - i,
/// then made monotone and capped at 1. Returned in input order.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let k = p.len();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&i, &j| p[i].total_cmp(&p[j])); // stable: ties keep input order
    let mut adjusted = vec![0.0; k];
    let mut running = 0.0f64;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((k - rank) as f64 * p[i]).min(1.0));
        adjusted[i] = running;
    }
    adjusted
}

/// Two-sided p-value of a standard normal statistic: erfc(|z| / sqrt 2).
pub fn two_sided_normal_p(z: f64) -> f64 {
    if z.is_nan() {
        return f64::NAN;
    }
    erfc(z.abs() / std::f64::consts::SQRT_2)
}

/// The complementary error function for x >= 0, to about 1e-15 absolute:
/// the all-positive Taylor series of erf below 3 (no cancellation inside the
/// sum), the continued fraction of erfc from 3 on (which converges fast
/// there and keeps small tail values accurate relatively).
fn erfc(x: f64) -> f64 {
    debug_assert!(x >= 0.0);
    if x.is_infinite() {
        return 0.0;
    }
    let two_over_sqrt_pi = std::f64::consts::FRAC_2_SQRT_PI;
    if x < 3.0 {
        // erf(x) = 2/sqrt(pi) exp(-x^2) sum_k (2x^2)^k x / (1*3*...*(2k+1)).
        let (mut term, mut sum) = (x, x);
        let mut k = 0.0;
        while term > sum * 1e-17 {
            k += 1.0;
            term *= 2.0 * x * x / (2.0 * k + 1.0);
            sum += term;
        }
        1.0 - two_over_sqrt_pi * (-x * x).exp() * sum
    } else {
        // erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))),
        // evaluated from the tail; 60 levels are far past convergence for x >= 3.
        let mut t = x;
        for k in (1..=60).rev() {
            t = x + (k as f64 / 2.0) / t;
        }
        two_over_sqrt_pi / 2.0 * (-x * x).exp() / t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{bootstrap_auc_ci, roc_auc};

    #[test]
    fn erfc_matches_known_values() {
        // scipy.special.erfc (printed with repr). Below 3 the series is
        // accurate absolutely (1 - erf cancels); from 3 on, the continued
        // fraction relatively, so tiny p-values keep their digits.
        for (x, want) in [
            (0.0, 1.0),
            (0.25, 0.7236736098317631),
            (0.5, 0.4795001221869535),
            (1.0, 0.15729920705028516),
            (2.0, 0.004677734981047266),
            (2.9, 4.109787809945884e-05),
            (2.99, 2.3525603080640205e-05),
            (3.0, 2.2090496998585445e-05),
            (3.01, 2.0738963637132645e-05),
            (4.0, 1.541725790028002e-08),
            (5.5, 7.357847917974398e-15),
            (8.0, 1.1224297172982928e-29),
        ] {
            let got = erfc(x);
            let ok = if x < 3.0 {
                (got - want).abs() < 1e-15
            } else {
                (got - want).abs() <= 1e-13 * want
            };
            assert!(ok, "erfc({x}) = {got:e}, want {want:e}");
        }
        // The two textbook two-sided p-values.
        assert!((two_sided_normal_p(Z_975) - 0.05).abs() < 1e-15);
        assert!((two_sided_normal_p(-2.575_829_303_548_901) - 0.01).abs() < 1e-15);
        assert_eq!(two_sided_normal_p(f64::INFINITY), 0.0);
    }

    #[test]
    fn midranks_share_ties() {
        assert_eq!(
            midranks(&[0.3, 0.1, 0.3, 0.2, 0.3]),
            [4.0, 1.0, 4.0, 2.0, 4.0]
        );
    }

    /// Worked by hand. Labels 1,1,1,0,0,0; a = [0.9, 0.8, 0.4, 0.5, 0.3, 0.1],
    /// b = [0.7, 0.5, 0.6, 0.6, 0.2, 0.4].
    /// a: V10 (negatives below each positive /3) = 1, 1, 2/3 -> AUC 8/9;
    ///    V01 (positives above each negative /3) = 2/3, 1, 1.
    /// b: the positive 0.6 ties the negative 0.6 (1/2): V10 = 1, 2/3, 5/6
    ///    -> AUC 5/6; V01 = 1/2 + 1 + 1/2... per negative: 0.6 -> (0.7 above,
    ///    0.6 tied) = 1.5/3 = 1/2; 0.2 -> 1; 0.4 -> 1.
    /// D10 = a - b = 0, 1/3, -1/6: mean 1/18, sample variance
    ///   ((-1/18)^2 + (5/18)^2 + (-4/18)^2) / 2 = (1 + 25 + 16) / 648 = 42/648.
    /// D01 = 1/6, 0, 0: mean 1/18, sample variance
    ///   ((2/18)^2 + 2 (1/18)^2) / 2 = 6/648.
    /// var = (42/648)/3 + (6/648)/3 = 48/1944 = 2/81; se = sqrt(2)/9;
    /// difference 8/9 - 5/6 = 1/18; z = (1/18) / (sqrt(2)/9) = 1/(2 sqrt 2).
    #[test]
    fn hand_checked_case() {
        let y = [true, true, true, false, false, false];
        let a = [0.9, 0.8, 0.4, 0.5, 0.3, 0.1];
        let b = [0.7, 0.5, 0.6, 0.6, 0.2, 0.4];
        let d = delong(&a, &b, &y).unwrap();
        let close = |x: f64, want: f64| (x - want).abs() < 1e-12;
        assert!(close(d.auc_a, 8.0 / 9.0), "{d:?}");
        assert!(close(d.auc_b, 5.0 / 6.0), "{d:?}");
        assert!(close(d.auc_b, roc_auc(&b, &y).unwrap()));
        assert!(close(d.difference, 1.0 / 18.0));
        assert!(close(d.variance, 2.0 / 81.0), "{d:?}");
        assert!(close(d.se, 2f64.sqrt() / 9.0));
        assert!(close(d.z, 1.0 / (2.0 * 2f64.sqrt())));
        // erfc(0.25) = 0.723673609831763 (A & S).
        assert!(close(d.p, 0.723_673_609_831_763), "{d:?}");
        assert!(close(d.ci.low, 1.0 / 18.0 - Z_975 * 2f64.sqrt() / 9.0));
        // Swapping the arms flips the sign and keeps the p-value.
        let swapped = delong(&b, &a, &y).unwrap();
        assert!(close(swapped.difference, -d.difference) && close(swapped.p, d.p));
    }

    #[test]
    fn identical_scores_give_p_one_not_nan() {
        let (s, y) = reference_case();
        let d = delong(&s.0, &s.0, &y).unwrap();
        assert_eq!((d.difference, d.variance, d.z, d.p), (0.0, 0.0, 0.0, 1.0));
        let b = paired_bootstrap(&s.0, &s.0, &y, 200, 3).unwrap();
        assert_eq!(b.p, 1.0);
        assert_eq!((b.ci.low, b.ci.high), (0.0, 0.0));
        // A constant arm against a perfect one: zero variance, real difference.
        let y = [true, true, false, false];
        let d = delong(&[0.9, 0.8, 0.2, 0.1], &[0.5; 4], &y).unwrap();
        assert_eq!(
            (d.difference, d.se, d.z, d.p),
            (0.5, 0.0, f64::INFINITY, 0.0)
        );
    }

    #[test]
    fn refuses_bad_input() {
        let y = [true, false, false];
        assert!(matches!(
            delong(&[0.2, 0.1, 0.3], &[0.2, 0.1, 0.3], &y),
            Err(MetricError::BadParameter(m)) if m.contains("at least 2 positives")
        ));
        assert!(delong(&[0.1, 0.2], &[0.1], &[true, false]).is_err());
        assert!(delong(&[0.1, 0.2], &[0.1, f64::NAN], &[true, false]).is_err());
        assert!(paired_bootstrap(&[0.1, 0.2], &[0.1, 0.2], &[true, true], 10, 0).is_err());
        assert!(paired_bootstrap(&[0.1, 0.2], &[0.1, 0.2], &[true, false], 0, 0).is_err());
    }

    #[test]
    fn holm_steps_down() {
        // Sorted 0.01, 0.02, 0.04 (x3, x2, x1) -> 0.03, 0.04, 0.04 (monotone).
        let adjusted = holm(&[0.04, 0.01, 0.02]);
        let want = [0.04, 0.03, 0.04];
        for (got, want) in adjusted.iter().zip(want) {
            assert!((got - want).abs() < 1e-15, "{adjusted:?}");
        }
        assert_eq!(holm(&[0.5, 0.6]), [1.0, 1.0]);
        assert_eq!(holm(&[0.3]), [0.3]);
        assert!(holm(&[]).is_empty());
    }

    /// The case `tests/reference/delong_reference.py` builds the same way,
    /// from integers so that both sides get the same numbers exactly:
    /// 300 images, image i positive when (7 i) mod 10 < 3 (90 positives);
    /// u_i = (37 i) mod 101, v_i = (53 i + 11) mod 97,
    /// a_i = floor(u_i / 4) + 6 y_i (32 levels: many ties),
    /// b_i = floor((u_i + v_i) / 20) + 2 y_i (a coarser score sharing u with a,
    /// so the arms are correlated as two classifiers on one test set are).
    fn reference_case() -> ((Vec<f64>, Vec<f64>), Vec<bool>) {
        let y: Vec<bool> = (0..300u64).map(|i| (7 * i) % 10 < 3).collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for i in 0..300u64 {
            let (u, v, label) = ((37 * i) % 101, (53 * i + 11) % 97, y[i as usize] as u64);
            a.push((u / 4 + 6 * label) as f64);
            b.push(((u + v) / 20 + 2 * label) as f64);
        }
        ((a, b), y)
    }

    /// Printed by `tests/reference/delong_reference.py` (numpy/scipy, the
    /// O(n^2) structural components of DeLong et al. 1988):
    /// (auc_a, auc_b, difference, variance, se, z, p). Its hand case line
    /// (the case of `hand_checked_case`) printed 0.8888888888888888,
    /// 0.8333333333333334, 0.0555..., 0.024691358024691367 (= 2/81),
    /// 0.15713484026367724, 0.3535533905932732, 0.7236736098317635.
    const REFERENCE: [f64; 7] = [
        0.6991534391534392,
        0.7355026455026455,
        -0.03634920634920635,
        0.0006212279852475858,
        0.024924445535409324,
        -1.458375725853811,
        0.14473700772835732,
    ];

    #[test]
    fn matches_the_python_reference() {
        let ((a, b), y) = reference_case();
        let d = delong(&a, &b, &y).unwrap();
        let got = [d.auc_a, d.auc_b, d.difference, d.variance, d.se, d.z, d.p];
        for (name, (g, want)) in ["auc_a", "auc_b", "difference", "variance", "se", "z", "p"]
            .iter()
            .zip(got.iter().zip(REFERENCE))
        {
            assert!((g - want).abs() < 1e-6, "{name}: {g} vs reference {want}");
        }
        assert!((d.auc_a - roc_auc(&a, &y).unwrap()).abs() < 1e-12);
        assert!((d.auc_b - roc_auc(&b, &y).unwrap()).abs() < 1e-12);
    }

    #[test]
    fn bootstrap_is_deterministic_and_close_to_delong() {
        let ((a, b), y) = reference_case();
        let first = paired_bootstrap(&a, &b, &y, 2000, 7).unwrap();
        assert_eq!(first, paired_bootstrap(&a, &b, &y, 2000, 7).unwrap());
        assert_ne!(first, paired_bootstrap(&a, &b, &y, 2000, 8).unwrap());
        let d = delong(&a, &b, &y).unwrap();
        // Both intervals hold the estimate, and their ends agree to a
        // fraction of the DeLong interval's width (normal vs percentile).
        let width = d.ci.high - d.ci.low;
        assert!(first.ci.low < d.difference && d.difference < first.ci.high);
        assert!(
            (first.ci.low - d.ci.low).abs() < 0.15 * width,
            "{first:?} vs {d:?}"
        );
        assert!(
            (first.ci.high - d.ci.high).abs() < 0.15 * width,
            "{first:?} vs {d:?}"
        );
        // Each arm's own resampled AUCs come from the same draws as the
        // unpaired bootstrap with that seed, so their intervals are related,
        // but the paired one is about the difference: check it is narrower
        // than the sum of the two arms' widths (the arms are correlated).
        let ia = bootstrap_auc_ci(&a, &y, 2000, 0.95, 7).unwrap();
        let ib = bootstrap_auc_ci(&b, &y, 2000, 0.95, 7).unwrap();
        assert!(first.ci.high - first.ci.low < (ia.high - ia.low) + (ib.high - ib.low));
        assert!((0.0..=1.0).contains(&first.p));
    }
}
