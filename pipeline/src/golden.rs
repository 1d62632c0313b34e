//! `verify --against`: a fresh run's lock file compared with a committed
//! ("golden") one, the check CI runs on `data/ci_small.lock`.
//!
//! Two findings, told apart because they mean different things:
//! - **stale**: a stage's fingerprint is unchanged but its output differs.
//!   Same fingerprint must mean same bytes, so this is the bug that would let
//!   a shared store serve old results as `cached` (code the fingerprint does
//!   not see, or bytes that depend on the machine or thread count). The
//!   report names the stage and, where the lock lists them, the files.
//! - **changed**: the fingerprint itself differs (code, parameters, an
//!   upstream output). Expected after an edit, but then the committed lock
//!   must be updated in the same commit; the report says why each changed.

use std::collections::BTreeSet;
use std::fmt;

use crate::digest::Digest;
use crate::fingerprint::changed_params;
use crate::lockfile::{LockEntry, LockFile, params_to_json};
use crate::registry::short_code;

/// What differs between a committed lock file and a fresh run's.
#[derive(Debug, Default)]
pub struct GoldenReport {
    /// Stages compared.
    pub stages: usize,
    pub stale: Vec<StaleOutput>,
    pub changed: Vec<ChangedStage>,
}

/// A stage whose output changed under an unchanged fingerprint.
#[derive(Debug)]
pub struct StaleOutput {
    pub stage: String,
    pub fingerprint: Digest,
    pub expected: Digest,
    pub actual: Digest,
    /// `path (changed|added|removed)`, when both entries list their files.
    pub files: Vec<String>,
}

/// A stage whose fingerprint changed, with the reasons.
#[derive(Debug)]
pub struct ChangedStage {
    pub stage: String,
    pub reasons: Vec<String>,
}

impl GoldenReport {
    pub fn passed(&self) -> bool {
        self.stale.is_empty() && self.changed.is_empty()
    }
}

/// Compares `actual` (the lock file a run just wrote) with `expected`.
pub fn compare(expected: &LockFile, actual: &LockFile) -> GoldenReport {
    let names: BTreeSet<&String> = expected.stages.keys().chain(actual.stages.keys()).collect();
    let mut report = GoldenReport {
        stages: names.len(),
        ..Default::default()
    };
    for name in names {
        let changed = |reasons: Vec<String>| ChangedStage {
            stage: name.clone(),
            reasons,
        };
        match (expected.stages.get(name), actual.stages.get(name)) {
            (Some(_), None) => report
                .changed
                .push(changed(vec!["in the committed lock but not run".into()])),
            (None, Some(_)) => report
                .changed
                .push(changed(vec!["new stage, not in the committed lock".into()])),
            (Some(e), Some(a)) if e.fingerprint == a.fingerprint => {
                if e.output != a.output {
                    report.stale.push(StaleOutput {
                        stage: name.clone(),
                        fingerprint: a.fingerprint,
                        expected: e.output,
                        actual: a.output,
                        files: differing_files(e, a),
                    });
                }
            }
            (Some(e), Some(a)) => {
                let mut reasons = why_changed(e, a);
                if expected.cache_version != actual.cache_version {
                    reasons.push(format!(
                        "engine cache version {} -> {}",
                        expected.cache_version, actual.cache_version
                    ));
                }
                if reasons.is_empty() {
                    reasons.push("fingerprint changed".into());
                }
                report.changed.push(changed(reasons));
            }
            (None, None) => unreachable!("name comes from one of the two"),
        }
    }
    report
}

/// The fingerprint inputs that differ between two entries of one stage.
fn why_changed(e: &LockEntry, a: &LockEntry) -> Vec<String> {
    let mut reasons = Vec::new();
    if e.kind != a.kind {
        reasons.push(format!("kind `{}` -> `{}`", e.kind, a.kind));
    } else if e.code != a.code {
        reasons.push(format!(
            "code of kind `{}` changed ({} -> {})",
            a.kind,
            short_code(&e.code),
            short_code(&a.code)
        ));
    }
    if e.code_version != a.code_version {
        reasons.push(format!(
            "version override v{} -> v{}",
            e.code_version, a.code_version
        ));
    }
    for p in changed_params(&params_to_json(&e.params), &params_to_json(&a.params)) {
        reasons.push(format!("parameter {p}"));
    }
    let upstream: BTreeSet<&String> = e.upstream.keys().chain(a.upstream.keys()).collect();
    for u in upstream {
        if e.upstream.get(u) != a.upstream.get(u) {
            reasons.push(format!("upstream `{u}` output changed"));
        }
    }
    if e.external != a.external {
        reasons.push("external input files changed".into());
    }
    reasons
}

fn differing_files(e: &LockEntry, a: &LockEntry) -> Vec<String> {
    if e.contents.is_empty() || a.contents.is_empty() {
        return Vec::new();
    }
    let paths: BTreeSet<&String> = e.contents.keys().chain(a.contents.keys()).collect();
    paths
        .into_iter()
        .filter_map(|p| match (e.contents.get(p), a.contents.get(p)) {
            (Some(x), Some(y)) if x == y => None,
            (Some(_), Some(_)) => Some(format!("{p} (changed)")),
            (Some(_), None) => Some(format!("{p} (removed)")),
            (None, _) => Some(format!("{p} (added)")),
        })
        .collect()
}

impl fmt::Display for GoldenReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.stale {
            writeln!(
                f,
                "STALE {}: output {} -> {} under the same fingerprint {}",
                s.stage,
                s.expected.short(),
                s.actual.short(),
                s.fingerprint.short()
            )?;
            if s.files.is_empty() {
                writeln!(f, "  (the lock lists no files for this output)")?;
            }
            for file in &s.files {
                writeln!(f, "  {file}")?;
            }
        }
        for c in &self.changed {
            writeln!(f, "CHANGED {}: {}", c.stage, c.reasons.join("; "))?;
        }
        if !self.stale.is_empty() {
            writeln!(
                f,
                "{} stage(s) wrote different bytes under an unchanged fingerprint: a cache would serve stale \
                 results. Make the fingerprint see the change (code identity, parameters) or make the output \
                 deterministic.",
                self.stale.len()
            )?;
        }
        if !self.changed.is_empty() {
            writeln!(
                f,
                "{} stage(s) changed fingerprint: commit the lock file this run wrote in the same commit as the change.",
                self.changed.len()
            )?;
        }
        if self.passed() {
            writeln!(
                f,
                "{} stage(s): every fingerprint and output matches the committed lock",
                self.stages
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fp: &[u8], out: &[u8], files: &[(&str, &[u8])]) -> LockEntry {
        LockEntry {
            kind: "toy".into(),
            code: "c0de".into(),
            code_version: 0,
            fingerprint: Digest::of_bytes(fp),
            output: Digest::of_bytes(out),
            files: files.len() as u64,
            bytes: 1,
            contents: files
                .iter()
                .map(|(p, d)| (p.to_string(), Digest::of_bytes(d)))
                .collect(),
            upstream: Default::default(),
            external: None,
            params: toml::Table::new(),
        }
    }

    fn lock(entries: &[(&str, LockEntry)]) -> LockFile {
        LockFile {
            cache_version: 2,
            stages: entries
                .iter()
                .map(|(n, e)| (n.to_string(), e.clone()))
                .collect(),
        }
    }

    #[test]
    fn identical_locks_pass() {
        let l = lock(&[("a", entry(b"f", b"o", &[("x", b"1")]))]);
        let r = compare(&l, &l);
        assert!(r.passed(), "{r}");
        assert!(
            r.to_string()
                .contains("1 stage(s): every fingerprint and output matches")
        );
    }

    #[test]
    fn same_fingerprint_other_bytes_is_stale_and_names_the_files() {
        let expected = lock(&[(
            "a",
            entry(b"f", b"o", &[("x", b"1"), ("y", b"2"), ("gone", b"3")]),
        )]);
        let actual = lock(&[(
            "a",
            entry(b"f", b"o2", &[("x", b"1"), ("y", b"9"), ("new", b"4")]),
        )]);
        let r = compare(&expected, &actual);
        assert!(!r.passed());
        assert_eq!(r.stale.len(), 1);
        assert_eq!(r.stale[0].stage, "a");
        assert_eq!(
            r.stale[0].files,
            vec!["gone (removed)", "new (added)", "y (changed)"]
        );
        let text = r.to_string();
        assert!(text.starts_with("STALE a: output "), "{text}");
        assert!(text.contains("a cache would serve stale results"), "{text}");
    }

    #[test]
    fn a_changed_fingerprint_says_why() {
        let mut new = entry(b"f2", b"o2", &[]);
        new.code = "beef".into();
        new.params.insert("seed".into(), toml::Value::Integer(7));
        new.upstream.insert("up".into(), Digest::of_bytes(b"u"));
        let r = compare(
            &lock(&[("a", entry(b"f", b"o", &[]))]),
            &lock(&[("a", new), ("b", entry(b"g", b"p", &[]))]),
        );
        assert!(r.stale.is_empty());
        assert_eq!(r.changed.len(), 2);
        let reasons = r.changed[0].reasons.join("; ");
        assert_eq!(
            reasons,
            "code of kind `toy` changed (c0de -> beef); parameter `seed` (unset -> 7); upstream `up` output changed"
        );
        assert_eq!(
            r.changed[1].reasons,
            vec!["new stage, not in the committed lock"]
        );
        assert!(
            r.to_string()
                .contains("commit the lock file this run wrote")
        );
    }
}
