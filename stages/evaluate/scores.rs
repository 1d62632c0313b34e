//! `evaluate/test_scores.parquet`: every arm's test scores per seed and
//! image, written by `evaluate` and read back by `diff` and the experiments'
//! report, which pair the same arm across two runs image by image.
//!
//! Promises: rows are in arm order, then seed order, then the first seed's
//! image order (so the same inputs give the same bytes); reading gives back
//! the `ArmScores` that were written, checked as `ArmScores::new` checks them.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use arrow_array::{ArrayRef, Float64Array, Int32Array, Int64Array, StringArray};
use polars::prelude::{ParquetReader, SerReader};

use super::compare::{ArmScores, SeedPredictions};

pub const FILE: &str = "test_scores.parquet";

pub fn write(path: &Path, arms: &[ArmScores]) -> Result<()> {
    let mut rows: Vec<(&str, u64, &str, bool, f64)> = Vec::new();
    for a in arms {
        for (seed, scores) in &a.seeds {
            for ((image, target), score) in a.images.iter().zip(scores) {
                rows.push((&a.arm, *seed, image, *target, *score));
            }
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.1 as i64).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.2).collect::<Vec<_>>(),
        )),
        Arc::new(Int32Array::from(
            rows.iter().map(|r| r.3 as i32).collect::<Vec<_>>(),
        )),
        Arc::new(Float64Array::from(
            rows.iter().map(|r| r.4).collect::<Vec<_>>(),
        )),
    ];
    melanoflow_schemas::write_parquet(path, &melanoflow_schemas::TEST_SCORES, columns)?;
    Ok(())
}

pub fn read(path: &Path) -> Result<Vec<ArmScores>> {
    melanoflow_schemas::check_parquet(path, &melanoflow_schemas::TEST_SCORES)?;
    let df = ParquetReader::new(
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
    )
    .finish()?;
    let (arm, seed, image, target, score) = (
        df.column("arm")?.str()?,
        df.column("seed")?.i64()?,
        df.column("image_name")?.str()?,
        df.column("target")?.i32()?,
        df.column("score")?.f64()?,
    );
    // (arm, [(seed, predictions)]) in first-seen order.
    let mut arms: Vec<(String, Vec<(u64, SeedPredictions)>)> = Vec::new();
    for i in 0..df.height() {
        let (Some(a), Some(s), Some(im), Some(t), Some(x)) = (
            arm.get(i),
            seed.get(i),
            image.get(i),
            target.get(i),
            score.get(i),
        ) else {
            bail!("{}: row {i} has a null", path.display());
        };
        if arms.last().is_none_or(|(name, _)| name != a) {
            arms.push((a.to_string(), Vec::new()));
        }
        let seeds = &mut arms.last_mut().expect("pushed").1;
        if seeds.last().is_none_or(|(last, _)| *last != s as u64) {
            seeds.push((s as u64, Vec::new()));
        }
        let predictions = &mut seeds.last_mut().expect("pushed").1;
        predictions.push((im.to_string(), t == 1, x));
    }
    arms.into_iter()
        .map(|(name, seeds)| {
            ArmScores::new(&name, seeds).with_context(|| format!("reading {}", path.display()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let seeds = |shift: f64| -> Vec<(u64, SeedPredictions)> {
            [3u64, 1]
                .iter()
                .map(|&s| {
                    let p = (0..6)
                        .map(|i| {
                            (
                                format!("img{i}"),
                                i % 2 == 0,
                                i as f64 * 0.1 + shift + s as f64,
                            )
                        })
                        .collect();
                    (s, p)
                })
                .collect()
        };
        let arms = vec![
            ArmScores::new("b", seeds(0.0)).unwrap(),
            ArmScores::new("a", seeds(0.5)).unwrap(),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        write(&path, &arms).unwrap();
        let back = read(&path).unwrap();
        assert_eq!(back.len(), 2);
        for (x, y) in arms.iter().zip(&back) {
            assert_eq!(x.arm, y.arm);
            assert_eq!(x.images, y.images);
            assert_eq!(x.seeds, y.seeds);
        }
    }
}
