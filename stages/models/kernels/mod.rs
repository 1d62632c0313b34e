//! CPU kernels the models use in place of candle's slower generic paths, as
//! candle custom ops with their own backward. Each falls back to candle's op on
//! other devices (CUDA keeps candle's kernels) and when switched off, so the
//! reference path stays testable.

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
pub mod conv;
mod cpu;
pub mod depthwise;
pub mod pointwise;
#[cfg(test)]
mod testing;

use std::sync::atomic::{AtomicBool, Ordering};

static FAST_KERNELS: AtomicBool = AtomicBool::new(true);

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
