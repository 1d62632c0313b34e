//! External input folders in an object store (`s3://bucket/prefix`, ...):
//! their manifest, with each object's BLAKE3 content digest.
//!
//! A digest is computed once per object version: objects are listed (one
//! request per 1,000 keys), each one's (size, ETag) is looked up in the file
//! hash cache, and only new or changed objects are downloaded, concurrently
//! and in bounded batches, and hashed. A no-op run therefore costs the listing.

use crate::digest::Digest;
use crate::error::Result;
use crate::filecache::FileHashCache;
use crate::manifest::{Entry, Manifest};
use crate::store::{BlobStore, ObjectBlobStore};

/// Objects fetched at once; bounds memory to this many objects.
const BATCH: usize = 64;
const CONCURRENCY: usize = 16;

pub fn manifest_of_prefix(
    remote: &ObjectBlobStore,
    cache: &mut FileHashCache,
    on_hashed: &(dyn Fn(u64) + Sync),
) -> Result<Manifest> {
    let base = remote.describe();
    let url_of = |key: &str| format!("{}/{key}", base.trim_end_matches('/'));
    let objects = remote.list_objects()?;
    let mut digests: Vec<Option<Digest>> = objects
        .iter()
        .map(|o| cache.get_remote(&url_of(&o.key), o.size, &o.version))
        .collect();
    let misses: Vec<usize> = (0..objects.len())
        .filter(|&i| digests[i].is_none())
        .collect();
    for batch in misses.chunks(BATCH) {
        let keys: Vec<&str> = batch.iter().map(|&i| objects[i].key.as_str()).collect();
        let bodies = remote.get_many(&keys, CONCURRENCY)?;
        for (&i, body) in batch.iter().zip(bodies) {
            let body = body.ok_or_else(|| {
                let gone = std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "listed, then deleted before it could be read",
                );
                crate::Error::io(url_of(&objects[i].key), gone)
            })?;
            let d = Digest::of_bytes(&body);
            cache.put_remote(
                &url_of(&objects[i].key),
                objects[i].size,
                &objects[i].version,
                d,
            );
            digests[i] = Some(d);
        }
        on_hashed(batch.len() as u64);
    }
    Ok(Manifest::new(
        objects
            .into_iter()
            .zip(digests)
            .map(|(o, d)| Entry {
                path: o.key,
                size: o.size,
                digest: d.expect("listed objects are all hashed"),
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_each_object_version_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("bucket");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.jpg"), b"aaa").unwrap();
        std::fs::write(root.join("sub/b.jpg"), b"bb").unwrap();
        let url = format!("file://{}", root.display());
        let remote = ObjectBlobStore::open(&url, dir.path()).unwrap();
        let mut cache = FileHashCache::in_memory();
        let m = manifest_of_prefix(&remote, &mut cache, &|_| {}).unwrap();
        assert_eq!(
            m.entries()
                .iter()
                .map(|e| e.path.as_str())
                .collect::<Vec<_>>(),
            ["a.jpg", "sub/b.jpg"]
        );
        assert_eq!(m.get("a.jpg").unwrap().digest, Digest::of_bytes(b"aaa"));
        assert_eq!(cache.hashed, 2);
        let again = manifest_of_prefix(&remote, &mut cache, &|_| {}).unwrap();
        assert_eq!(again, m);
        assert_eq!(cache.hashed, 2, "unchanged objects are not fetched again");
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(root.join("a.jpg"), b"AAAA").unwrap();
        let changed = manifest_of_prefix(&remote, &mut cache, &|_| {}).unwrap();
        assert_eq!(
            changed.get("a.jpg").unwrap().digest,
            Digest::of_bytes(b"AAAA")
        );
        assert_eq!(cache.hashed, 3);
    }
}
