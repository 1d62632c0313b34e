//! Packs: a stage output's small files travel to and from the remote as a few
//! large objects instead of one object each.
//!
//! Layout: `packs/MANIFEST/K.pack` is the concatenation of the output's blobs
//! smaller than [`PACK_BLOB_MAX`], each once (first occurrence in manifest
//! order), cut greedily into packs of about [`PACK_TARGET`] bytes. The layout
//! follows from the manifest alone, so a pack needs no index: whoever holds
//! the manifest knows every blob's pack and offset. Larger blobs stay loose
//! objects (`blobs/XX/...`), like manifests and run records.
//!
//! Promises: a pack is one PUT (published whole or not at all) and is only
//! written when missing or of the wrong size; every blob cut out of a pack is
//! hashed before it is stored, and a pack holding a corrupt blob is removed
//! from a writable remote (the next push writes a good one); a pack that is
//! absent falls back to loose blobs (remotes written blob by blob).

use bytes::{Bytes, BytesMut};
use indicatif::ProgressBar;
use rayon::prelude::*;

use crate::artifacts::{ArtifactError, blob_key};
use crate::digest::Digest;
use crate::manifest::Manifest;
use crate::store::BlobStore;
use crate::sync::{self, Remote, Transfer, Wanted};

/// Blobs smaller than this go into packs.
pub const PACK_BLOB_MAX: u64 = 1 << 20;
/// A pack is closed once it holds about this many bytes.
pub const PACK_TARGET: u64 = 64 << 20;

/// The packs of a manifest: the blobs of each, in order.
pub fn plan(manifest: &Manifest) -> Vec<Vec<Wanted>> {
    let mut seen = std::collections::HashSet::new();
    let mut packs: Vec<Vec<Wanted>> = Vec::new();
    let mut fill = PACK_TARGET;
    for e in manifest.entries() {
        if e.size >= PACK_BLOB_MAX || !seen.insert(e.digest) {
            continue;
        }
        if fill + e.size > PACK_TARGET {
            packs.push(Vec::new());
            fill = 0;
        }
        packs
            .last_mut()
            .expect("a pack was opened")
            .push((e.digest, e.size));
        fill += e.size;
    }
    packs
}

fn pack_key(manifest: &Digest, k: usize) -> String {
    format!("packs/{manifest}/{k}.pack")
}

/// The blobs of a manifest that travel loose.
fn loose(manifest: &Manifest) -> Vec<Wanted> {
    manifest
        .entries()
        .iter()
        .filter(|e| e.size >= PACK_BLOB_MAX)
        .map(|e| (e.digest, e.size))
        .collect()
}

/// Uploads a manifest's files the remote lacks: large ones loose, the rest as
/// packs. Call before uploading the manifest itself.
pub fn upload(
    local: &dyn BlobStore,
    remote: &Remote,
    manifest: &Manifest,
    bar: &ProgressBar,
) -> Result<Transfer, ArtifactError> {
    let mut done = sync::upload(local, remote, &loose(manifest), bar)?;
    let packs = plan(manifest);
    let digest = manifest.digest();
    let keys: Vec<String> = (0..packs.len()).map(|k| pack_key(&digest, k)).collect();
    let sizes = remote.store.size_many(&keys, 8)?;
    for ((key, pack), size) in keys.iter().zip(&packs).zip(sizes) {
        let len: u64 = pack.iter().map(|w| w.1).sum();
        if size == Some(len) {
            done.present += pack.len() as u64;
            continue;
        }
        bar.inc_length(len);
        let blobs: Vec<Bytes> = pack
            .par_iter()
            .map(|(d, _)| sync::read_local(local, d))
            .collect::<Result<_, _>>()?;
        let mut body = BytesMut::with_capacity(len as usize);
        blobs.iter().for_each(|b| body.extend_from_slice(b));
        remote.store.put(key, body.freeze())?;
        done += Transfer {
            copied: pack.len() as u64,
            present: 0,
            bytes: len,
            objects: 1,
        };
        bar.inc(len);
    }
    Ok(done)
}

/// Downloads a manifest's files the local store lacks (or holds damaged, with
/// `rehash_local`): packs for the small ones, loose objects for the rest.
pub fn download(
    local: &dyn BlobStore,
    remote: &Remote,
    manifest: &Manifest,
    bar: &ProgressBar,
    rehash_local: bool,
) -> Result<Transfer, ArtifactError> {
    let mut done = sync::download(local, remote, &loose(manifest), bar, rehash_local)?;
    let digest = manifest.digest();
    for (k, pack) in plan(manifest).into_iter().enumerate() {
        let missing = sync::missing_locally(local, &pack, rehash_local)?;
        done.present += (pack.len() - missing.len()) as u64;
        if missing.is_empty() {
            continue;
        }
        let key = pack_key(&digest, k);
        let len: u64 = pack.iter().map(|w| w.1).sum();
        let Some(body) = remote.store.get(&key)?.filter(|b| b.len() as u64 == len) else {
            // No pack (or a truncated one): the blobs may be there loose.
            done += sync::download(local, remote, &missing, bar, false)?;
            continue;
        };
        bar.inc_length(len);
        let mut offsets = Vec::with_capacity(pack.len());
        let mut at = 0usize;
        for (d, size) in &pack {
            offsets.push((*d, at, *size as usize));
            at += *size as usize;
        }
        let wanted: std::collections::HashSet<Digest> = missing.iter().map(|w| w.0).collect();
        offsets
            .par_iter()
            .filter(|(d, ..)| wanted.contains(d))
            .try_for_each(|(d, at, size)| {
                let blob = body.slice(*at..*at + *size);
                if let Err(e) = sync::check_remote(remote, d, Digest::of_bytes(&blob)) {
                    drop_pack(remote, &key);
                    return Err(e);
                }
                local.put(&blob_key(d), blob).map_err(ArtifactError::from)
            })?;
        done += Transfer {
            copied: missing.len() as u64,
            present: 0,
            bytes: len,
            objects: 1,
        };
        bar.inc(len);
    }
    Ok(done)
}

/// A pack with a corrupt blob is garbage as a whole: remove it when allowed,
/// so that the next push writes a good one.
fn drop_pack(remote: &Remote, key: &str) {
    if !remote.read_only
        && let Err(e) = remote.store.delete(key)
    {
        tracing::warn!("could not remove corrupt pack {key}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Entry;
    use crate::store::ObjectBlobStore;

    /// A manifest over `files` (path, bytes), with each blob in `store`.
    fn stored(store: &dyn BlobStore, files: &[(&str, Vec<u8>)]) -> Manifest {
        Manifest::new(
            files
                .iter()
                .map(|(p, b)| {
                    let d = Digest::of_bytes(b);
                    store.put(&blob_key(&d), Bytes::from(b.clone())).unwrap();
                    Entry {
                        path: p.to_string(),
                        size: b.len() as u64,
                        digest: d,
                    }
                })
                .collect(),
        )
    }

    #[test]
    fn small_files_travel_in_packs_large_ones_loose() {
        let local = ObjectBlobStore::memory();
        let big = vec![7u8; PACK_BLOB_MAX as usize + 5];
        let files: Vec<(&str, Vec<u8>)> = vec![
            ("a.jpg", b"aaa".to_vec()),
            ("b.jpg", b"bb".to_vec()),
            ("copy-of-a.jpg", b"aaa".to_vec()),
            ("big.bin", big.clone()),
        ];
        let m = stored(&local, &files);
        assert_eq!(plan(&m).len(), 1);
        assert_eq!(plan(&m)[0].len(), 2, "a duplicate blob is packed once");
        let remote = Remote {
            store: ObjectBlobStore::memory(),
            read_only: false,
        };
        let bar = ProgressBar::hidden();
        let t = upload(&local, &remote, &m, &bar).unwrap();
        assert_eq!(
            (t.copied, t.objects),
            (3, 2),
            "two small blobs in one pack, one loose"
        );
        assert_eq!(remote.store.list("packs").unwrap().len(), 1);
        assert_eq!(
            upload(&local, &remote, &m, &bar).unwrap().copied,
            0,
            "nothing twice"
        );

        let fresh = ObjectBlobStore::memory();
        let t = download(&fresh, &remote, &m, &bar, true).unwrap();
        assert_eq!((t.copied, t.objects), (3, 2));
        for (_, bytes) in &files {
            assert_eq!(
                fresh
                    .get(&blob_key(&Digest::of_bytes(bytes)))
                    .unwrap()
                    .unwrap(),
                Bytes::from(bytes.clone())
            );
        }
        assert_eq!(download(&fresh, &remote, &m, &bar, true).unwrap().copied, 0);
    }

    #[test]
    fn a_corrupt_blob_in_a_pack_is_named_and_the_pack_dropped() {
        let local = ObjectBlobStore::memory();
        let m = stored(
            &local,
            &[("a", b"first".to_vec()), ("b", b"second".to_vec())],
        );
        let remote = Remote {
            store: ObjectBlobStore::memory(),
            read_only: false,
        };
        upload(&local, &remote, &m, &ProgressBar::hidden()).unwrap();
        let key = pack_key(&m.digest(), 0);
        remote
            .store
            .put(&key, Bytes::from_static(b"firstSECOND"))
            .unwrap();
        let fresh = ObjectBlobStore::memory();
        let e = download(&fresh, &remote, &m, &ProgressBar::hidden(), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&Digest::of_bytes(b"second").to_hex()), "{e}");
        assert!(
            !remote.store.exists(&key).unwrap(),
            "the corrupt pack is removed"
        );
        assert!(
            !fresh
                .exists(&blob_key(&Digest::of_bytes(b"second")))
                .unwrap()
        );
        // The next push writes it again.
        assert_eq!(
            upload(&local, &remote, &m, &ProgressBar::hidden())
                .unwrap()
                .objects,
            1
        );
        download(&fresh, &remote, &m, &ProgressBar::hidden(), true).unwrap();
    }

    #[test]
    fn an_absent_pack_falls_back_to_loose_blobs() {
        let local = ObjectBlobStore::memory();
        let m = stored(&local, &[("a", b"one".to_vec()), ("b", b"two".to_vec())]);
        let remote = Remote {
            store: ObjectBlobStore::memory(),
            read_only: false,
        };
        sync::upload(
            &local,
            &remote,
            &crate::artifacts::wanted(&m),
            &ProgressBar::hidden(),
        )
        .unwrap();
        let fresh = ObjectBlobStore::memory();
        assert_eq!(
            download(&fresh, &remote, &m, &ProgressBar::hidden(), true)
                .unwrap()
                .copied,
            2
        );
    }

    #[test]
    fn packs_close_near_the_target() {
        let entries: Vec<Entry> = (0..200u32)
            .map(|i| Entry {
                path: format!("f{i:03}"),
                size: PACK_BLOB_MAX - 1,
                digest: Digest::of_bytes(&i.to_le_bytes()),
            })
            .collect();
        let packs = plan(&Manifest::new(entries));
        assert_eq!(packs.iter().map(Vec::len).sum::<usize>(), 200);
        assert!(
            packs
                .iter()
                .all(|p| p.iter().map(|w| w.1).sum::<u64>() <= PACK_TARGET),
            "no pack exceeds the target"
        );
        assert_eq!(packs.len(), 4);
    }
}
