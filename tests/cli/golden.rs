//! Code identities and the golden-lock check (`verify --against`), through
//! the real binary: the lock records each kind's code identity, and a
//! committed lock catches an output that changed under an unchanged
//! fingerprint, naming the stage and the files.

use crate::fixture::*;

fn hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[test]
fn the_lock_records_the_code_identity_that_kinds_prints() {
    let p = Project::new(SMALL);
    p.ok(&["run"]);
    let lock: toml::Table = toml::from_str(&p.lock()).unwrap();
    let code = lock["stages"]["ingest"]["code"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(hex(&code), "{code}");
    assert_ne!(
        code,
        lock["stages"]["synth"]["code"].as_str().unwrap(),
        "each kind has its own identity"
    );
    let kinds = p.ok(&["kinds"]).stdout;
    let line = kinds
        .lines()
        .find(|l| l.starts_with("ingest "))
        .expect("ingest listed");
    assert!(line.contains(&code[..12]), "{line} vs {code}");
    // Small outputs list their files, so a change can name them.
    let contents = lock["stages"]["ingest"]["contents"]
        .as_table()
        .expect("ingest lists its files");
    assert!(contents.contains_key("metadata.parquet"), "{contents:?}");
    assert!(
        lock["stages"]["synth"].get("contents").is_none(),
        "300 images are too many to list"
    );
}

/// The committed lock with the ingest stage's recorded bytes altered: what
/// a run of a stale build (new bytes, old fingerprint) looks like to CI.
fn with_other_ingest_bytes(lock: &str) -> String {
    let mut t: toml::Table = toml::from_str(lock).unwrap();
    let ingest = t["stages"].as_table_mut().unwrap()["ingest"]
        .as_table_mut()
        .unwrap();
    let other = "ab".repeat(32);
    ingest.insert("output".into(), toml::Value::String(other.clone()));
    ingest["contents"]
        .as_table_mut()
        .unwrap()
        .insert("metadata.parquet".into(), toml::Value::String(other));
    toml::to_string(&t).unwrap()
}

/// Asserts that `out` holds `text`, showing `out` when it does not.
fn says(out: &str, text: &str) {
    assert!(out.contains(text), "expected {text:?} in:\n{out}");
}

#[test]
fn verify_against_a_committed_lock_catches_stale_outputs_and_unrecorded_changes() {
    let p = Project::new(SMALL);
    p.ok(&["run"]);
    let committed = p.lock();
    p.write("committed.lock", &committed);
    let r = p.ok(&["verify", "--against", "committed.lock"]);
    says(
        &r.stdout,
        "2 stage(s): every fingerprint and output matches the committed lock",
    );

    // Same fingerprint, other bytes: the stale-cache bug, named with its file.
    p.write("committed.lock", with_other_ingest_bytes(&committed));
    let r = p.fails(&["verify", "--against", "committed.lock"]);
    says(&r.stdout, "STALE ingest: output abababababab -> ");
    says(&r.stdout, "  metadata.parquet (changed)");
    says(&r.stdout, "a cache would serve stale results");
    assert!(!r.stdout.contains("STALE synth"), "{}", r.stdout);

    // A changed parameter: a new fingerprint, fine only with the lock updated.
    p.write("committed.lock", &committed);
    p.ok(&["run", "--set", "ingest.seed=9"]);
    let r = p.fails(&["verify", "--against", "committed.lock"]);
    says(&r.stdout, "CHANGED ingest: parameter `seed` (42 -> 9)");
    says(&r.stdout, "commit the lock file this run wrote");
    assert!(!r.stdout.contains("synth"), "{}", r.stdout);
}
