//! Directory manifests: the sorted list of (path, size, digest) of every file in
//! a directory. A directory's digest is the digest of its manifest's bytes, so
//! two directories with the same files (names and bytes) have the same digest,
//! whatever their mtimes or the order the files were written in.
//!
//! The text form is one line per file, `DIGEST SIZE PATH`, sorted by path, with
//! `/` as separator: small, diffable, and stable across platforms.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::digest::Digest;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the directory root, `/`-separated.
    pub path: String,
    pub size: u64,
    pub digest: Digest,
}

#[derive(Clone, Debug, Default)]
pub struct Manifest {
    entries: Vec<Entry>,
    /// The digest, computed once: a 50,000-file manifest is 5 MB of text.
    digest: std::sync::OnceLock<Digest>,
}

impl PartialEq for Manifest {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl Eq for Manifest {}

/// A manifest's text could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("manifest line {line}: {what}")]
pub struct ManifestError {
    pub line: usize,
    pub what: String,
}

impl Manifest {
    /// Builds a manifest from entries in any order; paths must be unique.
    pub fn new(mut entries: Vec<Entry>) -> Manifest {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        entries.dedup_by(|a, b| a.path == b.path);
        Manifest {
            entries,
            digest: std::sync::OnceLock::new(),
        }
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.path.as_str().cmp(path))
            .ok()
            .map(|i| &self.entries[i])
    }

    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = String::with_capacity(self.entries.len() * 96);
        for e in &self.entries {
            out.push_str(&e.digest.to_hex());
            out.push(' ');
            out.push_str(&e.size.to_string());
            out.push(' ');
            out.push_str(&e.path);
            out.push('\n');
        }
        out.into_bytes()
    }

    pub fn digest(&self) -> Digest {
        *self
            .digest
            .get_or_init(|| Digest::of_bytes(&self.to_bytes()))
    }

    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let text = std::str::from_utf8(bytes).map_err(|_| ManifestError {
            line: 0,
            what: "not UTF-8".into(),
        })?;
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let bad = |what: &str| ManifestError {
                line: i + 1,
                what: what.to_string(),
            };
            let mut parts = line.splitn(3, ' ');
            let digest = parts.next().ok_or_else(|| bad("empty line"))?;
            let size = parts.next().ok_or_else(|| bad("missing size"))?;
            let path = parts.next().ok_or_else(|| bad("missing path"))?;
            entries.push(Entry {
                path: path.to_string(),
                size: size.parse().map_err(|_| bad("size is not an integer"))?,
                digest: digest.parse().map_err(|_| bad("bad digest"))?,
            });
        }
        Ok(Manifest::new(entries))
    }

    /// Paths whose digest differs, and paths only on one side, at most `limit` in all.
    pub fn diff(&self, newer: &Manifest, limit: usize) -> ManifestDiff {
        let old: BTreeMap<&str, &Entry> =
            self.entries.iter().map(|e| (e.path.as_str(), e)).collect();
        let new: BTreeMap<&str, &Entry> =
            newer.entries.iter().map(|e| (e.path.as_str(), e)).collect();
        let mut d = ManifestDiff::default();
        for (p, e) in &new {
            match old.get(p) {
                None => d.added.push(p.to_string()),
                Some(o) if o.digest != e.digest => d.changed.push(p.to_string()),
                _ => {}
            }
        }
        for p in old.keys() {
            if !new.contains_key(p) {
                d.removed.push(p.to_string());
            }
        }
        d.total = d.added.len() + d.changed.len() + d.removed.len();
        d.changed.truncate(limit);
        d.added.truncate(limit);
        d.removed.truncate(limit);
        d
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ManifestDiff {
    pub changed: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Number of differing paths before truncation.
    pub total: usize,
}

impl std::fmt::Display for ManifestDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        let list = |v: &[String]| {
            v.iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.changed.is_empty() {
            parts.push(format!("changed {}", list(&self.changed)));
        }
        if !self.added.is_empty() {
            parts.push(format!("added {}", list(&self.added)));
        }
        if !self.removed.is_empty() {
            parts.push(format!("removed {}", list(&self.removed)));
        }
        let shown = self.changed.len() + self.added.len() + self.removed.len();
        let mut s = parts.join("; ");
        if self.total > shown {
            s.push_str(&format!(" (and {} more)", self.total - shown));
        }
        f.write_str(&s)
    }
}

/// A regular file found under a root: its `/` path relative to the root, its
/// absolute path, and its metadata (one `stat` per file).
pub struct WalkedFile {
    pub rel: String,
    pub path: PathBuf,
    /// What the file hash cache stamps a file with. Kept small rather than
    /// the whole `Metadata`: 50,000 of these are sorted on every no-op run.
    pub size: u64,
    pub mtime_ns: i128,
    pub inode: u64,
}

/// Every regular file under `root`, sorted by relative path. Symlinks are
/// followed; hidden entries (names starting with `.`) are skipped, so editor
/// and OS litter does not change a digest.
pub fn walk_files(root: &Path) -> std::io::Result<Vec<WalkedFile>> {
    // `DirEntry::metadata` stats relative to the open directory (fstatat), so
    // the kernel does not walk the whole absolute path once per file: at
    // 50,000 files that walk was a third of a no-op run. The stats of one
    // folder run on rayon's threads (they were 40% of a no-op run over
    // 50,000 files, nearly all in the kernel); the result is sorted below,
    // so it does not depend on how they were split.
    use rayon::prelude::*;
    let mut found: Vec<WalkedFile> = Vec::new();
    let mut stack = vec![(String::new(), root.to_path_buf())];
    while let Some((rel, dir)) = stack.pop() {
        let entries: Vec<std::fs::DirEntry> =
            std::fs::read_dir(&dir)?.collect::<std::io::Result<_>>()?;
        let stated: Vec<Option<(WalkedFile, bool)>> = entries
            .par_iter()
            .map(|entry| -> std::io::Result<Option<(WalkedFile, bool)>> {
                let name = entry.file_name();
                let Some(name) = name.to_str() else {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("file name is not UTF-8: {}", entry.path().display()),
                    ));
                };
                if name.starts_with('.') {
                    return Ok(None);
                }
                let rel_path = if rel.is_empty() {
                    name.to_string()
                } else {
                    format!("{rel}/{name}")
                };
                let mut meta = entry.metadata()?;
                if meta.file_type().is_symlink() {
                    meta = std::fs::metadata(entry.path())?;
                }
                let is_dir = meta.is_dir();
                if !is_dir && !meta.is_file() {
                    return Ok(None);
                }
                use std::os::unix::fs::MetadataExt;
                let file = WalkedFile {
                    rel: rel_path,
                    path: entry.path(),
                    size: meta.len(),
                    mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
                    inode: meta.ino(),
                };
                Ok(Some((file, is_dir)))
            })
            .collect::<std::io::Result<_>>()?;
        for (file, is_dir) in stated.into_iter().flatten() {
            if is_dir {
                stack.push((file.rel, file.path));
            } else {
                found.push(file);
            }
        }
    }
    found.sort_unstable_by(|a, b| a.rel.cmp(&b.rel));
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, content: &[u8]) -> Entry {
        Entry {
            path: path.into(),
            size: content.len() as u64,
            digest: Digest::of_bytes(content),
        }
    }

    #[test]
    fn order_of_entries_does_not_matter_and_text_round_trips() {
        let a = Manifest::new(vec![e("b.txt", b"2"), e("a/x.jpg", b"1")]);
        let b = Manifest::new(vec![e("a/x.jpg", b"1"), e("b.txt", b"2")]);
        assert_eq!(a.digest(), b.digest());
        assert_eq!(Manifest::parse(&a.to_bytes()).unwrap(), a);
        assert_eq!(a.get("b.txt").unwrap().size, 1);
    }

    #[test]
    fn names_spaces_survive_and_digest_pinned() {
        let m = Manifest::new(vec![e("with space.txt", b"x")]);
        assert_eq!(Manifest::parse(&m.to_bytes()).unwrap(), m);
        // Pinned: change the text format and this changes; bump CACHE_VERSION then.
        assert_eq!(
            Manifest::new(vec![e("a", b"a")]).digest().to_hex(),
            Digest::of_bytes(format!("{} 1 a\n", Digest::of_bytes(b"a")).as_bytes()).to_hex()
        );
    }

    #[test]
    fn diff_names_changed_added_removed() {
        let old = Manifest::new(vec![e("a", b"1"), e("b", b"2"), e("c", b"3")]);
        let new = Manifest::new(vec![e("a", b"1"), e("b", b"X"), e("d", b"4")]);
        let d = old.diff(&new, 10);
        assert_eq!(d.changed, vec!["b"]);
        assert_eq!(d.added, vec!["d"]);
        assert_eq!(d.removed, vec!["c"]);
        assert_eq!(d.to_string(), "changed `b`; added `d`; removed `c`");
    }
}
