//! melanoflow's stages: one module per stage kind, registered with the engine
//! by [`registry`]. Stages depend on the engine (`melanoflow-pipeline`) and on
//! the Parquet schemas (`melanoflow-schemas`), never the other way round.

pub mod code_identity;
pub mod evaluate;
pub mod exp_report;
pub mod fidelity;
pub mod generate;
pub mod gpu_check;
pub mod imageset;
pub mod ingest;
pub mod metrics;
pub mod models;
pub mod preprocess;
pub mod synth;
pub mod train_classifier;
pub mod train_cyclegan;
pub mod weights;

use melanoflow_pipeline::Registry;

/// Every stage kind this build knows.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(synth::Synth)
        .register(ingest::Ingest)
        .register(preprocess::Preprocess)
        .register(train_cyclegan::TrainCycleGan)
        .register(generate::Generate)
        .register(train_classifier::TrainClassifier)
        .register(fidelity::Fidelity)
        .register(evaluate::Evaluate)
        .set_results(evaluate::results::EvaluateResults);
    r
}

/// Keeps freed memory in the process instead of returning it to the kernel
/// after every tensor: candle allocates a fresh buffer per op, and with
/// glibc's defaults (buffers above a few MB are mmap-ed and unmapped on free)
/// a training step spent a third of its time in page faults zeroing new pages.
/// Same effect as `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...`. No-op on
/// other C libraries.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before threads start allocating heavily.
    unsafe {
        // 32 MiB is glibc's maximum on 64-bit (a larger value is rejected).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
