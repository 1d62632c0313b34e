//! `melanoflow gpu-check bench`: training-step timings of the paper's shapes
//! (CycleGAN ngf 64, 9 blocks, 224 px, batch 8; EfficientNet-B0 and Lite0 at
//! 224 px, batch 32) in each precision, after warm-up steps, with the device
//! synchronised before and after every timed step; ms/step (median), images/s
//! and peak device memory.
//!
//! Peak memory is the CUDA driver's view: a background thread reads
//! `cuMemGetInfo` (total − free) every millisecond while the steps run; the
//! peak minus the same reading taken just before the model is built is
//! reported. So it counts tensors, allocator pools and library workspaces,
//! but not the CUDA context. On the CPU it is not measured.
//!
//! With `--export DIR` the models' initial weights (reference names) and a
//! probe (a fixed input and the model's output on it) are written for the
//! PyTorch half of the check (`benches/gpu_check_torch.py`), which loads them
//! into the reference models and checks its output against the probe before
//! timing the same steps.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Result, anyhow};
use candle_core::{DType, Device, Module, Tensor};
use serde::Serialize;

use super::steps::{Batches, Classifier, CycleGan, NoiseBatches, cyclegan_config};
use crate::models::efficientnet::Variant;

/// The precisions a training step can run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 everywhere, TF32 off (cuBLAS computes in full f32).
    F32,
    /// f32 tensors, matrix products on TF32 tensor cores.
    Tf32,
    /// bf16 activations with f32 master weights.
    Bf16,
}

impl Precision {
    /// The same setting as the training stages' `precision` parameter, so a
    /// timing computes what a stage would (`models::precision`).
    fn stage_precision(self) -> crate::models::precision::Precision {
        use crate::models::precision::Precision as Stage;
        match self {
            Precision::F32 => Stage::F32,
            Precision::Tf32 => Stage::Tf32,
            Precision::Bf16 => Stage::Bf16,
        }
    }
}

/// Which model a timing runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchModel {
    Cyclegan,
    B0,
    Lite0,
}

/// Shapes of a timing run (the paper's unless a test shrinks them).
#[derive(Clone, Debug, Serialize)]
pub struct Shape {
    pub size: usize,
    pub batch: usize,
    /// CycleGAN only.
    pub ngf: usize,
    pub n_blocks: usize,
    pub ndf: usize,
}

/// One row of the timings JSON.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub framework: &'static str,
    pub model: BenchModel,
    pub precision: Precision,
    /// "ok" (the table script also reads "skipped", which PyTorch rows can be).
    pub status: &'static str,
    pub note: String,
    pub device: String,
    pub shape: Shape,
    pub warmup: usize,
    pub steps: usize,
    /// Median over the timed steps.
    pub ms_per_step: Option<f64>,
    pub ms_per_step_mean: Option<f64>,
    /// Batch images per second at the median (CycleGAN: image pairs).
    pub images_per_s: Option<f64>,
    pub peak_mib: Option<f64>,
    pub memory_method: &'static str,
    /// The last timed step's loss (a sanity check: finite).
    pub last_loss: Option<f32>,
}

/// A model under timing: one step at a time.
enum Trainee {
    Gan(Box<CycleGan>),
    Cls(Box<Classifier>),
}

impl Trainee {
    fn step(
        &mut self,
        batches: &NoiseBatches,
        batch: usize,
        step: u64,
        dev: &Device,
    ) -> Result<f32> {
        match self {
            Trainee::Gan(g) => {
                let (a, b) = batches.pair(step, batch, dev)?;
                g.step(&a, &b, step)
            }
            Trainee::Cls(c) => {
                let (x, t) = batches.labelled(step, batch, dev)?;
                c.step(&x, &t, step)
            }
        }
    }
}

fn build(
    model: BenchModel,
    shape: &Shape,
    pretrained: Option<&HashMap<String, Tensor>>,
    seed: u64,
    dtype: DType,
    dev: &Device,
) -> Result<Trainee> {
    Ok(match model {
        BenchModel::Cyclegan => {
            let mut cfg = cyclegan_config(shape.ngf, shape.n_blocks, shape.ndf, shape.batch);
            cfg.seed = seed;
            Trainee::Gan(Box::new(CycleGan::new(&cfg, dev)?.in_dtype(dtype)))
        }
        BenchModel::B0 => Trainee::Cls(Box::new(
            Classifier::new(Variant::B0, None, seed, dev)?.in_dtype(dtype),
        )),
        BenchModel::Lite0 => Trainee::Cls(Box::new(
            Classifier::new(Variant::Lite0, pretrained, seed, dev)?.in_dtype(dtype),
        )),
    })
}

/// Writes the model's initial weights and a probe for the PyTorch half.
fn export(model: BenchModel, t: &Trainee, dir: &Path, dev: &Device) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let name = format!("{model:?}").to_lowercase();
    let probe = NoiseBatches { size: 64, seed: 7 };
    let (x, out) = match t {
        Trainee::Gan(g) => {
            for (stem, vm) in &g.nets.vars {
                vm.save(dir.join(format!("{name}-{stem}.safetensors")))?;
            }
            let (x, _) = probe.pair(0, 2, dev)?;
            let y = g.nets.g_a.forward(&x)?;
            (x, y)
        }
        Trainee::Cls(c) => {
            c.varmap.save(dir.join(format!("{name}.safetensors")))?;
            let (x, _) = probe.labelled(0, 2, dev)?;
            let y = c.model.forward_t(&x, None)?;
            (x, y)
        }
    };
    let tensors = HashMap::from([
        ("input".to_string(), x.to_device(&Device::Cpu)?),
        ("output".to_string(), out.to_device(&Device::Cpu)?),
    ]);
    candle_core::safetensors::save(&tensors, dir.join(format!("{name}-probe.safetensors")))?;
    Ok(())
}

/// Times `steps` training steps of `model` after `warmup` untimed ones.
#[allow(clippy::too_many_arguments)]
pub fn bench(
    model: BenchModel,
    precision: Precision,
    shape: &Shape,
    warmup: usize,
    steps: usize,
    pretrained: Option<&HashMap<String, Tensor>>,
    export_dir: Option<&Path>,
    dev: &Device,
) -> Result<BenchRow> {
    let mut row = BenchRow {
        framework: "candle",
        model,
        precision,
        status: "ok",
        note: String::new(),
        device: format!("{:?}", dev.location()),
        shape: shape.clone(),
        warmup,
        steps,
        ms_per_step: None,
        ms_per_step_mean: None,
        images_per_s: None,
        peak_mib: None,
        memory_method: memory::METHOD,
        last_loss: None,
    };
    // TF32 matmuls on a GPU while the guard lives, as in a training stage.
    let (resolved, _tf32) = precision.stage_precision().enter(dev);
    if dev.is_cpu() && precision == Precision::Tf32 {
        row.note = "TF32 has no effect on the CPU".into();
    }
    dev.synchronize()?;
    let baseline = memory::used(dev);
    let mut trainee = build(model, shape, pretrained, 0, resolved.compute_dtype(), dev)?;
    if let Some(dir) = export_dir {
        export(model, &trainee, dir, dev)?;
    }
    let batches = NoiseBatches {
        size: shape.size,
        seed: 1,
    };
    let sampler = memory::Sampler::start(dev);
    let mut times = Vec::with_capacity(steps);
    for i in 0..(warmup + steps) as u64 {
        dev.synchronize()?;
        let t0 = Instant::now();
        let loss = trainee.step(&batches, shape.batch, i, dev)?;
        dev.synchronize()?;
        if i as usize >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            row.last_loss = Some(loss);
        }
        if !loss.is_finite() {
            return Err(anyhow!(
                "{model:?} {precision:?}: the loss is {loss} at step {i}"
            ));
        }
    }
    let peak = sampler.stop();
    row.peak_mib = match (peak, baseline) {
        (Some(p), Some(b)) => Some(p.saturating_sub(b) as f64 / (1 << 20) as f64),
        _ => None,
    };
    if !times.is_empty() {
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        row.ms_per_step = Some(median);
        row.ms_per_step_mean = Some(times.iter().sum::<f64>() / n as f64);
        row.images_per_s = Some(shape.batch as f64 * 1e3 / median);
    }
    Ok(row)
}

/// Device memory in use, from the CUDA driver.
mod memory {
    use candle_core::Device;

    #[cfg(feature = "cuda")]
    pub const METHOD: &str =
        "cuMemGetInfo total-free, sampled every 1 ms, minus the reading before the model was built";
    #[cfg(not(feature = "cuda"))]
    pub const METHOD: &str = "not measured (a build without CUDA)";

    /// Bytes in use on the device (total − free), `None` on the CPU.
    #[cfg(feature = "cuda")]
    pub fn used(dev: &Device) -> Option<u64> {
        let Device::Cuda(cuda) = dev else { return None };
        cuda.cuda_stream().context().bind_to_thread().ok()?;
        let (free, total) = candle_core::cuda::cudarc::driver::result::mem_get_info().ok()?;
        Some((total - free) as u64)
    }

    #[cfg(not(feature = "cuda"))]
    pub fn used(_dev: &Device) -> Option<u64> {
        None
    }

    /// Samples [`used`] every millisecond on a thread of its own until stopped.
    pub struct Sampler {
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        thread: Option<std::thread::JoinHandle<Option<u64>>>,
    }

    impl Sampler {
        pub fn start(dev: &Device) -> Sampler {
            use std::sync::atomic::{AtomicBool, Ordering};
            let stop = std::sync::Arc::new(AtomicBool::new(false));
            let thread = (!dev.is_cpu()).then(|| {
                let (dev, stop) = (dev.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut peak = used(&dev)?;
                    while !stop.load(Ordering::Relaxed) {
                        peak = peak.max(used(&dev)?);
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    Some(peak.max(used(&dev)?))
                })
            });
            Sampler { stop, thread }
        }

        /// The peak seen.
        pub fn stop(self) -> Option<u64> {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            self.thread?.join().ok()?
        }
    }
}
