//! Planning and running: decide for each stage whether it is cached, can be
//! restored from the store, or must run (and say why), then run the stale ones
//! and commit their outputs atomically.
//!
//! The decision for a stage needs its upstreams' output digests, so `plan`
//! (for `status` and `--dry-run`) marks everything below a stale stage as
//! "would run", while `run` decides each stage only after its upstreams are
//! done: a stage that re-runs but writes the same bytes leaves its downstream
//! cached (early cut-off).
//!
//! Commit order, chosen so that a crash or kill at any point leaves the
//! previous state usable: stage writes into a private staging folder ->
//! outputs hashed -> blobs uploaded -> manifest uploaded -> run record
//! (fingerprint -> output) written -> staging folder swapped into
//! `out/STAGE` -> lock file rewritten.
//!
//! One file per job, all of them `impl Engine` blocks over the state held
//! here:
//! - `plan`: fingerprints, the decision for one stage (and why it is stale),
//!   and `plan` itself;
//! - `external`: resolving and hashing a stage's external inputs;
//! - `schedule`: `run`, deciding stages as their upstreams finish and running
//!   up to `-j` of them on worker threads; `failures` is its bookkeeping of
//!   what failed and what that blocks (`--keep-going`);
//! - `workspace`: the folders a stage runs in (staging, scratch, its previous
//!   output) and the one constructor of its `StageContext`;
//! - `commit`: hashing, storing, publishing and recording a finished stage;
//! - `restore`: writing a stored output into `out/STAGE` (`checkout`);
//! - `verify`: `verify --rerun`;
//! - `worker`: `run-stage`, one stage on a cluster worker.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::artifacts::Artifacts;
use crate::config::Pipeline;
use crate::context::Progress;
use crate::dag;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::filecache::FileHashCache;
use crate::lockfile::LockFile;
use crate::manifest::Manifest;
use crate::registry::Registry;
use crate::runlock::RunLock;
use crate::store::{BlobStore, ObjectBlobStore};
use crate::sync::Remote;

mod commit;
mod external;
mod failures;
mod plan;
mod restore;
mod schedule;
mod verify;
mod worker;
mod workspace;

pub use verify::RerunOutcome;
pub use worker::{Work, WorkerOutcome};

/// What happened, or would happen, to a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Up to date: nothing to do.
    Cached,
    /// Its result is in the store; only the output folder needs writing.
    WouldRestore,
    WouldRun,
    Restored,
    Ran,
    /// It ran, or was being decided, and failed: nothing of it was committed.
    Failed,
    /// Not run because an upstream failed (`run --keep-going`).
    Skipped,
}

impl State {
    pub fn label(self) -> &'static str {
        match self {
            State::Cached => "cached",
            State::WouldRestore => "would restore",
            State::WouldRun => "would run",
            State::Restored => "restored",
            State::Ran => "ran",
            State::Failed => "FAILED",
            State::Skipped => "skipped",
        }
    }
}

/// One line of `run` / `status` output.
#[derive(Clone, Debug, Serialize)]
pub struct StageOutcome {
    pub stage: String,
    pub kind: String,
    pub state: State,
    pub reasons: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Digest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Digest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    pub seconds: f64,
}

impl StageOutcome {
    pub fn line(&self) -> String {
        let mut s = format!("{:<8} {}", self.state.label(), self.stage);
        if !self.reasons.is_empty() {
            s.push_str(": ");
            s.push_str(&self.reasons.join("; "));
        }
        if let Some(summary) = &self.summary {
            s.push_str(&format!(" -> {summary}"));
        }
        if self.state == State::Ran || self.state == State::Restored {
            s.push_str(&format!(" ({:.1}s)", self.seconds));
        }
        s
    }
}

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Stages to bring up to date (with their upstreams); empty = all.
    pub targets: Vec<String>,
    /// Re-run the targets even when cached (their upstreams stay cached).
    pub force: bool,
    pub dry_run: bool,
    /// Wait for another run holding the store lock (default) or fail at once.
    pub wait: bool,
    /// Stages run at once when independent (`-j`); 0 and 1 both mean one.
    pub jobs: usize,
    /// Only restore from the store; a stage that would run is an error (the
    /// pass after a cluster ran the stages).
    pub restore_only: bool,
    /// After a failure, go on with every stage that does not depend on a
    /// failed one, then report every failure (`--keep-going`, as DVC's).
    /// Without it, nothing new starts after the first failure.
    pub keep_going: bool,
}

impl RunOptions {
    /// `--force` re-runs the named stages, or every stage when none is named.
    pub fn forces(&self, stage: &str) -> bool {
        self.force && (self.targets.is_empty() || self.targets.iter().any(|t| t == stage))
    }
}

/// A stage's committed output: its digest and file list.
#[derive(Clone)]
struct Output {
    digest: Digest,
    manifest: Manifest,
}

/// The pipeline's store, with its remote behind it when it has one: what
/// commands that only read or write records need (`exp show`), without an
/// engine's lock file and file hash cache.
pub fn open_artifacts(pipeline: &Pipeline, progress: &Progress) -> Result<Artifacts> {
    let store = ObjectBlobStore::open(&pipeline.store_url, &pipeline.base_dir)?;
    artifacts_over(pipeline, Arc::new(store), progress)
}

fn artifacts_over(
    pipeline: &Pipeline,
    store: Arc<dyn BlobStore>,
    progress: &Progress,
) -> Result<Artifacts> {
    let mut artifacts = Artifacts::new(store);
    if let Some(remote) = &pipeline.remote {
        let store = ObjectBlobStore::open_remote(remote, &pipeline.base_dir)?;
        artifacts = artifacts.with_remote(
            Remote {
                store,
                read_only: remote.read_only,
            },
            progress.clone(),
        );
    }
    Ok(artifacts)
}

pub struct Engine<'r> {
    pub pipeline: Pipeline,
    registry: &'r Registry,
    artifacts: Artifacts,
    cache: FileHashCache,
    lock: LockFile,
    progress: Progress,
}

impl<'r> Engine<'r> {
    pub fn open(pipeline: Pipeline, registry: &'r Registry, progress: Progress) -> Result<Self> {
        let store = ObjectBlobStore::open(&pipeline.store_url, &pipeline.base_dir)?;
        Self::with_store(pipeline, registry, Arc::new(store), progress)
    }

    pub fn with_store(
        pipeline: Pipeline,
        registry: &'r Registry,
        store: Arc<dyn BlobStore>,
        progress: Progress,
    ) -> Result<Self> {
        let lock = LockFile::load(&pipeline.lock_path())?;
        let cache = FileHashCache::load(&pipeline.state_dir().join("filecache"));
        let artifacts = artifacts_over(&pipeline, store, &progress)?;
        Ok(Engine {
            pipeline,
            registry,
            artifacts,
            cache,
            lock,
            progress,
        })
    }

    pub fn artifacts(&self) -> &Artifacts {
        &self.artifacts
    }

    pub fn lock_file(&self) -> &LockFile {
        &self.lock
    }

    /// The store-wide run lock: in the store folder for a local store, else
    /// in the pipeline's state folder.
    pub fn run_lock(&self, wait: bool) -> Result<RunLock> {
        let path = match self.artifacts.store().local_root() {
            Some(root) => root.join(".melanoflow-run.lock"),
            None => self.pipeline.state_dir().join("run.lock"),
        };
        RunLock::acquire(&path, wait)
    }

    fn selected(&self, targets: &[String]) -> Result<Vec<usize>> {
        let keep =
            dag::select(&self.pipeline.stages, targets).map_err(|name| Error::UnknownStage {
                name,
                known: self
                    .pipeline
                    .stages
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        Ok((0..self.pipeline.stages.len())
            .filter(|&i| keep.contains(self.pipeline.stages[i].name.as_str()))
            .collect())
    }

    /// The manifest of a folder (hashing only what changed), or `None` when
    /// it does not exist.
    fn dir_manifest(&mut self, dir: &Path) -> Result<Option<Manifest>> {
        if !dir.is_dir() {
            return Ok(None);
        }
        self.cache
            .manifest_of_dir(dir, &|_| {})
            .map(Some)
            .map_err(|e| Error::io(dir, e))
    }

    fn save_cache(&mut self) {
        if let Err(e) = self.cache.save() {
            tracing::warn!("could not save the file hash cache: {e}");
        }
    }

    /// Files the file hash cache had to read this session (for `-v` and tests).
    pub fn files_hashed(&self) -> usize {
        self.cache.hashed
    }
}

#[cfg(test)]
mod tests;
