//! Stage `train_cyclegan`: the paper's CycleGAN (benign = domain A,
//! malignant = domain B) trained in candle on `preprocess`'s train split.
//!
//! Outputs: `G_A.safetensors` (benign -> malignant), `G_B.safetensors`
//! (malignant -> benign), `D_A.safetensors` (judges domain B), `D_B.safetensors`
//! (judges domain A), with the PyTorch reference's parameter names;
//! `losses.parquet` (schema `cyclegan_losses/1`, one row per step);
//! `samples.png` (benign inputs, their malignant translations, the
//! reconstructions, like the paper's Figure 1); `config.json` (the resolved
//! configuration); `train.json` (steps, final losses and the precision it
//! ran in, `auto` resolved). No timings go into
//! outputs, so a re-run on the same machine writes the same bytes.
//!
//! Checkpoints (every `checkpoint_every` steps) go to the engine's scratch
//! folder for this fingerprint: kill the process, run again, and training
//! resumes from the last checkpoint and ends with the same weights as an
//! uninterrupted run.

pub mod data;
pub mod grid;
pub mod train;

#[cfg(test)]
mod tests;

use anyhow::{Result, anyhow};
use candle_core::Device;
use melanoflow_pipeline::{BoxError, Resources, Stage, StageContext, StageReport};
use serde::{Deserialize, Serialize};

use crate::models::cyclegan::{DiscriminatorConfig, GeneratorConfig, Upsample};
use crate::models::precision::Precision;

pub struct TrainCycleGan;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// Sized for 2 CPU cores on the default synthetic data (about 4 minutes):
    /// ngf 8, 2 blocks, ndf 8, batch 4, 12 + 12 epochs.
    Default,
    /// The paper: ngf 64, 9 blocks, batch 8, 360 + 360 epochs (use 224 px; a GPU).
    Paper,
}

/// How the discriminators' targets are smoothed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelSmoothing {
    None,
    /// Real target 0.9 (Salimans et al. 2016).
    OneSided,
    /// The paper's notebooks: real = 1 + 0.3 N(0,1), fake = 0.3 N(0,1), per patch.
    Noisy,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainCycleGanParams {
    #[serde(default = "defaults::preset")]
    pub preset: Preset,
    // Architecture; unset = the preset's value.
    #[serde(default)]
    pub ngf: Option<usize>,
    #[serde(default)]
    pub n_blocks: Option<usize>,
    #[serde(default)]
    pub ndf: Option<usize>,
    #[serde(default)]
    pub n_layers_d: Option<usize>,
    #[serde(default)]
    pub upsample: Option<Upsample>,
    /// Generator LeakyReLU slope (the paper's notebooks: 0.01).
    #[serde(default)]
    pub slope: Option<f64>,
    // Training; unset = the preset's value.
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Epochs at the initial learning rate.
    #[serde(default)]
    pub n_epochs: Option<usize>,
    /// Epochs of linear decay to zero after those.
    #[serde(default)]
    pub n_epochs_decay: Option<usize>,
    #[serde(default = "defaults::lr")]
    pub lr: f64,
    #[serde(default = "defaults::beta1")]
    pub beta1: f64,
    #[serde(default = "defaults::beta2")]
    pub beta2: f64,
    #[serde(default = "defaults::lambda_cycle")]
    pub lambda_cycle: f64,
    /// Identity loss weight as a fraction of `lambda_cycle` (reference: 0.5; 0 = off, the paper).
    #[serde(default)]
    pub lambda_identity: f64,
    /// Discriminator history of generated images (reference: 50; 0 = off, the paper).
    #[serde(default)]
    pub pool_size: usize,
    #[serde(default = "defaults::label_smoothing")]
    pub label_smoothing: LabelSmoothing,
    /// Random flips and 90-degree rotations of training images.
    #[serde(default = "defaults::augment")]
    pub augment: bool,
    #[serde(default = "defaults::checkpoint_every")]
    pub checkpoint_every: usize,
    #[serde(default)]
    pub seed: u64,
    /// "auto" (CUDA if built with `--features cuda` and a GPU is present), "cpu", or "cuda:N".
    #[serde(default = "defaults::device")]
    pub device: String,
    /// "auto" (bf16 on CUDA, f32 on the CPU), "f32", "tf32" or "bf16"
    /// (`models::precision`). Left out of the canonical parameters when
    /// "auto", so pipelines that never set it keep their fingerprints'
    /// parameter part; any explicit value enters the fingerprint.
    #[serde(default, skip_serializing_if = "Precision::is_auto")]
    pub precision: Precision,
}

mod defaults {
    use super::*;
    pub fn preset() -> Preset {
        Preset::Default
    }
    pub fn lr() -> f64 {
        2e-4
    }
    pub fn beta1() -> f64 {
        0.5
    }
    pub fn beta2() -> f64 {
        0.999
    }
    pub fn lambda_cycle() -> f64 {
        10.0
    }
    pub fn label_smoothing() -> LabelSmoothing {
        LabelSmoothing::None
    }
    pub fn augment() -> bool {
        true
    }
    pub fn checkpoint_every() -> usize {
        100
    }
    pub fn device() -> String {
        "auto".into()
    }
}

/// Everything training needs, with the preset applied: saved as `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub generator: GeneratorConfig,
    pub discriminator: DiscriminatorConfig,
    pub batch_size: usize,
    pub n_epochs: usize,
    pub n_epochs_decay: usize,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub lambda_cycle: f64,
    pub lambda_identity: f64,
    pub pool_size: usize,
    pub label_smoothing: LabelSmoothing,
    pub augment: bool,
    pub checkpoint_every: usize,
    pub seed: u64,
}

impl TrainCycleGanParams {
    pub fn resolve(&self) -> Config {
        let (ngf, nb, ndf, batch, epochs) = match self.preset {
            // Measured on 2 cores: ~0.73 s per step at 64 px, 312 steps on the
            // default data (50 malignant training images): under 4 minutes.
            Preset::Default => (8, 2, 8, 4, 12),
            Preset::Paper => (64, 9, 64, 8, 360),
        };
        Config {
            generator: GeneratorConfig {
                ngf: self.ngf.unwrap_or(ngf),
                n_blocks: self.n_blocks.unwrap_or(nb),
                upsample: self.upsample.unwrap_or(Upsample::Transposed),
                slope: self.slope.unwrap_or(0.01),
            },
            discriminator: DiscriminatorConfig {
                ndf: self.ndf.unwrap_or(ndf),
                n_layers: self.n_layers_d.unwrap_or(3),
            },
            batch_size: self.batch_size.unwrap_or(batch),
            n_epochs: self.n_epochs.unwrap_or(epochs),
            n_epochs_decay: self.n_epochs_decay.unwrap_or(epochs),
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            lambda_cycle: self.lambda_cycle,
            lambda_identity: self.lambda_identity,
            pool_size: self.pool_size,
            label_smoothing: self.label_smoothing,
            augment: self.augment,
            checkpoint_every: self.checkpoint_every,
            seed: self.seed,
        }
    }
}

/// How a `device` string is honoured, given whether this build has CUDA
/// (`--features cuda`). Whether a GPU can be opened is found out only by
/// [`select_device`], when a stage runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevicePlan {
    /// `"cpu"`, or `"auto"` in a build without CUDA.
    Cpu,
    /// `"auto"` in a CUDA build: GPU 0 when it can be opened, else the CPU
    /// with a one-line notice.
    CudaOrCpu,
    /// `"cuda:N"`: that GPU, or an error.
    Cuda(usize),
}

/// Parses `device` ("auto", "cpu" or "cuda:N") against the build's CUDA support.
pub fn plan_device(spec: &str, cuda_built: bool) -> Result<DevicePlan> {
    match spec {
        "cpu" => Ok(DevicePlan::Cpu),
        "auto" if cuda_built => Ok(DevicePlan::CudaOrCpu),
        "auto" => Ok(DevicePlan::Cpu),
        other => {
            let n: usize = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| {
                    anyhow!("device `{other}`: expected \"auto\", \"cpu\" or \"cuda:N\"")
                })?;
            if !cuda_built {
                return Err(anyhow!(
                    "device `{other}`: this build has no CUDA support (build it with `make build-cuda`)"
                ));
            }
            Ok(DevicePlan::Cuda(n))
        }
    }
}

/// What a cluster job of a stage computing on `device` asks for: one GPU for
/// `"cuda:N"`; for `"auto"`, one GPU if the cluster has them (`[executor]
/// gpus = true`); nothing for the CPU. Decided by the string alone, not by
/// this build: the workers may run another binary (`[executor] command`).
pub fn device_resources(spec: &str) -> Resources {
    let cuda = spec
        .strip_prefix("cuda:")
        .is_some_and(|n| n.parse::<usize>().is_ok());
    Resources {
        gpus: cuda.then_some(1),
        gpus_if_available: (spec == "auto").then_some(1),
        ..Resources::default()
    }
}

/// The device a stage computes on: `"auto"` is GPU 0 in a CUDA build when
/// one can be opened and the CPU otherwise (a build without CUDA, or no
/// usable GPU or driver: then one notice per process, not an error);
/// `"cuda:N"` is GPU N or an error naming it.
pub fn select_device(spec: &str) -> Result<Device> {
    select_device_with(
        spec,
        candle_core::utils::cuda_is_available(),
        Device::new_cuda,
    )
}

/// [`select_device`] with the build's CUDA support and the GPU opener passed
/// in, so the fallback can be tested in any build.
fn select_device_with(
    spec: &str,
    cuda_built: bool,
    open: impl Fn(usize) -> candle_core::Result<Device>,
) -> Result<Device> {
    match plan_device(spec, cuda_built)? {
        DevicePlan::Cpu => Ok(Device::Cpu),
        DevicePlan::Cuda(n) => open(n).map_err(|e| {
            anyhow!("device `cuda:{n}`: cannot open CUDA GPU {n} (no such GPU, or no NVIDIA driver on this machine): {}", without_backtrace(e))
        }),
        DevicePlan::CudaOrCpu => match open(0) {
            Ok(device) => Ok(device),
            Err(e) => {
                static NOTICE: std::sync::Once = std::sync::Once::new();
                NOTICE.call_once(|| {
                    tracing::warn!("device \"auto\": no usable CUDA GPU ({}); running on the CPU", without_backtrace(e));
                });
                Ok(Device::Cpu)
            }
        },
    }
}

/// candle attaches a backtrace to its errors when `RUST_BACKTRACE` is set:
/// the message alone belongs in a notice or an error line.
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        e => e,
    }
}

impl Stage for TrainCycleGan {
    type Params = TrainCycleGanParams;
    const KIND: &'static str = "train_cyclegan";
    const CODE: &'static str = crate::code_identity::TRAIN_CYCLEGAN;
    const ABOUT: &'static str = "CycleGAN benign -> malignant (ResNet generator, PatchGAN, LSGAN + cycle loss) -> safetensors, losses, sample grid";

    fn check(&self, p: &TrainCycleGanParams, inputs: &[String]) -> Result<(), String> {
        if inputs.len() != 1 {
            return Err("takes exactly one upstream: a `preprocess` stage".into());
        }
        let c = p.resolve();
        let positive = [
            ("ngf", c.generator.ngf),
            ("ndf", c.discriminator.ndf),
            ("n_layers_d", c.discriminator.n_layers),
            ("batch_size", c.batch_size),
            ("checkpoint_every", c.checkpoint_every),
        ];
        if let Some((k, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("`{k}` must be at least 1"));
        }
        if c.n_epochs + c.n_epochs_decay == 0 {
            return Err("`n_epochs` + `n_epochs_decay` must be at least 1".into());
        }
        if !(0.0..1.0).contains(&c.generator.slope) {
            return Err(format!(
                "`slope` must be within [0, 1), not {}",
                c.generator.slope
            ));
        }
        if !(0.0..1.0).contains(&c.beta1) || !(0.0..1.0).contains(&c.beta2) || c.lr <= 0.0 {
            return Err("`lr` must be positive and `beta1`, `beta2` within [0, 1)".into());
        }
        check_device_spec(&p.device)
    }

    fn resources(&self, p: &TrainCycleGanParams) -> Resources {
        device_resources(&p.device)
    }

    fn run(&self, p: &TrainCycleGanParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
        Ok(train::run(p, ctx)?)
    }
}

/// Checks the device string's form (whether the device exists is checked when the stage runs).
pub fn check_device_spec(spec: &str) -> Result<(), String> {
    match spec {
        "auto" | "cpu" => Ok(()),
        s if s
            .strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok()) =>
        {
            Ok(())
        }
        s => Err(format!(
            "`device` must be \"auto\", \"cpu\" or \"cuda:N\", not \"{s}\""
        )),
    }
}

#[cfg(test)]
mod device_tests {
    use super::*;

    fn no_gpu(_: usize) -> candle_core::Result<Device> {
        Err(candle_core::Error::Msg("DriverError(CUDA_ERROR_UNKNOWN)".into()).bt())
    }

    #[test]
    fn plans() {
        assert_eq!(plan_device("cpu", true).unwrap(), DevicePlan::Cpu);
        assert_eq!(plan_device("auto", false).unwrap(), DevicePlan::Cpu);
        assert_eq!(plan_device("auto", true).unwrap(), DevicePlan::CudaOrCpu);
        assert_eq!(plan_device("cuda:1", true).unwrap(), DevicePlan::Cuda(1));
        let e = plan_device("cuda:0", false).unwrap_err().to_string();
        assert!(e.contains("cuda:0") && e.contains("no CUDA support"), "{e}");
        for bad in ["gpu", "cuda", "cuda:x", "CPU"] {
            assert!(plan_device(bad, true).is_err(), "{bad}");
            assert!(check_device_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cluster_jobs_ask_for_a_gpu_by_device() {
        let r = device_resources("cuda:1");
        assert_eq!((r.gpus, r.gpus_if_available), (Some(1), None));
        let r = device_resources("auto");
        assert_eq!((r.gpus, r.gpus_if_available), (None, Some(1)));
        for cpu in ["cpu", "cuda:x"] {
            assert_eq!(device_resources(cpu), Resources::default(), "{cpu}");
        }
    }

    #[test]
    fn auto_falls_back_to_the_cpu_without_a_usable_gpu() {
        // A CUDA build on a machine without a GPU: opening one fails.
        assert!(matches!(
            select_device_with("auto", true, no_gpu).unwrap(),
            Device::Cpu
        ));
        assert!(matches!(
            select_device_with("auto", false, |_| panic!("no CUDA in this build")).unwrap(),
            Device::Cpu
        ));
        // An explicit GPU is never replaced by the CPU: the error names it,
        // without candle's backtrace.
        let e = select_device_with("cuda:0", true, no_gpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("device `cuda:0`: cannot open CUDA GPU 0")
                && e.contains("CUDA_ERROR_UNKNOWN"),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
        // A GPU that opens is used.
        let opened = std::cell::Cell::new(None);
        select_device_with("cuda:2", true, |n| {
            opened.set(Some(n));
            Ok(Device::Cpu)
        })
        .unwrap();
        assert_eq!(opened.get(), Some(2));
    }

    #[test]
    fn a_cpu_build_says_how_to_get_cuda() {
        if candle_core::utils::cuda_is_available() {
            return;
        }
        let e = select_device("cuda:0").unwrap_err().to_string();
        assert!(e.contains("make build-cuda"), "{e}");
        assert!(matches!(select_device("auto").unwrap(), Device::Cpu));
    }
}
