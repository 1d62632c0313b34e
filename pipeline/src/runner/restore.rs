//! Restoring: writing a stored output into `out/STAGE` (for `run` when the
//! store already holds a stage's result, and for `checkout`, which writes the
//! lock file's outputs and runs nothing).
//!
//! Promises: the folder is replaced whole, through staging, so a reader sees
//! the old output or the new one; a manifest missing from the store is
//! `ArtifactError::Missing`, naming the store.

use super::{Engine, Output};
use crate::artifacts::ArtifactError;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::lockfile::LockFile;

impl Engine<'_> {
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

    /// Writes a stored output into `out/STAGE` (through staging, atomically).
    pub(super) fn restore(&mut self, name: &str, output: Digest) -> Result<Output> {
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
}
