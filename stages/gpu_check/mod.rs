//! `melanoflow gpu-check`: the GPU check of issue 13, run on a GPU machine
//! by `scripts/gpu-check.sh` from the bundle `make gpu-build` prepares (this
//! binary, a preprocessed shard, the Lite0 ImageNet weights), with no network.
//!
//! * `gpu-check grads`: the CycleGAN (paper architecture, small), EfficientNet-B0
//!   and Lite0 built from the same seeds and weights on a reference device and
//!   a candidate device (`--reference cpu --device cuda:0`), trained on the
//!   same batches of the shard; every parameter gradient of the first step and
//!   every variable after `--steps` steps compared (`compare`'s rules: relative
//!   L2 error below 1e-4 for gradients, 1e-3 for weights after the steps).
//!   Exits 1 on a mismatch, naming each variable. Both devices are parameters,
//!   so `make test` runs it CPU against CPU (`--inject NAME` perturbs one
//!   gradient on the candidate side, to see it fail).
//! * `gpu-check bench`: `bench`'s timings of the paper's shapes per precision,
//!   optionally exporting the weights and probes the PyTorch half loads.
//!
//! Both write JSON (`--json FILE`) for the script's table.

pub mod bench;
pub mod compare;
pub mod steps;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::{Parser, Subcommand};
use melanoflow_pipeline::BoxError;
use melanoflow_pipeline::cli::AppInvocation;

use crate::models::efficientnet::Variant;
use bench::{BenchModel, Precision, Shape};
use compare::{GRAD_TOL, ModelReport, WEIGHT_TOL, ZERO_FLOOR};
use steps::{CheckModel, ShardBatches, cyclegan_config, run_side};

/// Compare training steps on two devices, and time the paper's shapes (scripts/gpu-check.sh).
#[derive(Parser, Debug)]
#[command(name = "gpu-check")]
struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// Gradients of one step and weights after a few steps, reference device vs candidate device.
    Grads(GradArgs),
    /// Training-step timings per model and precision.
    Bench(BenchArgs),
}

#[derive(clap::Args, Debug)]
struct GradArgs {
    /// A `preprocess` output folder (index.parquet and shards).
    #[arg(long)]
    data: PathBuf,
    /// Lite0 ImageNet weights (safetensors, torchvision names); without it
    /// Lite0 is seeded like B0.
    #[arg(long)]
    weights: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    reference: String,
    #[arg(long, default_value = "cuda:0")]
    device: String,
    #[arg(long, value_delimiter = ',', default_value = "cyclegan,b0,lite0")]
    models: Vec<BenchModel>,
    /// CycleGAN generator width, residual blocks, discriminator width, batch.
    #[arg(long, default_value_t = 16)]
    ngf: usize,
    #[arg(long, default_value_t = 9)]
    blocks: usize,
    #[arg(long, default_value_t = 16)]
    ndf: usize,
    #[arg(long, default_value_t = 2)]
    gan_batch: usize,
    /// Classifier batch and input side (default: the shard's).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long)]
    side: Option<usize>,
    /// Steps before the weights are compared (gradients: the first).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Test hook: perturb the candidate's gradient NETWORK.NAME (e.g.
    /// `cyclegan/G_A.model.1.weight`, `b0/classifier.features.0.0.weight`) by a relative 1e-3.
    #[arg(long)]
    inject: Option<String>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    #[arg(long, default_value = "cuda:0")]
    device: String,
    #[arg(long, value_delimiter = ',', default_value = "cyclegan,b0,lite0")]
    models: Vec<BenchModel>,
    #[arg(long, value_delimiter = ',', default_value = "f32,tf32,bf16")]
    precisions: Vec<Precision>,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// CycleGAN shape (the paper's by default).
    #[arg(long, default_value_t = 224)]
    gan_size: usize,
    #[arg(long, default_value_t = 8)]
    gan_batch: usize,
    #[arg(long, default_value_t = 64)]
    ngf: usize,
    #[arg(long, default_value_t = 9)]
    blocks: usize,
    #[arg(long, default_value_t = 64)]
    ndf: usize,
    /// Classifier shape.
    #[arg(long, default_value_t = 224)]
    size: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Lite0 ImageNet weights (safetensors); without it Lite0 is seeded.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Write each model's initial weights and a probe here (for the PyTorch half).
    #[arg(long)]
    export: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn gpu_check_command(inv: &AppInvocation) -> std::result::Result<ExitCode, BoxError> {
    let args = match Args::try_parse_from(inv.args) {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            print!("{e}");
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e.into()),
    };
    Ok(match args.command {
        Sub::Grads(a) => grads(&a, inv.quiet)?,
        Sub::Bench(a) => bench_all(&a, inv.quiet)?,
    })
}

fn open_device(spec: &str) -> Result<Device> {
    crate::train_cyclegan::select_device(spec)
}

fn load_weights(path: Option<&Path>) -> Result<Option<HashMap<String, Tensor>>> {
    path.map(|p| {
        candle_core::safetensors::load(p, &Device::Cpu)
            .with_context(|| format!("reading weights {}", p.display()))
    })
    .transpose()
}

fn write_json(path: Option<&Path>, value: &serde_json::Value) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_string_pretty(value)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn grads(a: &GradArgs, quiet: bool) -> Result<ExitCode> {
    let reference = open_device(&a.reference)?;
    let candidate = open_device(&a.device)?;
    let batches = ShardBatches::open(&a.data, a.side, a.seed)?;
    let pretrained = load_weights(a.weights.as_deref())?;
    let model_name = |m: &BenchModel| format!("{m:?}").to_lowercase();
    let inject = match a.inject.as_deref() {
        None => None,
        Some(spec) => match spec.split_once('/') {
            Some((m, name)) if a.models.iter().any(|x| model_name(x) == m) => Some((m, name)),
            _ => anyhow::bail!(
                "--inject {spec}: expected MODEL/NETWORK.NAME with MODEL one of the models checked"
            ),
        },
    };
    let mut reports: Vec<ModelReport> = Vec::new();
    for m in &a.models {
        let model = match m {
            BenchModel::Cyclegan => {
                let mut cfg = cyclegan_config(a.ngf, a.blocks, a.ndf, a.gan_batch);
                cfg.seed = a.seed;
                CheckModel::CycleGan(cfg)
            }
            BenchModel::B0 => CheckModel::Classifier(Variant::B0),
            BenchModel::Lite0 => CheckModel::Classifier(Variant::Lite0),
        };
        let name = model_name(m);
        let t = std::time::Instant::now();
        let side = |dev: &Device| {
            run_side(
                &model,
                a.batch,
                a.steps,
                a.seed,
                pretrained.as_ref(),
                &batches,
                dev,
            )
            .with_context(|| format!("{} on {}", model.label(), device_name(dev)))
        };
        let r = side(&reference)?;
        let mut c = side(&candidate)?;
        if let Some((_, target)) = inject.filter(|(m, _)| *m == name) {
            compare::inject(&mut c, target).map_err(anyhow::Error::msg)?;
        }
        let report = compare::compare(&name, &r, &c, a.steps);
        if !quiet {
            let rounding = report
                .rows
                .iter()
                .filter(|r| r.grad_at_rounding_level)
                .count();
            println!(
                "{}: {} {} variables: gradients worst {:.2e} (< {GRAD_TOL:.0e}), weights after {} steps worst {:.2e} (< {WEIGHT_TOL:.0e}); {rounding} gradients at rounding level; {:.1} s",
                if report.passed() { "ok" } else { "FAILED" },
                model.label(),
                report.rows.len(),
                report.worst_grad_err,
                a.steps,
                report.worst_weight_err,
                t.elapsed().as_secs_f64()
            );
        }
        reports.push(report);
    }
    let failures: Vec<&String> = reports.iter().flat_map(|r| &r.failures).collect();
    write_json(
        a.json.as_deref(),
        &serde_json::json!({
            "reference": device_name(&reference),
            "candidate": device_name(&candidate),
            "steps": a.steps,
            "tolerances": { "gradient": GRAD_TOL, "weights": WEIGHT_TOL, "rounding_floor": ZERO_FLOOR },
            "passed": failures.is_empty(),
            "models": reports,
        }),
    )?;
    if failures.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "gpu-check: {} on {} does not match {}: {} variable(s) beyond tolerance:",
        a.models
            .iter()
            .map(model_name)
            .collect::<Vec<_>>()
            .join(", "),
        device_name(&candidate),
        device_name(&reference),
        failures.len()
    );
    for f in failures.iter().take(20) {
        eprintln!("  {f}");
    }
    if failures.len() > 20 {
        eprintln!("  ... and {} more (see the JSON)", failures.len() - 20);
    }
    Ok(ExitCode::FAILURE)
}

fn device_name(dev: &Device) -> String {
    match dev.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

fn bench_all(a: &BenchArgs, quiet: bool) -> Result<ExitCode> {
    let dev = open_device(&a.device)?;
    let pretrained = load_weights(a.weights.as_deref())?;
    let mut rows = Vec::new();
    for &m in &a.models {
        let shape = match m {
            BenchModel::Cyclegan => Shape {
                size: a.gan_size,
                batch: a.gan_batch,
                ngf: a.ngf,
                n_blocks: a.blocks,
                ndf: a.ndf,
            },
            _ => Shape {
                size: a.size,
                batch: a.batch,
                ngf: 0,
                n_blocks: 0,
                ndf: 0,
            },
        };
        let mut exported = false;
        for &p in &a.precisions {
            // The weights and probe once per model, from its first run.
            let export = a.export.as_deref().filter(|_| !exported);
            let row = bench::bench(
                m,
                p,
                &shape,
                a.warmup,
                a.steps,
                pretrained.as_ref(),
                export,
                &dev,
            )
            .with_context(|| format!("timing {m:?} in {p:?} on {}", device_name(&dev)))?;
            exported |= row.status == "ok";
            if !quiet {
                match row.ms_per_step {
                    Some(ms) => println!(
                        "{m:?} {p:?}: {ms:.1} ms/step, {:.1} images/s, peak {} {}",
                        row.images_per_s.unwrap_or(0.0),
                        row.peak_mib
                            .map_or("n/a".to_string(), |p| format!("{p:.0} MiB")),
                        row.note
                    ),
                    None => println!("{m:?} {p:?}: {}", row.note),
                }
            }
            rows.push(row);
        }
    }
    write_json(
        a.json.as_deref(),
        &serde_json::json!({ "device": device_name(&dev), "rows": rows }),
    )?;
    Ok(ExitCode::SUCCESS)
}
