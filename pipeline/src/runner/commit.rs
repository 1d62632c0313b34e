//! Committing a stage that ran: hash what it wrote, store blobs and manifest,
//! write the run record (fingerprint -> output), swap the staging folder into
//! `out/STAGE`, then record it in the lock file.
//!
//! Promises: each step happens only after the one before succeeded, so a
//! crash or kill at any point leaves the previous state usable (a run record
//! never names blobs that are not stored; `out/STAGE` is replaced whole); a
//! failed run leaves nothing behind.

use std::path::Path;
use std::time::Instant;

use super::schedule::Launch;
use super::{Engine, Output, StageOutcome, State};
use crate::artifacts::RunRecord;
use crate::context::StageReport;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fingerprint::CACHE_VERSION;
use crate::fsutil;
use crate::lockfile::{LockEntry, params_to_toml};
use crate::manifest::Manifest;
use crate::registry::BoxError;

/// A stage that is done, for the lock file and the outcome line.
pub(super) struct Finished {
    pub(super) i: usize,
    pub(super) fp: Digest,
    pub(super) state: State,
    pub(super) reasons: Vec<String>,
    pub(super) upstream: Vec<(String, Digest)>,
    pub(super) external: Option<Manifest>,
    pub(super) summary: Option<String>,
    pub(super) started: Instant,
}

impl Engine<'_> {
    /// Commits what a stage's run wrote: hash, upload, record, then make
    /// visible. A failed run leaves nothing behind.
    pub(super) fn commit(
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
    pub(super) fn store_output(
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

    /// Records a finished stage in the lock file (saved at once: a later
    /// failure keeps what finished) and says what happened.
    pub(super) fn record(&mut self, f: Finished, output: Output) -> Result<(StageOutcome, Output)> {
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

    pub(super) fn publish(
        &mut self,
        name: &str,
        staging: &Path,
        manifest: &Manifest,
    ) -> Result<()> {
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
}
