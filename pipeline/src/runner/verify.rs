//! `verify --rerun`: re-execute up-to-date stages from scratch on their
//! committed inputs and compare each output with the lock file.
//!
//! Promises: nothing is stored, published or recorded (the store, the output
//! folders and the lock file stay as they were); the re-run folders under
//! `out/.verify` are removed whether the stages succeed, differ or fail; a
//! difference names the files that differ.

use std::time::Instant;

use serde::Serialize;

use super::schedule::run_catching_panics;
use super::workspace::Reuse;
use super::{Engine, RunOptions, State};
use crate::config::StageDecl;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::lockfile::LockFile;

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

impl Engine<'_> {
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
            let upstream = inputs
                .iter()
                .map(|n| {
                    self.dir_manifest(&self.pipeline.stage_out_dir(n))?
                        .ok_or_else(|| Error::NotUpToDate { stages: n.clone() })
                })
                .collect::<Result<Vec<_>>>()?;
            let ext = self.resolve_external(i)?;
            let (out_dir, scratch) = (root.join(&name), root.join(format!("{name}.scratch")));
            // Every selected stage is up to date, so this is its fingerprint now.
            let fp = self.lock.stages[&name].fingerprint;
            let reuse = Reuse::Nothing {
                scratch_dir: scratch.clone(),
            };
            let ctx = self.stage_context(i, fp, out_dir.clone(), upstream, ext.files, reuse)?;
            let decl: &StageDecl = &self.pipeline.stages[i];
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
}
