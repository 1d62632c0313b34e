//! CPU kernels the models use in place of candle's slower generic paths, as
//! candle custom ops with their own backward. Each falls back to candle's op on
//! other devices (CUDA keeps candle's kernels) and when switched off, so the
//! reference path stays testable.

pub mod depthwise;
