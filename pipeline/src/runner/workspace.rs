//! The folders a stage runs in: a private staging folder under
//! `out/.staging`, a scratch folder for checkpoints that survives a killed run
//! of the same fingerprint, and its previous output for per-item reuse.
//!
//! Promises: staging and trash folders are only cleaned under the run lock;
//! scratch folders go once the stage commits; `previous` is offered only when
//! `out/STAGE` holds exactly what the lock file records.

use std::path::PathBuf;

use super::Engine;
use crate::context::{ExternalFiles, StageContext, Upstream};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fsutil;

impl Engine<'_> {
    /// Per stage and fingerprint: `.melanoflow/scratch/STAGE-FINGERPRINT`.
    pub(super) fn scratch_dir(&self, name: &str, fp: &Digest) -> PathBuf {
        self.pipeline
            .state_dir()
            .join("scratch")
            .join(format!("{name}-{}", fp.short()))
    }

    /// Drops the stage's scratch folders (checkpoints of this and of abandoned
    /// fingerprints) once it has committed.
    pub(super) fn remove_scratch(&self, name: &str) {
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

    pub(super) fn staging_root(&self) -> PathBuf {
        self.pipeline.out_dir.join(".staging")
    }

    /// Leftovers of a killed run: safe to delete because we hold the run lock.
    pub(super) fn clean_staging(&self) -> Result<()> {
        for dir in [self.staging_root(), self.pipeline.out_dir.join(".trash")] {
            fsutil::remove_dir_if_exists(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        Ok(())
    }

    /// A fresh staging folder and the context a stage runs with.
    pub(super) fn prepare(
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
    pub(super) fn previous_output(&mut self, name: &str) -> Result<Option<PathBuf>> {
        let Some(committed) = self.lock.stages.get(name).map(|e| e.output) else {
            return Ok(None);
        };
        let dir = self.pipeline.stage_out_dir(name);
        Ok(self
            .dir_manifest(&dir)?
            .filter(|m| m.digest() == committed)
            .map(|_| dir))
    }
}
