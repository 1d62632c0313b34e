//! Training images for the CycleGAN: the train split of `preprocess`'s
//! shards, benign (domain A) and malignant (domain B), read image by image
//! from the shards (never the whole dataset in memory), turned into [-1, 1]
//! CHW tensors with random flips and 90-degree rotations.
//!
//! An epoch pairs every malignant training image with a benign one drawn at
//! random, as in the paper.

use std::path::Path;

use anyhow::{Result, bail};
use candle_core::{Device, Tensor};
use rand::Rng;
use rand::seq::SliceRandom;

pub use crate::imageset::ImageRecord as ImageRef;
use crate::imageset::ImageSet;

pub struct Images {
    pub size: u32,
    set: ImageSet,
    pub benign: Vec<ImageRef>,
    pub malignant: Vec<ImageRef>,
    /// Benign images to show in the sample grid: validation split first.
    pub preview: Vec<ImageRef>,
}

impl Images {
    /// The training images of a `preprocess` output, by class.
    pub fn open(dir: &Path) -> Result<Images> {
        let set = ImageSet::open(dir)?;
        let (malignant, benign): (Vec<ImageRef>, Vec<ImageRef>) =
            set.split("train").cloned().partition(|r| r.malignant);
        if malignant.is_empty() || benign.is_empty() {
            bail!(
                "the train split needs both classes: {} benign, {} malignant images",
                benign.len(),
                malignant.len()
            );
        }
        let preview = set
            .split("val")
            .filter(|r| !r.malignant)
            .chain(benign.iter())
            .take(8)
            .cloned()
            .collect();
        Ok(Images {
            size: set.size,
            set,
            benign,
            malignant,
            preview,
        })
    }

    /// Pixels of one image, HWC RGB.
    pub fn pixels(&self, r: &ImageRef) -> Result<Vec<u8>> {
        self.set.pixels(r)
    }

    /// A batch as a [B, 3, S, S] tensor in [-1, 1], optionally with a random
    /// flip / 90-degree rotation per image (drawn from `rng`).
    pub fn batch(
        &self,
        refs: &[&ImageRef],
        augment: bool,
        rng: &mut impl Rng,
        device: &Device,
    ) -> Result<Tensor> {
        let s = self.size as usize;
        let mut data = Vec::with_capacity(refs.len() * 3 * s * s);
        for r in refs {
            let px = self.pixels(r)?;
            let (flip, rot) = if augment {
                (rng.random::<bool>(), rng.random_range(0..4u8))
            } else {
                (false, 0)
            };
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
pub fn epoch_pairs<'a>(
    images: &'a Images,
    rng: &mut impl Rng,
) -> Vec<(&'a ImageRef, &'a ImageRef)> {
    let mut malignant: Vec<&ImageRef> = images.malignant.iter().collect();
    malignant.shuffle(rng);
    malignant
        .into_iter()
        .map(|m| (&images.benign[rng.random_range(0..images.benign.len())], m))
        .collect()
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
