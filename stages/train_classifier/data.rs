//! The classifier's data: which images an epoch trains on, in which order,
//! with which transform, and how a batch becomes a tensor.
//!
//! An epoch is every real training image once, plus per arm: nothing
//! (`none`), oversampled malignant copies up to `target_ratio` of the benign
//! count, each with a fresh classical transform (`classical`), or every
//! synthetic image of `generate` (`cyclegan`). The order and the transforms
//! come from streams keyed by (seed, epoch) and (seed, epoch, batch), so a run
//! resumed at an epoch boundary draws what an uninterrupted one draws.

use anyhow::{Result, bail};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Augmentation;
use super::augment::{Affine, push_normalised_chw, warp};
use crate::imageset::{ImageRecord, ImageSet};

/// Where a training sample comes from and how it is transformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Real,
    /// An extra copy of a real malignant image (classical arm): random affine.
    Oversampled,
    Synthetic,
}

#[derive(Clone, Copy)]
pub struct Sample<'a> {
    pub set: &'a ImageSet,
    pub record: &'a ImageRecord,
    pub origin: Origin,
}

/// The images a classifier sees: the preprocessed set and, for the CycleGAN
/// arm, the synthetic set.
pub struct ClassifierData<'a> {
    pub real: &'a ImageSet,
    pub synthetic: Option<&'a ImageSet>,
    pub augmentation: Augmentation,
    pub target_ratio: f64,
    pub flips: bool,
    /// Side of the tensors fed to the model.
    pub side: usize,
}

/// Counts of one epoch's composition.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Composition {
    pub benign: usize,
    pub malignant: usize,
    pub oversampled: usize,
    pub synthetic: usize,
}

impl<'a> ClassifierData<'a> {
    /// Checks that training and validation have both classes.
    pub fn validate(&self) -> Result<()> {
        for split in ["train", "val", "test"] {
            let (pos, n) = self
                .real
                .split(split)
                .fold((0, 0), |(p, n), r| (p + r.malignant as usize, n + 1));
            if pos == 0 || pos == n {
                bail!(
                    "the {split} split needs both classes for training and ROC-AUC: {pos} malignant of {n} images"
                );
            }
        }
        if let Some(s) = self.synthetic
            && s.records.iter().any(|r| r.split != "train" || !r.malignant)
        {
            bail!(
                "{}: synthetic images must all be malignant training images",
                s.dir.display()
            );
        }
        Ok(())
    }

    pub fn composition(&self) -> Composition {
        let train: Vec<&ImageRecord> = self.real.split("train").collect();
        let malignant = train.iter().filter(|r| r.malignant).count();
        let benign = train.len() - malignant;
        let mut c = Composition {
            benign,
            malignant,
            ..Default::default()
        };
        match self.augmentation {
            Augmentation::None => {}
            Augmentation::Classical => {
                c.oversampled = ((self.target_ratio * benign as f64).round() as usize)
                    .saturating_sub(malignant);
            }
            Augmentation::Cyclegan => c.synthetic = self.synthetic.map_or(0, |s| s.records.len()),
        }
        c
    }

    /// One epoch's samples, shuffled.
    pub fn epoch(&self, seed: u64, epoch: usize) -> Vec<Sample<'a>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(1 + epoch as u64);
        let real = |record| Sample {
            set: self.real,
            record,
            origin: Origin::Real,
        };
        let mut samples: Vec<Sample<'a>> = self.real.split("train").map(real).collect();
        let c = self.composition();
        if c.oversampled > 0 {
            let mut malignant: Vec<&ImageRecord> =
                self.real.split("train").filter(|r| r.malignant).collect();
            malignant.shuffle(&mut rng);
            samples.extend(
                malignant
                    .iter()
                    .cycle()
                    .take(c.oversampled)
                    .map(|&record| Sample {
                        set: self.real,
                        record,
                        origin: Origin::Oversampled,
                    }),
            );
        }
        if let Some(s) = self
            .synthetic
            .filter(|_| self.augmentation == Augmentation::Cyclegan)
        {
            samples.extend(s.records.iter().map(|record| Sample {
                set: s,
                record,
                origin: Origin::Synthetic,
            }));
        }
        samples.shuffle(&mut rng);
        samples
    }

    /// A training batch: inputs [B, 3, S, S] (ImageNet-normalised) and targets [B].
    pub fn train_batch(
        &self,
        batch: &[Sample],
        rng: &mut impl Rng,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let mut x = Vec::with_capacity(batch.len() * 3 * self.side * self.side);
        let mut t = Vec::with_capacity(batch.len());
        for s in batch {
            let transform = match s.origin {
                Origin::Oversampled => Affine::random_classical(rng),
                _ if self.flips => Affine::random_flip(rng),
                _ => Affine::IDENTITY,
            };
            let px = s.set.pixels(s.record)?;
            push_normalised_chw(
                &warp(&px, s.set.size as usize, self.side, transform),
                self.side,
                &mut x,
            );
            t.push(if s.record.malignant { 1f32 } else { 0.0 });
        }
        let n = batch.len();
        Ok((
            Tensor::from_vec(x, (n, 3, self.side, self.side), device)?,
            Tensor::from_vec(t, n, device)?,
        ))
    }

    /// An evaluation batch (no transform).
    pub fn eval_batch(&self, records: &[&ImageRecord], device: &Device) -> Result<Tensor> {
        let mut x = Vec::with_capacity(records.len() * 3 * self.side * self.side);
        for r in records {
            let px = self.real.pixels(r)?;
            push_normalised_chw(
                &warp(&px, self.real.size as usize, self.side, Affine::IDENTITY),
                self.side,
                &mut x,
            );
        }
        Ok(Tensor::from_vec(
            x,
            (records.len(), 3, self.side, self.side),
            device,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(split_sizes: &[(&str, usize, usize)]) -> ImageSet {
        let mut records = Vec::new();
        for &(split, benign, malignant) in split_sizes {
            for i in 0..benign + malignant {
                records.push(ImageRecord {
                    image_name: format!("{split}{i:03}"),
                    patient_id: format!("P{i}"),
                    split: split.into(),
                    malignant: i >= benign,
                    shard: "s".into(),
                    offset: 0,
                });
            }
        }
        ImageSet::from_records(records, 8)
    }

    fn data<'a>(
        real: &'a ImageSet,
        synthetic: Option<&'a ImageSet>,
        augmentation: Augmentation,
    ) -> ClassifierData<'a> {
        ClassifierData {
            real,
            synthetic,
            augmentation,
            target_ratio: 1.0,
            flips: true,
            side: 8,
        }
    }

    #[test]
    fn arms_compose_epochs_as_documented() {
        let real = set(&[("train", 30, 5), ("val", 10, 2), ("test", 10, 2)]);
        let synthetic = set(&[("train", 0, 25)]);
        let none = data(&real, None, Augmentation::None);
        assert_eq!(none.epoch(0, 0).len(), 35);
        let classical = data(&real, None, Augmentation::Classical);
        let e = classical.epoch(0, 0);
        assert_eq!(e.len(), 60);
        assert_eq!(
            e.iter().filter(|s| s.origin == Origin::Oversampled).count(),
            25
        );
        assert!(
            e.iter()
                .filter(|s| s.origin == Origin::Oversampled)
                .all(|s| s.record.malignant)
        );
        assert_eq!(
            e.iter().filter(|s| s.record.malignant).count(),
            30,
            "balanced"
        );
        let gan = data(&real, Some(&synthetic), Augmentation::Cyclegan);
        let e = gan.epoch(0, 0);
        assert_eq!(
            e.iter().filter(|s| s.origin == Origin::Synthetic).count(),
            25
        );
        assert!(
            e.iter().all(|s| s.record.split == "train"),
            "no validation or test image is trained on"
        );
        // Order: fixed per (seed, epoch), different across epochs.
        let names = |d: &ClassifierData, seed, epoch| {
            d.epoch(seed, epoch)
                .iter()
                .map(|s| s.record.image_name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&gan, 1, 2), names(&gan, 1, 2));
        assert_ne!(names(&gan, 1, 2), names(&gan, 1, 3));
        gan.validate().unwrap();
    }

    #[test]
    fn a_split_without_positives_is_an_error() {
        let real = set(&[("train", 30, 5), ("val", 10, 0), ("test", 10, 2)]);
        let err = data(&real, None, Augmentation::None)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("val split needs both classes"), "{err}");
    }
}
