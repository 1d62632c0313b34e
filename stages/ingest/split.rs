//! The patient-grouped, label-stratified split into train / val / test, and
//! into `k` cross-validation folds.
//!
//! Promises: every patient's images land in one split (one fold); each
//! split's share of malignant images follows its fraction, so its malignant
//! rate stays close to the whole dataset's (within one percentage point on
//! ISIC-sized data; the test suite checks it on the real ISIC 2020 metadata);
//! deterministic for a seed. With folds, the test split is one fold and every
//! patient is in exactly one fold's test split.
//!
//! Method: patients in a seeded random order, then stably sorted by number of
//! malignant images and of images (largest first); each goes to the split
//! furthest below its target share of malignant images (for patients with a
//! melanoma) or of images (for the rest). polars does the per-patient counts
//! and joins the assignment back onto the rows.

use anyhow::Result;
use polars::prelude::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

pub const SPLITS: [&str; 3] = ["train", "val", "test"];

/// Split name per row, in row order.
pub fn assign(
    patient_id: &[String],
    target: &[i32],
    fractions: [f64; 3],
    seed: u64,
) -> Result<Vec<&'static str>> {
    Ok(assign_groups(patient_id, target, &fractions, seed)?
        .into_iter()
        .map(|g| SPLITS[g])
        .collect())
}

/// Cross-validation: the patients in `folds` groups of equal shares, fold
/// `fold` is the test split and the other patients are split into train and
/// validation (`val_fraction` of them, of images and of malignant images).
pub fn assign_fold(
    patient_id: &[String],
    target: &[i32],
    folds: usize,
    fold: usize,
    val_fraction: f64,
    seed: u64,
) -> Result<Vec<&'static str>> {
    let fold_of = assign_groups(patient_id, target, &vec![1.0 / folds as f64; folds], seed)?;
    let rest: Vec<usize> = (0..patient_id.len())
        .filter(|&i| fold_of[i] != fold)
        .collect();
    let rest_split = assign_groups(
        &rest
            .iter()
            .map(|&i| patient_id[i].clone())
            .collect::<Vec<_>>(),
        &rest.iter().map(|&i| target[i]).collect::<Vec<_>>(),
        &[1.0 - val_fraction, val_fraction],
        // Another stream than the folds', so that validation is not the next fold.
        seed ^ 0x9e37_79b9_7f4a_7c15,
    )?;
    let mut split = vec![SPLITS[2]; patient_id.len()];
    for (&i, g) in rest.iter().zip(rest_split) {
        split[i] = SPLITS[g];
    }
    Ok(split)
}

/// Group index per row (into `fractions`), in row order: patients whole,
/// malignant images and images each shared out by `fractions`.
fn assign_groups(
    patient_id: &[String],
    target: &[i32],
    fractions: &[f64],
    seed: u64,
) -> Result<Vec<usize>> {
    let groups = fractions.len();
    let rows = df!(
        "patient_id" => patient_id,
        "target" => target,
    )?;
    let per_patient = rows
        .clone()
        .lazy()
        .group_by([col("patient_id")])
        .agg([
            len().alias("images"),
            col("target").sum().alias("malignant"),
        ])
        .sort(["patient_id"], Default::default())
        .collect()?;
    let ids: Vec<String> = per_patient
        .column("patient_id")?
        .str()?
        .no_null_iter()
        .map(str::to_string)
        .collect();
    let images: Vec<u64> = per_patient
        .column("images")?
        .cast(&DataType::UInt64)?
        .u64()?
        .no_null_iter()
        .collect();
    let malignant: Vec<u64> = per_patient
        .column("malignant")?
        .cast(&DataType::UInt64)?
        .u64()?
        .no_null_iter()
        .collect();

    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    order.sort_by(|&a, &b| (malignant[b], images[b]).cmp(&(malignant[a], images[a])));

    let total_images: u64 = images.iter().sum();
    let total_malignant: u64 = malignant.iter().sum();
    let mut got_images = vec![0u64; groups];
    let mut got_malignant = vec![0u64; groups];
    let mut split_of = vec![0usize; ids.len()];
    for &p in &order {
        let deficit = |s: usize, got: &[u64], total: u64| {
            let want = fractions[s] * total as f64;
            (want - got[s] as f64) / want.max(1e-9)
        };
        let best = (0..groups)
            .filter(|&s| fractions[s] > 0.0)
            .max_by(|&a, &b| {
                let key = |s: usize| {
                    if malignant[p] > 0 {
                        (
                            deficit(s, &got_malignant, total_malignant),
                            deficit(s, &got_images, total_images),
                        )
                    } else {
                        (deficit(s, &got_images, total_images), 0.0)
                    }
                };
                // Ties go to the earlier group (train, then val, then test).
                key(a)
                    .partial_cmp(&key(b))
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(b.cmp(&a))
            })
            .expect("the first fraction is positive");
        split_of[p] = best;
        got_images[best] += images[p];
        got_malignant[best] += malignant[p];
    }

    let assignment = df!(
        "patient_id" => &ids,
        "group" => split_of.iter().map(|&g| g as u32).collect::<Vec<_>>(),
    )?;
    let mut args = JoinArgs::new(JoinType::Left);
    args.maintain_order = MaintainOrderJoin::Left;
    let joined = rows
        .lazy()
        .join(
            assignment.lazy(),
            [col("patient_id")],
            [col("patient_id")],
            args,
        )
        .collect()?;
    let group = joined.column("group")?.u32()?;
    Ok(group
        .iter()
        .map(|g| g.expect("every patient was assigned") as usize)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patients_stay_whole_and_rates_follow_the_fractions() {
        // 300 patients with 1-20 images each; 1 in 6 has one or two melanomas.
        let mut pid = Vec::new();
        let mut target = Vec::new();
        for p in 0..300 {
            let n = 1 + (p * 7) % 20;
            for k in 0..n {
                pid.push(format!("IP_{p:04}"));
                target.push(((p % 6 == 0 && k < 1 + (p % 2)) as usize) as i32);
            }
        }
        let split = assign(&pid, &target, [0.7, 0.15, 0.15], 1).unwrap();
        let mut of_patient = std::collections::HashMap::new();
        for (p, s) in pid.iter().zip(&split) {
            assert_eq!(
                *of_patient.entry(p).or_insert(*s),
                *s,
                "patient {p} is in two splits"
            );
        }
        let rate = |name: &str| {
            let idx: Vec<usize> = (0..pid.len()).filter(|&i| split[i] == name).collect();
            idx.iter().map(|&i| target[i] as f64).sum::<f64>() / idx.len() as f64
        };
        let overall = target.iter().map(|&t| t as f64).sum::<f64>() / target.len() as f64;
        for s in SPLITS {
            assert!(
                (rate(s) - overall).abs() < 0.01,
                "{s}: {} vs {overall}",
                rate(s)
            );
        }
        assert_eq!(
            split,
            assign(&pid, &target, [0.7, 0.15, 0.15], 1).unwrap(),
            "deterministic"
        );
    }

    #[test]
    fn folds_partition_the_patients_and_each_holds_its_share() {
        let mut pid = Vec::new();
        let mut target = Vec::new();
        for p in 0..100 {
            pid.push(format!("IP_{p:04}"));
            target.push(p % 2);
        }
        let mut tested = vec![0; pid.len()];
        for fold in 0..5 {
            let split = assign_fold(&pid, &target, 5, fold, 0.2, 7).unwrap();
            let count = |name: &str, malignant: bool| {
                (0..pid.len())
                    .filter(|&i| split[i] == name && (!malignant || target[i] == 1))
                    .count()
            };
            // 20 test images (10 malignant); 20% of the other 80 for validation.
            assert_eq!(
                (count("test", false), count("test", true)),
                (20, 10),
                "fold {fold}"
            );
            assert_eq!(
                (count("val", false), count("val", true)),
                (16, 8),
                "fold {fold}"
            );
            for i in 0..pid.len() {
                tested[i] += (split[i] == "test") as usize;
            }
            assert_eq!(split, assign_fold(&pid, &target, 5, fold, 0.2, 7).unwrap());
        }
        assert!(
            tested.iter().all(|&n| n == 1),
            "each image is tested in exactly one fold"
        );
    }
}
