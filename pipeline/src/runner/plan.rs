//! Planning: for each stage, its fingerprint and what to do with it: nothing
//! (cached), write its stored result into `out/STAGE` (restore), or run it,
//! with the reasons in the user's terms.
//!
//! Promises: deciding never writes an output folder, the store or the lock
//! file (it only hashes, through the file hash cache); the reasons name what
//! changed (parameter, code, upstream, input files), not just "fingerprint
//! changed", whenever the lock file knows the previous run.

use std::collections::BTreeMap;
use std::path::Path;

use super::external::Externals;
use super::{Engine, Output, RunOptions, StageOutcome, State};
use crate::digest::Digest;
use crate::error::Result;
use crate::fingerprint::{CACHE_VERSION, FingerprintInputs, changed_params, fingerprint};
use crate::lockfile::{LockEntry, params_to_json, params_to_toml};
use crate::manifest::Manifest;
use crate::registry::short_code;

/// What the planner decided for a stage, from its fingerprint, the lock
/// file, its output folder and the store. Only a decision: what then happened
/// (a restore can find the stored copy damaged and run the stage instead) is
/// the outcome's [`State`].
pub(super) enum Decision {
    /// Up to date: its output folder holds this output.
    Cached(Output),
    /// The store holds its result; only the output folder needs writing.
    Restore {
        output: Digest,
        reasons: Vec<String>,
    },
    /// It must run.
    Run { reasons: Vec<String> },
}

impl Engine<'_> {
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

    pub(super) fn fingerprint_of(
        &self,
        i: usize,
        upstream: &[(String, Digest)],
        ext: &Externals,
    ) -> Digest {
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

    pub(super) fn decide(
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
}

fn strip_nulls(v: &serde_json::Value) -> serde_json::Value {
    params_to_json(&params_to_toml(v))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
