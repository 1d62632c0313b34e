//! Mixed precision: the `precision` parameter of `train_cyclegan`, `generate`
//! and `train_classifier`, and what each value does to the models.
//!
//! * `f32`: every tensor, matmul and convolution in F32.
//! * `tf32`: F32 tensors; on CUDA, cuBLAS may round matmul (and so im2col
//!   convolution) inputs to TF32 (a 10-bit mantissa) and accumulate in F32
//!   (`candle_core::cuda::set_gemm_reduced_precision_f32`). The CPU has no
//!   TF32: there `tf32` computes exactly as `f32`, with a one-line notice.
//! * `bf16`: activations, convolutions and matmuls in BF16, with F32 master
//!   weights. The variables stay F32; each layer casts its weight to its
//!   input's dtype in the forward pass ([`in_dtype_of`]), so gradients flow
//!   back through the cast and reach the variables, and Adam's moments, in
//!   F32. Kept in F32 whatever the input's dtype: losses
//!   (`layers::mse`, `layers::l1`, the classifier's BCE), BatchNorm and
//!   instance-norm statistics (the batch's and the running ones), bias
//!   additions (a bias gradient sums N·H·W values), EfficientNet's global
//!   pooling, squeeze-excitation and classifier, and depthwise convolutions
//!   (see `kernels::depthwise`). candle's reductions add in the tensor's own
//!   dtype (on CUDA too), so each of those would otherwise be a long BF16
//!   sum.
//! * `auto` (the default): `bf16` on CUDA, `f32` on the CPU, resolved by the
//!   device the stage runs on ([`Precision::resolve`]); the stages record the
//!   resolved value in their JSON output.
//!
//! A model runs in BF16 when its input is BF16: `Generator`, `Discriminator`
//! and `EfficientNet` compute in their input's dtype (EfficientNet's logits
//! and features are F32), so a caller casts the images with
//! [`Precision::compute_dtype`] and nothing else changes. In F32 every cast
//! is a no-op, so `f32` computes the same bytes as before the parameter
//! existed.
//!
//! On the CPU, candle 0.11 has no BF16 matmul (so no BF16 `conv2d`, which is
//! im2col + matmul) and melanoflow's CPU kernels are F32: a BF16 call there
//! computes in F32 from the BF16 values and rounds its result to BF16
//! (`kernels::half_on_cpu`). That is what a GPU's BF16 GEMM does (F32
//! accumulation, one rounding of the output), so a CPU `bf16` run is a
//! faithful emulation of the GPU's arithmetic, not a faster one.

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

/// The `precision` parameter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// `bf16` on CUDA, `f32` elsewhere.
    #[default]
    Auto,
    F32,
    Tf32,
    Bf16,
}

impl Precision {
    /// For `#[serde(skip_serializing_if)]`: the default is left out of the
    /// stage's canonical parameters, so pipelines that never set `precision`
    /// keep their parameter JSON (and lock entries) as they were.
    pub fn is_auto(&self) -> bool {
        *self == Precision::Auto
    }

    /// `auto` made concrete for `device`: `bf16` on CUDA, `f32` elsewhere.
    pub fn resolve(self, device: &Device) -> Precision {
        match self {
            Precision::Auto if device.is_cuda() => Precision::Bf16,
            Precision::Auto => Precision::F32,
            p => p,
        }
    }

    /// The dtype activations compute in (call on a resolved precision).
    pub fn compute_dtype(self) -> DType {
        match self {
            Precision::Bf16 => DType::BF16,
            _ => DType::F32,
        }
    }

    /// The name as the pipeline file spells it.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }

    /// Resolves `self` for `device` and applies what is process-wide: TF32
    /// matmuls on CUDA while the returned guard lives. candle's switch is
    /// global, so while any `tf32` stage runs on a GPU, every F32 matmul of
    /// the process may use TF32 (stages run beside each other under
    /// `run -j N`); the guards count their holders, and the last one out
    /// turns TF32 off again.
    pub fn enter(self, device: &Device) -> (Precision, Tf32Guard) {
        let resolved = self.resolve(device);
        if resolved == Precision::Tf32 && !device.is_cuda() {
            static NOTICE: std::sync::Once = std::sync::Once::new();
            NOTICE.call_once(|| {
                tracing::info!("precision \"tf32\" on the CPU computes exactly as \"f32\" (TF32 is a GPU matmul mode)");
            });
        }
        let on = resolved == Precision::Tf32 && device.is_cuda();
        (resolved, Tf32Guard::new(on))
    }
}

/// How many live guards asked for TF32.
static TF32_HOLDERS: Mutex<usize> = Mutex::new(0);

/// Whether some live [`Tf32Guard`] holds cuBLAS's TF32 mode on.
pub fn tf32_held() -> bool {
    *TF32_HOLDERS.lock().unwrap_or_else(|e| e.into_inner()) > 0
}

/// Keeps cuBLAS's TF32 mode on while alive (when it was asked for); see
/// [`Precision::enter`].
#[must_use = "TF32 is turned off again when the guard drops"]
pub struct Tf32Guard {
    on: bool,
}

impl Tf32Guard {
    fn new(on: bool) -> Tf32Guard {
        if on {
            let mut n = TF32_HOLDERS.lock().unwrap_or_else(|e| e.into_inner());
            *n += 1;
            #[cfg(feature = "cuda")]
            candle_core::cuda::set_gemm_reduced_precision_f32(true);
        }
        Tf32Guard { on }
    }
}

impl Drop for Tf32Guard {
    fn drop(&mut self) {
        if self.on {
            let mut n = TF32_HOLDERS.lock().unwrap_or_else(|e| e.into_inner());
            *n -= 1;
            #[cfg(feature = "cuda")]
            {
                if *n == 0 {
                    candle_core::cuda::set_gemm_reduced_precision_f32(false);
                }
            }
        }
    }
}

/// `w` (a parameter, F32) in the dtype of the activations `x` it meets: the
/// same tensor when the dtypes agree, else a rounded copy whose gradient flows
/// back, converted, to `w`.
pub fn in_dtype_of(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    w.to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_resolves_by_device_and_names_round_trip() {
        assert_eq!(Precision::Auto.resolve(&Device::Cpu), Precision::F32);
        assert_eq!(Precision::Bf16.resolve(&Device::Cpu), Precision::Bf16);
        assert_eq!(Precision::Bf16.compute_dtype(), DType::BF16);
        assert_eq!(Precision::Tf32.compute_dtype(), DType::F32);
        for p in [
            Precision::Auto,
            Precision::F32,
            Precision::Tf32,
            Precision::Bf16,
        ] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.name());
        }
    }

    /// The only test that takes guards, so no other test sees the count move.
    #[test]
    fn tf32_is_held_on_cuda_only_until_the_last_guard_drops() {
        let (p, guard) = Precision::Tf32.enter(&Device::Cpu);
        assert_eq!(p, Precision::Tf32);
        assert!(!tf32_held(), "no TF32 on the CPU");
        drop(guard);
        // What `enter` does on a GPU (none is needed to count guards).
        let (a, b) = (Tf32Guard::new(true), Tf32Guard::new(true));
        assert!(tf32_held());
        drop(a);
        assert!(tf32_held(), "a second tf32 stage still runs");
        drop(b);
        assert!(!tf32_held());
    }
}
