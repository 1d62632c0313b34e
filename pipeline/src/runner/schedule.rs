//! Running: `run` decides each selected stage as soon as its upstreams are
//! done (so a stage that re-runs but writes the same bytes leaves its
//! downstream cached), runs up to `-j` stale stages at once on worker
//! threads, and commits each on the calling thread.
//!
//! Promises: with one job the order is exactly the pipeline's; a failing or
//! panicking stage commits nothing and does not take the scheduler down; the
//! lock file is saved after every stage and once more at the end, so a
//! failure keeps what finished.

use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc;
use std::time::Instant;

use super::commit::Finished;
use super::failures::Failures;
use super::plan::Decision;
use super::workspace::Reuse;
use super::{Engine, Output, RunOptions, StageOutcome, State};
use crate::artifacts::ArtifactError;
use crate::context::{StageContext, StageReport};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fingerprint::CACHE_VERSION;
use crate::lockfile::LockFile;
use crate::manifest::Manifest;
use crate::registry::{BoxError, Registry};

/// A stage decided to run, with everything it runs with and everything its
/// commit needs.
pub(super) struct Launch {
    pub(super) i: usize,
    pub(super) fp: Digest,
    pub(super) reasons: Vec<String>,
    pub(super) upstream: Vec<(String, Digest)>,
    pub(super) external: Option<Manifest>,
    pub(super) ctx: StageContext,
    pub(super) started: Instant,
}

enum Step {
    Done(Box<(StageOutcome, Output)>),
    Launch(Box<Launch>),
}

/// Runs a stage's work, turning a panic into its error: a panicking stage
/// fails like any other instead of taking the scheduler down.
pub(super) fn run_catching_panics(
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

impl<'r> Engine<'r> {
    /// Brings the selected stages up to date. `on_stage` sees each outcome as
    /// soon as it is known (for streaming output).
    pub fn run(
        &mut self,
        opts: &RunOptions,
        on_stage: &mut dyn FnMut(&StageOutcome),
    ) -> Result<Vec<StageOutcome>> {
        if opts.dry_run {
            let outcomes = self.plan(opts)?;
            outcomes.iter().for_each(&mut *on_stage);
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
        let mut failures = Failures::new(opts.keep_going);
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
                        Ok(Step::Done(done_step)) => {
                            let (outcome, output) = *done_step;
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
        // Cached, or restored here, the stage is done; else the reasons it runs.
        let reasons = 'run: {
            let (state, reasons, output) =
                match self.decide(i, fp, &upstream, &ext, opts.forces(&name))? {
                    Decision::Cached(out) => (State::Cached, vec![], out),
                    Decision::Restore {
                        output,
                        mut reasons,
                    } => match self.restore(&name, output) {
                        Ok(out) => (State::Restored, reasons, out),
                        // A damaged or incomplete store copy is not fatal: recompute it.
                        Err(Error::Artifact(
                            e @ (ArtifactError::Corrupt { .. } | ArtifactError::Missing { .. }),
                        )) => {
                            tracing::warn!("stage `{name}`: {e}");
                            reasons.push("stored result is damaged, recomputing".into());
                            break 'run reasons;
                        }
                        Err(e) => return Err(e),
                    },
                    Decision::Run { reasons } => break 'run reasons,
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
            return self
                .record(stage, output)
                .map(|done| Step::Done(Box::new(done)));
        };
        if opts.restore_only {
            return Err(Error::Worker(format!(
                "stage `{name}` has no result in the store {} to restore ({}): its job succeeded, so the workers must be writing to another store",
                self.artifacts.store().describe(),
                reasons.join("; ")
            )));
        }
        tracing::info!("running stage `{name}`: {}", reasons.join("; "));
        let ups = self.pipeline.stages[i]
            .inputs
            .iter()
            .map(|n| outputs[n].manifest.clone())
            .collect();
        let staging = self.staging_root().join(&name);
        let ctx = self.stage_context(i, fp, staging, ups, ext.files, Reuse::Earlier)?;
        let launch = Launch {
            i,
            fp,
            reasons,
            upstream,
            external: ext.combined,
            ctx,
            started,
        };
        Ok(Step::Launch(Box::new(launch)))
    }
}
