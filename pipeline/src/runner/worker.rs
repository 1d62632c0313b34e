//! `run-stage`: one stage run by a worker process (a Slurm job, say) against
//! the shared store, with no lock file and no output folder of its own.
//!
//! The worker finds its upstreams' results the way `status` does (cached, or
//! a run record in the store for their fingerprints), runs the stage in a
//! private folder, and commits blobs, manifest and run record. It never writes
//! the lock file or its own `out/` folder: the submitting command does that
//! afterwards, as a local run would. Like a local run, it hands a map stage
//! its committed `out/STAGE` (when it matches the lock file) for per-item
//! reuse. (It does write its upstreams' `out/`
//! folders when they are missing or stale, one worker at a time per folder.) Promises: a worker whose result is already committed exits
//! successfully without recomputing; a killed worker leaves no run record, so
//! nothing half-done is ever used; when two workers race on one fingerprint,
//! the first record stands and the second worker reports the one that stood.

use std::path::Path;

use super::external::Externals;
use super::schedule::run_catching_panics;
use super::workspace::Reuse;
use super::{Engine, RunOptions};
use crate::artifacts::ArtifactError;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::runlock::RunLock;

/// Which share of a stage's work a worker does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// The whole stage.
    Whole,
    /// Part `part` of `parts` of a map stage (a job-array task): committed as
    /// a part record, not as the stage's result.
    Part { part: usize, parts: usize },
    /// Joins the committed parts into the stage's result.
    Assemble { parts: usize },
}

/// What a worker did.
#[derive(Clone, Debug, PartialEq)]
pub enum WorkerOutcome {
    /// This worker's result was committed; `summary` is the stage's report.
    Committed { output: Digest, summary: String },
    /// Another run had already committed this fingerprint.
    AlreadyCommitted { output: Digest },
}

impl<'r> Engine<'r> {
    /// Runs stage `name` as a worker. With `expected`, refuses to run when its
    /// fingerprint differs (the pipeline file or an input changed since the
    /// job was planned).
    pub fn run_stage(
        &mut self,
        name: &str,
        expected: Option<Digest>,
        force: bool,
        work: Work,
    ) -> Result<WorkerOutcome> {
        let i = self
            .selected(&[name.to_string()])?
            .into_iter()
            .find(|&i| self.pipeline.stages[i].name == name)
            .expect("selected");
        let inputs = self.pipeline.stages[i].inputs.clone();
        let mut upstream: Vec<(String, Digest)> = Vec::new();
        if !inputs.is_empty() {
            let plan = self.plan(&RunOptions {
                targets: inputs.clone(),
                ..Default::default()
            })?;
            for n in &inputs {
                let o = plan
                    .iter()
                    .find(|o| &o.stage == n)
                    .expect("upstreams are planned");
                let d = o.output.ok_or_else(|| {
                    Error::Worker(format!(
                        "stage `{name}`: upstream `{n}` has no committed result yet ({}: {})",
                        o.state.label(),
                        o.reasons.join("; ")
                    ))
                })?;
                upstream.push((n.clone(), d));
            }
        }
        let ext = self.resolve_external(i)?;
        let fp = self.fingerprint_of(i, &upstream, &ext);
        if let Some(e) = expected.filter(|e| *e != fp) {
            return Err(Error::Worker(format!(
                "stage `{name}`: its fingerprint is {} but {} was planned: the pipeline file or an input changed since the job was submitted",
                fp.short(),
                e.short()
            )));
        }
        if let Some(record) = self.artifacts.get_run(&fp)?.filter(|_| !force) {
            return Ok(WorkerOutcome::AlreadyCommitted {
                output: record.output,
            });
        }
        if let Work::Part { part, parts } = work
            && let Some(record) = self
                .artifacts
                .get_part(&fp, part, parts)?
                .filter(|_| !force)
        {
            return Ok(WorkerOutcome::AlreadyCommitted {
                output: record.output,
            });
        }
        let dir = self.pipeline.state_dir().join("work").join(format!(
            "{name}-{}-{}",
            fp.short(),
            std::process::id()
        ));
        let result = self.run_in(i, fp, &upstream, ext, &dir, force, work);
        let _ = fsutil::remove_dir_if_exists(&dir);
        self.cache.forget_under(&dir);
        self.save_cache();
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn run_in(
        &mut self,
        i: usize,
        fp: Digest,
        upstream: &[(String, Digest)],
        ext: Externals,
        dir: &Path,
        force: bool,
        work: Work,
    ) -> Result<WorkerOutcome> {
        let name = self.pipeline.stages[i].name.clone();
        fsutil::remove_dir_if_exists(dir).map_err(|e| Error::io(dir, e))?;
        let mut ups = Vec::new();
        for (n, digest) in upstream {
            let manifest =
                self.artifacts
                    .get_manifest(digest)?
                    .ok_or_else(|| ArtifactError::Missing {
                        digest: *digest,
                        store: self.artifacts.store().describe(),
                    })?;
            // The stage reads it at `out/NAME`, as in a local run (see
            // `stage_context`). Workers sharing the folder take turns writing it.
            let dir = self.pipeline.stage_out_dir(n);
            if self
                .dir_manifest(&dir)?
                .is_none_or(|m| m.digest() != *digest)
            {
                let _turn = RunLock::acquire(
                    &self
                        .pipeline
                        .state_dir()
                        .join("locks")
                        .join(format!("out-{n}.lock")),
                    true,
                )?;
                if self
                    .dir_manifest(&dir)?
                    .is_none_or(|m| m.digest() != *digest)
                {
                    self.restore(n, *digest)?;
                }
            }
            ups.push(manifest);
        }
        let out_dir = dir.join("out");
        // Per-item reuse as in a local run: the committed `out/STAGE` the lock
        // file names (read only; the submitting command replaces it after
        // every job has finished).
        let ctx = self.stage_context(i, fp, out_dir.clone(), ups, ext.files, Reuse::Earlier)?;
        let decl = &self.pipeline.stages[i];
        let kind = self.registry.get(&decl.kind).expect("validated kind");
        let mut part_dirs = Vec::new();
        if let Work::Assemble { parts } = work {
            for part in 0..parts {
                let record = self.artifacts.get_part(&fp, part, parts)?.ok_or_else(|| {
                    Error::Worker(format!("stage `{name}`: part {part} of {parts} is not committed (its job must succeed first)"))
                })?;
                let manifest = self
                    .artifacts
                    .get_manifest(&record.output)?
                    .expect("get_part checked the manifest");
                let part_dir = dir.join("parts").join(part.to_string());
                self.artifacts.materialize(&manifest, &part_dir)?;
                part_dirs.push(part_dir);
            }
        }
        let report = run_catching_panics(|| match work {
            Work::Whole => kind.run(&decl.params, &ctx),
            Work::Part { part, parts } => kind.run_part(&decl.params, &ctx, part, parts),
            Work::Assemble { .. } => kind.assemble(&decl.params, &ctx, &part_dirs),
        })
        .map_err(|source| Error::StageFailed {
            stage: name.clone(),
            source,
        })?;
        let (_, record) = self.store_output(i, &out_dir, ext.combined.as_ref())?;
        let digest = record.output;
        let summary = report.summary;
        if let Work::Part { part, parts } = work {
            self.artifacts.put_part(&fp, part, parts, &record)?;
            return Ok(WorkerOutcome::Committed {
                output: digest,
                summary,
            });
        }
        // Forced: this run's result replaces the record, as a local --force does.
        let stood = if force {
            self.artifacts.put_run(&fp, &record).map(|()| record)?
        } else {
            self.artifacts.put_run_once(&fp, &record)?
        };
        // Only this fingerprint's: workers of other fingerprints of the same
        // stage (experiments of a sweep) may be running beside this one.
        let scratch = self.scratch_dir(&name, &fp);
        let _ = fsutil::remove_dir_if_exists(&scratch);
        if stood.output != digest {
            tracing::warn!(
                "stage `{name}`: another worker committed {} for this fingerprint first; its result stands (this run wrote {})",
                stood.output.short(),
                digest.short()
            );
            return Ok(WorkerOutcome::AlreadyCommitted {
                output: stood.output,
            });
        }
        Ok(WorkerOutcome::Committed {
            output: digest,
            summary,
        })
    }
}
