//! The file hash cache: remembers each file's digest under its
//! (path, size, mtime, inode) stamp, so a no-op run stats 50,000 input files
//! instead of reading them. A file whose stamp changed is hashed again; a file
//! touched without changing its bytes is hashed again once and then found
//! unchanged by digest, so nothing downstream re-runs.
//!
//! Promise: a digest returned here equals the BLAKE3 of the file's bytes at the
//! time of the call, unless the file was rewritten within the same nanosecond
//! mtime with the same size and inode. To keep that corner closed, a file whose
//! mtime is less than `RACY_WINDOW` old when hashed is not remembered (git's
//! "racily clean" rule), so it is re-hashed on the next run.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rayon::prelude::*;

use crate::digest::Digest;
use crate::manifest::{Entry, Manifest, walk_files};

const RACY_WINDOW: Duration = Duration::from_secs(2);
const HEADER: &str = "# melanoflow file hash cache v1: digest size mtime_ns inode path";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    inode: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            inode: meta.ino(),
        }
    }
}

/// One remembered file: its path's bytes, stamp and digest.
type CacheRow = (Box<[u8]>, (Stamp, Digest));

#[derive(Default)]
pub struct FileHashCache {
    file: Option<PathBuf>,
    /// Keyed by the path's bytes: hashing a `Path` goes component by
    /// component and showed up in no-op profiles.
    entries: HashMap<Box<[u8]>, (Stamp, Digest)>,
    dirty: bool,
    /// Files read and hashed (cache misses) since load: the work the cache did not save.
    pub hashed: usize,
}

impl FileHashCache {
    /// A cache that is never saved (tests, read-only commands on a fresh checkout).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Loads the cache file; a missing or unreadable file starts an empty cache
    /// (the cache only saves work, it never decides correctness).
    pub fn load(file: &Path) -> Self {
        let mut cache = FileHashCache {
            file: Some(file.to_path_buf()),
            ..Default::default()
        };
        let Ok(text) = std::fs::read_to_string(file) else {
            return cache;
        };
        // Rows are parsed on rayon's threads (50,000 digests to decode on a
        // no-op run over ISIC-sized folders), then inserted in file order.
        let body = text.split_once('\n').map_or("", |(_, rest)| rest);
        let rows: Option<Vec<CacheRow>> = body
            .par_lines()
            .map(|line| {
                let mut parts = line.splitn(5, ' ');
                let digest: Digest = parts.next()?.parse().ok()?;
                let size = parts.next()?.parse().ok()?;
                let mtime_ns = parts.next()?.parse().ok()?;
                let inode = parts.next()?.parse().ok()?;
                let path: Box<[u8]> = parts.next()?.as_bytes().into();
                let stamp = Stamp {
                    size,
                    mtime_ns,
                    inode,
                };
                Some((path, (stamp, digest)))
            })
            .collect();
        match rows {
            Some(rows) => cache.entries.extend(rows),
            None => tracing::warn!("ignoring corrupt file hash cache {}", file.display()),
        }
        cache
    }

    /// Size and digest of one file.
    pub fn digest(&mut self, path: &Path) -> std::io::Result<(u64, Digest)> {
        let mut out = self.digest_many(&[path.to_path_buf()], &|_| {})?;
        Ok(out.pop().expect("one result per path"))
    }

    /// Size and digest of each file, hashing the misses in parallel.
    /// `on_hashed(n)` is called as files are hashed, for progress bars.
    pub fn digest_many(
        &mut self,
        paths: &[PathBuf],
        on_hashed: &(dyn Fn(u64) + Sync),
    ) -> std::io::Result<Vec<(u64, Digest)>> {
        let stamps: Vec<Stamp> = paths
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .map(|m| Stamp::of(&m))
                    .map_err(|e| with_path(e, p))
            })
            .collect::<Result<_, _>>()?;
        self.digest_stamped(paths, &stamps, on_hashed)
    }

    fn digest_stamped(
        &mut self,
        paths: &[PathBuf],
        stamps: &[Stamp],
        on_hashed: &(dyn Fn(u64) + Sync),
    ) -> std::io::Result<Vec<(u64, Digest)>> {
        let mut results: Vec<Option<(u64, Digest)>> = paths
            .iter()
            .zip(stamps)
            .map(|(p, s)| match self.entries.get(key(p)) {
                Some((cached, d)) if cached == s => Some((s.size, *d)),
                _ => None,
            })
            .collect();
        let misses: Vec<usize> = (0..paths.len()).filter(|&i| results[i].is_none()).collect();
        let hashed: Vec<(usize, Digest)> = misses
            .par_iter()
            .map(|&i| {
                let d = Digest::of_file(&paths[i]).map_err(|e| with_path(e, &paths[i]))?;
                on_hashed(1);
                Ok((i, d))
            })
            .collect::<std::io::Result<_>>()?;
        self.hashed += hashed.len();
        let now = SystemTime::now();
        for (i, digest) in hashed {
            let stamp = stamps[i];
            results[i] = Some((stamp.size, digest));
            if is_racy(stamp, now) {
                self.entries.remove(key(&paths[i]));
            } else {
                self.entries.insert(key(&paths[i]).into(), (stamp, digest));
            }
            self.dirty = true;
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every path was looked up or hashed"))
            .collect())
    }

    /// Remembers the digest of a file this process just wrote and hashed.
    pub fn record(&mut self, path: &Path, digest: Digest) -> std::io::Result<()> {
        let stamp = Stamp::of(&std::fs::metadata(path).map_err(|e| with_path(e, path))?);
        if !is_racy(stamp, SystemTime::now()) {
            self.entries.insert(key(path).into(), (stamp, digest));
            self.dirty = true;
        }
        Ok(())
    }

    /// The digest remembered for an object in a remote store, if its size and
    /// version (ETag or mtime) are unchanged. Keyed by the object's URL.
    pub fn get_remote(&self, url: &str, size: u64, version: &str) -> Option<Digest> {
        match self.entries.get(url.as_bytes()) {
            Some((stamp, digest)) if *stamp == remote_stamp(size, version) => Some(*digest),
            _ => None,
        }
    }

    /// Remembers a remote object's digest under its size and version.
    pub fn put_remote(&mut self, url: &str, size: u64, version: &str, digest: Digest) {
        self.entries
            .insert(url.as_bytes().into(), (remote_stamp(size, version), digest));
        self.hashed += 1;
        self.dirty = true;
    }

    /// Drops every entry under `dir` (a staging folder that was renamed away).
    pub fn forget_under(&mut self, dir: &Path) {
        let before = self.entries.len();
        let mut prefix = key(dir).to_vec();
        prefix.push(b'/');
        self.entries.retain(|p, _| !p.starts_with(&prefix));
        self.dirty |= self.entries.len() != before;
    }

    /// Writes the cache back (atomically) if anything changed.
    pub fn save(&mut self) -> std::io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        let mut rows: Vec<_> = self.entries.iter().collect();
        rows.sort_by(|a, b| a.0.cmp(b.0));
        let mut text = String::with_capacity(rows.len() * 120);
        text.push_str(HEADER);
        text.push('\n');
        for (path, (s, d)) in rows {
            let Ok(p) = std::str::from_utf8(path) else {
                continue;
            };
            text.push_str(&format!(
                "{} {} {} {} {}\n",
                d, s.size, s.mtime_ns, s.inode, p
            ));
        }
        crate::fsutil::write_atomic(file, text.as_bytes())?;
        self.dirty = false;
        Ok(())
    }

    /// The manifest of every file under `root`, hashing only files whose stamp changed.
    pub fn manifest_of_dir(
        &mut self,
        root: &Path,
        on_hashed: &(dyn Fn(u64) + Sync),
    ) -> std::io::Result<Manifest> {
        let files = walk_files(root).map_err(|e| with_path(e, root))?;
        let stamps: Vec<Stamp> = files
            .iter()
            .map(|f| Stamp {
                size: f.size,
                mtime_ns: f.mtime_ns,
                inode: f.inode,
            })
            .collect();
        let paths: Vec<PathBuf> = files.iter().map(|f| f.path.clone()).collect();
        let digests = self.digest_stamped(&paths, &stamps, on_hashed)?;
        Ok(Manifest::new(
            files
                .into_iter()
                .zip(digests)
                .map(|(f, (size, digest))| Entry {
                    path: f.rel,
                    size,
                    digest,
                })
                .collect(),
        ))
    }
}

/// A remote object's version string folded into the stamp's inode slot
/// (remote keys are URLs, so they never collide with local paths).
fn remote_stamp(size: u64, version: &str) -> Stamp {
    let h = Digest::of_bytes(version.as_bytes());
    Stamp {
        size,
        mtime_ns: -1,
        inode: u64::from_le_bytes(h.0[..8].try_into().expect("8 bytes")),
    }
}

fn is_racy(stamp: Stamp, now: SystemTime) -> bool {
    let now_ns = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(i128::MAX);
    now_ns - stamp.mtime_ns < RACY_WINDOW.as_nanos() as i128
}

fn key(path: &Path) -> &[u8] {
    path.as_os_str().as_encoded_bytes()
}

fn with_path(e: std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age(path: &Path) {
        let old = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }

    #[test]
    fn unchanged_stamp_is_not_rehashed_and_survives_save_load() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.jpg");
        std::fs::write(&f, b"abc").unwrap();
        age(&f);
        let cache_file = dir.path().join("cache");
        let mut c = FileHashCache::load(&cache_file);
        assert_eq!(c.digest(&f).unwrap(), (3, Digest::of_bytes(b"abc")));
        assert_eq!(c.hashed, 1);
        c.save().unwrap();
        let mut c = FileHashCache::load(&cache_file);
        assert_eq!(c.digest(&f).unwrap(), (3, Digest::of_bytes(b"abc")));
        assert_eq!(c.hashed, 0, "a cached stamp must not be read again");
    }

    #[test]
    fn changed_bytes_are_rehashed_even_with_same_size() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"abc").unwrap();
        age(&f);
        let mut c = FileHashCache::in_memory();
        c.digest(&f).unwrap();
        std::fs::write(&f, b"xyz").unwrap();
        assert_eq!(c.digest(&f).unwrap().1, Digest::of_bytes(b"xyz"));
        assert_eq!(c.hashed, 2);
    }

    #[test]
    fn fresh_files_are_not_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"abc").unwrap();
        let mut c = FileHashCache::in_memory();
        c.digest(&f).unwrap();
        c.digest(&f).unwrap();
        assert_eq!(
            c.hashed, 2,
            "a file younger than the racy window is re-hashed"
        );
    }

    #[test]
    fn corrupt_cache_file_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let cache_file = dir.path().join("cache");
        std::fs::write(&cache_file, "header\nnot a row\n").unwrap();
        assert!(FileHashCache::load(&cache_file).entries.is_empty());
    }
}
