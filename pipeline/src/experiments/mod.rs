//! Experiments: named runs of the pipeline with parameter overrides, kept
//! beside the workspace instead of in it, and compared with it and with each
//! other (`exp run|show|apply|remove`, `diff`).
//!
//! Layout: an experiment of `data/pipeline.toml` named `N` runs with its own
//! lock file and output folders under
//! `data/.melanoflow/experiments/pipeline/N/` (`pipeline.lock`, `out/`), and
//! shares the store with the workspace, so a stage whose fingerprint the
//! store already holds is restored, never run again: experiments that share
//! upstream stages compute them once. Its record (`record.json`: overrides,
//! lock file, metrics, what each stage did) is written there and into the
//! store under `experiments/pipeline/N.json`, and to the remote when there is
//! a writable one, so that it travels like any result.
//!
//! Promises:
//! - `exp run` never touches the workspace lock file or output folders.
//! - A record is written only after its run succeeded, atomically.
//! - `gc` keeps what every local experiment's lock file references, unless
//!   told `--workspace-only`.
//! - Metrics and paired tests come from the application's [`ResultReader`];
//!   the engine itself knows nothing of ROC curves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Override, Pipeline};
use crate::error::{Error, Result};
use crate::lockfile::LockFile;
use crate::registry::BoxError;

pub mod apply;
pub mod cli;
pub mod diff;
pub mod run;
pub mod sweep;
pub mod table;

/// Reads an application's results out of a finished workspace, for `exp
/// show` and `diff`.
pub trait ResultReader: Send + Sync {
    /// The stages whose output folders hold the results (what `diff` must
    /// restore for a git revision).
    fn result_stages(&self, pipeline: &Pipeline) -> Vec<String>;
    /// Named metrics, in display order (`classical auc` -> 0.857), of the
    /// workspace whose output folders are under `out_dir`. Empty when the
    /// result stages have not run there.
    fn metrics(&self, pipeline: &Pipeline, out_dir: &Path) -> Result<Vec<Metric>, BoxError>;
    /// Paired tests between two workspaces for every metric they measured
    /// on the same test items (e.g. DeLong for ROC-AUC); what cannot be
    /// paired is left out.
    fn paired(
        &self,
        pipeline: &Pipeline,
        out_a: &Path,
        out_b: &Path,
    ) -> Result<Vec<PairedTest>, BoxError>;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub name: String,
    pub value: f64,
}

/// A paired test of one metric between two workspaces (A - B).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairedTest {
    pub metric: String,
    pub a: f64,
    pub b: f64,
    pub difference: f64,
    /// 95% interval of the difference.
    pub ci: (f64, f64),
    /// Two-sided.
    pub p: f64,
    /// The test's name, e.g. "DeLong".
    pub test: String,
    /// How many items both sides scored (e.g. test images).
    pub n: usize,
}

/// What was recorded about one experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExperimentRecord {
    pub name: String,
    /// The pipeline file's name (its folder is the workspace's).
    pub pipeline: String,
    /// Every `--set` it ran with, as `STAGE.KEY=VALUE`.
    pub overrides: Vec<String>,
    /// The git revision of the workspace when it ran, if a git checkout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_revision: Option<String>,
    /// Its lock file.
    pub lock: LockFile,
    pub metrics: Vec<Metric>,
    /// What each stage did in this run (`ran`, `restored`, `cached`).
    pub stages: BTreeMap<String, String>,
}

impl ExperimentRecord {
    pub fn overrides(&self) -> Result<Vec<Override>> {
        self.overrides
            .iter()
            .map(|o| {
                o.parse().map_err(|e: String| {
                    Error::Experiment(format!("experiment `{}`: {e}", self.name))
                })
            })
            .collect()
    }
}

/// Where a pipeline's experiments live: `.melanoflow/experiments/STEM/`.
pub fn experiments_dir(pipeline: &Pipeline) -> PathBuf {
    pipeline
        .state_dir()
        .join("experiments")
        .join(pipeline_stem(pipeline))
}

fn pipeline_stem(pipeline: &Pipeline) -> String {
    pipeline
        .file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pipeline".into())
}

/// One experiment's folder.
pub fn experiment_dir(pipeline: &Pipeline, name: &str) -> PathBuf {
    experiments_dir(pipeline).join(name)
}

/// The store key of an experiment's record.
pub fn record_key(pipeline: &Pipeline, name: &str) -> String {
    format!("experiments/{}/{name}.json", pipeline_stem(pipeline))
}

/// Points a pipeline at an experiment's lock file and output folders.
pub fn redirect(pipeline: &mut Pipeline, name: &str) {
    let dir = experiment_dir(pipeline, name);
    pipeline.out_dir = dir.join("out");
    pipeline.lock_file = dir.join("pipeline.lock");
}

/// An experiment name is a folder name: letters, digits, `-`, `_`, `.`, not
/// starting with `.` (and not `workspace`, which names the workspace row).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name != "workspace"
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Experiment(format!(
            "`{name}` is not a usable experiment name: letters, digits, `-`, `_` or `.`, \
             not starting with `.`, and not `workspace`"
        )))
    }
}

/// Every experiment of this pipeline: those run here, then those only in
/// the store or on the remote (run elsewhere and shared), each by name.
/// The flag says whether its folders are here.
pub fn list_shared(
    pipeline: &Pipeline,
    artifacts: &crate::artifacts::Artifacts,
) -> Result<Vec<(ExperimentRecord, bool)>> {
    let mut all: Vec<(ExperimentRecord, bool)> =
        list(pipeline)?.into_iter().map(|r| (r, true)).collect();
    let prefix = record_key(pipeline, "");
    let prefix = prefix.trim_end_matches(".json");
    for key in artifacts.list_records(prefix)? {
        let Some(name) = key
            .strip_prefix(prefix)
            .and_then(|k| k.strip_suffix(".json"))
        else {
            continue;
        };
        if all.iter().any(|(r, _)| r.name == name) {
            continue;
        }
        if let Some(record) = stored_record(artifacts, &key)? {
            all.push((record, false));
        }
    }
    all.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    Ok(all)
}

fn stored_record(
    artifacts: &crate::artifacts::Artifacts,
    key: &str,
) -> Result<Option<ExperimentRecord>> {
    let Some(bytes) = artifacts.get_record(key)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        Error::Experiment(format!("store record {key}: not an experiment record: {e}"))
    })
}

/// One experiment's record: run here, else from the store or the remote.
pub fn load_shared(
    pipeline: &Pipeline,
    artifacts: &crate::artifacts::Artifacts,
    name: &str,
) -> Result<ExperimentRecord> {
    check_name(name)?;
    match load(pipeline, name) {
        Ok(r) => Ok(r),
        Err(e) => stored_record(artifacts, &record_key(pipeline, name))?.ok_or(e),
    }
}

/// Every experiment recorded for this pipeline here, by name.
pub fn list(pipeline: &Pipeline) -> Result<Vec<ExperimentRecord>> {
    let dir = experiments_dir(pipeline);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&dir, e)),
    };
    let mut records = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| Error::io(&dir, e))?
            .path()
            .join("record.json");
        if path.is_file() {
            records.push(read_record(&path)?);
        }
    }
    records.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(records)
}

/// One experiment's record, or an error listing the known ones.
pub fn load(pipeline: &Pipeline, name: &str) -> Result<ExperimentRecord> {
    let path = experiment_dir(pipeline, name).join("record.json");
    if path.is_file() {
        return read_record(&path);
    }
    let known: Vec<String> = list(pipeline)?.into_iter().map(|r| r.name).collect();
    Err(Error::Experiment(format!(
        "no experiment `{name}` for {} (known: {})",
        pipeline.file.display(),
        if known.is_empty() {
            "none; `melanoflow exp run` makes one".to_string()
        } else {
            known.join(", ")
        }
    )))
}

fn read_record(path: &Path) -> Result<ExperimentRecord> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::Experiment(format!("{}: not an experiment record: {e}", path.display()))
    })
}

/// Writes a record locally (atomically) and into the store.
pub fn save(
    pipeline: &Pipeline,
    artifacts: &crate::artifacts::Artifacts,
    record: &ExperimentRecord,
) -> Result<()> {
    let text = serde_json::to_string_pretty(record).expect("records serialise");
    let path = experiment_dir(pipeline, &record.name).join("record.json");
    crate::fsutil::write_atomic(&path, text.as_bytes()).map_err(|e| Error::io(&path, e))?;
    artifacts.put_record(&record_key(pipeline, &record.name), text.into_bytes())?;
    Ok(())
}

/// Deletes an experiment: its folder and its record in the store (the
/// results it references stay until `gc`).
pub fn remove(
    pipeline: &Pipeline,
    artifacts: &crate::artifacts::Artifacts,
    name: &str,
) -> Result<()> {
    load(pipeline, name)?;
    artifacts.delete_record(&record_key(pipeline, name))?;
    let dir = experiment_dir(pipeline, name);
    crate::fsutil::remove_dir_if_exists(&dir).map_err(|e| Error::io(&dir, e))
}

/// The lock files of every local experiment of every pipeline in `base_dir`
/// (the roots `gc` keeps besides the workspace's).
pub fn all_lock_files(state_dir: &Path) -> Result<Vec<LockFile>> {
    let root = state_dir.join("experiments");
    let mut locks = Vec::new();
    let Ok(pipelines) = std::fs::read_dir(&root) else {
        return Ok(locks);
    };
    for p in pipelines {
        let p = p.map_err(|e| Error::io(&root, e))?.path();
        let Ok(exps) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in exps {
            let lock = e
                .map_err(|e| Error::io(&p, e))?
                .path()
                .join("pipeline.lock");
            if lock.is_file() {
                locks.push(LockFile::load(&lock)?);
            }
        }
    }
    Ok(locks)
}

/// The workspace's git revision (`HEAD`), with ` (modified)` when tracked
/// files differ from it; `None` outside a git checkout.
pub fn git_revision(dir: &Path) -> Option<String> {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = git(&["rev-parse", "HEAD"]).filter(|h| !h.is_empty())?;
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty {
        format!("{head} (modified)")
    } else {
        head
    })
}
