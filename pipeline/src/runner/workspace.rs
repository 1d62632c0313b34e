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
use crate::manifest::Manifest;

/// What a stage's run may carry over from earlier runs of it.
pub(super) enum Reuse {
    /// Per-item results from its last committed output, when that is intact,
    /// and checkpoints from its scratch folder (`run`, cluster workers).
    Earlier,
    /// Nothing: a re-execution from scratch (`verify --rerun`), with this
    /// throwaway scratch folder, emptied first.
    Nothing { scratch_dir: PathBuf },
}

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

    /// The context stage `i` runs with (the one place a `StageContext` is
    /// built): it writes into `out_dir`, emptied and created here, and reads
    /// its upstreams from their `out/NAME` folders, which hold `upstream`
    /// (their manifests, in the order of its `inputs`). Upstreams are read
    /// there wherever the stage runs (`run`, `verify --rerun`, a cluster
    /// worker): stages may record those paths, and the bytes must not depend
    /// on where a stage ran.
    pub(super) fn stage_context(
        &mut self,
        i: usize,
        fp: Digest,
        out_dir: PathBuf,
        upstream: Vec<Manifest>,
        external: Vec<ExternalFiles>,
        reuse: Reuse,
    ) -> Result<StageContext> {
        let decl = &self.pipeline.stages[i];
        debug_assert_eq!(upstream.len(), decl.inputs.len());
        let upstream = decl
            .inputs
            .iter()
            .zip(upstream)
            .map(|(n, manifest)| Upstream {
                name: n.clone(),
                kind: self.pipeline.stage(n).expect("validated").kind.clone(),
                dir: self.pipeline.stage_out_dir(n),
                manifest,
            })
            .collect();
        let name = decl.name.clone();
        fsutil::remove_dir_if_exists(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
        std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
        let (previous, scratch_dir) = match reuse {
            Reuse::Earlier => (self.previous_output(&name)?, self.scratch_dir(&name, &fp)),
            Reuse::Nothing { scratch_dir } => {
                fsutil::remove_dir_if_exists(&scratch_dir)
                    .map_err(|e| Error::io(&scratch_dir, e))?;
                (None, scratch_dir)
            }
        };
        Ok(StageContext {
            stage: name,
            fingerprint: fp,
            out_dir,
            base_dir: self.pipeline.base_dir.clone(),
            upstream,
            external,
            progress: self.progress.clone(),
            previous,
            scratch_dir,
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
