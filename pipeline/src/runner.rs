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

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use indicatif::ProgressBar;
use serde::Serialize;

use crate::artifacts::{ArtifactError, Artifacts, RunRecord};
use crate::config::{Pipeline, StageDecl};
use crate::context::{ExternalFiles, Progress, StageContext, StageReport, Upstream};
use crate::dag;
use crate::digest::Digest;
use crate::error::{Error, Result, Skipped, StageFailure};
use crate::filecache::FileHashCache;
use crate::fingerprint::{CACHE_VERSION, FingerprintInputs, changed_params, fingerprint};
use crate::fsutil;
use crate::lockfile::{LockEntry, LockFile, params_to_json, params_to_toml};
use crate::manifest::{Entry, Manifest};
use crate::registry::{BoxError, Registry, Source, short_code};
use crate::remote;
use crate::runlock::RunLock;
use crate::store::{BlobStore, ObjectBlobStore};
use crate::sync::Remote;

mod worker;
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

/// What `verify --rerun` found for one stage.
#[derive(Clone, Debug, Serialize)]
pub struct RerunOutcome {
    pub stage: String,
    /// The output digest the lock file records.
    pub locked: Digest,
    /// The digest of the output the re-run wrote.
    pub rerun: Digest,
    /// Which files differ (empty when the digests match).
    pub differences: Option<String>,
    pub seconds: f64,
}

impl RerunOutcome {
    pub fn reproduced(&self) -> bool {
        self.locked == self.rerun
    }

    pub fn line(&self) -> String {
        match &self.differences {
            None => format!(
                "reproduced {} ({}, {:.1}s)",
                self.stage,
                self.rerun.short(),
                self.seconds
            ),
            Some(d) => format!(
                "DIFFERS    {}: lock {} vs re-run {}: {d}",
                self.stage,
                self.locked.short(),
                self.rerun.short()
            ),
        }
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

/// A stage decided to run, with everything it runs with and everything its
/// commit needs.
struct Launch {
    i: usize,
    fp: Digest,
    reasons: Vec<String>,
    upstream: Vec<(String, Digest)>,
    external: Option<Manifest>,
    ctx: StageContext,
    started: Instant,
}

/// A stage that is done, for the lock file and the outcome line.
struct Finished {
    i: usize,
    fp: Digest,
    state: State,
    reasons: Vec<String>,
    upstream: Vec<(String, Digest)>,
    external: Option<Manifest>,
    summary: Option<String>,
    started: Instant,
}

enum Step {
    Done(StageOutcome, Output),
    Launch(Box<Launch>),
}

/// Runs a stage's work, turning a panic into its error: a panicking stage
/// fails like any other instead of taking the scheduler down.
fn run_catching_panics(
    f: impl FnOnce() -> std::result::Result<StageReport, BoxError>,
) -> std::result::Result<StageReport, BoxError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(format!("panicked: {message}").into())
    })
}

/// What failed in one scheduling pass.
#[derive(Default)]
struct Failures {
    keep_going: bool,
    /// Without keep-going: the first error; nothing new starts after it.
    first: Option<Error>,
    /// With keep-going: every failed stage, and every stage skipped because
    /// of one.
    failed: Vec<StageFailure>,
    skipped: Vec<Skipped>,
    /// Failed or skipped stage -> the failed stage that blocks it.
    blocked: BTreeMap<String, String>,
}

impl Failures {
    /// Whether nothing new may start.
    fn stop(&self) -> bool {
        self.first.is_some()
    }

    /// Stage `i` failed: says so, then either stops new stages or (keep-going)
    /// takes its dependants, direct or not, out of `waiting` as skipped.
    fn add(
        &mut self,
        stages: &[StageDecl],
        i: usize,
        error: Error,
        started: Instant,
        waiting: &mut Vec<usize>,
        done: &mut dyn FnMut(StageOutcome),
    ) {
        let outcome = |decl: &StageDecl, state, why: String, seconds| StageOutcome {
            stage: decl.name.clone(),
            kind: decl.kind.clone(),
            state,
            reasons: vec![why],
            fingerprint: None,
            output: None,
            summary: None,
            seconds,
        };
        let failure = StageFailure {
            stage: stages[i].name.clone(),
            error,
        };
        done(outcome(
            &stages[i],
            State::Failed,
            failure.why(),
            started.elapsed().as_secs_f64(),
        ));
        if !self.keep_going {
            self.first.get_or_insert(failure.error);
            return;
        }
        self.blocked
            .insert(failure.stage.clone(), failure.stage.clone());
        self.failed.push(failure);
        // Stages are in topological order: one pass finds every dependant.
        waiting.retain(|&w| {
            let Some(root) = stages[w]
                .inputs
                .iter()
                .find_map(|n| self.blocked.get(n).cloned())
            else {
                return true;
            };
            done(outcome(
                &stages[w],
                State::Skipped,
                format!("upstream `{root}` failed"),
                0.0,
            ));
            self.blocked.insert(stages[w].name.clone(), root.clone());
            self.skipped.push(Skipped {
                stage: stages[w].name.clone(),
                upstream: root,
            });
            false
        });
    }

    fn into_result(self) -> Result<()> {
        match self.first {
            Some(e) => Err(e),
            None if self.failed.is_empty() => Ok(()),
            None => Err(Error::StagesFailed {
                failed: self.failed,
                skipped: self.skipped,
            }),
        }
    }
}

/// The external inputs of a stage, resolved and hashed.
struct Externals {
    files: Vec<ExternalFiles>,
    combined: Option<Manifest>,
}

enum Decision {
    Cached(Output),
    Restored(Output, Vec<String>),
    Restore {
        output: Digest,
        reasons: Vec<String>,
    },
    Run {
        reasons: Vec<String>,
    },
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

    /// Decides every selected stage without running anything (`status`, `--dry-run`).
    pub fn plan(&mut self, opts: &RunOptions) -> Result<Vec<StageOutcome>> {
        let mut outputs: BTreeMap<String, Digest> = BTreeMap::new();
        let mut outcomes = Vec::new();
        for i in self.selected(&opts.targets)? {
            let decl = &self.pipeline.stages[i];
            let (name, kind) = (decl.name.clone(), decl.kind.clone());
            let pending: Vec<&String> = decl
                .inputs
                .iter()
                .filter(|n| !outputs.contains_key(*n))
                .collect();
            // (state, reasons, fingerprint, output digest)
            let (state, reasons, fp, output) = if !pending.is_empty() {
                (
                    State::WouldRun,
                    pending
                        .iter()
                        .map(|n| format!("upstream `{n}` will run"))
                        .collect(),
                    None,
                    None,
                )
            } else {
                let upstream: Vec<(String, Digest)> = decl
                    .inputs
                    .iter()
                    .map(|n| (n.clone(), outputs[n]))
                    .collect();
                let ext = self.resolve_external(i)?;
                let fp = self.fingerprint_of(i, &upstream, &ext);
                match self.decide(i, fp, &upstream, &ext, opts.forces(&name))? {
                    Decision::Cached(out) => (State::Cached, vec![], Some(fp), Some(out.digest)),
                    Decision::Restore { output, reasons } => {
                        (State::WouldRestore, reasons, Some(fp), Some(output))
                    }
                    Decision::Run { reasons } => (State::WouldRun, reasons, Some(fp), None),
                    Decision::Restored(..) => unreachable!("decide never restores"),
                }
            };
            if let Some(d) = output {
                outputs.insert(name.clone(), d);
            }
            let outcome = StageOutcome {
                stage: name,
                kind,
                state,
                reasons,
                fingerprint: fp,
                output,
                summary: None,
                seconds: 0.0,
            };
            outcomes.push(outcome);
        }
        self.save_cache();
        Ok(outcomes)
    }

    /// Brings the selected stages up to date. `on_stage` sees each outcome as
    /// soon as it is known (for streaming output).
    pub fn run(
        &mut self,
        opts: &RunOptions,
        on_stage: &mut dyn FnMut(&StageOutcome),
    ) -> Result<Vec<StageOutcome>> {
        if opts.dry_run {
            let outcomes = self.plan(opts)?;
            outcomes.iter().for_each(|o| on_stage(o));
            return Ok(outcomes);
        }
        let _guard = self.run_lock(opts.wait)?;
        // The lock file may have changed while we waited for the lock.
        self.lock = LockFile::load(&self.pipeline.lock_path())?;
        self.clean_staging()?;
        let mut outcomes = Vec::new();
        let result = self.schedule(opts, &mut |o| {
            on_stage(&o);
            outcomes.push(o);
        });
        self.lock
            .stages
            .retain(|name, _| self.pipeline.stage(name).is_some());
        self.lock.cache_version = CACHE_VERSION;
        self.lock
            .save(&self.pipeline.lock_path())
            .map_err(|e| Error::io(self.pipeline.lock_path(), e))?;
        self.save_cache();
        result.map(|()| outcomes)
    }

    /// Writes the lock file's output of each selected stage (all, or the named
    /// ones and their upstreams) into its output folder where the folder
    /// differs, from the store (fetching from the remote as needed). Runs
    /// nothing; returns the stages written.
    pub fn checkout(&mut self, targets: &[String]) -> Result<Vec<String>> {
        let _guard = self.run_lock(true)?;
        self.lock = LockFile::load(&self.pipeline.lock_path())?;
        self.clean_staging()?;
        let mut written = Vec::new();
        for name in self.locked_stages(targets)? {
            let output = self.lock.stages[&name].output;
            let on_disk = self.dir_manifest(&self.pipeline.stage_out_dir(&name))?;
            if on_disk.is_none_or(|m| m.digest() != output) {
                self.restore(&name, output)?;
                written.push(name);
            }
        }
        self.save_cache();
        Ok(written)
    }

    /// The selected stages (all, or the named ones and their upstreams) that
    /// the lock file records, in pipeline order.
    pub fn locked_stages(&self, targets: &[String]) -> Result<Vec<String>> {
        Ok(self
            .selected(targets)?
            .into_iter()
            .map(|i| self.pipeline.stages[i].name.clone())
            .filter(|n| self.lock.stages.contains_key(n))
            .collect())
    }

    /// Re-executes the selected stages from scratch (no cache, no per-item
    /// reuse, no checkpoints) on their committed inputs, and compares each new
    /// output with the lock file. Every selected stage must be up to date
    /// first. Nothing is stored, published or recorded: the store, the output
    /// folders and the lock file stay exactly as they were.
    pub fn verify_rerun(
        &mut self,
        targets: &[String],
        on_stage: &mut dyn FnMut(&RerunOutcome),
    ) -> Result<Vec<RerunOutcome>> {
        let _guard = self.run_lock(true)?;
        self.lock = LockFile::load(&self.pipeline.lock_path())?;
        let stale: Vec<String> = self
            .plan(&RunOptions {
                targets: targets.to_vec(),
                ..Default::default()
            })?
            .into_iter()
            .filter(|o| o.state != State::Cached)
            .map(|o| o.stage)
            .collect();
        if !stale.is_empty() {
            return Err(Error::NotUpToDate {
                stages: stale.join(", "),
            });
        }
        let selected: Vec<usize> = if targets.is_empty() {
            (0..self.pipeline.stages.len()).collect()
        } else {
            self.selected(targets)?
                .into_iter()
                .filter(|&i| targets.contains(&self.pipeline.stages[i].name))
                .collect()
        };
        let root = self.pipeline.out_dir.join(".verify");
        let mut outcomes = Vec::new();
        for i in selected {
            let started = Instant::now();
            let name = self.pipeline.stages[i].name.clone();
            let inputs = self.pipeline.stages[i].inputs.clone();
            let locked = self.lock.stages[&name].output;
            let mut upstream = Vec::new();
            for n in &inputs {
                let dir = self.pipeline.stage_out_dir(n);
                let manifest = self
                    .dir_manifest(&dir)?
                    .ok_or_else(|| Error::NotUpToDate { stages: n.clone() })?;
                upstream.push(Upstream {
                    name: n.clone(),
                    kind: self.pipeline.stage(n).expect("validated").kind.clone(),
                    dir,
                    manifest,
                });
            }
            let ext = self.resolve_external(i)?;
            let (out_dir, scratch) = (root.join(&name), root.join(format!("{name}.scratch")));
            for d in [&out_dir, &scratch] {
                fsutil::remove_dir_if_exists(d).map_err(|e| Error::io(d, e))?;
            }
            std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
            let decl: &StageDecl = &self.pipeline.stages[i];
            let ctx = StageContext {
                stage: name.clone(),
                // Every selected stage is up to date, so this is its fingerprint now.
                fingerprint: self.lock.stages[&name].fingerprint,
                out_dir: out_dir.clone(),
                base_dir: self.pipeline.base_dir.clone(),
                upstream,
                external: ext.files,
                progress: self.progress.clone(),
                previous: None,
                scratch_dir: scratch.clone(),
            };
            let kind = self.registry.get(&decl.kind).expect("validated kind");
            // A panic fails the stage as in `run`: reported, and the re-run
            // folders are removed below.
            let result = run_catching_panics(|| kind.run(&decl.params, &ctx));
            let manifest = result
                .map_err(|source| Error::StageFailed {
                    stage: name.clone(),
                    source,
                })
                .and_then(|_| {
                    self.cache
                        .manifest_of_dir(&out_dir, &|_| {})
                        .map_err(|e| Error::io(&out_dir, e))
                });
            let committed = self.dir_manifest(&self.pipeline.stage_out_dir(&name));
            for d in [&out_dir, &scratch] {
                let _ = fsutil::remove_dir_if_exists(d);
            }
            self.cache.forget_under(&out_dir);
            let manifest = match manifest {
                Ok(m) => m,
                Err(e) => {
                    let _ = fsutil::remove_dir_if_exists(&root);
                    self.save_cache();
                    return Err(e);
                }
            };
            let rerun = manifest.digest();
            let differences = (rerun != locked).then(|| match committed {
                Ok(Some(m)) => m.diff(&manifest, 10).to_string(),
                _ => "the committed output folder could not be read to compare files".to_string(),
            });
            let outcome = RerunOutcome {
                stage: name,
                locked,
                rerun,
                differences,
                seconds: started.elapsed().as_secs_f64(),
            };
            on_stage(&outcome);
            outcomes.push(outcome);
        }
        let _ = fsutil::remove_dir_if_exists(&root);
        self.save_cache();
        Ok(outcomes)
    }

    /// Decides and runs the selected stages, up to `opts.jobs` at once: a
    /// stage is decided as soon as its upstreams are done, its work runs on a
    /// worker thread, and every commit happens here, on the calling thread.
    /// A stage that fails gets a `FAILED` outcome. After a failure nothing
    /// new starts; stages already running finish and commit, then the first
    /// error is returned. With `keep_going`, every stage that does not depend
    /// on a failed one still runs; the dependants get a `skipped` outcome, and
    /// the error lists every failure and every skipped stage.
    fn schedule(&mut self, opts: &RunOptions, done: &mut dyn FnMut(StageOutcome)) -> Result<()> {
        let jobs = opts.jobs.max(1);
        let registry: &'r Registry = self.registry;
        let mut waiting: Vec<usize> = self.selected(&opts.targets)?;
        let mut outputs: BTreeMap<String, Output> = BTreeMap::new();
        let mut failures = Failures {
            keep_going: opts.keep_going,
            ..Default::default()
        };
        std::thread::scope(|scope| {
            let (tx, rx) = mpsc::channel::<(Launch, std::result::Result<StageReport, BoxError>)>();
            let mut queued: VecDeque<Launch> = VecDeque::new();
            let mut running = 0usize;
            loop {
                // Decide, in pipeline order, every stage whose upstreams are done.
                // With one job, one stage at a time: exactly the sequential order.
                let mut k = 0;
                while !failures.stop()
                    && k < waiting.len()
                    && (jobs > 1 || (running == 0 && queued.is_empty()))
                {
                    let i = waiting[k];
                    if !self.pipeline.stages[i]
                        .inputs
                        .iter()
                        .all(|n| outputs.contains_key(n))
                    {
                        k += 1;
                        continue;
                    }
                    waiting.remove(k);
                    let started = Instant::now();
                    match self.step(i, opts, &outputs) {
                        Ok(Step::Done(outcome, output)) => {
                            outputs.insert(outcome.stage.clone(), output);
                            done(outcome);
                        }
                        Ok(Step::Launch(launch)) => queued.push_back(*launch),
                        Err(e) => {
                            failures.add(&self.pipeline.stages, i, e, started, &mut waiting, done);
                            // Skipped stages may have left `waiting` before `k`.
                            k = 0;
                        }
                    }
                }
                while !failures.stop() && running < jobs {
                    let Some(launch) = queued.pop_front() else {
                        break;
                    };
                    let kind = registry
                        .get(&self.pipeline.stages[launch.i].kind)
                        .expect("validated kind");
                    let params = self.pipeline.stages[launch.i].params.clone();
                    let tx = tx.clone();
                    scope.spawn(move || {
                        let result = run_catching_panics(|| kind.run(&params, &launch.ctx));
                        let _ = tx.send((launch, result));
                    });
                    running += 1;
                }
                if running == 0 {
                    break;
                }
                let (launch, result) = rx.recv().expect("every running stage reports back");
                running -= 1;
                let (i, started) = (launch.i, launch.started);
                match self.commit(launch, result) {
                    Ok((outcome, output)) => {
                        outputs.insert(outcome.stage.clone(), output);
                        done(outcome);
                    }
                    Err(e) => {
                        failures.add(&self.pipeline.stages, i, e, started, &mut waiting, done)
                    }
                }
            }
        });
        failures.into_result()
    }

    /// Decides one stage whose upstreams are done: finished when cached or
    /// restorable, else prepared for a worker.
    fn step(
        &mut self,
        i: usize,
        opts: &RunOptions,
        outputs: &BTreeMap<String, Output>,
    ) -> Result<Step> {
        let started = Instant::now();
        let decl = &self.pipeline.stages[i];
        let name = decl.name.clone();
        let upstream: Vec<(String, Digest)> = decl
            .inputs
            .iter()
            .map(|n| (n.clone(), outputs[n].digest))
            .collect();
        let ext = self.resolve_external(i)?;
        let fp = self.fingerprint_of(i, &upstream, &ext);
        let mut decision = self.decide(i, fp, &upstream, &ext, opts.forces(&name))?;
        if let Decision::Restore { output, reasons } = &decision {
            match self.restore(&name, *output) {
                Ok(out) => decision = Decision::Restored(out, reasons.clone()),
                // A damaged or incomplete store copy is not fatal: recompute it.
                Err(Error::Artifact(
                    e @ (ArtifactError::Corrupt { .. } | ArtifactError::Missing { .. }),
                )) => {
                    tracing::warn!("stage `{name}`: {e}");
                    let mut reasons = reasons.clone();
                    reasons.push("stored result is damaged, recomputing".into());
                    decision = Decision::Run { reasons };
                }
                Err(e) => return Err(e),
            }
        }
        let (state, reasons, output) = match decision {
            Decision::Cached(out) => (State::Cached, vec![], out),
            Decision::Restored(out, reasons) => (State::Restored, reasons, out),
            Decision::Restore { .. } => unreachable!("restored above"),
            Decision::Run { reasons } if opts.restore_only => {
                return Err(Error::Worker(format!(
                    "stage `{name}` has no result in the store {} to restore ({}): its job succeeded, so the workers must be writing to another store",
                    self.artifacts.store().describe(),
                    reasons.join("; ")
                )));
            }
            Decision::Run { reasons } => {
                tracing::info!("running stage `{name}`: {}", reasons.join("; "));
                let ups = self.pipeline.stages[i]
                    .inputs
                    .iter()
                    .map(|n| Upstream {
                        name: n.clone(),
                        kind: self.pipeline.stage(n).expect("validated").kind.clone(),
                        dir: self.pipeline.stage_out_dir(n),
                        manifest: outputs[n].manifest.clone(),
                    })
                    .collect();
                let ctx = self.prepare(i, &fp, ups, ext.files)?;
                let launch = Launch {
                    i,
                    fp,
                    reasons,
                    upstream,
                    external: ext.combined,
                    ctx,
                    started,
                };
                return Ok(Step::Launch(Box::new(launch)));
            }
        };
        let stage = Finished {
            i,
            fp,
            state,
            reasons,
            upstream,
            external: ext.combined,
            summary: None,
            started,
        };
        self.record(stage, output)
            .map(|(o, out)| Step::Done(o, out))
    }

    /// Records a finished stage in the lock file (saved at once: a later
    /// failure keeps what finished) and says what happened.
    fn record(&mut self, f: Finished, output: Output) -> Result<(StageOutcome, Output)> {
        let decl = &self.pipeline.stages[f.i];
        let (name, kind) = (decl.name.clone(), decl.kind.clone());
        let stage = self.registry.get(&kind).expect("validated kind");
        self.lock.stages.insert(
            name.clone(),
            LockEntry {
                kind: kind.clone(),
                code: stage.code().to_string(),
                code_version: stage.version(),
                fingerprint: f.fp,
                output: output.digest,
                files: output.manifest.len() as u64,
                bytes: output.manifest.total_bytes(),
                contents: crate::lockfile::contents_of(&output.manifest),
                upstream: f.upstream.into_iter().collect(),
                external: f.external.as_ref().map(|m| m.digest()),
                params: params_to_toml(&decl.params.canonical),
            },
        );
        self.lock.cache_version = CACHE_VERSION;
        self.lock
            .save(&self.pipeline.lock_path())
            .map_err(|e| Error::io(self.pipeline.lock_path(), e))?;
        let outcome = StageOutcome {
            stage: name,
            kind,
            state: f.state,
            reasons: f.reasons,
            fingerprint: Some(f.fp),
            output: Some(output.digest),
            summary: f.summary,
            seconds: f.started.elapsed().as_secs_f64(),
        };
        Ok((outcome, output))
    }

    fn fingerprint_of(&self, i: usize, upstream: &[(String, Digest)], ext: &Externals) -> Digest {
        let decl = &self.pipeline.stages[i];
        let stage = self.registry.get(&decl.kind).expect("validated kind");
        fingerprint(&FingerprintInputs {
            kind: &decl.kind,
            code: stage.code(),
            code_version: stage.version(),
            params: &decl.params.canonical,
            upstream,
            external: ext.combined.as_ref().map(|m| m.digest()),
        })
    }

    fn decide(
        &mut self,
        i: usize,
        fp: Digest,
        upstream: &[(String, Digest)],
        ext: &Externals,
        forced: bool,
    ) -> Result<Decision> {
        let name = self.pipeline.stages[i].name.clone();
        if forced {
            return Ok(Decision::Run {
                reasons: vec!["forced with --force".into()],
            });
        }
        let out_dir = self.pipeline.stage_out_dir(&name);
        let on_disk = self.dir_manifest(&out_dir)?;
        let entry = self.lock.stages.get(&name).cloned();
        if let Some(entry) = entry.as_ref().filter(|e| e.fingerprint == fp) {
            if let Some(m) = on_disk.as_ref().filter(|m| m.digest() == entry.output) {
                return Ok(Decision::Cached(Output {
                    digest: entry.output,
                    manifest: m.clone(),
                }));
            }
            if self.artifacts.get_manifest(&entry.output)?.is_some() {
                let why = match &on_disk {
                    None => "output folder missing".to_string(),
                    Some(m) => match self.artifacts.get_manifest(&entry.output)? {
                        Some(stored) => format!("output folder modified ({})", stored.diff(m, 3)),
                        None => "output folder modified".to_string(),
                    },
                };
                return Ok(Decision::Restore {
                    output: entry.output,
                    reasons: vec![why],
                });
            }
        }
        let reasons = self.why_stale(i, fp, entry.as_ref(), upstream, ext)?;
        if let Some(record) = self.artifacts.get_run(&fp)? {
            if let Some(m) = on_disk.filter(|m| m.digest() == record.output) {
                return Ok(Decision::Cached(Output {
                    digest: record.output,
                    manifest: m,
                }));
            }
            let mut reasons = reasons;
            reasons.push("result found in the store".into());
            return Ok(Decision::Restore {
                output: record.output,
                reasons,
            });
        }
        Ok(Decision::Run { reasons })
    }

    /// Why the fingerprint differs from the lock file's, in the user's terms.
    fn why_stale(
        &self,
        i: usize,
        fp: Digest,
        entry: Option<&LockEntry>,
        upstream: &[(String, Digest)],
        ext: &Externals,
    ) -> Result<Vec<String>> {
        let decl = &self.pipeline.stages[i];
        let Some(entry) = entry else {
            return Ok(vec![format!(
                "never run (not in {})",
                file_name(&self.pipeline.lock_path())
            )]);
        };
        if entry.fingerprint == fp {
            return Ok(vec![
                "its result is not in the store (a fresh store, or removed by gc)".into(),
            ]);
        }
        let mut reasons = Vec::new();
        if self.lock.cache_version != CACHE_VERSION {
            reasons.push(format!(
                "engine cache version changed ({} -> {CACHE_VERSION})",
                self.lock.cache_version
            ));
        }
        let stage = self.registry.get(&decl.kind).expect("validated");
        if entry.kind != decl.kind {
            reasons.push(format!(
                "kind changed (`{}` -> `{}`)",
                entry.kind, decl.kind
            ));
        } else {
            if entry.code != stage.code() {
                reasons.push(format!(
                    "code of kind `{}` changed ({} -> {})",
                    decl.kind,
                    short_code(&entry.code),
                    short_code(stage.code())
                ));
            }
            if entry.code_version != stage.version() {
                reasons.push(format!(
                    "kind `{}` version override changed (v{} -> v{})",
                    decl.kind,
                    entry.code_version,
                    stage.version()
                ));
            }
        }
        for p in changed_params(
            &params_to_json(&entry.params),
            &strip_nulls(&decl.params.canonical),
        ) {
            reasons.push(format!("parameter {p}"));
        }
        let old_inputs: Vec<&String> = entry.upstream.keys().collect();
        let mut new_inputs: Vec<&String> = upstream.iter().map(|(n, _)| n).collect();
        new_inputs.sort();
        if old_inputs != new_inputs {
            reasons.push(format!(
                "inputs changed ({:?} -> {:?})",
                old_inputs, new_inputs
            ));
        } else {
            for (n, d) in upstream {
                if entry.upstream.get(n) != Some(d) {
                    reasons.push(format!("upstream `{n}` output changed"));
                }
            }
        }
        let now = ext.combined.as_ref().map(|m| m.digest());
        if entry.external != now {
            let old = match entry.external {
                Some(d) => self.artifacts.get_manifest(&d)?,
                None => Some(Manifest::default()),
            };
            match (old, &ext.combined) {
                (Some(old), Some(new)) => reasons.push(format!("input files {}", old.diff(new, 3))),
                _ => reasons.push("external inputs changed".into()),
            }
        }
        if reasons.is_empty() {
            reasons.push("fingerprint changed".into());
        }
        Ok(reasons)
    }

    /// Resolves and hashes the stage's declared external inputs.
    fn resolve_external(&mut self, i: usize) -> Result<Externals> {
        let decl = &self.pipeline.stages[i];
        let kind = self.registry.get(&decl.kind).expect("validated kind");
        let declared = kind.external_inputs(&decl.params, &self.pipeline.base_dir);
        if declared.is_empty() {
            return Ok(Externals {
                files: vec![],
                combined: None,
            });
        }
        let stage = decl.name.clone();
        let mut files = Vec::new();
        let mut combined = Vec::new();
        let bar: OnceLock<ProgressBar> = OnceLock::new();
        let progress = self.progress.clone();
        for input in declared {
            let on_hashed = |n: u64| {
                bar.get_or_init(|| progress.counter("hashing input files"))
                    .inc(n)
            };
            let missing = || Error::MissingInput {
                stage: stage.clone(),
                name: input.name.clone(),
                location: input.source.to_string(),
            };
            let (manifest, is_dir) = match &input.source {
                Source::Local(path) => {
                    let meta = std::fs::metadata(path).map_err(|_| missing())?;
                    if meta.is_dir() {
                        (
                            self.cache
                                .manifest_of_dir(path, &on_hashed)
                                .map_err(|e| Error::io(path, e))?,
                            true,
                        )
                    } else {
                        let (size, digest) =
                            self.cache.digest(path).map_err(|e| Error::io(path, e))?;
                        (
                            Manifest::new(vec![Entry {
                                path: input.name.clone(),
                                size,
                                digest,
                            }]),
                            false,
                        )
                    }
                }
                Source::Remote(url) => {
                    let remote = ObjectBlobStore::open(url, &self.pipeline.base_dir)?;
                    let m = remote::manifest_of_prefix(&remote, &mut self.cache, &on_hashed)?;
                    if m.is_empty() {
                        return Err(missing());
                    }
                    (m, true)
                }
            };
            for e in manifest.entries() {
                let path = if is_dir {
                    format!("{}/{}", input.name, e.path)
                } else {
                    e.path.clone()
                };
                combined.push(Entry { path, ..e.clone() });
            }
            files.push(ExternalFiles {
                name: input.name,
                source: input.source,
                is_dir,
                manifest,
            });
        }
        if let Some(b) = bar.get() {
            b.finish_and_clear();
        }
        Ok(Externals {
            files,
            combined: Some(Manifest::new(combined)),
        })
    }

    fn dir_manifest(&mut self, dir: &Path) -> Result<Option<Manifest>> {
        if !dir.is_dir() {
            return Ok(None);
        }
        self.cache
            .manifest_of_dir(dir, &|_| {})
            .map(Some)
            .map_err(|e| Error::io(dir, e))
    }

    /// Per stage and fingerprint: `.melanoflow/scratch/STAGE-FINGERPRINT`.
    fn scratch_dir(&self, name: &str, fp: &Digest) -> PathBuf {
        self.pipeline
            .state_dir()
            .join("scratch")
            .join(format!("{name}-{}", fp.short()))
    }

    /// Drops the stage's scratch folders (checkpoints of this and of abandoned
    /// fingerprints) once it has committed.
    fn remove_scratch(&self, name: &str) {
        let root = self.pipeline.state_dir().join("scratch");
        let Ok(entries) = std::fs::read_dir(&root) else {
            return;
        };
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('-') && rest.len() == 13)
            {
                let _ = fsutil::remove_dir_if_exists(&e.path());
            }
        }
    }

    fn staging_root(&self) -> PathBuf {
        self.pipeline.out_dir.join(".staging")
    }

    /// Leftovers of a killed run: safe to delete because we hold the run lock.
    fn clean_staging(&self) -> Result<()> {
        for dir in [self.staging_root(), self.pipeline.out_dir.join(".trash")] {
            fsutil::remove_dir_if_exists(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        Ok(())
    }

    /// A fresh staging folder and the context a stage runs with.
    fn prepare(
        &mut self,
        i: usize,
        fp: &Digest,
        upstream: Vec<Upstream>,
        external: Vec<ExternalFiles>,
    ) -> Result<StageContext> {
        let name = self.pipeline.stages[i].name.clone();
        let staging = self.staging_root().join(&name);
        fsutil::remove_dir_if_exists(&staging).map_err(|e| Error::io(&staging, e))?;
        std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        let previous = self.previous_output(&name)?;
        Ok(StageContext {
            stage: name.clone(),
            fingerprint: *fp,
            out_dir: staging,
            base_dir: self.pipeline.base_dir.clone(),
            upstream,
            external,
            progress: self.progress.clone(),
            previous,
            scratch_dir: self.scratch_dir(&name, fp),
        })
    }

    /// The stage's last committed output folder, `out/STAGE`, when it holds
    /// exactly what the lock file records: map stages reuse per-item results
    /// from it (`StageContext::previous`).
    fn previous_output(&mut self, name: &str) -> Result<Option<PathBuf>> {
        let Some(committed) = self.lock.stages.get(name).map(|e| e.output) else {
            return Ok(None);
        };
        let dir = self.pipeline.stage_out_dir(name);
        Ok(self
            .dir_manifest(&dir)?
            .filter(|m| m.digest() == committed)
            .map(|_| dir))
    }

    /// Commits what a stage's run wrote: hash, upload, record, then make
    /// visible. A failed run leaves nothing behind.
    fn commit(
        &mut self,
        launch: Launch,
        result: std::result::Result<StageReport, BoxError>,
    ) -> Result<(StageOutcome, Output)> {
        let Launch {
            i,
            fp,
            reasons,
            upstream,
            external,
            ctx,
            started,
        } = launch;
        let name = ctx.stage;
        let staging = ctx.out_dir;
        let report = match result {
            Ok(r) => r,
            Err(source) => {
                let _ = fsutil::remove_dir_if_exists(&staging);
                return Err(Error::StageFailed {
                    stage: name,
                    source,
                });
            }
        };
        let (manifest, record) = self.store_output(i, &staging, external.as_ref())?;
        self.artifacts.put_run(&fp, &record)?;
        self.publish(&name, &staging, &manifest)?;
        self.remove_scratch(&name);
        let summary = Some(report.summary).filter(|s| !s.is_empty());
        let stage = Finished {
            i,
            fp,
            state: State::Ran,
            reasons,
            upstream,
            external,
            summary,
            started,
        };
        self.record(
            stage,
            Output {
                digest: record.output,
                manifest,
            },
        )
    }

    /// Hashes what a stage wrote into `dir` and stores its files, its
    /// manifest and the manifest of the external files it read; returns the
    /// manifest and the run record, which the caller writes its own way.
    fn store_output(
        &mut self,
        i: usize,
        dir: &Path,
        external: Option<&Manifest>,
    ) -> Result<(Manifest, RunRecord)> {
        let manifest = self
            .cache
            .manifest_of_dir(dir, &|_| {})
            .map_err(|e| Error::io(dir, e))?;
        let output = self.artifacts.put_dir(dir, &manifest)?;
        if let Some(m) = external {
            self.artifacts.put_manifest(m)?;
        }
        let record = RunRecord {
            kind: self.pipeline.stages[i].kind.clone(),
            output,
            files: manifest.len() as u64,
            bytes: manifest.total_bytes(),
        };
        Ok((manifest, record))
    }

    /// Writes a stored output into `out/STAGE` (through staging, atomically).
    fn restore(&mut self, name: &str, output: Digest) -> Result<Output> {
        let manifest =
            self.artifacts
                .get_manifest(&output)?
                .ok_or_else(|| ArtifactError::Missing {
                    digest: output,
                    store: self.artifacts.store().describe(),
                })?;
        let staging = self.staging_root().join(name);
        fsutil::remove_dir_if_exists(&staging).map_err(|e| Error::io(&staging, e))?;
        self.artifacts.materialize(&manifest, &staging)?;
        self.publish(name, &staging, &manifest)?;
        Ok(Output {
            digest: output,
            manifest,
        })
    }

    fn publish(&mut self, name: &str, staging: &Path, manifest: &Manifest) -> Result<()> {
        let target = self.pipeline.stage_out_dir(name);
        let trash = self.pipeline.out_dir.join(".trash").join(name);
        fsutil::swap_dir(staging, &target, &trash).map_err(|e| Error::io(&target, e))?;
        self.cache.forget_under(staging);
        for e in manifest.entries() {
            let _ = self
                .cache
                .record(&crate::context::join_rel(&target, &e.path), e.digest);
        }
        Ok(())
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

fn strip_nulls(v: &serde_json::Value) -> serde_json::Value {
    params_to_json(&params_to_toml(v))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::StageReport;
    use crate::registry::{BoxError, Stage};
    use serde::{Deserialize, Serialize};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Writes `fixed.txt` (always the same) and `count.txt` (how many times
    /// any `Counter` stage has run in this process): not reproducible on purpose.
    struct Counter;
    static RUNS: AtomicU32 = AtomicU32::new(0);
    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct CounterParams {
        #[serde(default)]
        deterministic: bool,
    }
    impl Stage for Counter {
        type Params = CounterParams;
        const KIND: &'static str = "counter";
        const CODE: &'static str = "test-code";
        const ABOUT: &'static str = "test kind";
        fn run(&self, p: &CounterParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
            std::fs::write(ctx.out_dir.join("fixed.txt"), "same")?;
            if !p.deterministic {
                std::fs::write(
                    ctx.out_dir.join("count.txt"),
                    RUNS.fetch_add(1, Ordering::SeqCst).to_string(),
                )?;
            }
            Ok(StageReport::default())
        }
    }

    /// Waits until `count` stages of this kind are running at once (or fails
    /// after 30 s): proof that they ran in parallel, with no timing assert.
    struct Rendezvous;
    static ARRIVED: std::sync::Mutex<u32> = std::sync::Mutex::new(0);
    static ARRIVAL: std::sync::Condvar = std::sync::Condvar::new();
    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RendezvousParams {
        count: u32,
        #[serde(default)]
        fail: Option<String>,
    }
    impl Stage for Rendezvous {
        type Params = RendezvousParams;
        const KIND: &'static str = "rendezvous";
        const CODE: &'static str = "test-code";
        const ABOUT: &'static str = "test kind";
        fn run(&self, p: &RendezvousParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
            let mut arrived = ARRIVED.lock().unwrap();
            *arrived += 1;
            ARRIVAL.notify_all();
            let (arrived, timeout) = ARRIVAL
                .wait_timeout_while(arrived, std::time::Duration::from_secs(30), |n| {
                    *n < p.count
                })
                .unwrap();
            drop(arrived);
            match p.fail.as_deref() {
                Some("panic") => panic!("deliberate panic in {}", ctx.stage),
                Some(message) => return Err(message.to_string().into()),
                None if timeout.timed_out() => {
                    return Err("ran alone: the other stage never started".into());
                }
                None => {}
            }
            std::fs::write(ctx.out_dir.join("done.txt"), &ctx.stage)?;
            Ok(StageReport::default())
        }
    }

    /// Fails (or panics), unless `when_exists` names a file that is absent:
    /// then it succeeds, so a test can make it fail later.
    struct Broken;
    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct BrokenParams {
        #[serde(default)]
        panic: bool,
        #[serde(default)]
        when_exists: Option<String>,
    }
    impl Stage for Broken {
        type Params = BrokenParams;
        const KIND: &'static str = "broken";
        const CODE: &'static str = "test-code";
        const ABOUT: &'static str = "test kind";
        fn run(&self, p: &BrokenParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
            if p.when_exists
                .as_ref()
                .is_some_and(|f| !ctx.base_dir.join(f).exists())
            {
                std::fs::write(ctx.out_dir.join("ok.txt"), "fine this time")?;
                return Ok(StageReport::default());
            }
            if p.panic {
                panic!("deliberate panic in {}", ctx.stage);
            }
            Err(format!("deliberate failure in {}", ctx.stage).into())
        }
    }

    fn parallel_engine(dir: &Path, pipeline: &str) -> (Registry, PathBuf) {
        let file = dir.join("p.toml");
        std::fs::write(&file, pipeline).unwrap();
        let mut registry = Registry::new();
        registry.register(Rendezvous);
        registry.register(Counter);
        registry.register(Broken);
        (registry, file)
    }

    /// Two failures, one a panic, in separate branches: with keep-going every
    /// stage that depends on neither runs, the dependants (direct or not) are
    /// skipped naming the failure they wait on, and the error lists them all.
    #[test]
    fn keep_going_runs_every_independent_stage_and_reports_every_failure() {
        let pipeline = "[stages.a]\nkind = \"counter\"\n\n\
                        [stages.bad]\nkind = \"broken\"\ninputs = [\"a\"]\n\n\
                        [stages.boom]\nkind = \"broken\"\npanic = true\n\n\
                        [stages.after_bad]\nkind = \"counter\"\ninputs = [\"bad\"]\n\n\
                        [stages.after_after]\nkind = \"counter\"\ninputs = [\"after_bad\"]\n\n\
                        [stages.fine]\nkind = \"counter\"\ninputs = [\"a\"]\n\n\
                        [stages.joined]\nkind = \"counter\"\ninputs = [\"fine\", \"boom\"]\n";
        for jobs in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let (registry, file) = parallel_engine(dir.path(), pipeline);
            let open = || {
                Engine::open(
                    crate::config::load(&file, &registry, &[]).unwrap(),
                    &registry,
                    Progress::new(true),
                )
                .unwrap()
            };
            let mut seen: Vec<(String, State, Vec<String>)> = Vec::new();
            let opts = RunOptions {
                jobs,
                keep_going: true,
                ..Default::default()
            };
            let err = open()
                .run(&opts, &mut |o| {
                    seen.push((o.stage.clone(), o.state, o.reasons.clone()))
                })
                .unwrap_err();
            let state = |name: &str| {
                seen.iter()
                    .find(|(s, ..)| s == name)
                    .map(|(_, st, r)| (*st, r.join("; ")))
                    .unwrap_or_else(|| panic!("no outcome for {name}: {seen:?}"))
            };
            assert_eq!(seen.len(), 7, "every stage has one outcome: {seen:?}");
            assert_eq!(state("a").0, State::Ran);
            assert_eq!(state("fine").0, State::Ran);
            assert_eq!(
                state("bad"),
                (State::Failed, "deliberate failure in bad".into())
            );
            assert_eq!(
                state("boom"),
                (State::Failed, "panicked: deliberate panic in boom".into())
            );
            assert_eq!(
                state("after_bad"),
                (State::Skipped, "upstream `bad` failed".into())
            );
            assert_eq!(
                state("after_after"),
                (State::Skipped, "upstream `bad` failed".into())
            );
            assert_eq!(
                state("joined"),
                (State::Skipped, "upstream `boom` failed".into())
            );
            let Error::StagesFailed { failed, skipped } = &err else {
                panic!("{err}")
            };
            let mut names: Vec<&str> = failed.iter().map(|f| f.stage.as_str()).collect();
            names.sort();
            assert_eq!(names, ["bad", "boom"]);
            assert_eq!(skipped.len(), 3);
            let report = err.to_string();
            assert!(
                report.starts_with("2 stage(s) failed, 3 skipped because an upstream failed:"),
                "{report}"
            );
            for line in [
                "\n  bad: deliberate failure in bad",
                "\n  boom: panicked: deliberate panic in boom",
                "\n  after_after: skipped (upstream `bad` failed)",
                "\n  joined: skipped (upstream `boom` failed)",
            ] {
                assert!(report.contains(line), "{line:?} in:\n{report}");
            }
            // What ran is committed; nothing of the failed or skipped stages.
            let lock = std::fs::read_to_string(dir.path().join("p.lock")).unwrap();
            assert!(
                lock.contains("[stages.a]") && lock.contains("[stages.fine]"),
                "{lock}"
            );
            for stage in ["bad", "boom", "after_bad", "joined"] {
                assert!(
                    !lock.contains(&format!("[stages.{stage}]"))
                        && !dir.path().join("out").join(stage).exists(),
                    "{stage}: {lock}"
                );
            }
            assert!(
                !dir.path()
                    .join("out/.staging")
                    .read_dir()
                    .is_ok_and(|mut d| d.next().is_some()),
                "staging left behind"
            );

            // Without keep-going the first failure stops everything not yet started.
            let dir = tempfile::tempdir().unwrap();
            let (registry, file) = parallel_engine(dir.path(), pipeline);
            let mut engine = Engine::open(
                crate::config::load(&file, &registry, &[]).unwrap(),
                &registry,
                Progress::new(true),
            )
            .unwrap();
            let mut seen = Vec::new();
            let err = engine
                .run(
                    &RunOptions {
                        jobs: 1,
                        ..Default::default()
                    },
                    &mut |o| seen.push((o.stage.clone(), o.state)),
                )
                .unwrap_err();
            assert!(
                matches!(err, Error::StageFailed { ref stage, .. } if stage == "bad"),
                "{err}"
            );
            assert_eq!(
                seen,
                [
                    ("a".to_string(), State::Ran),
                    ("bad".to_string(), State::Failed)
                ]
            );
        }
    }

    #[test]
    fn independent_stages_run_at_once_with_jobs_and_a_failure_keeps_the_rest() {
        // Every test stage here runs once per process: ARRIVED only grows.
        let dir = tempfile::tempdir().unwrap();
        let pipeline = "[stages.left]\nkind = \"rendezvous\"\ncount = 2\n\n[stages.right]\nkind = \"rendezvous\"\ncount = 2\n\n\
                        [stages.joined]\nkind = \"counter\"\ninputs = [\"left\", \"right\"]\n";
        let (registry, file) = parallel_engine(dir.path(), pipeline);
        let mut engine = Engine::open(
            crate::config::load(&file, &registry, &[]).unwrap(),
            &registry,
            Progress::new(true),
        )
        .unwrap();
        let mut order = Vec::new();
        engine
            .run(
                &RunOptions {
                    jobs: 2,
                    ..Default::default()
                },
                &mut |o| order.push(o.stage.clone()),
            )
            .unwrap();
        assert_eq!(
            order.last().unwrap(),
            "joined",
            "the downstream stage waits for both"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out/right/done.txt")).unwrap(),
            "right"
        );

        // A failing and a panicking stage: both reported, the third (independent)
        // one commits, the downstream of a failure never starts.
        let dir = tempfile::tempdir().unwrap();
        let pipeline = "[stages.fails]\nkind = \"rendezvous\"\ncount = 5\nfail = \"deliberate failure\"\n\n\
                        [stages.panics]\nkind = \"rendezvous\"\ncount = 5\nfail = \"panic\"\n\n\
                        [stages.fine]\nkind = \"rendezvous\"\ncount = 5\n\n\
                        [stages.after]\nkind = \"counter\"\ninputs = [\"fails\"]\n";
        let (registry, file) = parallel_engine(dir.path(), pipeline);
        let mut engine = Engine::open(
            crate::config::load(&file, &registry, &[]).unwrap(),
            &registry,
            Progress::new(true),
        )
        .unwrap();
        let mut finished = Vec::new();
        let err = engine
            .run(
                &RunOptions {
                    jobs: 3,
                    ..Default::default()
                },
                &mut |o| finished.push((o.stage.clone(), o.state)),
            )
            .unwrap_err();
        let chain = format!(
            "{err}: {}",
            std::error::Error::source(&err)
                .map(|e| e.to_string())
                .unwrap_or_default()
        );
        assert!(
            chain.contains("fails") || chain.contains("panics"),
            "{chain}"
        );
        finished.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            finished,
            [
                ("fails".into(), State::Failed),
                ("fine".into(), State::Ran),
                ("panics".into(), State::Failed)
            ]
        );
        let lock = std::fs::read_to_string(dir.path().join("p.lock")).unwrap();
        assert!(
            lock.contains("[stages.fine]")
                && !lock.contains("[stages.after]")
                && !lock.contains("[stages.fails]"),
            "{lock}"
        );
        assert!(
            !dir.path().join("out/.staging/fails").exists()
                && !dir.path().join("out/.staging/panics").exists()
        );
    }

    /// `counter` as a later build would see it: same kind and behaviour,
    /// other sources, so another code identity.
    struct RecodedCounter;
    impl Stage for RecodedCounter {
        type Params = CounterParams;
        const KIND: &'static str = "counter";
        const CODE: &'static str = "test-code-2";
        const ABOUT: &'static str = "test kind";
        fn run(&self, p: &CounterParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
            Counter.run(p, ctx)
        }
    }

    /// Copies nothing, writes a constant: a kind whose code never changes here.
    struct Constant;
    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoParams {}
    impl Stage for Constant {
        type Params = NoParams;
        const KIND: &'static str = "constant";
        const CODE: &'static str = "constant-code";
        const ABOUT: &'static str = "test kind";
        fn run(&self, _: &NoParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
            std::fs::write(ctx.out_dir.join("c.txt"), "c")?;
            Ok(StageReport::default())
        }
    }

    #[test]
    fn new_code_reruns_its_kind_and_downstream_only_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(
            &file,
            "[stages.counted]\nkind = \"counter\"\n\n[stages.below]\nkind = \"constant\"\ninputs = [\"counted\"]\n\n\
             [stages.apart]\nkind = \"constant\"\n",
        )
        .unwrap();
        let run = |registry: &Registry| {
            let pipeline = crate::config::load(&file, registry, &[]).unwrap();
            let mut outcomes = BTreeMap::new();
            Engine::open(pipeline, registry, Progress::new(true))
                .unwrap()
                .run(&RunOptions::default(), &mut |o| {
                    outcomes.insert(o.stage.clone(), (o.state, o.reasons.join("; ")));
                })
                .unwrap();
            outcomes
        };
        let mut old = Registry::new();
        old.register(Counter).register(Constant);
        run(&old);
        let lock = LockFile::load(&dir.path().join("p.lock")).unwrap();
        assert_eq!(lock.stages["counted"].code, "test-code");

        let mut new = Registry::new();
        new.register(RecodedCounter).register(Constant);
        let outcomes = run(&new);
        assert_eq!(outcomes["counted"].0, State::Ran);
        assert_eq!(
            outcomes["counted"].1,
            "code of kind `counter` changed (test-code -> test-code-2)"
        );
        assert_eq!(outcomes["below"].0, State::Ran);
        assert_eq!(outcomes["below"].1, "upstream `counted` output changed");
        assert_eq!(outcomes["apart"].0, State::Cached);
        assert_eq!(
            LockFile::load(&dir.path().join("p.lock")).unwrap().stages["counted"].code,
            "test-code-2"
        );
    }

    /// Writes the fingerprint its context carries.
    struct Fingerprinted;
    impl Stage for Fingerprinted {
        type Params = NoParams;
        const KIND: &'static str = "fingerprinted";
        const CODE: &'static str = "fingerprinted-code";
        const ABOUT: &'static str = "test kind";
        fn run(&self, _: &NoParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
            std::fs::write(ctx.out_dir.join("fp.txt"), ctx.fingerprint.to_hex())?;
            Ok(StageReport::default())
        }
    }

    /// The context's fingerprint is the one the lock file records, in `run`
    /// and in `verify --rerun` (which therefore reproduces the bytes), and it
    /// differs between stages with different inputs.
    #[test]
    fn a_stage_sees_its_own_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(
            &file,
            "[stages.top]\nkind = \"fingerprinted\"\n\n[stages.below]\nkind = \"fingerprinted\"\ninputs = [\"top\"]\n",
        )
        .unwrap();
        let mut registry = Registry::new();
        registry.register(Fingerprinted);
        let open = || {
            Engine::open(
                crate::config::load(&file, &registry, &[]).unwrap(),
                &registry,
                Progress::new(true),
            )
            .unwrap()
        };
        open().run(&RunOptions::default(), &mut |_| {}).unwrap();
        let lock = LockFile::load(&dir.path().join("p.lock")).unwrap();
        for stage in ["top", "below"] {
            assert_eq!(
                std::fs::read_to_string(dir.path().join("out").join(stage).join("fp.txt")).unwrap(),
                lock.stages[stage].fingerprint.to_hex(),
                "{stage}"
            );
        }
        assert_ne!(
            lock.stages["top"].fingerprint,
            lock.stages["below"].fingerprint
        );
        let outcomes = open().verify_rerun(&[], &mut |_| {}).unwrap();
        assert!(outcomes.iter().all(|o| o.reproduced()), "{outcomes:?}");
    }

    #[test]
    fn verify_rerun_names_the_differing_file_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(&file, "[stages.same]\nkind = \"counter\"\ndeterministic = true\n\n[stages.drifts]\nkind = \"counter\"\ninputs = [\"same\"]\n").unwrap();
        let mut registry = Registry::new();
        registry.register(Counter);
        let open = || {
            Engine::open(
                crate::config::load(&file, &registry, &[]).unwrap(),
                &registry,
                Progress::new(true),
            )
            .unwrap()
        };
        open().run(&RunOptions::default(), &mut |_| {}).unwrap();
        let lock_before = std::fs::read_to_string(dir.path().join("p.lock")).unwrap();
        let count_before =
            std::fs::read_to_string(dir.path().join("out/drifts/count.txt")).unwrap();

        let outcomes = open().verify_rerun(&[], &mut |_| {}).unwrap();
        assert_eq!(outcomes.len(), 2);
        assert!(outcomes[0].reproduced(), "{:?}", outcomes[0]);
        assert!(!outcomes[1].reproduced());
        let diff = outcomes[1].differences.as_deref().unwrap();
        assert!(
            diff.contains("count.txt") && !diff.contains("fixed.txt"),
            "{diff}"
        );
        // Only one stage when named.
        assert_eq!(
            open()
                .verify_rerun(&["same".into()], &mut |_| {})
                .unwrap()
                .len(),
            1
        );
        // Nothing committed: lock, outputs, every stage still cached; no leftovers.
        assert_eq!(
            std::fs::read_to_string(dir.path().join("p.lock")).unwrap(),
            lock_before
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out/drifts/count.txt")).unwrap(),
            count_before
        );
        assert!(
            open()
                .plan(&RunOptions::default())
                .unwrap()
                .iter()
                .all(|o| o.state == State::Cached)
        );
        assert!(!dir.path().join("out/.verify").exists());
    }

    /// A stage that panics on re-execution fails `verify --rerun` the way it
    /// fails `run`: an error naming the stage and the panic, no leftovers,
    /// nothing changed.
    #[test]
    fn verify_rerun_catches_a_panicking_stage() {
        let dir = tempfile::tempdir().unwrap();
        let pipeline = "[stages.a]\nkind = \"counter\"\ndeterministic = true\n\n\
                        [stages.flaky]\nkind = \"broken\"\ninputs = [\"a\"]\npanic = true\nwhen_exists = \"now-panic\"\n";
        let (registry, file) = parallel_engine(dir.path(), pipeline);
        let open = || {
            Engine::open(
                crate::config::load(&file, &registry, &[]).unwrap(),
                &registry,
                Progress::new(true),
            )
            .unwrap()
        };
        open().run(&RunOptions::default(), &mut |_| {}).unwrap();
        let lock_before = std::fs::read_to_string(dir.path().join("p.lock")).unwrap();
        std::fs::write(dir.path().join("now-panic"), "").unwrap();
        let mut reproduced = Vec::new();
        let err = open()
            .verify_rerun(&[], &mut |o| reproduced.push(o.stage.clone()))
            .unwrap_err();
        assert!(
            matches!(err, Error::StageFailed { ref stage, .. } if stage == "flaky"),
            "{err}"
        );
        assert_eq!(
            crate::error::chain(&err),
            "stage `flaky` failed; nothing of it was committed: panicked: deliberate panic in flaky"
        );
        assert_eq!(reproduced, ["a"], "the stage before it was compared");
        assert!(
            !dir.path().join("out/.verify").exists(),
            "re-run folders removed"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("p.lock")).unwrap(),
            lock_before
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out/flaky/ok.txt")).unwrap(),
            "fine this time"
        );
    }

    #[test]
    fn verify_rerun_refuses_stale_stages() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(&file, "[stages.a]\nkind = \"counter\"\n").unwrap();
        let mut registry = Registry::new();
        registry.register(Counter);
        let mut engine = Engine::open(
            crate::config::load(&file, &registry, &[]).unwrap(),
            &registry,
            Progress::new(true),
        )
        .unwrap();
        let err = engine
            .verify_rerun(&[], &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not up to date: a") && err.contains("melanoflow run"),
            "{err}"
        );
    }
}
