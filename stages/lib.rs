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
pub mod import;
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
        .register(import::Import)
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

/// Runs candle's elementwise ops on the calling thread unless the user set
/// `CANDLE_NUM_THREADS`. candle 0.11 parallelises large elementwise ops on a
/// pool of its own whose threads spin-wait (up to ~25,000 pauses) beside
/// rayon's, which runs melanoflow's kernels: on 2 cores the two pools fought
/// for the CPU, and a CycleGAN step spent ~30% of its samples spinning in
/// candle's barrier (`BarrierGuard::drop`), far more under `-j 2` or any
/// other load. The heavy elementwise work (norms, activations, Adam) runs in
/// melanoflow's rayon kernels, so what is left for candle is cheap. Call
/// first thing in `main`, before any thread starts.
pub fn tune_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called at the start of `main`, before other threads exist.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
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
