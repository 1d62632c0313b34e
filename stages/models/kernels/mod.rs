//! CPU kernels the models use in place of candle's slower generic paths, as
//! candle custom ops with their own backward. Each falls back to candle's op on
//! other devices (CUDA keeps candle's kernels) and when switched off, so the
//! reference path stays testable.

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
