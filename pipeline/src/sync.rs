//! Copies content-addressed blobs between the local store and a remote one
//! (`[store] remote`): the transfers behind `push`, `pull`, and a run that
//! finds a result only on the remote.
//!
//! Promises:
//! - Only what is missing moves. Existence is checked in batches: one listing
//!   per `blobs/XX/` prefix when that is fewer requests than one HEAD per
//!   blob. An object whose size differs from the manifest's (a truncated
//!   upload) counts as missing and is replaced.
//! - Every blob is re-hashed on both sides of a transfer: a corrupt local blob
//!   is never uploaded, a corrupt remote blob is never stored locally. Either
//!   is removed from the store holding it (the remote only when writable) and
//!   reported by digest.
//! - Each object is published whole (an S3 PUT, a local rename); many requests
//!   are in flight at once, and memory is bounded by the batch size. Large
//!   blobs stream, `LARGE_CONCURRENCY` at a time; a pulled one is written
//!   straight into the local store's folder and renamed into place once
//!   checked, so it is copied once.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use indicatif::ProgressBar;
use rayon::prelude::*;

use crate::artifacts::{ArtifactError, blob_key};
use crate::digest::Digest;
use crate::store::{BlobStore, ObjectBlobStore};

/// Requests in flight at once.
const CONCURRENCY: usize = 32;
/// A batch of small blobs is read into memory, hashed, then sent together.
const BATCH_OBJECTS: usize = 512;
const BATCH_BYTES: u64 = 128 << 20;
/// From this many blobs on, existence is checked by listing every blob.
const FULL_LISTING: usize = 1000;
/// Blobs at least this large are streamed instead, `LARGE_CONCURRENCY` at a
/// time (each holds at most a 64 MiB body or four 16 MiB parts in memory).
/// One at a time left a 1 GB folder of 50 MB files at 100-200 MB/s on
/// loopback, the link idle while each blob was hashed and stored.
const LARGE: u64 = 16 << 20;
const LARGE_CONCURRENCY: usize = 4;

/// The shared store behind the local one.
pub struct Remote {
    pub store: ObjectBlobStore,
    /// Never write to it (`--remote-read-only`, `remote_read_only = true`).
    pub read_only: bool,
}

/// What a transfer did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Transfer {
    /// Objects copied.
    pub copied: u64,
    /// Objects already at the destination.
    pub present: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// Remote objects written or read (a pack holds many blobs).
    pub objects: u64,
}

impl std::ops::AddAssign for Transfer {
    fn add_assign(&mut self, o: Transfer) {
        self.copied += o.copied;
        self.present += o.present;
        self.bytes += o.bytes;
        self.objects += o.objects;
    }
}

/// A blob to move: its digest and expected size.
pub type Wanted = (Digest, u64);

/// Uploads the `wanted` blobs the remote lacks, reading and checking each
/// from the local store.
pub fn upload(
    local: &dyn BlobStore,
    remote: &Remote,
    wanted: &[Wanted],
    bar: &ProgressBar,
) -> Result<Transfer, ArtifactError> {
    let wanted = dedup(wanted);
    let sizes = remote_sizes(&remote.store, &wanted)?;
    let missing: Vec<Wanted> = wanted
        .iter()
        .zip(&sizes)
        .filter(|(w, s)| **s != Some(w.1))
        .map(|(w, _)| *w)
        .collect();
    let mut done = Transfer {
        present: (wanted.len() - missing.len()) as u64,
        ..Default::default()
    };
    bar.set_length(missing.iter().map(|w| w.1).sum());
    let (large, small): (Vec<Wanted>, Vec<Wanted>) =
        missing.into_iter().partition(|w| w.1 >= LARGE);
    for batch in batches(&small) {
        let items: Vec<(String, Bytes)> = batch
            .par_iter()
            .map(|(d, _)| Ok((blob_key(d), read_local(local, d)?)))
            .collect::<Result<_, ArtifactError>>()?;
        let bytes: u64 = items.iter().map(|(_, b)| b.len() as u64).sum();
        remote.store.put_many(items, CONCURRENCY)?;
        done += Transfer {
            copied: batch.len() as u64,
            present: 0,
            bytes,
            objects: batch.len() as u64,
        };
        bar.inc(bytes);
    }
    done += each_large(&large, bar, |(d, size)| {
        let key = blob_key(&d);
        let path = local_path(local, &key).ok_or_else(|| ArtifactError::Missing {
            digest: d,
            store: local.describe(),
        })?;
        check(
            local,
            &d,
            Digest::of_file(&path).map_err(|source| io(&path, source))?,
            LOCAL_REMEDY,
        )?;
        remote.store.put_file(&key, &path)?;
        Ok(size)
    })?;
    Ok(done)
}

/// Downloads the `wanted` blobs the local store lacks or holds damaged,
/// checking each before it is stored. With `rehash_local`, local copies are
/// re-hashed (cheap next to a transfer), so a corrupt one is replaced, not
/// trusted; without, a local copy of the right size counts as present (for
/// callers that check what they read anyway).
pub fn download(
    local: &dyn BlobStore,
    remote: &Remote,
    wanted: &[Wanted],
    bar: &ProgressBar,
    rehash_local: bool,
) -> Result<Transfer, ArtifactError> {
    let wanted = dedup(wanted);
    let missing = missing_locally(local, &wanted, rehash_local)?;
    let mut done = Transfer {
        present: (wanted.len() - missing.len()) as u64,
        ..Default::default()
    };
    bar.set_length(missing.iter().map(|w| w.1).sum());
    let remote_missing = |d: Digest| ArtifactError::Missing {
        digest: d,
        store: remote.store.describe(),
    };
    let (large, small): (Vec<Wanted>, Vec<Wanted>) =
        missing.into_iter().partition(|w| w.1 >= LARGE);
    for batch in batches(&small) {
        let keys: Vec<String> = batch.iter().map(|(d, _)| blob_key(d)).collect();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let bodies = remote.store.get_many(&key_refs, CONCURRENCY)?;
        let bytes = batch
            .par_iter()
            .zip(bodies)
            .map(|((d, _), body)| {
                let body = body.ok_or_else(|| remote_missing(*d))?;
                check_remote(remote, d, Digest::of_bytes(&body))?;
                let n = body.len() as u64;
                local.put(&blob_key(d), body)?;
                Ok(n)
            })
            .sum::<Result<u64, ArtifactError>>()?;
        done += Transfer {
            copied: batch.len() as u64,
            present: 0,
            bytes,
            objects: batch.len() as u64,
        };
        bar.inc(bytes);
    }
    done += each_large(&large, bar, |(d, size)| {
        let key = blob_key(&d);
        // Straight into the local store's folder when it has one (a rename
        // then publishes it), else through a temporary file and a put.
        let dest = local_path(local, &key);
        let tmp = match &dest {
            Some(path) => {
                path.with_file_name(format!(".{}.pull.{}", d.to_hex(), std::process::id()))
            }
            None => std::env::temp_dir().join(format!(
                "melanoflow-{}-{}",
                d.to_hex(),
                std::process::id()
            )),
        };
        if !remote.store.get_to_file(&key, &tmp)? {
            return Err(remote_missing(d));
        }
        let stored = Digest::of_file(&tmp)
            .map_err(|source| io(&tmp, source))
            .and_then(|actual| check_remote(remote, &d, actual))
            .and_then(|()| match &dest {
                Some(path) => std::fs::rename(&tmp, path).map_err(|source| io(path, source)),
                None => local.put_file(&key, &tmp).map_err(ArtifactError::from),
            });
        let _ = std::fs::remove_file(&tmp);
        stored.map(|()| size)
    })?;
    Ok(done)
}

/// The `wanted` blobs the local store lacks: absent or of the wrong size, or
/// with `rehash_local` also corrupt (such a copy is removed).
pub(crate) fn missing_locally(
    local: &dyn BlobStore,
    wanted: &[Wanted],
    rehash_local: bool,
) -> Result<Vec<Wanted>, ArtifactError> {
    let intact: Vec<bool> = wanted
        .par_iter()
        .map(|w| {
            if rehash_local {
                local_intact(local, w)
            } else {
                Ok(local.size(&blob_key(&w.0))? == Some(w.1))
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(wanted
        .iter()
        .zip(&intact)
        .filter(|(_, ok)| !**ok)
        .map(|(w, _)| *w)
        .collect())
}

/// Whether the local store holds this blob whole and uncorrupted; a damaged
/// copy is removed (with a warning) so that it is fetched again.
fn local_intact(local: &dyn BlobStore, (d, size): &Wanted) -> Result<bool, ArtifactError> {
    let key = blob_key(d);
    if local.size(&key)? != Some(*size) {
        return Ok(false);
    }
    let actual = match local_path(local, &key) {
        Some(path) => match Digest::of_file(&path) {
            Ok(actual) => actual,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(io(&path, source)),
        },
        None => match local.get(&key)? {
            Some(bytes) => Digest::of_bytes(&bytes),
            None => return Ok(false),
        },
    };
    if let Err(e) = check(local, d, actual, "fetching it again from the remote") {
        tracing::warn!("{e}");
        return Ok(false);
    }
    Ok(true)
}

pub(crate) const LOCAL_REMEDY: &str = "it was removed from the local store: `melanoflow pull` restores it from the remote, or run the stage again";

/// Reads a local blob for upload; a corrupt one is removed and reported.
pub(crate) fn read_local(local: &dyn BlobStore, d: &Digest) -> Result<Bytes, ArtifactError> {
    let bytes = local
        .get(&blob_key(d))?
        .ok_or_else(|| ArtifactError::Missing {
            digest: *d,
            store: local.describe(),
        })?;
    check(local, d, Digest::of_bytes(&bytes), LOCAL_REMEDY)?;
    Ok(bytes)
}

/// A remote blob whose bytes are not its name is garbage wherever it came
/// from: drop it (when allowed) so a later push can put a good copy there.
pub(crate) fn check_remote(
    remote: &Remote,
    d: &Digest,
    actual: Digest,
) -> Result<(), ArtifactError> {
    if actual == *d {
        return Ok(());
    }
    let remedy = if remote.read_only {
        "the remote is read-only here, so it was left in place: push a good copy from another machine".to_string()
    } else {
        match remote.store.delete(&blob_key(d)) {
            Ok(()) => "it was removed from the remote: `melanoflow push` from a machine with a good copy repairs it".to_string(),
            Err(e) => format!("removing it failed too ({e})"),
        }
    };
    Err(ArtifactError::Corrupt {
        digest: *d,
        actual,
        store: remote.store.describe(),
        remedy,
    })
}

/// Checks a local blob's hash; a mismatch removes it and is an error.
pub(crate) fn check(
    store: &dyn BlobStore,
    d: &Digest,
    actual: Digest,
    remedy: &str,
) -> Result<(), ArtifactError> {
    if actual == *d {
        return Ok(());
    }
    if let Err(e) = store.delete(&blob_key(d)) {
        tracing::warn!("could not remove corrupt blob {d}: {e}");
    }
    Err(ArtifactError::Corrupt {
        digest: *d,
        actual,
        store: store.describe(),
        remedy: remedy.to_string(),
    })
}

/// Sizes of the wanted blobs on the remote, `None` when absent, in as few
/// requests as is likely: from `FULL_LISTING` blobs on, one listing of all
/// blobs (1,000 keys a page: fewer pages than 256 prefix listings while the
/// remote holds under 256,000 blobs); else one listing per distinct
/// `blobs/XX/` prefix when that beats one HEAD per blob; else HEADs.
fn remote_sizes(
    remote: &ObjectBlobStore,
    wanted: &[Wanted],
) -> Result<Vec<Option<u64>>, ArtifactError> {
    let keys: Vec<String> = wanted.iter().map(|(d, _)| blob_key(d)).collect();
    let prefixes: BTreeSet<String> = keys
        .iter()
        .map(|k| k[..k.rfind('/').expect("blob keys have a folder")].to_string())
        .collect();
    let listing = if keys.len() >= FULL_LISTING {
        vec!["blobs".to_string()]
    } else if prefixes.len() * 2 < keys.len() {
        prefixes.into_iter().collect()
    } else {
        return Ok(remote.size_many(&keys, CONCURRENCY)?);
    };
    let listed = remote.list_sizes(&listing, CONCURRENCY)?;
    Ok(keys.iter().map(|k| listed.get(k).copied()).collect())
}

fn dedup(wanted: &[Wanted]) -> Vec<Wanted> {
    let mut seen = BTreeSet::new();
    wanted
        .iter()
        .filter(|(d, _)| seen.insert(*d))
        .copied()
        .collect()
}

/// Consecutive runs of at most `BATCH_OBJECTS` blobs and about `BATCH_BYTES`.
fn batches(items: &[Wanted]) -> Vec<&[Wanted]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, (_, size)) in items.iter().enumerate() {
        if i > start && (i - start >= BATCH_OBJECTS || bytes + size > BATCH_BYTES) {
            out.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// Moves each large blob with `transfer` (which returns its size), on up to
/// [`LARGE_CONCURRENCY`] threads of their own: the work waits on the network
/// and the disk, so it does not belong on rayon's pool, sized for the CPU.
/// After an error no further blob is started, and an error is returned (the
/// first failed worker's; the others finish the blob they hold).
fn each_large(
    large: &[Wanted],
    bar: &ProgressBar,
    transfer: impl Fn(Wanted) -> Result<u64, ArtifactError> + Sync,
) -> Result<Transfer, ArtifactError> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let worker = || -> Result<Transfer, ArtifactError> {
        let mut done = Transfer::default();
        while !failed.load(Ordering::Relaxed) {
            let Some(&w) = large.get(next.fetch_add(1, Ordering::Relaxed)) else {
                break;
            };
            let size = transfer(w).inspect_err(|_| failed.store(true, Ordering::Relaxed))?;
            done += Transfer {
                copied: 1,
                present: 0,
                bytes: size,
                objects: 1,
            };
            bar.inc(size);
        }
        Ok(done)
    };
    let results: Vec<Result<Transfer, ArtifactError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..LARGE_CONCURRENCY.min(large.len()))
            .map(|_| scope.spawn(worker))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a transfer thread panicked"))
            .collect()
    });
    results
        .into_iter()
        .try_fold(Transfer::default(), |mut all, r| {
            all += r?;
            Ok(all)
        })
}

fn local_path(local: &dyn BlobStore, key: &str) -> Option<PathBuf> {
    local
        .local_root()
        .map(|root| crate::context::join_rel(root, key))
}

fn io(path: &std::path::Path, source: std::io::Error) -> ArtifactError {
    ArtifactError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote() -> Remote {
        Remote {
            store: ObjectBlobStore::memory(),
            read_only: false,
        }
    }

    fn put(store: &dyn BlobStore, bytes: &'static [u8]) -> Wanted {
        let d = Digest::of_bytes(bytes);
        store.put(&blob_key(&d), Bytes::from_static(bytes)).unwrap();
        (d, bytes.len() as u64)
    }

    #[test]
    fn upload_then_download_moves_only_what_is_missing() {
        let local = ObjectBlobStore::memory();
        let remote = remote();
        let a = put(&local, b"alpha");
        let b = put(&local, b"beta");
        put(&remote.store, b"alpha");
        let bar = ProgressBar::hidden();
        let t = upload(&local, &remote, &[a, b, b], &bar).unwrap();
        assert_eq!(
            t,
            Transfer {
                copied: 1,
                present: 1,
                bytes: 4,
                objects: 1
            }
        );
        assert_eq!(
            upload(&local, &remote, &[a, b], &bar).unwrap(),
            Transfer {
                copied: 0,
                present: 2,
                bytes: 0,
                objects: 0
            }
        );

        let fresh = ObjectBlobStore::memory();
        assert_eq!(
            download(&fresh, &remote, &[a, b], &bar, true).unwrap(),
            Transfer {
                copied: 2,
                present: 0,
                bytes: 9,
                objects: 2
            }
        );
        assert_eq!(
            fresh.get(&blob_key(&b.0)).unwrap().unwrap(),
            Bytes::from_static(b"beta")
        );
        // A corrupt local copy (same size) is replaced, not trusted.
        fresh
            .put(&blob_key(&b.0), Bytes::from_static(b"BETA"))
            .unwrap();
        assert_eq!(
            download(&fresh, &remote, &[a, b], &bar, true).unwrap(),
            Transfer {
                copied: 1,
                present: 1,
                bytes: 4,
                objects: 1
            }
        );
        assert_eq!(
            fresh.get(&blob_key(&b.0)).unwrap().unwrap(),
            Bytes::from_static(b"beta")
        );
    }

    #[test]
    fn a_truncated_remote_object_is_replaced() {
        let local = ObjectBlobStore::memory();
        let remote = remote();
        let a = put(&local, b"complete");
        remote
            .store
            .put(&blob_key(&a.0), Bytes::from_static(b"comp"))
            .unwrap();
        let t = upload(&local, &remote, &[a], &ProgressBar::hidden()).unwrap();
        assert_eq!(t.copied, 1);
        assert_eq!(
            remote.store.get(&blob_key(&a.0)).unwrap().unwrap(),
            Bytes::from_static(b"complete")
        );
    }

    #[test]
    fn corrupt_blobs_are_never_copied_and_are_removed() {
        let bar = ProgressBar::hidden();
        // Remote corrupt (same size, other bytes): not stored locally, removed remotely.
        let remote = remote();
        let d = Digest::of_bytes(b"good");
        remote
            .store
            .put(&blob_key(&d), Bytes::from_static(b"evil"))
            .unwrap();
        let local = ObjectBlobStore::memory();
        let e = download(&local, &remote, &[(d, 4)], &bar, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&d.to_hex()) && e.contains("push"), "{e}");
        assert!(!local.exists(&blob_key(&d)).unwrap());
        assert!(!remote.store.exists(&blob_key(&d)).unwrap());

        // Read-only remote: reported, left alone.
        let ro = Remote {
            store: ObjectBlobStore::memory(),
            read_only: true,
        };
        ro.store
            .put(&blob_key(&d), Bytes::from_static(b"evil"))
            .unwrap();
        assert!(
            download(&local, &ro, &[(d, 4)], &bar, true)
                .unwrap_err()
                .to_string()
                .contains("read-only")
        );
        assert!(ro.store.exists(&blob_key(&d)).unwrap());

        // Local corrupt: never uploaded, removed locally.
        local
            .put(&blob_key(&d), Bytes::from_static(b"evil"))
            .unwrap();
        let e = upload(&local, &remote, &[(d, 4)], &bar)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&d.to_hex()) && e.contains("pull"), "{e}");
        assert!(!remote.store.exists(&blob_key(&d)).unwrap());
        assert!(!local.exists(&blob_key(&d)).unwrap());
    }

    #[test]
    fn many_blobs_are_checked_by_listing_and_batched() {
        let local = ObjectBlobStore::memory();
        let remote = remote();
        let blobs: Vec<Wanted> = (0..1500u32)
            .map(|i| {
                let bytes = Bytes::from(i.to_le_bytes().to_vec());
                let d = Digest::of_bytes(&bytes);
                local.put(&blob_key(&d), bytes).unwrap();
                (d, 4)
            })
            .collect();
        assert!(
            batches(&blobs).len() == 3 && batches(&blobs).iter().all(|b| b.len() <= BATCH_OBJECTS)
        );
        let bar = ProgressBar::hidden();
        assert_eq!(
            upload(&local, &remote, &blobs[..700], &bar).unwrap().copied,
            700
        );
        let t = upload(&local, &remote, &blobs, &bar).unwrap();
        assert_eq!((t.copied, t.present, t.bytes), (800, 700, 3200));
        assert_eq!(remote.store.list("blobs").unwrap().len(), 1500);
    }
}
