//! The paired comparisons `evaluate` reports: every pair of arms, on the same
//! test images, pooled over seeds.
//!
//! Promises:
//! - An arm's test predictions are pooled into its seed-ensemble score: per
//!   test image, the mean of its seeds' scores (summed in the seeds' listed
//!   order). Every seed of an arm must score the same test images with the
//!   same labels, each once.
//! - Arms are matched image by image through `image_name`, never by row
//!   order; two arms whose test images or labels differ are an error naming
//!   both stages and the first image that differs.
//! - Pairs come in the order the arms are listed: (1, 2), (1, 3), ...,
//!   (2, 3), ...; k arms give k (k - 1) / 2 comparisons, each with DeLong's
//!   test, the paired bootstrap (every pair drawn from the same seed, so
//!   all pairs see the same resampled images), the DeLong p-values
//!   Holm-adjusted over the pairs, and DeLong on single seeds for every seed
//!   number both arms trained.

use std::collections::HashMap;

use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::paired::{delong, holm, paired_bootstrap};
use super::report::IntervalDef;
use crate::metrics::Interval;

/// One seed's test predictions: (image name, malignant, score), any order.
pub type SeedPredictions = Vec<(String, bool, f64)>;

/// One arm's test predictions, per seed, aligned to one image order.
pub struct ArmScores {
    pub arm: String,
    /// Test images (name, malignant) in the first seed's order.
    pub images: Vec<(String, bool)>,
    /// (seed, score per image of `images`), in the seeds' listed order.
    pub seeds: Vec<(u64, Vec<f64>)>,
}

impl ArmScores {
    /// `seeds`: (seed, its test predictions), in the seeds' listed order.
    pub fn new(arm: &str, seeds: Vec<(u64, SeedPredictions)>) -> Result<ArmScores> {
        let Some((_, first)) = seeds.first() else {
            bail!("arm `{arm}` has no seeds");
        };
        let images: Vec<(String, bool)> = first.iter().map(|(n, t, _)| (n.clone(), *t)).collect();
        let index = image_index(&images).map_err(|dup| {
            anyhow!("arm `{arm}`: test image `{dup}` is predicted twice by one seed")
        })?;
        let mut aligned = Vec::new();
        for (seed, predictions) in seeds {
            if predictions.len() != images.len() {
                bail!(
                    "arm `{arm}`: seed {seed} scores {} test images, the first seed {}",
                    predictions.len(),
                    images.len()
                );
            }
            let mut scores = vec![f64::NAN; images.len()];
            for (name, target, score) in predictions {
                let Some(&i) = index.get(name.as_str()) else {
                    bail!(
                        "arm `{arm}`: seed {seed} scores test image `{name}`, which the first seed does not"
                    );
                };
                if images[i].1 != target {
                    bail!(
                        "arm `{arm}`: seed {seed} labels test image `{name}` differently from the first seed"
                    );
                }
                if !scores[i].is_nan() {
                    bail!("arm `{arm}`: test image `{name}` is predicted twice by seed {seed}");
                }
                scores[i] = score;
            }
            aligned.push((seed, scores));
        }
        Ok(ArmScores {
            arm: arm.to_string(),
            images,
            seeds: aligned,
        })
    }

    /// The seed-ensemble score of each image (in `images` order).
    pub fn pooled(&self) -> Vec<f64> {
        (0..self.images.len())
            .map(|i| self.seeds.iter().map(|(_, s)| s[i]).sum::<f64>() / self.seeds.len() as f64)
            .collect()
    }

    fn labels(&self) -> Vec<bool> {
        self.images.iter().map(|(_, t)| *t).collect()
    }
}

/// Image name -> position; Err(name) on a duplicate.
fn image_index(images: &[(String, bool)]) -> Result<HashMap<&str, usize>, String> {
    let mut index = HashMap::with_capacity(images.len());
    for (i, (name, _)) in images.iter().enumerate() {
        if index.insert(name.as_str(), i).is_some() {
            return Err(name.clone());
        }
    }
    Ok(index)
}

/// For each image of `a`, its position in `b`; an error names both arms and
/// the first image that differs.
fn match_images(a: &ArmScores, b: &ArmScores) -> Result<Vec<usize>> {
    let index = image_index(&b.images).expect("checked in ArmScores::new");
    let mismatch = |why: String| {
        anyhow!(
            "arms `{}` and `{}` were not tested on the same images ({why}); they must share one preprocess stage",
            a.arm,
            b.arm
        )
    };
    let mut order = Vec::with_capacity(a.images.len());
    for (name, target) in &a.images {
        let Some(&j) = index.get(name.as_str()) else {
            return Err(mismatch(format!("`{name}` is only in `{}`", a.arm)));
        };
        if b.images[j].1 != *target {
            return Err(mismatch(format!("`{name}` has different labels")));
        }
        order.push(j);
    }
    if b.images.len() != a.images.len() {
        let extra = b
            .images
            .iter()
            .find(|(n, _)| !a.images.iter().any(|(m, _)| m == n))
            .map_or_else(String::new, |(n, _)| n.clone());
        return Err(mismatch(format!("`{extra}` is only in `{}`", b.arm)));
    }
    Ok(order)
}

/// DeLong's test in `metrics.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeLongRecord {
    pub se: f64,
    /// difference / se; absent when infinite (zero variance, non-zero
    /// difference: then p = 0).
    pub z: Option<f64>,
    /// Two-sided, not adjusted.
    pub p: f64,
    /// Holm-adjusted over every pair of this evaluation.
    pub p_holm: f64,
    /// 95%.
    #[serde(with = "IntervalDef")]
    pub ci: Interval,
}

/// The paired bootstrap in `metrics.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BootstrapRecord {
    /// 95% percentile interval of the difference.
    #[serde(with = "IntervalDef")]
    pub ci: Interval,
    /// Two-sided, not adjusted.
    pub p: f64,
    pub resamples: usize,
}

/// DeLong on one seed both arms trained (no pooling).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeedComparison {
    pub seed: u64,
    pub auc_a: f64,
    pub auc_b: f64,
    pub difference: f64,
    pub p: f64,
}

/// Arm A against arm B on the seed-ensemble scores: difference = auc_a - auc_b.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub arm_a: String,
    pub arm_b: String,
    /// How many seeds each arm's scores average.
    pub seeds_a: usize,
    pub seeds_b: usize,
    pub auc_a: f64,
    pub auc_b: f64,
    pub difference: f64,
    pub delong: DeLongRecord,
    pub bootstrap: BootstrapRecord,
    pub n_pos: usize,
    pub n_neg: usize,
    #[serde(default)]
    pub per_seed: Vec<SeedComparison>,
}

/// Every pair of `arms`, in their order.
pub fn compare_arms(arms: &[ArmScores], resamples: usize, seed: u64) -> Result<Vec<Comparison>> {
    let mut comparisons = Vec::new();
    for (i, a) in arms.iter().enumerate() {
        for b in &arms[i + 1..] {
            comparisons.push(compare_pair(a, b, resamples, seed)?);
        }
    }
    let adjusted = holm(&comparisons.iter().map(|c| c.delong.p).collect::<Vec<_>>());
    for (c, p) in comparisons.iter_mut().zip(adjusted) {
        c.delong.p_holm = p;
    }
    Ok(comparisons)
}

/// DeLong's test of two arms' seed-ensemble scores, matched image by image
/// (an error when their test images or labels differ).
pub fn delong_pooled(a: &ArmScores, b: &ArmScores) -> Result<super::paired::DeLong> {
    let order = match_images(a, b)?;
    let sb: Vec<f64> = {
        let pooled = b.pooled();
        order.iter().map(|&j| pooled[j]).collect()
    };
    delong(&a.pooled(), &sb, &a.labels())
        .map_err(|e| anyhow!("comparing `{}` with `{}`: {e}", a.arm, b.arm))
}

fn compare_pair(a: &ArmScores, b: &ArmScores, resamples: usize, seed: u64) -> Result<Comparison> {
    let order = match_images(a, b)?;
    let labels = a.labels();
    let in_a_order = |scores: &[f64]| order.iter().map(|&j| scores[j]).collect::<Vec<f64>>();
    let (sa, sb) = (a.pooled(), in_a_order(&b.pooled()));
    let what = |e| anyhow!("comparing `{}` with `{}`: {e}", a.arm, b.arm);
    let d = delong(&sa, &sb, &labels).map_err(what)?;
    let boot = paired_bootstrap(&sa, &sb, &labels, resamples, seed).map_err(what)?;
    let mut per_seed = Vec::new();
    for (s, scores_a) in &a.seeds {
        if let Some((_, scores_b)) = b.seeds.iter().find(|(t, _)| t == s) {
            let one = delong(scores_a, &in_a_order(scores_b), &labels).map_err(what)?;
            per_seed.push(SeedComparison {
                seed: *s,
                auc_a: one.auc_a,
                auc_b: one.auc_b,
                difference: one.difference,
                p: one.p,
            });
        }
    }
    let n_pos = labels.iter().filter(|&&l| l).count();
    Ok(Comparison {
        arm_a: a.arm.clone(),
        arm_b: b.arm.clone(),
        seeds_a: a.seeds.len(),
        seeds_b: b.seeds.len(),
        auc_a: d.auc_a,
        auc_b: d.auc_b,
        difference: d.difference,
        delong: DeLongRecord {
            se: d.se,
            z: d.z.is_finite().then_some(d.z),
            p: d.p,
            p_holm: d.p,
            ci: d.ci,
        },
        bootstrap: BootstrapRecord {
            ci: boot.ci,
            p: boot.p,
            resamples: boot.resamples,
        },
        n_pos,
        n_neg: labels.len() - n_pos,
        per_seed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::roc_auc;

    /// 40 images, every fourth malignant; score = f(image, seed).
    fn arm(name: &str, seeds: &[u64], shift: f64, reversed: bool) -> ArmScores {
        let per_seed = seeds
            .iter()
            .map(|&s| {
                let mut rows: Vec<(String, bool, f64)> = (0..40)
                    .map(|i| {
                        let malignant = i % 4 == 0;
                        let noise = ((i * 7 + s as usize * 13) % 17) as f64 / 17.0;
                        (
                            format!("ISIC_{i:03}"),
                            malignant,
                            noise + shift * malignant as u8 as f64,
                        )
                    })
                    .collect();
                if reversed {
                    rows.reverse();
                }
                (s, rows)
            })
            .collect();
        ArmScores::new(name, per_seed).unwrap()
    }

    #[test]
    fn delong_between_runs_matches_images_by_name() {
        // The same arm in two runs, its rows in opposite orders.
        let (a, b) = (arm("x", &[0, 1], 0.3, false), arm("x", &[0, 1], 0.6, true));
        let d = delong_pooled(&a, &b).unwrap();
        let aligned: Vec<f64> = b.pooled().into_iter().rev().collect();
        let want = delong(&a.pooled(), &aligned, &a.labels()).unwrap();
        assert_eq!(d, want);
        assert!((d.auc_b - roc_auc(&aligned, &a.labels()).unwrap()).abs() < 1e-15);
        // Another test split cannot be paired.
        let mut other = arm("x", &[0], 0.3, false);
        other.images[3].0 = "ISIC_999".into();
        assert!(delong_pooled(&a, &other).is_err());
    }

    #[test]
    fn pools_by_image_and_matches_arms_by_name() {
        // The same predictions in reverse row order: same pooled scores per
        // image, so a difference of exactly 0 and p = 1.
        let a = arm("classical", &[0, 1], 0.3, false);
        let b = arm("copy", &[0, 1], 0.3, true);
        let pooled = a.pooled();
        // Image 5, seeds 0 and 1: noise 35 % 17 = 1 and 48 % 17 = 14 -> 15/34.
        assert!((pooled[5] - 15.0 / 34.0).abs() < 1e-15);
        let c = &compare_arms(&[a, b], 200, 0).unwrap()[0];
        assert_eq!((c.difference, c.delong.p, c.bootstrap.p), (0.0, 1.0, 1.0));
        assert_eq!((c.n_pos, c.n_neg, c.seeds_a, c.seeds_b), (10, 30, 2, 2));
        assert_eq!(c.per_seed.len(), 2);
        assert!(c.per_seed.iter().all(|s| s.difference == 0.0 && s.p == 1.0));
    }

    #[test]
    fn every_pair_in_order_with_holm() {
        let arms = [
            arm("none", &[0], 0.0, false),
            arm("classical", &[0, 1, 2], 0.4, false),
            arm("cyclegan", &[1], 0.2, true),
        ];
        let cs = compare_arms(&arms, 300, 5).unwrap();
        let pairs: Vec<(&str, &str)> = cs
            .iter()
            .map(|c| (c.arm_a.as_str(), c.arm_b.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("none", "classical"),
                ("none", "cyclegan"),
                ("classical", "cyclegan")
            ]
        );
        let labels = arms[1].labels();
        assert!((cs[0].auc_b - roc_auc(&arms[1].pooled(), &labels).unwrap()).abs() < 1e-12);
        assert!(cs[0].difference < 0.0, "the shifted arm is better");
        // Seeds in common: none-classical {0}, none-cyclegan {}, classical-cyclegan {1}.
        let seeds: Vec<Vec<u64>> = cs
            .iter()
            .map(|c| c.per_seed.iter().map(|s| s.seed).collect())
            .collect();
        assert_eq!(seeds, [vec![0], vec![], vec![1]]);
        let adjusted = holm(&cs.iter().map(|c| c.delong.p).collect::<Vec<_>>());
        for (c, p) in cs.iter().zip(adjusted) {
            assert_eq!(c.delong.p_holm, p);
            assert!(c.delong.p_holm >= c.delong.p);
            assert!(c.delong.p.is_finite() && c.bootstrap.p.is_finite());
        }
    }

    #[test]
    fn mismatched_test_sets_name_both_arms() {
        let a = arm("classical", &[0], 0.3, false);
        let mut rows: Vec<(String, bool, f64)> = (0..40)
            .map(|i| (format!("ISIC_{i:03}"), i % 4 == 0, i as f64))
            .collect();
        rows[7].0 = "ISIC_999".into();
        let b = ArmScores::new("cyclegan", vec![(0, rows.clone())]).unwrap();
        let err = compare_arms(&[a, b], 100, 0).unwrap_err().to_string();
        assert!(
            err.contains("`classical` and `cyclegan`")
                && err.contains("`ISIC_007` is only in `classical`"),
            "{err}"
        );
        // A seed that scores another image set is refused when the arm is built.
        let mut other = rows.clone();
        other.pop();
        let err = ArmScores::new("arm", vec![(0, rows.clone()), (1, other)])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("seed 1 scores 39 test images, the first seed 40"),
            "{err}"
        );
        let mut relabelled = rows.clone();
        relabelled[3].1 = !relabelled[3].1;
        let err = ArmScores::new("arm", vec![(0, rows), (1, relabelled)])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("labels test image `ISIC_003` differently"),
            "{err}"
        );
    }
}
