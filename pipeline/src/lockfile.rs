//! The lock file (`pipeline.lock` beside `pipeline.toml`): per stage, the
//! fingerprint it last ran with, its full parameters, what it read, and the
//! digest of what it wrote. Committed to git, it is what CI compares to prove
//! a run reproducible, and what `status` diffs against to say why a stage is
//! stale.
//!
//! TOML, keys sorted, no timestamps: the same run writes the same bytes.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

const HEADER: &str = "# Written by melanoflow: the last committed run of each stage.\n\
# Commit this file; `melanoflow verify` checks outputs against it.\n\n";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    /// The engine's `CACHE_VERSION` when written.
    pub cache_version: u32,
    #[serde(default)]
    pub stages: BTreeMap<String, LockEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockEntry {
    pub kind: String,
    /// The kind's code identity (`Stage::CODE`) when it ran.
    #[serde(default)]
    pub code: String,
    /// The kind's explicit override (`Stage::VERSION`).
    pub code_version: u32,
    pub fingerprint: Digest,
    /// Digest of the output folder's manifest.
    pub output: Digest,
    pub files: u64,
    pub bytes: u64,
    /// Path -> digest of each output file, for outputs of at most
    /// [`CONTENTS_LIMIT`] files: a changed output then names its files in
    /// `git diff` and in `verify --against`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub contents: BTreeMap<String, Digest>,
    /// Upstream stage name -> its output digest, as read by this run.
    #[serde(default)]
    pub upstream: BTreeMap<String, Digest>,
    /// Digest of the manifest of the external files read, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<Digest>,
    /// The stage's parameters with defaults filled in.
    pub params: toml::Table,
}

/// Outputs of up to this many files list them in the lock entry; larger ones
/// (image folders) would drown the file, and are named by their digest only.
pub const CONTENTS_LIMIT: usize = 32;

/// The `contents` of a lock entry for an output manifest.
pub fn contents_of(manifest: &crate::manifest::Manifest) -> BTreeMap<String, Digest> {
    if manifest.len() > CONTENTS_LIMIT {
        return BTreeMap::new();
    }
    manifest
        .entries()
        .iter()
        .map(|e| (e.path.clone(), e.digest))
        .collect()
}

#[derive(Debug, thiserror::Error)]
#[error("lock file {path}: {message}")]
pub struct LockFileError {
    pub path: String,
    pub message: String,
}

impl LockFile {
    /// Reads the lock file; a missing file is an empty lock.
    pub fn load(path: &Path) -> Result<LockFile, LockFileError> {
        let err = |message: String| LockFileError {
            path: path.display().to_string(),
            message,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LockFile::default()),
            Err(e) => return Err(err(e.to_string())),
        };
        toml::from_str(&text).map_err(|e| {
            err(format!(
                "{e} (delete it to start over; outputs stay cached in the store)"
            ))
        })
    }

    pub fn to_text(&self) -> String {
        let body = toml::to_string(self).expect("lock file serialises");
        format!("{HEADER}{body}")
    }

    /// Writes atomically; unchanged content is not rewritten (keeps mtimes quiet).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let text = self.to_text();
        if std::fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        crate::fsutil::write_atomic(path, text.as_bytes())
    }
}

/// Parameters as stored in the lock file: JSON nulls (unset optional keys) are
/// dropped because TOML has no null.
pub fn params_to_toml(v: &serde_json::Value) -> toml::Table {
    fn strip(v: &serde_json::Value) -> Option<toml::Value> {
        Some(match v {
            serde_json::Value::Null => return None,
            serde_json::Value::Bool(b) => toml::Value::Boolean(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => toml::Value::Integer(i),
                None => toml::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => toml::Value::String(s.clone()),
            serde_json::Value::Array(a) => toml::Value::Array(a.iter().filter_map(strip).collect()),
            serde_json::Value::Object(m) => toml::Value::Table(
                m.iter()
                    .filter_map(|(k, v)| strip(v).map(|v| (k.clone(), v)))
                    .collect(),
            ),
        })
    }
    match strip(v) {
        Some(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    }
}

/// The inverse of [`params_to_toml`], for comparing with current parameters.
pub fn params_to_json(t: &toml::Table) -> serde_json::Value {
    serde_json::to_value(t).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_deterministic() {
        let mut lock = LockFile {
            cache_version: 1,
            ..Default::default()
        };
        let params = serde_json::json!({"seed": 42, "frac": 0.15, "dups": null, "list": ["a"]});
        lock.stages.insert(
            "ingest".into(),
            LockEntry {
                kind: "ingest".into(),
                code: "c0de".into(),
                code_version: 1,
                fingerprint: Digest::of_bytes(b"f"),
                output: Digest::of_bytes(b"o"),
                files: 3,
                bytes: 100,
                contents: [("metadata.parquet".to_string(), Digest::of_bytes(b"m"))].into(),
                upstream: [("synth".to_string(), Digest::of_bytes(b"s"))].into(),
                external: None,
                params: params_to_toml(&params),
            },
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pipeline.lock");
        lock.save(&path).unwrap();
        let back = LockFile::load(&path).unwrap();
        assert_eq!(back, lock);
        assert_eq!(back.to_text(), lock.to_text());
        let json = params_to_json(&back.stages["ingest"].params);
        assert_eq!(
            json,
            serde_json::json!({"seed": 42, "frac": 0.15, "list": ["a"]})
        );
    }

    #[test]
    fn missing_is_empty_and_garbage_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            LockFile::load(&dir.path().join("none.lock")).unwrap(),
            LockFile::default()
        );
        let bad = dir.path().join("bad.lock");
        std::fs::write(&bad, "stages = 3\n").unwrap();
        let e = LockFile::load(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.lock"), "{e}");
    }
}
