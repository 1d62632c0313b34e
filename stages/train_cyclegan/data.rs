//! Training images for the CycleGAN: the train split of `preprocess`'s
//! shards, benign (domain A) and malignant (domain B), read image by image
//! from the shards (never the whole dataset in memory), turned into [-1, 1]
//! CHW tensors with random flips and 90-degree rotations.
//!
//! An epoch pairs every malignant training image with a benign one drawn at
//! random, as in the paper.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use polars::prelude::{ParquetReader, SerReader};
use rand::Rng;
use rand::seq::SliceRandom;

use crate::preprocess::shards::ShardReader;

/// Where one image lives: shard file and index in it.
#[derive(Clone, Debug)]
pub struct ImageRef {
    pub shard: String,
    pub offset: u64,
}

pub struct Images {
    pub size: u32,
    readers: HashMap<String, ShardReader>,
    pub benign: Vec<ImageRef>,
    pub malignant: Vec<ImageRef>,
    /// Benign images to show in the sample grid: validation split first.
    pub preview: Vec<ImageRef>,
}

impl Images {
    /// Reads `index.parquet` and opens the shards of a `preprocess` output.
    pub fn open(dir: &Path) -> Result<Images> {
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("preprocess.json")).context("reading preprocess.json")?,
        )?;
        let size = summary["size"].as_u64().context("preprocess.json has no size")? as u32;
        let index = dir.join("index.parquet");
        melanoflow_schemas::check_parquet(&index, &melanoflow_schemas::IMAGE_INDEX)?;
        let df = ParquetReader::new(std::fs::File::open(&index)?).finish()?;
        let shard = df.column("shard")?.str()?.clone();
        let offset = df.column("offset")?.i64()?.clone();
        let target = df.column("target")?.i32()?.clone();
        let split = df.column("split")?.str()?.clone();
        let mut images = Images { size, readers: HashMap::new(), benign: vec![], malignant: vec![], preview: vec![] };
        let mut val_benign = Vec::new();
        for i in 0..df.height() {
            let (Some(s), Some(o), Some(t), Some(sp)) = (shard.get(i), offset.get(i), target.get(i), split.get(i)) else {
                bail!("{}: row {i} has a null", index.display());
            };
            if !images.readers.contains_key(s) {
                images.readers.insert(s.to_string(), ShardReader::open(&dir.join(s), size)?);
            }
            let r = ImageRef { shard: s.to_string(), offset: o as u64 };
            match (sp, t) {
                ("train", 1) => images.malignant.push(r),
                ("train", _) => images.benign.push(r),
                ("val", 0) => val_benign.push(r),
                _ => {}
            }
        }
        if images.malignant.is_empty() || images.benign.is_empty() {
            bail!(
                "the train split needs both classes: {} benign, {} malignant images",
                images.benign.len(),
                images.malignant.len()
            );
        }
        images.preview = val_benign.into_iter().chain(images.benign.iter().cloned()).take(8).collect();
        Ok(images)
    }

    /// Pixels of one image, HWC RGB.
    pub fn pixels(&self, r: &ImageRef) -> Result<Vec<u8>> {
        self.readers[&r.shard].read(r.offset)
    }

    /// A batch as a [B, 3, S, S] tensor in [-1, 1], optionally with a random
    /// flip / 90-degree rotation per image (drawn from `rng`).
    pub fn batch(&self, refs: &[&ImageRef], augment: bool, rng: &mut impl Rng, device: &Device) -> Result<Tensor> {
        let s = self.size as usize;
        let mut data = Vec::with_capacity(refs.len() * 3 * s * s);
        for r in refs {
            let px = self.pixels(r)?;
            let (flip, rot) = if augment { (rng.random::<bool>(), rng.random_range(0..4u8)) } else { (false, 0) };
            // CHW, with the dihedral transform applied while gathering.
            for c in 0..3 {
                for y in 0..s {
                    for x in 0..s {
                        let (sx, sy) = dihedral(x, y, s, flip, rot);
                        data.push(px[(sy * s + sx) * 3 + c] as f32 / 127.5 - 1.0);
                    }
                }
            }
        }
        Ok(Tensor::from_vec(data, (refs.len(), 3, s, s), device)?)
    }
}

/// Source pixel of output (x, y) under a horizontal flip then `rot` quarter turns.
fn dihedral(x: usize, y: usize, s: usize, flip: bool, rot: u8) -> (usize, usize) {
    let (mut x, mut y) = (x, y);
    for _ in 0..rot {
        (x, y) = (y, s - 1 - x);
    }
    if flip {
        x = s - 1 - x;
    }
    (x, y)
}

/// One epoch's (benign, malignant) pairs: every malignant image once, in a
/// random order, each with a random benign partner.
pub fn epoch_pairs<'a>(images: &'a Images, rng: &mut impl Rng) -> Vec<(&'a ImageRef, &'a ImageRef)> {
    let mut malignant: Vec<&ImageRef> = images.malignant.iter().collect();
    malignant.shuffle(rng);
    malignant.into_iter().map(|m| (&images.benign[rng.random_range(0..images.benign.len())], m)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dihedral_transforms_are_permutations() {
        for flip in [false, true] {
            for rot in 0..4 {
                let mut seen = std::collections::HashSet::new();
                for y in 0..4 {
                    for x in 0..4 {
                        assert!(seen.insert(dihedral(x, y, 4, flip, rot)));
                    }
                }
                assert_eq!(seen.len(), 16);
            }
        }
        assert_eq!(dihedral(1, 2, 4, false, 0), (1, 2));
    }
}
