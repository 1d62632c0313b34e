//! melanoflow's stages: one module per stage kind, registered with the engine
//! by [`registry`]. Stages depend on the engine (`melanoflow-pipeline`) and on
//! the Parquet schemas (`melanoflow-schemas`), never the other way round.

pub mod evaluate;
pub mod generate;
pub mod imageset;
pub mod ingest;
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
    r.register(synth::Synth).register(ingest::Ingest).register(preprocess::Preprocess)
        .register(train_cyclegan::TrainCycleGan)
        .register(generate::Generate)
        .register(train_classifier::TrainClassifier)
        .register(evaluate::Evaluate);
    r
}
