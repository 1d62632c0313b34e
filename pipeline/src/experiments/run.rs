//! `exp run`: each planned experiment runs with its overrides into its own
//! folder (see the module above), then its record is written.
//!
//! Locally the experiments run one after another, each with the engine's
//! `-j`: a stage the first one ran is in the store when the next one reaches
//! it, so it is restored there, not run again. On Slurm every experiment is
//! planned first and all their jobs are submitted as one batch, a stage
//! shared by several experiments (same name, parameters and upstreams, all
//! the way up) as one job that all their downstream jobs wait for; then each
//! experiment's restore-only pass writes its folders and lock file.

use std::collections::BTreeMap;
use std::path::Path;

use super::sweep::Planned;
use super::{ExperimentRecord, Metric};
use crate::config::{self, Override, Pipeline};
use crate::context::Progress;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fingerprint::canonical_json;
use crate::registry::Registry;
use crate::runner::{Engine, RunOptions, StageOutcome};
use crate::slurm::{Batch, WorkerCommand};

/// How the experiments are run.
pub struct ExpRunOptions<'a> {
    /// The pipeline file.
    pub file: &'a Path,
    pub registry: &'a Registry,
    pub run: RunOptions,
    pub remote_read_only: bool,
    pub progress: Progress,
    /// Set for `--executor slurm`: how a job calls this binary, less the
    /// `--set`s (each experiment adds its own).
    pub slurm: Option<WorkerCommand>,
}

/// Loads the pipeline for one experiment: the file with its overrides,
/// pointed at the experiment's lock file and folders.
pub fn experiment_pipeline(
    file: &Path,
    registry: &Registry,
    name: &str,
    overrides: &[Override],
    remote_read_only: bool,
) -> Result<Pipeline> {
    let mut pipeline = config::load(file, registry, overrides)?;
    if let Some(remote) = pipeline.remote.as_mut() {
        remote.read_only |= remote_read_only;
    }
    super::redirect(&mut pipeline, name);
    Ok(pipeline)
}

/// Runs every planned experiment; `on_stage` gets each stage line with its
/// experiment's name, `on_line` each Slurm job event. Returns the records.
pub fn run(
    opts: &ExpRunOptions,
    planned: &[Planned],
    on_stage: &mut dyn FnMut(&str, &StageOutcome),
    on_line: &mut dyn FnMut(&str),
) -> Result<Vec<ExperimentRecord>> {
    let mut engines = Vec::new();
    for p in planned {
        let pipeline = experiment_pipeline(
            opts.file,
            opts.registry,
            &p.name,
            &p.overrides,
            opts.remote_read_only,
        )?;
        engines.push(Engine::open(
            pipeline,
            opts.registry,
            opts.progress.clone(),
        )?);
    }
    if let Some(worker) = &opts.slurm {
        submit_and_follow(opts, planned, &mut engines, worker, on_line)?;
    }
    let mut records = Vec::new();
    for (p, engine) in planned.iter().zip(&mut engines) {
        let run = RunOptions {
            restore_only: opts.slurm.is_some(),
            jobs: if opts.slurm.is_some() {
                1
            } else {
                opts.run.jobs
            },
            ..opts.run.clone()
        };
        let outcomes = engine.run(&run, &mut |o| on_stage(&p.name, o))?;
        records.push(finish(opts.registry, engine, p, &outcomes)?);
    }
    Ok(records)
}

/// Plans every experiment and submits their jobs as one batch.
fn submit_and_follow(
    opts: &ExpRunOptions,
    planned: &[Planned],
    engines: &mut [Engine],
    worker: &WorkerCommand,
    on_line: &mut dyn FnMut(&str),
) -> Result<()> {
    if opts.run.keep_going {
        return Err(Error::Experiment(
            "--keep-going is not supported for experiments on Slurm".into(),
        ));
    }
    let mut batch = Batch::default();
    for (p, engine) in planned.iter().zip(engines.iter_mut()) {
        let plan = engine.plan(&opts.run)?;
        let keys = declaration_keys(&engine.pipeline);
        let mut worker = worker.clone();
        // Its own `--set`s, and its own folders: a worker restores the
        // stage's upstream outputs into the experiment's `out/`, never the
        // workspace's or another experiment's.
        worker
            .global_args
            .extend(p.overrides.iter().map(|o| format!("--set={o}")));
        worker.global_args.push(format!("--experiment={}", p.name));
        let log_dir = super::experiment_dir(&engine.pipeline, &p.name).join("slurm");
        let key = |stage: &str| keys[stage].clone();
        batch.submit_keyed(engine, &opts.run, &worker, &plan, &log_dir, &key, on_line)?;
    }
    let cfg = engines[0].pipeline.executor.clone();
    let failed = batch.follow(&cfg, on_line)?;
    batch.check(&failed)
}

/// A key per stage that is equal in two experiments exactly when the stage
/// and all its upstreams have the same kind and parameters there: such a
/// stage computes the same thing, so one job serves both.
fn declaration_keys(pipeline: &Pipeline) -> BTreeMap<String, String> {
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    // Stages are in topological order: upstream keys are known first.
    for s in &pipeline.stages {
        let upstream: Vec<&str> = s.inputs.iter().map(|n| keys[n].as_str()).collect();
        let text = format!(
            "{}\n{}\n{}\n{}",
            s.name,
            s.kind,
            canonical_json(&s.params.canonical),
            upstream.join(",")
        );
        keys.insert(s.name.clone(), Digest::of_bytes(text.as_bytes()).to_hex());
    }
    keys
}

/// Reads the metrics and writes the record of an experiment that ran.
fn finish(
    registry: &Registry,
    engine: &Engine,
    planned: &Planned,
    outcomes: &[StageOutcome],
) -> Result<ExperimentRecord> {
    let pipeline = &engine.pipeline;
    let metrics: Vec<Metric> = match registry.results() {
        Some(reader) => reader.metrics(pipeline, &pipeline.out_dir).map_err(|e| {
            Error::Experiment(format!(
                "experiment `{}`: reading its metrics: {e}",
                planned.name
            ))
        })?,
        None => Vec::new(),
    };
    let record = ExperimentRecord {
        name: planned.name.clone(),
        pipeline: pipeline
            .file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        overrides: planned.overrides.iter().map(|o| o.to_string()).collect(),
        git_revision: super::git_revision(&pipeline.base_dir),
        lock: crate::lockfile::LockFile::load(&pipeline.lock_path())?,
        metrics,
        stages: outcomes
            .iter()
            .map(|o| (o.stage.clone(), o.state.label().to_string()))
            .collect(),
    };
    super::save(pipeline, engine.artifacts(), &record)?;
    Ok(record)
}
