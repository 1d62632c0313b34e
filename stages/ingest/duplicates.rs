//! The ISIC duplicates list: pairs of image names showing the same lesion
//! photo. One image of each pair is dropped so the same picture cannot land in
//! both training and evaluation (the original study's leak).
//!
//! Rule, deterministic and label-preserving: keep the malignant one when the
//! labels differ (the rare class is precious), else keep `image_name_1`.
//! Pairs naming an image not in the metadata are ignored and counted.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Result, bail};

use super::metadata_csv::{Records, read_text_csv, text_column};

/// Drops chosen from the pairs: (row index dropped, row index kept).
pub struct Drops {
    pub dropped: Vec<(usize, usize)>,
    /// Pairs that name an image not in the metadata.
    pub unmatched_pairs: usize,
}

pub fn choose(path: &Path, records: &Records) -> Result<Drops> {
    let df = read_text_csv(path)?;
    for c in ["image_name_1", "image_name_2"] {
        if df.column(c).is_err() {
            bail!(
                "{}: missing column `{c}` (expected image_name_1,image_name_2)",
                path.display()
            );
        }
    }
    let a = text_column(&df, "image_name_1")?;
    let b = text_column(&df, "image_name_2")?;
    let index: HashMap<&str, usize> = records
        .image_name
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let mut is_dropped = vec![false; records.len()];
    let mut drops = Drops {
        dropped: Vec::new(),
        unmatched_pairs: 0,
    };
    for (line, (x, y)) in a.iter().zip(&b).enumerate() {
        let (Some(x), Some(y)) = (x, y) else {
            bail!(
                "{}: line {}: a pair needs two image names",
                path.display(),
                line + 2
            );
        };
        let (Some(&i), Some(&j)) = (index.get(x.as_str()), index.get(y.as_str())) else {
            drops.unmatched_pairs += 1;
            continue;
        };
        if i == j || is_dropped[i] || is_dropped[j] {
            continue;
        }
        let (drop, keep) = if records.target[j] > records.target[i] {
            (i, j)
        } else {
            (j, i)
        };
        is_dropped[drop] = true;
        drops.dropped.push((drop, keep));
    }
    Ok(drops)
}
