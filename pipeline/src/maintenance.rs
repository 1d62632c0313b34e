//! `gc` and `verify`: keeping the store small and proving it intact.
//!
//! `gc` keeps exactly what some lock file in the pipeline's folder references
//! (each stage's output manifest and its files, its external-input manifest,
//! and the run record of its fingerprint) and deletes every other blob and run
//! record, and every part record of a split stage (parts only matter until
//! their assembly commits; don't gc while a cluster run is assembling). `verify` re-hashes every stored blob a lock file references, and
//! each materialised output folder, and lists every mismatch.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::artifacts::{Artifacts, blob_key};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::filecache::FileHashCache;
use crate::lockfile::LockFile;

/// Lock files in `dir`: every `*.lock` that parses as one.
pub fn lock_files_in(dir: &Path) -> Result<Vec<(PathBuf, LockFile)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "lock")
            && let Ok(lock) = LockFile::load(&path)
        {
            out.push((path, lock));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub kept_blobs: usize,
    pub deleted_blobs: usize,
    pub kept_runs: usize,
    pub deleted_runs: usize,
    pub deleted_parts: usize,
}

pub fn gc(artifacts: &Artifacts, locks: &[LockFile], dry_run: bool) -> Result<GcReport> {
    let mut keep_blobs: BTreeSet<Digest> = BTreeSet::new();
    let mut keep_runs: BTreeSet<Digest> = BTreeSet::new();
    for lock in locks {
        for entry in lock.stages.values() {
            keep_runs.insert(entry.fingerprint);
            keep_blobs.insert(entry.output);
            if let Some(ext) = entry.external {
                keep_blobs.insert(ext);
            }
            if let Some(m) = artifacts.get_manifest(&entry.output)? {
                keep_blobs.extend(m.entries().iter().map(|e| e.digest));
            }
        }
    }
    let mut report = GcReport::default();
    for (key, digest) in artifacts.list_blobs()? {
        if digest.is_some_and(|d| keep_blobs.contains(&d)) {
            report.kept_blobs += 1;
        } else {
            report.deleted_blobs += 1;
            if !dry_run {
                artifacts.store().delete(&key)?;
            }
        }
    }
    for (key, fp) in artifacts.list_runs()? {
        if fp.is_some_and(|d| keep_runs.contains(&d)) {
            report.kept_runs += 1;
        } else {
            report.deleted_runs += 1;
            if !dry_run {
                artifacts.store().delete(&key)?;
            }
        }
    }
    for key in artifacts.store().list("parts")? {
        report.deleted_parts += 1;
        if !dry_run {
            artifacts.store().delete(&key)?;
        }
    }
    Ok(report)
}

/// One thing that does not match the lock file.
#[derive(Debug, PartialEq, Eq)]
pub struct Problem {
    pub stage: String,
    pub what: String,
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub stages: usize,
    pub blobs: usize,
    pub problems: Vec<Problem>,
}

/// Re-hashes the stored outputs of every stage in `lock`, and the output
/// folders under `out_dir`, against the lock file.
pub fn verify(artifacts: &Artifacts, lock: &LockFile, out_dir: &Path) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let mut cache = FileHashCache::in_memory();
    for (stage, entry) in &lock.stages {
        report.stages += 1;
        let problem = |what: String| Problem {
            stage: stage.clone(),
            what,
        };
        let manifest = match artifacts.get_manifest(&entry.output) {
            Ok(Some(m)) => m,
            Ok(None) => {
                report.problems.push(problem(format!(
                    "output manifest {} is missing from the store",
                    entry.output
                )));
                continue;
            }
            Err(e) => {
                report.problems.push(problem(e.to_string()));
                continue;
            }
        };
        for e in manifest.entries() {
            report.blobs += 1;
            match artifacts.store().get(&blob_key(&e.digest)) {
                Ok(Some(bytes)) => {
                    let actual = Digest::of_bytes(&bytes);
                    if actual != e.digest {
                        report.problems.push(problem(format!(
                            "stored `{}` (blob {}) is corrupt: it hashes to {actual}",
                            e.path, e.digest
                        )));
                    }
                }
                Ok(None) => report.problems.push(problem(format!(
                    "stored `{}` (blob {}) is missing",
                    e.path, e.digest
                ))),
                Err(err) => report.problems.push(problem(err.to_string())),
            }
        }
        let dir = out_dir.join(stage);
        if dir.is_dir() {
            let on_disk = cache
                .manifest_of_dir(&dir, &|_| {})
                .map_err(|e| Error::io(&dir, e))?;
            if on_disk.digest() != entry.output {
                report.problems.push(problem(format!(
                    "{} differs from the lock file: {}",
                    dir.display(),
                    manifest.diff(&on_disk, 5)
                )));
            }
        } else {
            report.problems.push(problem(format!(
                "{} is missing (`melanoflow run` restores it)",
                dir.display()
            )));
        }
    }
    Ok(report)
}
