//! `push` and `pull`: a lock file's results to and from the remote store.
//!
//! What moves for each stage is what a fresh clone needs to skip it: every
//! file blob of its output (small ones in packs, see `packs.rs`), the output
//! manifest, the manifest of the external files it read (when stored), and
//! its run record. Uploads go in that order,
//! so a reader of the remote never finds a record whose bytes are missing; an
//! interrupted push leaves only complete objects, and a retry sends the rest.

use std::collections::BTreeSet;
use std::time::Instant;

use bytes::Bytes;

use crate::artifacts::{ArtifactError, Artifacts, RunRecord, blob_key, run_key};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::lockfile::LockFile;
use crate::packs;
use crate::store::BlobStore;
use crate::sync::{self, Remote, Transfer};

/// What a push or pull did.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShareReport {
    pub stages: usize,
    pub transfer: Transfer,
    pub seconds: f64,
}

impl ShareReport {
    /// `pushed 5003 files (2 already there) as 4 objects for 1 stage(s), 12.3 MiB in 1.23 s`.
    pub fn line(&self, verb: &str) -> String {
        let t = &self.transfer;
        format!(
            "{verb} {} files ({} already there) as {} objects for {} stage(s), {} in {:.2} s",
            t.copied,
            t.present,
            t.objects,
            self.stages,
            human_bytes(t.bytes),
            self.seconds
        )
    }
}

/// Uploads the named stages' results (from the lock file) to the remote.
pub fn push(artifacts: &Artifacts, lock: &LockFile, stages: &[String]) -> Result<ShareReport> {
    let started = Instant::now();
    let remote = remote_of(artifacts)?;
    if remote.read_only {
        return Err(Error::Remote(format!(
            "the remote {} is read-only here (--remote-read-only or remote_read_only = true)",
            remote.store.describe()
        )));
    }
    let local = artifacts.store();
    let bar = artifacts.progress().bytes_bar("pushing");
    let mut transfer = Transfer::default();
    let mut manifests = Vec::new();
    for name in stages {
        let entry = &lock.stages[name];
        let manifest = artifacts.get_manifest(&entry.output)?.ok_or_else(|| {
            Error::Remote(format!(
                "stage `{name}`: its output {} is not in the local store {}; run it first",
                entry.output.short(),
                local.describe()
            ))
        })?;
        transfer += packs::upload(local, remote, &manifest, &bar)?;
        manifests.push((entry.output, manifest.to_bytes().len() as u64));
        if let Some(ext) = entry
            .external
            .filter(|d| local.exists(&blob_key(d)).unwrap_or(false))
        {
            manifests.push((ext, local.size(&blob_key(&ext))?.unwrap_or_default()));
        }
    }
    transfer += sync::upload(local, remote, &manifests, &bar)?;
    let records: Vec<(String, Bytes)> = stages.iter().map(|n| record_of(lock, n)).collect();
    transfer.bytes += records.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
    transfer.objects += records.len() as u64;
    remote.store.put_many(records, 16)?;
    bar.finish_and_clear();
    Ok(ShareReport {
        stages: stages.len(),
        transfer,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Downloads the named stages' results (from the lock file) into the local store.
pub fn pull(artifacts: &Artifacts, lock: &LockFile, stages: &[String]) -> Result<ShareReport> {
    let started = Instant::now();
    let remote = remote_of(artifacts)?;
    let local = artifacts.store();
    let present_before: BTreeSet<Digest> = stages
        .iter()
        .map(|n| lock.stages[n].output)
        .filter(|d| local.exists(&blob_key(d)).unwrap_or(false))
        .collect();
    let bar = artifacts.progress().bytes_bar("pulling");
    let mut transfer = Transfer::default();
    for name in stages {
        let entry = &lock.stages[name];
        let manifest = artifacts.get_manifest(&entry.output)?.ok_or_else(|| {
            Error::Remote(format!(
                "stage `{name}`: its output {} is on neither the local store nor the remote {}; push it from the machine that ran it",
                entry.output.short(),
                remote.store.describe()
            ))
        })?;
        transfer += packs::download(local, remote, &manifest, &bar, true)?;
        if let Some(ext) = entry.external {
            // Only used to explain a changed input: fine to lack.
            let _ = artifacts.get_manifest(&ext);
        }
    }
    bar.finish_and_clear();
    let fetched = stages
        .iter()
        .filter(|n| !present_before.contains(&lock.stages[*n].output))
        .count() as u64;
    transfer.copied += fetched;
    transfer.objects += fetched;
    transfer.present += stages.len() as u64 - fetched;
    for name in stages {
        let (key, bytes) = record_of(lock, name);
        local.put(&key, bytes).map_err(ArtifactError::from)?;
    }
    Ok(ShareReport {
        stages: stages.len(),
        transfer,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn remote_of(artifacts: &Artifacts) -> Result<&Remote> {
    artifacts.remote().ok_or_else(|| Error::Remote("no remote store: set `remote = \"s3://bucket/prefix\"` in the pipeline file's [store] table".into()))
}

/// The run record a lock entry stands for, as stored.
fn record_of(lock: &LockFile, name: &str) -> (String, Bytes) {
    let e = &lock.stages[name];
    let record = RunRecord {
        kind: e.kind.clone(),
        output: e.output,
        files: e.files,
        bytes: e.bytes,
    };
    (run_key(&e.fingerprint), record.to_bytes())
}

/// A byte count for people: `1.5 KiB`, `3.20 GiB`.
pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
