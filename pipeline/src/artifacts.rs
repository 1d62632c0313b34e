//! The content-addressed layer over a [`BlobStore`]: file blobs and manifests
//! by digest, and run records by fingerprint.
//!
//! Key layout (part of `CACHE_VERSION`):
//!   `blobs/XX/REST`        a file's bytes or a manifest's text, named by its BLAKE3
//!   `runs/FINGERPRINT.json` the run record: which output a fingerprint produced
//!
//! With a remote (`[store] remote`), the local store sits in front of it: a
//! local miss is looked up remotely and the blobs found are kept locally; a
//! result is written to both (the remote unless read-only).
//!
//! Promises: every blob is re-hashed when read and a mismatch is an error
//! naming the digest, never data; blobs are uploaded before the manifest that
//! lists them and the manifest before the run record that references it, in
//! each store, so a record never points at missing bytes.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::context::{Progress, join_rel};
use crate::digest::Digest;
use crate::manifest::Manifest;
use crate::store::{BlobStore, StoreError};
use crate::sync::{self, Remote};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("blob {digest} in store {store} is corrupt (its bytes hash to {actual}); {remedy}")]
    Corrupt {
        digest: Digest,
        actual: Digest,
        store: String,
        remedy: String,
    },
    #[error("blob {digest} is missing from store {store}")]
    Missing { digest: Digest, store: String },
    #[error("manifest {digest} is malformed")]
    BadManifest {
        digest: Digest,
        #[source]
        source: crate::manifest::ManifestError,
    },
    #[error("run record {key} is malformed")]
    BadRecord {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

const NO_REMOTE_REMEDY: &str = "it was removed from the store: run again to recompute it";

/// Every file blob of a manifest with its size, for a transfer.
pub fn wanted(manifest: &Manifest) -> Vec<sync::Wanted> {
    manifest
        .entries()
        .iter()
        .map(|e| (e.digest, e.size))
        .collect()
}

impl RunRecord {
    /// The record as stored: pretty JSON.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec_pretty(self).expect("record serialises"))
    }
}

fn parse_record(key: &str, bytes: &[u8]) -> Result<RunRecord, ArtifactError> {
    serde_json::from_slice(bytes).map_err(|source| ArtifactError::BadRecord {
        key: key.to_string(),
        source,
    })
}

/// What a fingerprint produced.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    pub kind: String,
    pub output: Digest,
    pub files: u64,
    pub bytes: u64,
}

#[derive(Clone)]
pub struct Artifacts {
    store: Arc<dyn BlobStore>,
    remote: Option<Arc<Remote>>,
    progress: Progress,
}

pub fn blob_key(d: &Digest) -> String {
    let hex = d.to_hex();
    format!("blobs/{}/{}", &hex[..2], &hex[2..])
}

pub fn run_key(fingerprint: &Digest) -> String {
    format!("runs/{fingerprint}.json")
}

/// One part of a stage split across workers (a job-array task).
fn part_key(fingerprint: &Digest, part: usize, parts: usize) -> String {
    format!("parts/{fingerprint}/{part}-of-{parts}.json")
}

impl Artifacts {
    pub fn new(store: Arc<dyn BlobStore>) -> Self {
        Artifacts {
            store,
            remote: None,
            progress: Progress::new(true),
        }
    }

    /// Puts `remote` behind the local store; transfers draw on `progress`.
    pub fn with_remote(mut self, remote: Remote, progress: Progress) -> Self {
        self.remote = Some(Arc::new(remote));
        self.progress = progress;
        self
    }

    /// The local store.
    pub fn store(&self) -> &dyn BlobStore {
        self.store.as_ref()
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_deref()
    }

    fn writable_remote(&self) -> Option<&Remote> {
        self.remote.as_deref().filter(|r| !r.read_only)
    }

    /// Stores bytes under their digest (no-op when already present), locally
    /// and on a writable remote.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, ArtifactError> {
        let d = Digest::of_bytes(bytes);
        let key = blob_key(&d);
        let stores = std::iter::once(self.store.as_ref())
            .chain(self.writable_remote().map(|r| &r.store as &dyn BlobStore));
        for store in stores {
            if !store.exists(&key)? {
                store.put(&key, Bytes::copy_from_slice(bytes))?;
            }
        }
        Ok(d)
    }

    /// Reads a blob and checks its digest; `Ok(None)` when absent. A local
    /// miss (or a corrupt local copy, which is removed) is fetched from the
    /// remote and kept locally.
    pub fn get_bytes(&self, d: &Digest) -> Result<Option<Bytes>, ArtifactError> {
        let key = blob_key(d);
        if let Some(bytes) = self.store.get(&key)? {
            match sync::check(
                self.store.as_ref(),
                d,
                Digest::of_bytes(&bytes),
                NO_REMOTE_REMEDY,
            ) {
                Ok(()) => return Ok(Some(bytes)),
                Err(e) if self.remote.is_none() => return Err(e),
                Err(e) => tracing::warn!("{e}; fetching it from the remote"),
            }
        }
        let Some(remote) = self.remote() else {
            return Ok(None);
        };
        let Some(bytes) = remote.store.get(&key)? else {
            return Ok(None);
        };
        sync::check_remote(remote, d, Digest::of_bytes(&bytes))?;
        self.store.put(&key, bytes.clone())?;
        Ok(Some(bytes))
    }

    pub fn put_manifest(&self, m: &Manifest) -> Result<Digest, ArtifactError> {
        self.put_bytes(&m.to_bytes())
    }

    pub fn get_manifest(&self, d: &Digest) -> Result<Option<Manifest>, ArtifactError> {
        let Some(bytes) = self.get_bytes(d)? else {
            return Ok(None);
        };
        Manifest::parse(&bytes)
            .map(Some)
            .map_err(|source| ArtifactError::BadManifest { digest: *d, source })
    }

    /// Stores every file of `dir` listed in `manifest` that the store lacks,
    /// then the manifest itself; returns the manifest's digest. With a
    /// writable remote, the same files go there too, before the manifest.
    pub fn put_dir(&self, dir: &Path, manifest: &Manifest) -> Result<Digest, ArtifactError> {
        manifest
            .entries()
            .par_iter()
            .try_for_each(|e| -> Result<(), ArtifactError> {
                let key = blob_key(&e.digest);
                if !self.store.exists(&key)? {
                    self.store.put_file(&key, &join_rel(dir, &e.path))?;
                }
                Ok(())
            })?;
        if let Some(remote) = self.writable_remote() {
            let bar = self.progress.bytes_bar("uploading to remote");
            crate::packs::upload(self.store.as_ref(), remote, manifest, &bar)?;
            bar.finish_and_clear();
        }
        self.put_manifest(manifest)
    }

    /// Writes every file of `manifest` under `dest` (which must not exist yet),
    /// checking each blob's digest as it lands. Blobs missing locally are
    /// fetched from the remote first.
    pub fn materialize(&self, manifest: &Manifest, dest: &Path) -> Result<(), ArtifactError> {
        if let Some(remote) = self.remote() {
            let bar = self.progress.bytes_bar("fetching from remote");
            // Local copies are checked below as they land: no need to hash them twice.
            crate::packs::download(self.store.as_ref(), remote, manifest, &bar, false)?;
            bar.finish_and_clear();
        }
        std::fs::create_dir_all(dest).map_err(|source| ArtifactError::Io {
            path: dest.display().to_string(),
            source,
        })?;
        let missing = |e: &crate::manifest::Entry| ArtifactError::Missing {
            digest: e.digest,
            store: self.store.describe(),
        };
        manifest
            .entries()
            .par_iter()
            .try_for_each(|e| -> Result<(), ArtifactError> {
                let path = join_rel(dest, &e.path);
                match self.store.local_root() {
                    // A plain file copy (copy_file_range) beats a store read per file.
                    Some(root) => {
                        let io = |source| ArtifactError::Io {
                            path: path.display().to_string(),
                            source,
                        };
                        if let Some(dir) = path.parent() {
                            std::fs::create_dir_all(dir).map_err(io)?;
                        }
                        match std::fs::copy(join_rel(root, &blob_key(&e.digest)), &path) {
                            Ok(_) => {}
                            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                                return Err(missing(e));
                            }
                            Err(err) => return Err(io(err)),
                        }
                    }
                    None => {
                        if !self.store.get_to_file(&blob_key(&e.digest), &path)? {
                            return Err(missing(e));
                        }
                    }
                }
                let actual = Digest::of_file(&path).map_err(|source| ArtifactError::Io {
                    path: path.display().to_string(),
                    source,
                })?;
                if actual != e.digest {
                    let _ = std::fs::remove_file(&path);
                    return Err(sync::check(
                        self.store.as_ref(),
                        &e.digest,
                        actual,
                        self.local_remedy(),
                    )
                    .unwrap_err());
                }
                Ok(())
            })
    }

    fn local_remedy(&self) -> &'static str {
        if self.remote.is_some() {
            sync::LOCAL_REMEDY
        } else {
            NO_REMOTE_REMEDY
        }
    }

    /// Records what `fingerprint` produced, locally and on a writable remote.
    /// Call it after the output's blobs and manifest are stored.
    pub fn put_run(&self, fingerprint: &Digest, record: &RunRecord) -> Result<(), ArtifactError> {
        let json = record.to_bytes();
        self.store.put(&run_key(fingerprint), json.clone())?;
        if let Some(remote) = self.writable_remote() {
            remote.store.put(&run_key(fingerprint), json)?;
        }
        Ok(())
    }

    /// Writes a named record (an experiment's) locally and on a writable
    /// remote; the key is the caller's, outside `blobs/` and `runs/`.
    pub fn put_record(&self, key: &str, bytes: Vec<u8>) -> Result<(), ArtifactError> {
        let bytes = Bytes::from(bytes);
        self.store.put(key, bytes.clone())?;
        if let Some(remote) = self.writable_remote() {
            remote.store.put(key, bytes)?;
        }
        Ok(())
    }

    /// Keys of named records under `prefix`, in the local store and on the
    /// remote, sorted, each once.
    pub fn list_records(&self, prefix: &str) -> Result<Vec<String>, ArtifactError> {
        let mut keys = self.store.list(prefix)?;
        if let Some(remote) = self.remote() {
            keys.extend(remote.store.list(prefix)?);
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// A named record: the local store's, else the remote's.
    pub fn get_record(&self, key: &str) -> Result<Option<Bytes>, ArtifactError> {
        if let Some(bytes) = self.store.get(key)? {
            return Ok(Some(bytes));
        }
        match self.remote() {
            Some(remote) => Ok(remote.store.get(key)?),
            None => Ok(None),
        }
    }

    /// Deletes a named record locally and on a writable remote.
    pub fn delete_record(&self, key: &str) -> Result<(), ArtifactError> {
        self.store.delete(key)?;
        if let Some(remote) = self.writable_remote() {
            remote.store.delete(key)?;
        }
        Ok(())
    }

    /// Records what part `part` of `parts` of a split stage produced, after
    /// its blobs and manifest are stored.
    pub fn put_part(
        &self,
        fingerprint: &Digest,
        part: usize,
        parts: usize,
        record: &RunRecord,
    ) -> Result<(), ArtifactError> {
        let key = part_key(fingerprint, part, parts);
        self.store.put(&key, record.to_bytes())?;
        if let Some(remote) = self.writable_remote() {
            remote.store.put(&key, record.to_bytes())?;
        }
        Ok(())
    }

    /// The record of a committed part whose manifest is stored.
    pub fn get_part(
        &self,
        fingerprint: &Digest,
        part: usize,
        parts: usize,
    ) -> Result<Option<RunRecord>, ArtifactError> {
        let key = part_key(fingerprint, part, parts);
        let bytes = match self.store.get(&key)? {
            Some(b) => Some(b),
            None => match self.remote() {
                Some(r) => r.store.get(&key)?,
                None => None,
            },
        };
        let Some(bytes) = bytes else { return Ok(None) };
        let record = parse_record(&key, &bytes)?;
        Ok(self.get_manifest(&record.output)?.map(|_| record))
    }

    /// Records what `fingerprint` produced unless a record exists already
    /// (two workers racing on one fingerprint); returns the record that
    /// stands. Atomic where the store supports create-only writes.
    pub fn put_run_once(
        &self,
        fingerprint: &Digest,
        record: &RunRecord,
    ) -> Result<RunRecord, ArtifactError> {
        let key = run_key(fingerprint);
        let json = record.to_bytes();
        let stores = std::iter::once(self.store.as_ref())
            .chain(self.writable_remote().map(|r| &r.store as &dyn BlobStore));
        for store in stores {
            if !store.put_if_absent(&key, json.clone())? {
                let existing = store
                    .get(&key)?
                    .map(|b| parse_record(&key, &b))
                    .transpose()?;
                if let Some(existing) = existing.filter(|e| e != record) {
                    return Ok(existing);
                }
            }
        }
        Ok(record.clone())
    }

    /// The record of an earlier run with this fingerprint whose output
    /// manifest is still stored: locally, else on the remote (the record and
    /// manifest are then kept locally; the files follow on materialize).
    pub fn get_run(&self, fingerprint: &Digest) -> Result<Option<RunRecord>, ArtifactError> {
        let key = run_key(fingerprint);
        if let Some(bytes) = self.store.get(&key)? {
            let record = parse_record(&key, &bytes)?;
            if self.store.exists(&blob_key(&record.output))? {
                return Ok(Some(record));
            }
        }
        let Some(remote) = self.remote() else {
            return Ok(None);
        };
        let Some(bytes) = remote.store.get(&key)? else {
            return Ok(None);
        };
        let record = parse_record(&key, &bytes)?;
        if self.get_manifest(&record.output)?.is_none() {
            return Ok(None);
        }
        self.store.put(&key, bytes)?;
        Ok(Some(record))
    }

    /// Every blob digest in the store.
    pub fn list_blobs(&self) -> Result<Vec<(String, Option<Digest>)>, ArtifactError> {
        Ok(self
            .store
            .list("blobs")?
            .into_iter()
            .map(|k| {
                let d = k
                    .strip_prefix("blobs/")
                    .map(|r| r.replace('/', ""))
                    .and_then(|h| h.parse().ok());
                (k, d)
            })
            .collect())
    }

    /// Every run record: (key, fingerprint).
    pub fn list_runs(&self) -> Result<Vec<(String, Option<Digest>)>, ArtifactError> {
        Ok(self
            .store
            .list("runs")?
            .into_iter()
            .map(|k| {
                let d = k
                    .strip_prefix("runs/")
                    .and_then(|r| r.strip_suffix(".json"))
                    .and_then(|h| h.parse().ok());
                (k, d)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Entry;
    use crate::store::ObjectBlobStore;

    fn dir_with(files: &[(&str, &[u8])]) -> (tempfile::TempDir, Manifest) {
        let dir = tempfile::tempdir().unwrap();
        let mut entries = Vec::new();
        for (p, b) in files {
            let path = join_rel(dir.path(), p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b).unwrap();
            entries.push(Entry {
                path: p.to_string(),
                size: b.len() as u64,
                digest: Digest::of_bytes(b),
            });
        }
        (dir, Manifest::new(entries))
    }

    #[test]
    fn put_dir_then_materialize_round_trips() {
        let a = Artifacts::new(Arc::new(ObjectBlobStore::memory()));
        let (dir, m) = dir_with(&[("a.csv", b"x,y\n"), ("img/1.jpg", b"\xff\xd8")]);
        let d = a.put_dir(dir.path(), &m).unwrap();
        assert_eq!(d, m.digest());
        assert_eq!(a.get_manifest(&d).unwrap().unwrap(), m);
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("restored");
        a.materialize(&m, &dest).unwrap();
        assert_eq!(std::fs::read(dest.join("img/1.jpg")).unwrap(), b"\xff\xd8");
    }

    #[test]
    fn corrupt_blob_is_an_error_naming_the_digest() {
        let store = Arc::new(ObjectBlobStore::memory());
        let a = Artifacts::new(store.clone());
        let d = a.put_bytes(b"good").unwrap();
        store
            .put(&blob_key(&d), Bytes::from_static(b"evil"))
            .unwrap();
        let e = a.get_bytes(&d).unwrap_err().to_string();
        assert!(e.contains(&d.to_hex()), "{e}");
        let (_dir, m) = dir_with(&[("f", b"good")]);
        let out = tempfile::tempdir().unwrap();
        assert!(a.materialize(&m, &out.path().join("x")).is_err());
        assert!(
            !out.path().join("x/f").exists(),
            "a corrupt blob is never left in place"
        );
    }

    #[test]
    fn run_records_round_trip_and_miss_is_none() {
        let a = Artifacts::new(Arc::new(ObjectBlobStore::memory()));
        let fp = Digest::of_bytes(b"fp");
        assert_eq!(a.get_run(&fp).unwrap(), None);
        let out = a.put_manifest(&Manifest::default()).unwrap();
        let r = RunRecord {
            kind: "k".into(),
            output: out,
            files: 0,
            bytes: 0,
        };
        a.put_run(&fp, &r).unwrap();
        assert_eq!(a.get_run(&fp).unwrap(), Some(r));
        assert_eq!(a.list_runs().unwrap()[0].1, Some(fp));
    }
}
