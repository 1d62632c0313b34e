//! Stage `generate`: synthetic malignant images from the CycleGAN's
//! benign -> malignant generator (`G_A`), to balance the classifier's
//! training set.
//!
//! Sources are benign images of the *training* split only, drawn without
//! replacement in an order fixed by the seed, until the malignant class
//! (real + synthetic) reaches `target_ratio` of the benign one. Validation
//! and test images are never read, so no test pixel can leak into training.
//! Each synthetic image belongs to its source's patient and split (train).
//!
//! Outputs, in `preprocess`'s layout so the classifier reads both alike:
//! `shard-NNNNN.safetensors` + `index.parquet` (target 1, split train),
//! `provenance.parquet` (synthetic name, source image, source patient,
//! generator digest), `samples.png` (sources above their translations) and
//! `generate.json` (counts, and the precision the generator ran in, `auto`
//! resolved). The generator runs in evaluation mode (instance norm, no
//! dropout): the same weights and sources give the same bytes.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use arrow_array::{ArrayRef, Int32Array, Int64Array, StringArray};
use candle_core::{DType, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use melanoflow_pipeline::{BoxError, Resources, Stage, StageContext, StageReport};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::imageset::{ImageRecord, ImageSet};
use crate::models::cyclegan::Generator;
use crate::models::precision::Precision;
use crate::preprocess::shards::write_shard;
use crate::train_cyclegan::{
    Config as CycleGanConfig, check_device_spec, device_resources, select_device,
};

pub struct Generate;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateParams {
    /// Malignant (real + synthetic) : benign in the training split; 1.0 = balanced,
    /// above 1 grows the malignant class beyond the benign one (at most one
    /// synthetic image per benign source).
    #[serde(default = "defaults::target_ratio")]
    pub target_ratio: f64,
    /// Images per generator forward pass.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Shard size limit, MiB.
    #[serde(default = "defaults::shard_mb")]
    pub shard_mb: u64,
    /// Orders the benign sources.
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "defaults::device")]
    pub device: String,
    /// As `train_cyclegan`'s: "auto" (bf16 on CUDA, f32 on the CPU), "f32",
    /// "tf32" or "bf16"; left out of the canonical parameters when "auto".
    #[serde(default, skip_serializing_if = "Precision::is_auto")]
    pub precision: Precision,
}

mod defaults {
    pub fn target_ratio() -> f64 {
        1.0
    }
    pub fn batch_size() -> usize {
        16
    }
    pub fn shard_mb() -> u64 {
        256
    }
    pub fn device() -> String {
        "auto".into()
    }
}

impl Stage for Generate {
    type Params = GenerateParams;
    const KIND: &'static str = "generate";
    const CODE: &'static str = crate::code_identity::GENERATE;
    const ABOUT: &'static str = "translate benign training images with the CycleGAN generator -> synthetic malignant shards + provenance";

    fn check(&self, p: &GenerateParams, inputs: &[String]) -> Result<(), String> {
        if inputs.len() != 2 {
            return Err(
                "takes two upstreams: a `preprocess` stage and a `train_cyclegan` stage".into(),
            );
        }
        if !(p.target_ratio > 0.0 && p.target_ratio <= 10.0) {
            return Err(format!(
                "`target_ratio` must be within (0, 10], not {}",
                p.target_ratio
            ));
        }
        if p.batch_size == 0 || p.shard_mb == 0 {
            return Err("`batch_size` and `shard_mb` must be at least 1".into());
        }
        check_device_spec(&p.device)
    }

    fn resources(&self, p: &GenerateParams) -> Resources {
        device_resources(&p.device)
    }

    fn run(&self, p: &GenerateParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
        Ok(run(p, ctx)?)
    }

    /// Contiguous runs of whole batches per part.
    const SPLITS: bool = true;

    fn run_part(
        &self,
        p: &GenerateParams,
        ctx: &StageContext,
        part: usize,
        parts: usize,
    ) -> Result<StageReport, BoxError> {
        let inputs = inputs(ctx)?;
        let (synthetic, precision) = translate(p, ctx, &inputs, part, parts)?;
        std::fs::write(ctx.out_dir.join(PART_PIXELS), synthetic.concat())?;
        if let Some(precision) = precision {
            std::fs::write(ctx.out_dir.join(PART_PRECISION), precision.name())?;
        }
        Ok(StageReport::new(format!(
            "part {part} of {parts}: {} images",
            synthetic.len()
        )))
    }

    fn assemble(
        &self,
        p: &GenerateParams,
        ctx: &StageContext,
        parts: &[std::path::PathBuf],
    ) -> Result<StageReport, BoxError> {
        let inputs = inputs(ctx)?;
        let image_bytes = (inputs.set.size as usize).pow(2) * 3;
        let mut synthetic = Vec::new();
        let mut precisions = Vec::new();
        for dir in parts {
            let path = dir.join(PART_PIXELS);
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            if bytes.len() % image_bytes != 0 {
                return Err(format!(
                    "{}: {} bytes is not a whole number of {image_bytes}-byte images",
                    path.display(),
                    bytes.len()
                )
                .into());
            }
            synthetic.extend(bytes.chunks(image_bytes).map(<[u8]>::to_vec));
            if let Ok(name) = std::fs::read_to_string(dir.join(PART_PRECISION)) {
                precisions.push(name);
            }
            let samples = dir.join(SAMPLES);
            if samples.exists() {
                std::fs::copy(&samples, ctx.out_dir.join(SAMPLES))
                    .with_context(|| format!("copying {}", samples.display()))?;
            }
        }
        precisions.sort();
        precisions.dedup();
        Ok(finish(p, ctx, &inputs, synthetic, &precisions.join(", "))?)
    }
}

/// The benign training images to translate, in generation order: as many as
/// it takes for `malignant + n >= target_ratio * benign`. Only training-split
/// records are ever returned.
pub fn choose_sources(set: &ImageSet, target_ratio: f64, seed: u64) -> Result<Vec<&ImageRecord>> {
    let mut benign: Vec<&ImageRecord> = set.split("train").filter(|r| !r.malignant).collect();
    let malignant = set.split("train").filter(|r| r.malignant).count();
    let wanted = (target_ratio * benign.len() as f64).round() as usize;
    let n = wanted.saturating_sub(malignant);
    if n > benign.len() {
        bail!(
            "target_ratio {target_ratio} needs {n} synthetic images but the train split has only {} benign sources",
            benign.len()
        );
    }
    // Sorted first so the draw depends on the names, not the index order.
    benign.sort_by(|a, b| a.image_name.cmp(&b.image_name));
    benign.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    benign.truncate(n);
    Ok(benign)
}

/// [-1, 1] CHW batch -> HWC RGB bytes per image.
fn to_pixels(t: &Tensor) -> Result<Vec<Vec<u8>>> {
    let t = ((t.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .round()?
        .permute((0, 2, 3, 1))?
        .to_dtype(DType::U8)?;
    let (b, ..) = t.dims4()?;
    (0..b)
        .map(|i| Ok(t.get(i)?.flatten_all()?.to_vec1::<u8>()?))
        .collect()
}

/// What a stage's run reads: the preprocessed images and the generator.
struct Inputs {
    set: ImageSet,
    generator_digest: String,
    gan_dir: std::path::PathBuf,
}

fn inputs(ctx: &StageContext) -> Result<Inputs> {
    let pre = ctx
        .upstream_of_kind("preprocess")
        .ok_or_else(|| anyhow!("one upstream must be a `preprocess` stage"))?;
    let gan = ctx
        .upstream_of_kind("train_cyclegan")
        .ok_or_else(|| anyhow!("one upstream must be a `train_cyclegan` stage"))?;
    let generator_digest = gan
        .manifest
        .get("G_A.safetensors")
        .map(|e| e.digest.to_hex())
        .context("train_cyclegan's output has no G_A.safetensors")?;
    Ok(Inputs {
        set: ImageSet::open(&pre.dir)?,
        generator_digest,
        gan_dir: gan.dir.clone(),
    })
}

/// Pixels of one part's translations, concatenated (NHWC u8), the precision
/// they were computed in (when the part had any batch), and the part's
/// sample grid when it holds the first batch.
const PART_PIXELS: &str = "pixels.u8";
const PART_PRECISION: &str = "precision.txt";
const SAMPLES: &str = "samples.png";

/// Translates part `part` of `parts` of the sources: a contiguous run of
/// whole `batch_size` batches, the same batches a whole run forms, so a
/// split run computes the same pixels. Writes the sample grid (from the first
/// batch) into `ctx.out_dir` when it has that batch; returns the pixels and,
/// when there were any, the precision they were computed in.
fn translate(
    p: &GenerateParams,
    ctx: &StageContext,
    inputs: &Inputs,
    part: usize,
    parts: usize,
) -> Result<(Vec<Vec<u8>>, Option<Precision>)> {
    let set = &inputs.set;
    let sources = choose_sources(set, p.target_ratio, p.seed)?;
    let batches: Vec<&[&ImageRecord]> = sources.chunks(p.batch_size).collect();
    let mine = (part * batches.len() / parts)..((part + 1) * batches.len() / parts);
    if mine.is_empty() {
        return Ok((Vec::new(), None));
    }
    let device = select_device(&p.device)?;
    let (precision, _tf32) = p.precision.enter(&device);
    let dtype = precision.compute_dtype();
    let config = inputs.gan_dir.join("config.json");
    let cfg: CycleGanConfig = serde_json::from_str(
        &std::fs::read_to_string(&config)
            .with_context(|| format!("reading {}", config.display()))?,
    )
    .context("train_cyclegan's config.json")?;
    let mut varmap = VarMap::new();
    let generator = Generator::new(
        &cfg.generator,
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
    )?;
    let weights = inputs.gan_dir.join("G_A.safetensors");
    varmap
        .load(&weights)
        .with_context(|| format!("loading {}", weights.display()))?;

    let side = set.size as usize;
    let bar = ctx.progress.bar(
        batches[mine.clone()].iter().map(|b| b.len() as u64).sum(),
        "generating synthetic malignant images",
    );
    let mut synthetic: Vec<Vec<u8>> = Vec::new();
    for (b, batch) in batches.iter().enumerate().filter(|(b, _)| mine.contains(b)) {
        let mut data = Vec::with_capacity(batch.len() * 3 * side * side);
        for r in batch.iter() {
            let px = set.pixels(r)?;
            for c in 0..3 {
                data.extend((0..side * side).map(|i| px[i * 3 + c] as f32 / 127.5 - 1.0));
            }
        }
        let x = Tensor::from_vec(data, (batch.len(), 3, side, side), &device)?;
        let y = generator
            .forward(&x.to_dtype(dtype)?)?
            .to_dtype(DType::F32)?;
        if b == 0 {
            let k = batch.len().min(8);
            crate::train_cyclegan::grid::write_grid(
                &ctx.out_dir.join(SAMPLES),
                &[&x.narrow(0, 0, k)?, &y.narrow(0, 0, k)?],
            )?;
        }
        synthetic.extend(to_pixels(&y)?);
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    Ok((synthetic, Some(precision)))
}

fn run(p: &GenerateParams, ctx: &StageContext) -> Result<StageReport> {
    let inputs = inputs(ctx)?;
    let (synthetic, precision) = translate(p, ctx, &inputs, 0, 1)?;
    finish(
        p,
        ctx,
        &inputs,
        synthetic,
        precision.map_or("", Precision::name),
    )
}

/// Writes the artifact from every translation, in source order: shards,
/// index, provenance, summary (the sample grid is already in place). A whole
/// run and an assembled split run both end here. `precision`: what the
/// translations were computed in (parts that disagree, `auto` on machines
/// with and without a GPU, are listed; empty when nothing was translated).
fn finish(
    p: &GenerateParams,
    ctx: &StageContext,
    inputs: &Inputs,
    synthetic: Vec<Vec<u8>>,
    precision: &str,
) -> Result<StageReport> {
    let (set, generator_digest) = (&inputs.set, &inputs.generator_digest);
    let sources = choose_sources(set, p.target_ratio, p.seed)?;
    if synthetic.len() != sources.len() {
        bail!(
            "{} translations for {} sources: the parts do not cover the sources",
            synthetic.len(),
            sources.len()
        );
    }
    let side = set.size as usize;
    let per_shard = ((p.shard_mb << 20) / (side * side * 3) as u64).max(1) as usize;
    let names: Vec<String> = sources
        .iter()
        .map(|r| format!("SYN_{}", r.image_name))
        .collect();
    let mut shard_col = Vec::with_capacity(names.len());
    let mut offset_col = Vec::with_capacity(names.len());
    for (k, chunk) in synthetic.chunks(per_shard).enumerate() {
        let shard = format!("shard-{k:05}.safetensors");
        let refs: Vec<&[u8]> = chunk.iter().map(|v| v.as_slice()).collect();
        write_shard(&ctx.out_dir.join(&shard), set.size, &refs)?;
        for i in 0..chunk.len() {
            shard_col.push(shard.clone());
            offset_col.push(i as i64);
        }
    }
    let n = names.len();
    let strings = |v: Vec<String>| -> ArrayRef { Arc::new(StringArray::from(v)) };
    melanoflow_schemas::write_parquet(
        &ctx.out_dir.join("index.parquet"),
        &melanoflow_schemas::IMAGE_INDEX,
        vec![
            strings(names.clone()),
            strings(shard_col),
            Arc::new(Int64Array::from(offset_col)),
            Arc::new(Int32Array::from(vec![1; n])),
            strings(sources.iter().map(|r| r.patient_id.clone()).collect()),
            strings(vec!["train".to_string(); n]),
            // The pixels' origin: this generator applied to the source image.
            strings(vec![generator_digest.clone(); n]),
        ],
    )?;
    melanoflow_schemas::write_parquet(
        &ctx.out_dir.join("provenance.parquet"),
        &melanoflow_schemas::SYNTHETIC_PROVENANCE,
        vec![
            strings(names),
            strings(sources.iter().map(|r| r.image_name.clone()).collect()),
            strings(sources.iter().map(|r| r.patient_id.clone()).collect()),
            strings(vec![generator_digest.clone(); n]),
        ],
    )?;
    let benign = set.split("train").filter(|r| !r.malignant).count();
    let malignant = set.split("train").filter(|r| r.malignant).count();
    let summary = serde_json::json!({
        "size": set.size,
        "synthetic": n,
        "train_benign": benign,
        "train_malignant": malignant,
        "target_ratio": p.target_ratio,
        "generator_digest": generator_digest,
        "precision": precision,
    });
    std::fs::write(
        ctx.out_dir.join("generate.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    Ok(StageReport::new(format!(
        "{n} synthetic malignant images from benign training images ({malignant} real malignant, {benign} benign: ratio {:.2})",
        (malignant + n) as f64 / benign.max(1) as f64
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, split: &str, malignant: bool) -> ImageRecord {
        ImageRecord {
            image_name: name.into(),
            patient_id: format!("P_{name}"),
            split: split.into(),
            malignant,
            shard: "s".into(),
            offset: 0,
        }
    }

    fn set(records: Vec<ImageRecord>) -> ImageSet {
        ImageSet::from_records(records, 8)
    }

    #[test]
    fn sources_are_benign_training_images_only_and_balance_the_classes() {
        let mut records = Vec::new();
        for i in 0..40 {
            records.push(record(&format!("tr{i:02}"), "train", i < 4));
            records.push(record(&format!("va{i:02}"), "val", i < 2));
            records.push(record(&format!("te{i:02}"), "test", i < 2));
        }
        let s = set(records);
        let chosen = choose_sources(&s, 1.0, 7).unwrap();
        // 36 benign, 4 malignant: 32 synthetic images balance them.
        assert_eq!(chosen.len(), 32);
        assert!(chosen.iter().all(|r| r.split == "train" && !r.malignant));
        let unique: std::collections::HashSet<_> = chosen.iter().map(|r| &r.image_name).collect();
        assert_eq!(unique.len(), 32);
        assert_eq!(choose_sources(&s, 0.5, 7).unwrap().len(), 14);
        // Deterministic for a seed, different for another.
        let names = |seed| {
            choose_sources(&s, 0.5, seed)
                .unwrap()
                .iter()
                .map(|r| r.image_name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(7), names(7));
        assert_ne!(names(7), names(8));
        // Already balanced enough: nothing to generate.
        assert!(choose_sources(&s, 0.1, 7).unwrap().is_empty());
    }
}
