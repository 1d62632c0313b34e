//! The classifier training loop: Adam(W) with a cosine-decayed learning rate,
//! the numerically stable binary cross-entropy on one logit, validation
//! ROC-AUC after every epoch, the best epoch's weights kept, a checkpoint per
//! epoch to resume from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use arrow_array::{ArrayRef, Float64Array, Int32Array, Int64Array, StringArray};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use melanoflow_pipeline::{StageContext, StageReport};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::data::{ClassifierData, Composition};
use super::{Augmentation, TrainClassifierParams};
use crate::imageset::{ImageRecord, ImageSet};
use crate::metrics::roc_auc;
use crate::models::adam::Adam;
use crate::models::efficientnet::{
    EfficientNet, EfficientNetConfig, LoadReport, init_head_for_finetuning, init_weights,
    load_pretrained,
};
use crate::train_cyclegan::select_device;

/// Binary cross-entropy with logits, mean over the batch, in the form that
/// never overflows: max(x, 0) - x t + log(1 + exp(-|x|)).
/// (candle-nn's `binary_cross_entropy_with_logit` goes through sigmoid and
/// log and returns inf for logits beyond about +-90.)
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let softplus_neg_abs = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    ((logits.relu()? - (logits * targets)?)? + softplus_neg_abs)?.mean_all()
}

/// One epoch's record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochRow {
    pub epoch: usize,
    #[serde(with = "exact_f64")]
    pub lr: f64,
    #[serde(with = "exact_f64")]
    pub train_loss: f64,
    #[serde(with = "exact_f64")]
    pub val_loss: f64,
    #[serde(with = "exact_f64")]
    pub val_auc: f64,
}

/// A seed's training state, saved after every epoch.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SeedState {
    epochs_done: usize,
    adam_t: u64,
    history: Vec<EpochRow>,
    best_epoch: usize,
    #[serde(with = "exact_f64")]
    best_val_auc: f64,
}

/// f64 in a checkpoint as its bit pattern: serde_json's default float parsing
/// is not always correctly rounded, and a resumed run must write the same
/// history bytes as an uninterrupted one.
mod exact_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(v.to_bits())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(f64::from_bits(u64::deserialize(d)?))
    }
}

/// What one seed produced.
pub struct SeedResult {
    pub seed: u64,
    pub history: Vec<EpochRow>,
    pub best_epoch: usize,
    pub best_val_auc: f64,
    /// The kept checkpoint's variables.
    pub best_weights: PathBuf,
    /// (record, score) for validation and test images.
    pub predictions: Vec<(ImageRecord, f64)>,
    /// Epochs restored from a checkpoint of a killed run.
    pub resumed_after: Option<usize>,
}

/// The cosine schedule: `lr` at step 0, 0 at `total`.
fn cosine_lr(lr: f64, step: u64, total: u64) -> f64 {
    0.5 * lr * (1.0 + (std::f64::consts::PI * step as f64 / total.max(1) as f64).cos())
}

fn model_config(p: &TrainClassifierParams) -> EfficientNetConfig {
    EfficientNetConfig {
        dropout: p.dropout,
        stochastic_depth: p.stochastic_depth,
        frozen_stages: p.frozen_stages,
        bn_momentum: p.bn_momentum,
        ..EfficientNetConfig::new(p.variant, 1)
    }
}

/// Trainable variables: neither BatchNorm running statistics nor the frozen
/// stages' variables.
fn trainable(varmap: &VarMap, config: &EfficientNetConfig) -> Vec<(String, candle_core::Var)> {
    crate::models::adam::named_vars("", varmap)
        .into_iter()
        .filter(|(n, _)| {
            !n.ends_with("running_mean") && !n.ends_with("running_var") && !config.is_frozen(n)
        })
        .collect()
}

/// Scores (logits) of the model in evaluation mode, computing in `dtype`.
fn predict(
    model: &EfficientNet,
    data: &ClassifierData,
    records: &[&ImageRecord],
    (device, dtype): (&Device, DType),
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(records.len());
    for chunk in records.chunks(64) {
        let x = data.eval_batch(chunk, device)?.to_dtype(dtype)?;
        let logits = model
            .forward_t(&x, None)?
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        out.extend(logits);
    }
    Ok(out)
}

fn mean_bce(logits: &[f64], records: &[&ImageRecord]) -> f64 {
    let sum: f64 = logits
        .iter()
        .zip(records)
        .map(|(&x, r)| x.max(0.0) - if r.malignant { x } else { 0.0 } + (-x.abs()).exp().ln_1p())
        .sum();
    sum / logits.len().max(1) as f64
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[allow(clippy::too_many_arguments)]
fn train_seed(
    p: &TrainClassifierParams,
    seed: u64,
    data: &ClassifierData,
    pretrained: Option<&HashMap<String, Tensor>>,
    (device, dtype): (&Device, DType),
    scratch: &Path,
    ctx: &StageContext,
    label: &str,
) -> Result<SeedResult> {
    let varmap = VarMap::new();
    let model = EfficientNet::new(
        &model_config(p),
        VarBuilder::from_varmap(&varmap, DType::F32, device),
    )?;
    init_weights(&varmap, seed)?;
    if let Some(t) = pretrained {
        load_pretrained(&varmap, t).map_err(|e| anyhow!("loading `weights`: {e}"))?;
        init_head_for_finetuning(&varmap, seed)?;
    }
    let mut adam = Adam::new(trainable(&varmap, &model.config), p.lr, 0.9, 0.999)?;
    adam.weight_decay = p.weight_decay;

    std::fs::create_dir_all(scratch)?;
    // state.json is written last and names its weights by epoch
    // (`last-{epochs_done}`, `best-{best_epoch}`), so a kill at any point
    // leaves a consistent checkpoint: the previous one.
    let state_file = scratch.join("state.json");
    let last = |s: &SeedState| scratch.join(format!("last-{}.safetensors", s.epochs_done));
    let best = |s: &SeedState| scratch.join(format!("best-{}.safetensors", s.best_epoch));
    let mut state = SeedState {
        epochs_done: 0,
        adam_t: 0,
        history: vec![],
        best_epoch: 0,
        best_val_auc: f64::NEG_INFINITY,
    };
    let mut resumed_after = None;
    if let Ok(text) = std::fs::read(&state_file) {
        state = serde_json::from_slice(&text)
            .context("reading a classifier checkpoint's state.json")?;
        let tensors = candle_core::safetensors::load(last(&state), device)
            .with_context(|| format!("loading checkpoint {}", last(&state).display()))?;
        for (name, var) in crate::models::adam::named_vars("", &varmap) {
            var.set(
                tensors
                    .get(&format!("model.{name}"))
                    .ok_or_else(|| anyhow!("checkpoint lacks `{name}`"))?,
            )?;
        }
        adam.load_state("adam.", &tensors, state.adam_t)?;
        tracing::info!("{label}: resuming after epoch {}", state.epochs_done);
        resumed_after = Some(state.epochs_done);
    }

    let val: Vec<&ImageRecord> = data.real.split("val").collect();
    let steps_per_epoch = data.epoch(seed, 0).len().div_ceil(p.batch_size) as u64;
    let total_steps = steps_per_epoch * p.epochs as u64;
    let bar = ctx
        .progress
        .bar(total_steps, &format!("training {label} (steps)"));
    bar.set_position(steps_per_epoch * state.epochs_done as u64);
    for epoch in state.epochs_done..p.epochs {
        let samples = data.epoch(seed, epoch);
        let mut loss_sum = 0.0;
        let mut lr = p.lr;
        for (b, batch) in samples.chunks(p.batch_size).enumerate() {
            // A last batch of one would break BatchNorm's batch statistics.
            if batch.len() < 2 {
                continue;
            }
            let step = epoch as u64 * steps_per_epoch + b as u64;
            lr = cosine_lr(p.lr, step, total_steps);
            adam.lr = lr;
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xC1A5_51F1);
            rng.set_stream(step);
            let (x, t) = data.train_batch(batch, &mut rng, device)?;
            // Logits are F32 whatever `dtype` the network computes in.
            let logits = model
                .forward_t(&x.to_dtype(dtype)?, Some(&mut rng))?
                .flatten_all()?;
            let loss = bce_with_logits(&logits, &t)?;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(anyhow!(
                    "{label}: the loss diverged at epoch {epoch}, batch {b}"
                ));
            }
            adam.step(&loss.backward()?)?;
            loss_sum += value * batch.len() as f64;
            bar.inc(1);
            bar.set_message(format!("epoch {}/{} loss {value:.3}", epoch + 1, p.epochs));
        }
        let logits = predict(&model, data, &val, (device, dtype))?;
        let labels: Vec<bool> = val.iter().map(|r| r.malignant).collect();
        let val_auc = roc_auc(&logits, &labels).map_err(|e| anyhow!("validation ROC-AUC: {e}"))?;
        let row = EpochRow {
            epoch,
            lr,
            train_loss: loss_sum / samples.len() as f64,
            val_loss: mean_bce(&logits, &val),
            val_auc,
        };
        tracing::info!(
            "{label} epoch {epoch}: train loss {:.4}, val loss {:.4}, val AUC {:.4}",
            row.train_loss,
            row.val_loss,
            row.val_auc
        );
        state.history.push(row);
        let mut tensors: HashMap<String, Tensor> =
            crate::models::adam::named_vars("model.", &varmap)
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone()))
                .collect();
        if val_auc > state.best_val_auc {
            state.best_val_auc = val_auc;
            state.best_epoch = epoch;
            varmap.save(best(&state))?;
        }
        tensors.extend(adam.state("adam."));
        state.epochs_done = epoch + 1;
        state.adam_t = adam.t;
        candle_core::safetensors::save(&tensors, last(&state))?;
        melanoflow_pipeline::fsutil::write_atomic(&state_file, &serde_json::to_vec(&state)?)?;
        // Weights the new state.json no longer names.
        let keep = [last(&state), best(&state)];
        for e in std::fs::read_dir(scratch)?.flatten() {
            if e.path().extension().is_some_and(|x| x == "safetensors") && !keep.contains(&e.path())
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    bar.finish_and_clear();

    // Predictions of the kept checkpoint.
    let best = best(&state);
    varmap_load(&varmap, &best, device)?;
    let eval: Vec<&ImageRecord> = data
        .real
        .split("val")
        .chain(data.real.split("test"))
        .collect();
    let logits = predict(&model, data, &eval, (device, dtype))?;
    let predictions = eval
        .iter()
        .zip(logits)
        .map(|(r, x)| ((*r).clone(), sigmoid(x)))
        .collect();
    Ok(SeedResult {
        seed,
        history: state.history,
        best_epoch: state.best_epoch,
        best_val_auc: state.best_val_auc,
        best_weights: best,
        predictions,
        resumed_after,
    })
}

/// Loads a safetensors file written by `VarMap::save` into the same model's variables.
fn varmap_load(varmap: &VarMap, path: &Path, device: &Device) -> Result<()> {
    let tensors = candle_core::safetensors::load(path, device)
        .with_context(|| format!("loading {}", path.display()))?;
    for (name, var) in crate::models::adam::named_vars("", varmap) {
        var.set(
            tensors
                .get(&name)
                .ok_or_else(|| anyhow!("{} lacks `{name}`", path.display()))?,
        )?;
    }
    Ok(())
}

pub fn run(p: &TrainClassifierParams, ctx: &StageContext) -> Result<StageReport> {
    let device = select_device(&p.device)?;
    let (precision, _tf32) = p.precision.enter(&device);
    let pre = ctx
        .upstream_of_kind("preprocess")
        .ok_or_else(|| anyhow!("one upstream must be a `preprocess` stage"))?;
    let real = ImageSet::open(&pre.dir)?;
    let mut generator_digest = None;
    let synthetic = match p.augmentation {
        Augmentation::Cyclegan => {
            let gen_dir = &ctx
                .upstream_of_kind("generate")
                .ok_or_else(|| {
                    anyhow!("`augmentation = \"cyclegan\"` needs a `generate` upstream")
                })?
                .dir;
            let summary: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(gen_dir.join("generate.json"))?)?;
            generator_digest = summary["generator_digest"].as_str().map(str::to_string);
            Some(ImageSet::open(gen_dir)?)
        }
        _ => None,
    };
    let side = p.image_size.unwrap_or(real.size as usize);
    if let Some(s) = &synthetic
        && s.size != real.size
    {
        return Err(anyhow!(
            "synthetic images are {} px but preprocessed ones {} px",
            s.size,
            real.size
        ));
    }
    let data = ClassifierData {
        real: &real,
        synthetic: synthetic.as_ref(),
        augmentation: p.augmentation,
        target_ratio: p.target_ratio,
        flips: p.flips,
        side,
    };
    data.validate()?;
    let pretrained = match ctx.external("weights") {
        Some(w) => {
            let path = match &w.source {
                melanoflow_pipeline::Source::Local(path) => path.clone(),
                other => return Err(anyhow!("`weights` must be a local file, not {other}")),
            };
            Some(
                candle_core::safetensors::load(&path, &device)
                    .with_context(|| format!("reading weights {}", path.display()))?,
            )
        }
        None => None,
    };

    let mut results = Vec::new();
    let mut load_report: Option<LoadReport> = None;
    for &seed in &p.seeds {
        let label = format!("{} seed {seed}", ctx.stage);
        let r = train_seed(
            p,
            seed,
            &data,
            pretrained.as_ref(),
            (&device, precision.compute_dtype()),
            &ctx.scratch_dir.join(format!("seed-{seed}")),
            ctx,
            &label,
        )?;
        std::fs::copy(
            &r.best_weights,
            ctx.out_dir.join(format!("model-seed{seed}.safetensors")),
        )?;
        results.push(r);
    }
    if let Some(t) = &pretrained {
        let vm = VarMap::new();
        EfficientNet::new(
            &model_config(p),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )?;
        load_report = Some(load_pretrained(&vm, t).map_err(|e| anyhow!("loading `weights`: {e}"))?);
    }

    write_predictions(&ctx.out_dir.join("predictions.parquet"), &results)?;
    write_history(&ctx.out_dir.join("history.parquet"), &results)?;
    std::fs::write(
        ctx.out_dir.join("config.json"),
        serde_json::to_string_pretty(&serde_json::json!({"params": p, "model": model_config(p)}))?
            + "\n",
    )?;
    let composition: Composition = data.composition();
    let summary = serde_json::json!({
        "arm": ctx.stage,
        "augmentation": p.augmentation,
        "variant": p.variant,
        "image_size": side,
        "precision": precision.name(),
        "pretrained": load_report,
        "generator_digest": generator_digest,
        "epoch_composition": composition,
        "seeds": results.iter().map(|r| serde_json::json!({
            "seed": r.seed, "best_epoch": r.best_epoch, "best_val_auc": r.best_val_auc,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(
        ctx.out_dir.join("train.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    let best: Vec<String> = results
        .iter()
        .map(|r| format!("{:.3}@{}", r.best_val_auc, r.best_epoch))
        .collect();
    let resumed: String = results
        .iter()
        .filter_map(|r| {
            r.resumed_after
                .map(|e| format!(", seed {} resumed after epoch {e}", r.seed))
        })
        .collect();
    // Names as the pipeline file spells them (`lite0`, `classical`), not
    // Rust's Debug names.
    let spelled = |v: serde_json::Value| v.as_str().unwrap_or("?").to_string();
    Ok(StageReport::new(format!(
        "{}, augmentation {}, {} seed(s), {} epochs of {} images: best val ROC-AUC {}{resumed}",
        spelled(serde_json::to_value(p.variant)?),
        spelled(serde_json::to_value(p.augmentation)?),
        results.len(),
        p.epochs,
        composition.benign
            + composition.malignant
            + composition.oversampled
            + composition.synthetic,
        best.join(", "),
    )))
}

fn write_predictions(path: &Path, results: &[SeedResult]) -> Result<()> {
    let rows: Vec<(u64, &ImageRecord, f64)> = results
        .iter()
        .flat_map(|r| r.predictions.iter().map(move |(rec, s)| (r.seed, rec, *s)))
        .collect();
    let strings = |f: fn(&ImageRecord) -> &str| -> ArrayRef {
        Arc::new(StringArray::from(
            rows.iter().map(|(_, r, _)| f(r)).collect::<Vec<_>>(),
        ))
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(
            rows.iter().map(|(s, ..)| *s as i64).collect::<Vec<_>>(),
        )),
        strings(|r| &r.image_name),
        strings(|r| &r.patient_id),
        strings(|r| &r.split),
        Arc::new(Int32Array::from(
            rows.iter()
                .map(|(_, r, _)| r.malignant as i32)
                .collect::<Vec<_>>(),
        )),
        Arc::new(Float64Array::from(
            rows.iter().map(|(.., s)| *s).collect::<Vec<_>>(),
        )),
    ];
    melanoflow_schemas::write_parquet(path, &melanoflow_schemas::PREDICTIONS, columns)?;
    Ok(())
}

fn write_history(path: &Path, results: &[SeedResult]) -> Result<()> {
    let rows: Vec<(u64, &EpochRow)> = results
        .iter()
        .flat_map(|r| r.history.iter().map(move |h| (r.seed, h)))
        .collect();
    let f = |get: fn(&EpochRow) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from(
            rows.iter().map(|(_, h)| get(h)).collect::<Vec<_>>(),
        ))
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(
            rows.iter().map(|(s, _)| *s as i64).collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(
            rows.iter().map(|(_, h)| h.epoch as i64).collect::<Vec<_>>(),
        )),
        f(|h| h.lr),
        f(|h| h.train_loss),
        f(|h| h.val_loss),
        f(|h| h.val_auc),
    ];
    melanoflow_schemas::write_parquet(path, &melanoflow_schemas::CLASSIFIER_HISTORY, columns)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bce_is_finite_and_correct_for_extreme_logits() {
        let d = Device::Cpu;
        let x = Tensor::new(&[100f32, -100., 100., -100., 0., 2.], &d).unwrap();
        let t = Tensor::new(&[1f32, 0., 0., 1., 1., 0.], &d).unwrap();
        // Per element: 0, 0, 100, 100, ln 2, 2 + ln(1 + e^-2).
        let want = (200.0 + 2f64.ln() + 2.0 + (1.0 + (-2f64).exp()).ln()) / 6.0;
        let got = bce_with_logits(&x, &t).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        // Gradient: (sigmoid(x) - t) / n, finite everywhere.
        let v = candle_core::Var::from_tensor(&x).unwrap();
        let g = bce_with_logits(v.as_tensor(), &t)
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<f32> = g.get(&v).unwrap().to_vec1().unwrap();
        let want = [
            0.0,
            0.0,
            1.0 / 6.0,
            -1.0 / 6.0,
            -0.5 / 6.0,
            (sigmoid(2.0) / 6.0) as f32,
        ];
        for (a, b) in g.iter().zip(want) {
            assert!(a.is_finite() && (a - b).abs() < 1e-5, "{g:?}");
        }
        assert!(
            (mean_bce(
                &[100.0],
                &[&ImageRecord {
                    malignant: false,
                    ..rec()
                }]
            ) - 100.0)
                .abs()
                < 1e-9
        );
    }

    fn rec() -> ImageRecord {
        ImageRecord {
            image_name: "a".into(),
            patient_id: "p".into(),
            split: "val".into(),
            malignant: false,
            shard: "s".into(),
            offset: 0,
        }
    }

    #[test]
    fn cosine_schedule_starts_at_lr_and_ends_at_zero() {
        assert_eq!(cosine_lr(0.1, 0, 10), 0.1);
        assert!((cosine_lr(0.1, 5, 10) - 0.05).abs() < 1e-12);
        assert!(cosine_lr(0.1, 10, 10).abs() < 1e-12);
    }
}
