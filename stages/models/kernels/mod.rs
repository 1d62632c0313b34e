//! Kernels the models use in place of candle's slower generic paths, and the
//! one place that picks, per call, which implementation runs ([`path`]):
//!
//! * CPU tensors (F32, [`fast_kernels_enabled`]): this folder's CPU kernels,
//!   candle custom ops with their own backward (`conv`, `depthwise`,
//!   `pointwise`, `batchnorm`, `bias`).
//! * CUDA tensors: `gpu`'s formulations, built only from ops that are fast on
//!   candle's CUDA backend (see its header), unless the environment variable
//!   `MELANOFLOW_GPU_OPS=candle` or [`set_gpu_formulations`]`(false)` asks for
//!   candle's own ops.
//! * Anything else (Metal, F64 on CPU, a switch off): candle's ops, the
//!   reference the kernels and formulations are tested against.
//! * Half precision (BF16, F16) on the CPU ([`half_on_cpu`]): each kernel
//!   computes in F32 from the half-precision values (on the CPU kernels, or
//!   candle's F32 ops with the switch off) and rounds its result to the
//!   input's dtype. candle 0.11's CPU backend has no half-precision matmul,
//!   so no half-precision `conv2d` (im2col + matmul) either; and F32
//!   arithmetic rounded once at the end is what a GPU's BF16 GEMM does.
//!
//! Only CUDA calls ever take the formulations outside tests, so a CPU run's
//! bytes do not depend on them.

/// Defines `$name(args)` that runs `$impl::<true, ..>` compiled for AVX2+FMA
/// when the CPU has both, else `$impl::<false, ..>` for the baseline target.
/// The `act` form adds the activation as a const parameter `ACT`.
macro_rules! dispatch {
    ($name:ident, $wide:ident, $impl:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $wide($($arg: $ty),*) {
            $impl::<true>($($arg),*)
        }

        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports the features `$wide` is compiled for.
                return unsafe { $wide($($arg),*) };
            }
            // aarch64 has FMA in its baseline; other targets keep mul + add.
            $impl::<{ cfg!(target_arch = "aarch64") }>($($arg),*)
        }
    };
    ($name:ident, $wide:ident, $impl:ident, act, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $wide<const ACT: u8>($($arg: $ty),*) {
            $impl::<true, ACT>($($arg),*)
        }

        fn $name<const ACT: u8>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports the features `$wide` is compiled for.
                return unsafe { $wide::<ACT>($($arg),*) };
            }
            $impl::<{ cfg!(target_arch = "aarch64") }, ACT>($($arg),*)
        }
    };
}

pub mod batchnorm;
pub mod bias;
pub mod conv;
mod cpu;
pub mod depthwise;
pub(crate) mod gpu;
pub mod pointwise;
#[cfg(test)]
pub(crate) mod testing;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use candle_core::{DType, Tensor};

static FAST_KERNELS: AtomicBool = AtomicBool::new(true);

/// Which implementation a kernel call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// This folder's CPU kernels.
    Cpu,
    /// `gpu`'s formulations (CUDA tensors; CPU tensors only in tests).
    Formulation,
    /// candle's own ops.
    Candle,
    /// Half precision on the CPU ([`half_on_cpu`]): the same call on the
    /// arguments widened to F32, its result rounded to the input's dtype.
    Widened,
}

/// The implementation for a call on `ts` (its tensor arguments): the one
/// decision every kernel's public function defers to.
pub(crate) fn path(ts: &[&Tensor]) -> Path {
    if half_on_cpu(ts) {
        return Path::Widened;
    }
    let all = |f: fn(&Tensor) -> bool| ts.iter().all(|t| f(t));
    #[cfg(test)]
    if FORMULATIONS_ON_CPU.with(|f| f.get()) && all(|t| t.device().is_cpu()) {
        return Path::Formulation;
    }
    if fast_kernels_enabled() && all(|t| t.device().is_cpu() && t.dtype() == DType::F32) {
        Path::Cpu
    } else if gpu_formulations_enabled() && all(|t| t.device().is_cuda()) {
        Path::Formulation
    } else {
        Path::Candle
    }
}

/// Whether a kernel call on `ts` is half precision (some tensor BF16 or F16)
/// on the CPU, and so computes in F32 and rounds its result back (see the
/// module header). Checked before every other path: candle's CPU ops and
/// the GPU formulations (which are made of them) lack half-precision matmul.
pub(crate) fn half_on_cpu(ts: &[&Tensor]) -> bool {
    ts.iter()
        .any(|t| t.dtype() != accumulation_dtype(t.dtype()))
        && ts.iter().all(|t| t.device().is_cpu())
}

/// The dtype that sums and statistics of `dtype` values are computed in:
/// F32 for half precision (BF16, F16; candle's reductions add in the
/// tensor's own dtype, on CUDA too), else `dtype` itself.
pub fn accumulation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// `t` in [`accumulation_dtype`]: the same tensor unless it is half
/// precision, else a differentiable F32 copy.
pub fn widen(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(accumulation_dtype(t.dtype()))
}

/// [`set_gpu_formulations`]' state: unset (read the environment), on, off.
static GPU_FORMULATIONS: AtomicU8 = AtomicU8::new(UNSET);
const UNSET: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;

/// Turns the GPU formulations on or off (process-wide). Off, CUDA tensors go
/// through candle's own ops. The default is on, unless the environment
/// variable `MELANOFLOW_GPU_OPS` is `candle`.
pub fn set_gpu_formulations(enabled: bool) {
    GPU_FORMULATIONS.store(if enabled { ON } else { OFF }, Ordering::Relaxed);
}

/// Whether CUDA tensors take `gpu`'s formulations (see [`set_gpu_formulations`]).
pub fn gpu_formulations_enabled() -> bool {
    match GPU_FORMULATIONS.load(Ordering::Relaxed) {
        UNSET => {
            let on = match std::env::var("MELANOFLOW_GPU_OPS").as_deref() {
                Ok("candle") => false,
                Ok("") | Ok("fast") | Err(_) => true,
                Ok(other) => {
                    eprintln!(
                        "warning: MELANOFLOW_GPU_OPS={other:?} is neither \"fast\" nor \"candle\"; using \"fast\""
                    );
                    true
                }
            };
            // A racing `set_gpu_formulations` wins over the environment.
            let _ = GPU_FORMULATIONS.compare_exchange(
                UNSET,
                if on { ON } else { OFF },
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            GPU_FORMULATIONS.load(Ordering::Relaxed) == ON
        }
        state => state == ON,
    }
}

#[cfg(test)]
thread_local! {
    /// Set by tests (per thread, so other tests never see it): CPU tensors
    /// take the GPU formulations, which is how they are tested without a GPU.
    static FORMULATIONS_ON_CPU: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While the returned guard lives, kernel calls made on this thread with CPU
/// tensors take the GPU formulations, as CUDA tensors would.
#[cfg(test)]
pub(crate) fn formulations_on_cpu() -> impl Drop {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            FORMULATIONS_ON_CPU.with(|f| f.set(self.0));
        }
    }
    Reset(FORMULATIONS_ON_CPU.with(|f| f.replace(true)))
}

/// Turns the fast CPU kernels on or off (process-wide; default on). When off,
/// every kernel here computes with candle's own ops, the reference.
pub fn set_fast_kernels(enabled: bool) {
    FAST_KERNELS.store(enabled, Ordering::Relaxed);
}

/// Whether the kernels take their fast CPU paths (where device and dtype allow).
pub fn fast_kernels_enabled() -> bool {
    FAST_KERNELS.load(Ordering::Relaxed)
}

/// Tests that assume the switch is on hold this shared; tests that flip it
/// hold it exclusively, so parallel tests of every kernel never see it off.
#[cfg(test)]
static SWITCH: std::sync::RwLock<()> = std::sync::RwLock::new(());
