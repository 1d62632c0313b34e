//! Stage `train_classifier`: fine-tunes (or trains from scratch) an
//! EfficientNet with one logit for melanoma, for one augmentation arm of the
//! paper's comparison, once per seed.
//!
//! Arms (`augmentation`): `none` (the imbalanced training split as it is),
//! `classical` (malignant images oversampled to `target_ratio` of the benign
//! ones, each extra copy randomly rotated, cropped, shifted and mirrored) and
//! `cyclegan` (the synthetic malignant images of an upstream `generate`
//! stage added). With `flips` (default on) every training image also gets a
//! random mirror and quarter turn, in every arm, so arms differ only in how
//! they balance the classes.
//!
//! Upstreams: a `preprocess` stage, and for `cyclegan` a `generate` stage.
//! Pretrained weights: `weights` = a safetensors file in torchvision's layout
//! (`make weights` writes ImageNet EfficientNet-Lite0); its digest is part of
//! the fingerprint. The head is always new (one logit); `frozen_stages`
//! keeps the early stages as pretrained.
//!
//! Per seed, the checkpoint with the best validation ROC-AUC is kept (ties:
//! the earlier epoch). Outputs: `model-seed{S}.safetensors`,
//! `predictions.parquet` (validation and test scores of the kept checkpoint,
//! schema `predictions/1`), `history.parquet` (`classifier_history/1`),
//! `train.json` (with the precision it ran in, `auto` resolved),
//! `config.json`. Training resumes from the last finished epoch
//! after a kill (checkpoints in the engine's scratch folder).

pub mod augment;
pub mod data;
pub mod train;

use anyhow::Result;
use melanoflow_pipeline::{BoxError, ExternalInput, Resources, Stage, StageContext, StageReport};
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::models::efficientnet::Variant;
use crate::models::precision::Precision;
use crate::train_cyclegan::check_device_spec;

pub struct TrainClassifier;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augmentation {
    None,
    Classical,
    Cyclegan,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainClassifierParams {
    pub augmentation: Augmentation,
    #[serde(default = "defaults::variant")]
    pub variant: Variant,
    /// Input side in pixels; unset = the preprocessed size (images are
    /// resampled bilinearly when it differs).
    #[serde(default)]
    pub image_size: Option<usize>,
    #[serde(default = "defaults::epochs")]
    pub epochs: usize,
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Peak learning rate (Adam), decayed to zero on a cosine over training.
    #[serde(default = "defaults::lr")]
    pub lr: f64,
    /// Decoupled weight decay (AdamW style); 0 = plain Adam.
    #[serde(default)]
    pub weight_decay: f64,
    /// `classical`: malignant : benign after oversampling.
    #[serde(default = "defaults::target_ratio")]
    pub target_ratio: f64,
    #[serde(default = "defaults::flips")]
    pub flips: bool,
    /// Dropout before the head; unset = the variant's.
    #[serde(default)]
    pub dropout: Option<f64>,
    #[serde(default = "defaults::stochastic_depth")]
    pub stochastic_depth: f64,
    /// One training run per seed; `evaluate` reports their mean and spread.
    #[serde(default = "defaults::seeds")]
    pub seeds: Vec<u64>,
    /// Pretrained weights (safetensors, torchvision names); unset = from scratch.
    #[serde(default)]
    pub weights: Option<String>,
    /// With `weights`: torchvision's `features[..n]` keep their pretrained
    /// weights and BatchNorm statistics (1 = the stem, 2..=8 also the MBConv
    /// stages up to n - 1). Fewer parameters to fit a few dozen malignant
    /// images, and no backward pass through the early, high-resolution
    /// layers. 0 = fine-tune everything.
    #[serde(default)]
    pub frozen_stages: usize,
    /// BatchNorm's running-statistics momentum (weight of each new batch).
    #[serde(default = "defaults::bn_momentum")]
    pub bn_momentum: f64,
    #[serde(default = "defaults::device")]
    pub device: String,
    /// As `train_cyclegan`'s: "auto" (bf16 on CUDA, f32 on the CPU), "f32",
    /// "tf32" or "bf16"; left out of the canonical parameters when "auto".
    #[serde(default, skip_serializing_if = "Precision::is_auto")]
    pub precision: Precision,
}

mod defaults {
    use super::*;
    pub fn variant() -> Variant {
        Variant::B0
    }
    pub fn epochs() -> usize {
        10
    }
    pub fn batch_size() -> usize {
        32
    }
    pub fn lr() -> f64 {
        1e-3
    }
    pub fn target_ratio() -> f64 {
        1.0
    }
    pub fn flips() -> bool {
        true
    }
    pub fn stochastic_depth() -> f64 {
        0.2
    }
    pub fn bn_momentum() -> f64 {
        0.1
    }
    pub fn seeds() -> Vec<u64> {
        vec![0]
    }
    pub fn device() -> String {
        "auto".into()
    }
}

impl Stage for TrainClassifier {
    type Params = TrainClassifierParams;
    const KIND: &'static str = "train_classifier";
    const CODE: &'static str = crate::code_identity::TRAIN_CLASSIFIER;
    const ABOUT: &'static str = "EfficientNet (B0-B4, Lite0) per augmentation arm and seed, best validation ROC-AUC kept -> safetensors + predictions";

    fn check(&self, p: &TrainClassifierParams, inputs: &[String]) -> Result<(), String> {
        match (p.augmentation, inputs.len()) {
            (Augmentation::Cyclegan, 2) => {}
            (Augmentation::Cyclegan, _) => return Err("`augmentation = \"cyclegan\"` takes two upstreams: a `preprocess` and a `generate` stage".into()),
            (_, 1) => {}
            (a, _) => return Err(format!("`augmentation = \"{}\"` takes one upstream: a `preprocess` stage", serde_json::to_value(a).unwrap().as_str().unwrap_or("?"))),
        }
        if p.epochs == 0 || p.batch_size < 2 {
            return Err(
                "`epochs` must be at least 1 and `batch_size` at least 2 (BatchNorm needs a batch)"
                    .into(),
            );
        }
        if p.seeds.is_empty() {
            return Err("`seeds` must list at least one seed".into());
        }
        // `lr > 0` is false for NaN too, which is the point.
        if p.lr.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) || p.weight_decay < 0.0 {
            return Err("`lr` must be positive and `weight_decay` non-negative".into());
        }
        if !(p.target_ratio > 0.0 && p.target_ratio <= 10.0) {
            return Err(format!(
                "`target_ratio` must be within (0, 10], not {}",
                p.target_ratio
            ));
        }
        if p.image_size.is_some_and(|s| s < 32) {
            return Err("`image_size` must be at least 32 (EfficientNet downsamples 32x)".into());
        }
        if p.dropout.is_some_and(|d| !(0.0..1.0).contains(&d))
            || !(0.0..1.0).contains(&p.stochastic_depth)
        {
            return Err("`dropout` and `stochastic_depth` must be within [0, 1)".into());
        }
        if !(p.bn_momentum > 0.0 && p.bn_momentum <= 1.0) {
            return Err(format!(
                "`bn_momentum` must be within (0, 1], not {}",
                p.bn_momentum
            ));
        }
        if p.frozen_stages > 8 {
            return Err(format!(
                "`frozen_stages` must be within 0..=8 (the head always trains), not {}",
                p.frozen_stages
            ));
        }
        if p.frozen_stages > 0 && p.weights.is_none() {
            return Err(
                "`frozen_stages` needs pretrained `weights`: frozen random layers would never learn"
                    .into(),
            );
        }
        if p.weights.as_deref().is_some_and(|w| w.contains("://")) {
            return Err("`weights` must be a local safetensors file".into());
        }
        check_device_spec(&p.device)
    }

    fn external_inputs(&self, p: &TrainClassifierParams, base_dir: &Path) -> Vec<ExternalInput> {
        p.weights
            .iter()
            .map(|w| ExternalInput::new("weights", w, base_dir))
            .collect()
    }

    fn resources(&self, p: &TrainClassifierParams) -> Resources {
        crate::train_cyclegan::device_resources(&p.device)
    }

    fn run(&self, p: &TrainClassifierParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
        Ok(train::run(p, ctx)?)
    }
}
