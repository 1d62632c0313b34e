//! The CycleGAN training loop: two optimisers, alternating generator and
//! discriminator steps (burn's WGAN example habit), least-squares GAN loss,
//! L1 cycle loss, optional identity loss and image history, the learning
//! rate constant then decaying linearly to zero, checkpoints to resume from.
//!
//! Randomness is drawn from streams keyed by the seed and the epoch (pairing)
//! or the step (augmentation, label noise, history), so a run resumed at any
//! checkpoint draws exactly what an uninterrupted run draws.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use arrow_array::{ArrayRef, Float32Array, Float64Array, Int64Array};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use melanoflow_pipeline::{StageContext, StageReport};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::data::{Images, epoch_pairs};
use super::{Config, LabelSmoothing, TrainCycleGanParams, select_device};
use crate::models::adam::{Adam, named_vars};
use crate::models::cyclegan::{Discriminator, Generator};
use crate::models::init::{normal_init, standard_normal};
use crate::models::layers::{l1, mse, scalar};

/// The four networks and their variables.
pub struct Nets {
    pub g_a: Generator,
    pub g_b: Generator,
    pub d_a: Discriminator,
    pub d_b: Discriminator,
    /// (file stem, variables): G_A, G_B, D_A, D_B.
    pub vars: Vec<(&'static str, VarMap)>,
}

impl Nets {
    pub fn new(cfg: &Config, device: &Device) -> Result<Nets> {
        let vm = || VarMap::new();
        let (vga, vgb, vda, vdb) = (vm(), vm(), vm(), vm());
        let vb = |v: &VarMap| VarBuilder::from_varmap(v, DType::F32, device);
        let nets = Nets {
            g_a: Generator::new(&cfg.generator, vb(&vga))?,
            g_b: Generator::new(&cfg.generator, vb(&vgb))?,
            d_a: Discriminator::new(&cfg.discriminator, vb(&vda))?,
            d_b: Discriminator::new(&cfg.discriminator, vb(&vdb))?,
            vars: vec![("G_A", vga), ("G_B", vgb), ("D_A", vda), ("D_B", vdb)],
        };
        for (k, (_, v)) in nets.vars.iter().enumerate() {
            normal_init(v, cfg.seed.wrapping_mul(4).wrapping_add(k as u64), 0.02)?;
        }
        Ok(nets)
    }

    pub fn named(&self, which: &[usize]) -> Vec<(String, candle_core::Var)> {
        which
            .iter()
            .flat_map(|&k| named_vars(&format!("{}.", self.vars[k].0), &self.vars[k].1))
            .collect()
    }
}

/// The discriminators' history of generated images (Shrivastava et al.):
/// with probability 1/2 a new image is swapped for a stored one.
#[derive(Default)]
pub struct Pool {
    images: Vec<Tensor>,
    size: usize,
}

impl Pool {
    pub fn new(size: usize) -> Pool {
        Pool {
            images: Vec::new(),
            size,
        }
    }

    fn query(&mut self, batch: &Tensor, rng: &mut impl Rng) -> Result<Tensor> {
        if self.size == 0 {
            return Ok(batch.clone());
        }
        let mut out = Vec::with_capacity(batch.dim(0)?);
        for i in 0..batch.dim(0)? {
            let img = batch.get(i)?.unsqueeze(0)?;
            if self.images.len() < self.size {
                self.images.push(img.clone());
                out.push(img);
            } else if rng.random::<f64>() > 0.5 {
                let j = rng.random_range(0..self.size);
                // A checkpoint's images may come from a run in another
                // precision (`auto` on another device).
                out.push(std::mem::replace(&mut self.images[j], img).to_dtype(batch.dtype())?);
            } else {
                out.push(img);
            }
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}

/// One row of `losses.parquet`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LossRow {
    pub step: u64,
    pub epoch: u64,
    pub lr: f64,
    pub g: f32,
    pub g_a: f32,
    pub g_b: f32,
    pub cycle_a: f32,
    pub cycle_b: f32,
    pub idt_a: f32,
    pub idt_b: f32,
    pub d_a: f32,
    pub d_b: f32,
}

/// What a checkpoint's JSON half holds (the tensors are beside it).
#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: u64,
    weights: String,
    adam_g_t: u64,
    adam_d_t: u64,
    pool_a: usize,
    pool_b: usize,
    losses: Vec<LossRow>,
}

/// The learning-rate factor for a 0-based epoch: 1 for `n_epochs` epochs, then
/// a linear decay over `n_epochs_decay` epochs towards 0 (the reference's
/// `lambda_rule`: the last epoch runs at 1 / (n_epochs_decay + 1)).
pub fn lr_factor(cfg: &Config, epoch: usize) -> f64 {
    1.0 - (epoch + 1).saturating_sub(cfg.n_epochs) as f64 / (cfg.n_epochs_decay + 1) as f64
}

/// Discriminator targets shaped like `like`, per the smoothing option, in
/// F32 whatever `like`'s dtype (0.9 has no exact BF16 value).
fn targets(
    like: &Tensor,
    smoothing: LabelSmoothing,
    rng: &mut impl Rng,
) -> Result<(Tensor, Tensor)> {
    let (ones, zeros) = (
        Tensor::ones(like.shape(), DType::F32, like.device())?,
        Tensor::zeros(like.shape(), DType::F32, like.device())?,
    );
    Ok(match smoothing {
        LabelSmoothing::None => (ones, zeros),
        LabelSmoothing::OneSided => ((ones * 0.9)?, zeros),
        LabelSmoothing::Noisy => {
            let n = like.elem_count();
            let real: Vec<f32> = (0..n).map(|_| 1.0 + 0.3 * standard_normal(rng)).collect();
            let fake: Vec<f32> = (0..n).map(|_| 0.3 * standard_normal(rng)).collect();
            (
                Tensor::from_vec(real, like.shape(), like.device())?,
                Tensor::from_vec(fake, like.shape(), like.device())?,
            )
        }
    })
}

/// One training step on a batch (F32 images): the generators' update, then
/// the discriminators'. The networks compute in `dtype` (their input's: see
/// `models::precision`), the losses in F32 against the F32 images. Returns
/// the losses (step, epoch and lr left at 0).
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    cfg: &Config,
    nets: &Nets,
    adam_g: &mut Adam,
    adam_d: &mut Adam,
    pool_a: &mut Pool,
    pool_b: &mut Pool,
    real_a: &Tensor,
    real_b: &Tensor,
    dtype: DType,
    rng: &mut impl Rng,
) -> Result<LossRow> {
    let mut row = LossRow::default();
    let (in_a, in_b) = (real_a.to_dtype(dtype)?, real_b.to_dtype(dtype)?);
    // Generators: fool both discriminators, reconstruct both ways.
    let fake_b = nets.g_a.forward(&in_a)?;
    let rec_a = nets.g_b.forward(&fake_b)?;
    let fake_a = nets.g_b.forward(&in_b)?;
    let rec_b = nets.g_a.forward(&fake_a)?;
    // The discriminators are held fixed here: their weight gradients would be
    // dropped, so they are not computed.
    let pred_fake_b = nets.d_a.frozen().forward(&fake_b)?;
    let pred_fake_a = nets.d_b.frozen().forward(&fake_a)?;
    let loss_g_a = mse(&pred_fake_b, &pred_fake_b.ones_like()?)?;
    let loss_g_b = mse(&pred_fake_a, &pred_fake_a.ones_like()?)?;
    let loss_cycle_a = (l1(&rec_a, real_a)? * cfg.lambda_cycle)?;
    let loss_cycle_b = (l1(&rec_b, real_b)? * cfg.lambda_cycle)?;
    let mut loss_g = (((&loss_g_a + &loss_g_b)? + &loss_cycle_a)? + &loss_cycle_b)?;
    if cfg.lambda_identity > 0.0 {
        let w = cfg.lambda_cycle * cfg.lambda_identity;
        let idt_a = (l1(&nets.g_a.forward(&in_b)?, real_b)? * w)?;
        let idt_b = (l1(&nets.g_b.forward(&in_a)?, real_a)? * w)?;
        row.idt_a = scalar(&idt_a)?;
        row.idt_b = scalar(&idt_b)?;
        loss_g = ((loss_g + idt_a)? + idt_b)?;
    }
    adam_g.step(&loss_g.backward()?)?;

    // Discriminators: real vs (possibly historical) fakes.
    let fake_b = pool_b.query(&fake_b.detach(), rng)?;
    let fake_a = pool_a.query(&fake_a.detach(), rng)?;
    let pred_real_b = nets.d_a.forward(&in_b)?;
    let (real_t, fake_t) = targets(&pred_real_b, cfg.label_smoothing, rng)?;
    let loss_d_a =
        ((mse(&pred_real_b, &real_t)? + mse(&nets.d_a.forward(&fake_b)?, &fake_t)?)? * 0.5)?;
    let pred_real_a = nets.d_b.forward(&in_a)?;
    let (real_t, fake_t) = targets(&pred_real_a, cfg.label_smoothing, rng)?;
    let loss_d_b =
        ((mse(&pred_real_a, &real_t)? + mse(&nets.d_b.forward(&fake_a)?, &fake_t)?)? * 0.5)?;
    adam_d.step(&(&loss_d_a + &loss_d_b)?.backward()?)?;

    row.g = scalar(&loss_g)?;
    row.g_a = scalar(&loss_g_a)?;
    row.g_b = scalar(&loss_g_b)?;
    row.cycle_a = scalar(&loss_cycle_a)?;
    row.cycle_b = scalar(&loss_cycle_b)?;
    row.d_a = scalar(&loss_d_a)?;
    row.d_b = scalar(&loss_d_b)?;
    Ok(row)
}

pub struct Trained {
    pub nets: Nets,
    pub losses: Vec<LossRow>,
    /// Steps this call ran (not counting those restored from a checkpoint).
    pub steps_run: u64,
    pub resumed_from: Option<u64>,
}

/// Trains from scratch or from the checkpoint in `scratch`, the networks
/// computing in `dtype`; stops early after `stop_after` steps (tests use it
/// to simulate a kill right after a checkpoint).
pub fn train(
    cfg: &Config,
    images: &Images,
    device: &Device,
    dtype: DType,
    scratch: &Path,
    stop_after: Option<u64>,
    on_step: &dyn Fn(&LossRow, u64),
) -> Result<Trained> {
    let nets = Nets::new(cfg, device)?;
    let mut adam_g = Adam::new(nets.named(&[0, 1]), cfg.lr, cfg.beta1, cfg.beta2)?;
    let mut adam_d = Adam::new(nets.named(&[2, 3]), cfg.lr, cfg.beta1, cfg.beta2)?;
    let mut pool_a = Pool::new(cfg.pool_size);
    let mut pool_b = Pool::new(cfg.pool_size);
    let mut losses: Vec<LossRow> = Vec::new();
    let resumed_from = load_checkpoint(
        scratch,
        device,
        &nets,
        &mut adam_g,
        &mut adam_d,
        &mut pool_a,
        &mut pool_b,
        &mut losses,
    )?;
    let start = resumed_from.unwrap_or(0);
    let steps_per_epoch = images.malignant.len().div_ceil(cfg.batch_size) as u64;
    let total_steps = steps_per_epoch * (cfg.n_epochs + cfg.n_epochs_decay) as u64;
    let mut step = 0u64;
    let mut steps_run = 0u64;
    'epochs: for epoch in 0..cfg.n_epochs + cfg.n_epochs_decay {
        let mut epoch_rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        epoch_rng.set_stream(1 + epoch as u64);
        let pairs = epoch_pairs(images, &mut epoch_rng);
        let lr = cfg.lr * lr_factor(cfg, epoch);
        adam_g.lr = lr;
        adam_d.lr = lr;
        for batch in pairs.chunks(cfg.batch_size) {
            step += 1;
            if step <= start {
                continue;
            }
            let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5EED_5EED);
            rng.set_stream(step);
            let a_refs: Vec<_> = batch.iter().map(|(a, _)| *a).collect();
            let b_refs: Vec<_> = batch.iter().map(|(_, b)| *b).collect();
            let real_a = images.batch(&a_refs, cfg.augment, &mut rng, device)?;
            let real_b = images.batch(&b_refs, cfg.augment, &mut rng, device)?;
            let mut row = train_step(
                cfg,
                &nets,
                &mut adam_g,
                &mut adam_d,
                &mut pool_a,
                &mut pool_b,
                &real_a,
                &real_b,
                dtype,
                &mut rng,
            )?;
            (row.step, row.epoch, row.lr) = (step, epoch as u64, lr);
            if !row.g.is_finite() || !row.d_a.is_finite() || !row.d_b.is_finite() {
                return Err(anyhow!("training diverged at step {step}: {row:?}"));
            }
            on_step(&row, total_steps);
            losses.push(row);
            steps_run += 1;
            if step.is_multiple_of(cfg.checkpoint_every as u64) || step == total_steps {
                save_checkpoint(
                    scratch, step, &nets, &adam_g, &adam_d, &pool_a, &pool_b, &losses,
                )?;
            }
            if stop_after.is_some_and(|s| steps_run >= s) {
                break 'epochs;
            }
        }
    }
    Ok(Trained {
        nets,
        losses,
        steps_run,
        resumed_from,
    })
}

#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    dir: &Path,
    step: u64,
    nets: &Nets,
    adam_g: &Adam,
    adam_d: &Adam,
    pool_a: &Pool,
    pool_b: &Pool,
    losses: &[LossRow],
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in nets.named(&[0, 1, 2, 3]) {
        tensors.insert(name, var.as_tensor().clone());
    }
    tensors.extend(adam_g.state("adam_g."));
    tensors.extend(adam_d.state("adam_d."));
    for (p, pool) in [("pool_a", pool_a), ("pool_b", pool_b)] {
        for (i, t) in pool.images.iter().enumerate() {
            tensors.insert(format!("{p}.{i}"), t.clone());
        }
    }
    let weights = format!("ckpt-{step:08}.safetensors");
    let tmp = dir.join(format!(".{weights}.tmp"));
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, dir.join(&weights))?;
    let state = CheckpointState {
        step,
        weights: weights.clone(),
        adam_g_t: adam_g.t,
        adam_d_t: adam_d.t,
        pool_a: pool_a.images.len(),
        pool_b: pool_b.images.len(),
        losses: losses.to_vec(),
    };
    melanoflow_pipeline::fsutil::write_atomic(
        &dir.join("checkpoint.json"),
        &serde_json::to_vec(&state)?,
    )?;
    // Older weights are now unreferenced.
    for e in std::fs::read_dir(dir)?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("ckpt-") && n != weights {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn load_checkpoint(
    dir: &Path,
    device: &Device,
    nets: &Nets,
    adam_g: &mut Adam,
    adam_d: &mut Adam,
    pool_a: &mut Pool,
    pool_b: &mut Pool,
    losses: &mut Vec<LossRow>,
) -> Result<Option<u64>> {
    let Ok(text) = std::fs::read(dir.join("checkpoint.json")) else {
        return Ok(None);
    };
    let state: CheckpointState =
        serde_json::from_slice(&text).context("reading checkpoint.json")?;
    let tensors = candle_core::safetensors::load(dir.join(&state.weights), device)
        .with_context(|| format!("loading checkpoint {}", dir.join(&state.weights).display()))?;
    for (name, var) in nets.named(&[0, 1, 2, 3]) {
        let t = tensors
            .get(&name)
            .ok_or_else(|| anyhow!("checkpoint lacks `{name}`"))?;
        var.set(t)?;
    }
    adam_g.load_state("adam_g.", &tensors, state.adam_g_t)?;
    adam_d.load_state("adam_d.", &tensors, state.adam_d_t)?;
    for (p, pool, n) in [
        ("pool_a", pool_a, state.pool_a),
        ("pool_b", pool_b, state.pool_b),
    ] {
        pool.images = (0..n)
            .map(|i| {
                tensors
                    .get(&format!("{p}.{i}"))
                    .cloned()
                    .ok_or_else(|| anyhow!("checkpoint lacks `{p}.{i}`"))
            })
            .collect::<Result<_>>()?;
    }
    *losses = state.losses;
    Ok(Some(state.step))
}

fn write_losses(path: &Path, rows: &[LossRow]) -> Result<()> {
    let f = |get: fn(&LossRow) -> f32| -> ArrayRef {
        Arc::new(Float32Array::from(rows.iter().map(get).collect::<Vec<_>>()))
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.step as i64).collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.epoch as i64).collect::<Vec<_>>(),
        )),
        Arc::new(Float64Array::from(
            rows.iter().map(|r| r.lr).collect::<Vec<_>>(),
        )),
        f(|r| r.g),
        f(|r| r.g_a),
        f(|r| r.g_b),
        f(|r| r.cycle_a),
        f(|r| r.cycle_b),
        f(|r| r.idt_a),
        f(|r| r.idt_b),
        f(|r| r.d_a),
        f(|r| r.d_b),
    ];
    melanoflow_schemas::write_parquet(path, &melanoflow_schemas::CYCLEGAN_LOSSES, columns)?;
    Ok(())
}

/// Mean of a loss over the last `n` rows.
fn tail_mean(rows: &[LossRow], n: usize, get: fn(&LossRow) -> f32) -> f32 {
    let tail = &rows[rows.len().saturating_sub(n)..];
    tail.iter().map(get).sum::<f32>() / tail.len().max(1) as f32
}

pub fn run(p: &TrainCycleGanParams, ctx: &StageContext) -> Result<StageReport> {
    let cfg = p.resolve();
    let device = select_device(&p.device)?;
    let (precision, _tf32) = p.precision.enter(&device);
    let dtype = precision.compute_dtype();
    let pre = ctx
        .upstream_of_kind("preprocess")
        .ok_or_else(|| anyhow!("the upstream must be a `preprocess` stage"))?;
    let images = Images::open(&pre.dir)?;
    if images.size % 4 != 0 {
        return Err(anyhow!(
            "image size {} must be a multiple of 4 for the generator",
            images.size
        ));
    }
    let steps_per_epoch = images.malignant.len().div_ceil(cfg.batch_size) as u64;
    let total = steps_per_epoch * (cfg.n_epochs + cfg.n_epochs_decay) as u64;
    let bar = ctx.progress.bar(total, "training CycleGAN (steps)");
    let started = std::time::Instant::now();
    let trained = train(
        &cfg,
        &images,
        &device,
        dtype,
        &ctx.scratch_dir,
        None,
        &|row, _| {
            bar.set_position(row.step);
            bar.set_message(format!("G {:.3} D {:.3}", row.g, (row.d_a + row.d_b) / 2.0));
        },
    )?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if trained.steps_run > 0 {
        tracing::info!(
            "{} steps in {seconds:.1}s ({:.0} ms/step) on {device:?} in {}",
            trained.steps_run,
            1000.0 * seconds / trained.steps_run as f64,
            precision.name()
        );
    }

    for (stem, vm) in &trained.nets.vars {
        vm.save(ctx.out_dir.join(format!("{stem}.safetensors")))?;
    }
    write_losses(&ctx.out_dir.join("losses.parquet"), &trained.losses)?;
    let preview: Vec<&super::data::ImageRef> = images.preview.iter().collect();
    let x = images.batch(&preview, false, &mut ChaCha8Rng::seed_from_u64(0), &device)?;
    let fake = trained.nets.g_a.forward(&x.to_dtype(dtype)?)?;
    let rec = trained.nets.g_b.forward(&fake)?.to_dtype(DType::F32)?;
    let fake = fake.to_dtype(DType::F32)?;
    super::grid::write_grid(&ctx.out_dir.join("samples.png"), &[&x, &fake, &rec])?;
    std::fs::write(
        ctx.out_dir.join("config.json"),
        serde_json::to_string_pretty(&cfg)? + "\n",
    )?;
    let last = |get: fn(&LossRow) -> f32| tail_mean(&trained.losses, steps_per_epoch as usize, get);
    let summary = serde_json::json!({
        "steps": trained.losses.len(),
        "epochs": cfg.n_epochs + cfg.n_epochs_decay,
        "train_images": { "benign": images.benign.len(), "malignant": images.malignant.len() },
        "image_size": images.size,
        "precision": precision.name(),
        "final_epoch_mean": {
            "loss_g": last(|r| r.g), "loss_cycle_a": last(|r| r.cycle_a), "loss_cycle_b": last(|r| r.cycle_b),
            "loss_d_a": last(|r| r.d_a), "loss_d_b": last(|r| r.d_b),
        },
    });
    std::fs::write(
        ctx.out_dir.join("train.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    let resumed = trained
        .resumed_from
        .map(|s| format!(", resumed at step {s}"))
        .unwrap_or_default();
    Ok(StageReport::new(format!(
        "{} steps ({} epochs x {steps_per_epoch}) on {} malignant / {} benign train images at {} px{resumed}: cycle loss {:.3} -> {:.3}, ms/step {:.0}",
        trained.losses.len(),
        cfg.n_epochs + cfg.n_epochs_decay,
        images.malignant.len(),
        images.benign.len(),
        images.size,
        trained
            .losses
            .first()
            .map(|r| r.cycle_a + r.cycle_b)
            .unwrap_or(f32::NAN),
        last(|r| r.cycle_a + r.cycle_b),
        if trained.steps_run > 0 {
            1000.0 * seconds / trained.steps_run as f64
        } else {
            0.0
        },
    )))
}
