//! The invalidation rules of the code identity, checked on scratch copies of
//! this crate's real sources: what must change a kind's identity, and what
//! must not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::scan::{Identity, identities};

/// A scratch copy of everything the scanner reads.
struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn copy() -> Tree {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&root.join("stages"), &dir.path().join("stages"));
        copy_dir(&root.join("schemas/src"), &dir.path().join("schemas/src"));
        std::fs::copy(root.join("Cargo.lock"), dir.path().join("Cargo.lock")).unwrap();
        Tree { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn identities(&self) -> BTreeMap<String, Identity> {
        identities(self.dir.path()).unwrap()
    }

    /// Replaces the one occurrence of `from` in `rel` by `to`.
    fn edit(&self, rel: &str, from: &str, to: &str) {
        let path = self.path(rel);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.matches(from).count(),
            1,
            "{rel} must hold `{from}` exactly once"
        );
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    }

    fn append(&self, rel: &str, more: &str) {
        let path = self.path(rel);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text + more).unwrap();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dest)
        } else {
            std::fs::copy(&path, &dest).map(|_| ()).unwrap()
        }
    }
}

/// Names of the modules whose digest differs between two scans.
fn changed(a: &BTreeMap<String, Identity>, b: &BTreeMap<String, Identity>) -> Vec<String> {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .filter(|(k, v)| b[*k].digest != v.digest)
        .map(|(k, _)| k.clone())
        .collect()
}

#[test]
fn the_build_embeds_the_identities_of_these_sources() {
    // Guards the build script's wiring: what the binary carries is what the
    // scanner says of the tree it was built from.
    let scanned = identities(Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
    let embedded: BTreeMap<String, String> = super::ALL
        .iter()
        .map(|(m, d)| (m.to_string(), d.to_string()))
        .collect();
    let expected: BTreeMap<String, String> = scanned
        .iter()
        .map(|(m, id)| (m.clone(), id.digest.clone()))
        .collect();
    assert_eq!(embedded, expected);
    for kind in [
        "synth",
        "ingest",
        "preprocess",
        "train_cyclegan",
        "generate",
        "train_classifier",
        "fidelity",
        "evaluate",
    ] {
        assert!(
            scanned.contains_key(kind),
            "no identity for stage module `{kind}`"
        );
    }
}

#[test]
fn closures_follow_the_code() {
    let ids = Tree::copy().identities();
    let classifier = &ids["train_classifier"];
    assert!(
        classifier.modules.contains(&"models".to_string()),
        "{:?}",
        classifier.modules
    );
    assert!(
        classifier
            .crates
            .iter()
            .any(|c| c.starts_with("candle-core ")),
        "{:?}",
        classifier.crates
    );
    assert!(
        classifier
            .crates
            .iter()
            .any(|c| c.starts_with("gemm-common ")),
        "transitive crates count too"
    );
    let ingest = &ids["ingest"];
    assert!(!ingest.modules.contains(&"models".to_string()));
    assert!(
        ingest.crates.iter().any(|c| c.starts_with("polars ")),
        "{:?}",
        ingest.crates
    );
    assert!(
        !ingest.crates.iter().any(|c| c.starts_with("candle-core ")),
        "{:?}",
        ingest.crates
    );
    // Ingest names `anyhow::` in its code, but error plumbing cannot change a byte.
    assert!(
        !ingest.crates.iter().any(|c| c.starts_with("anyhow ")),
        "inert crates are left out"
    );
}

#[test]
fn comments_formatting_docs_and_tests_change_nothing() {
    let tree = Tree::copy();
    let before = tree.identities();
    let rel = "stages/train_classifier/train.rs";
    let text = std::fs::read_to_string(tree.path(rel)).unwrap();
    // Every line indented further and followed by a blank line, comments of
    // both kinds, a doc comment, and a new test module.
    let reformatted: String = text.lines().map(|l| format!("    {l}   \n\n")).collect();
    std::fs::write(
        tree.path(rel),
        format!("//! a new module doc\n/* block /* nested */ */\n{reformatted}"),
    )
    .unwrap();
    tree.append(rel, "\n/// doc\n#[cfg(test)]\nmod more_tests {\n    #[test]\n    fn t() { assert_eq!(1 + 1, 2); }\n}\n");
    tree.edit(
        "stages/train_cyclegan/tests.rs",
        "use super::*;",
        "use super::*;\n#[test]\nfn another() { assert!(true) }",
    );
    assert_eq!(changed(&before, &tree.identities()), Vec::<String>::new());
}

#[test]
fn one_changed_line_changes_its_kind_and_nothing_else() {
    let tree = Tree::copy();
    let before = tree.identities();
    tree.edit(
        "stages/train_classifier/train.rs",
        "0.5 * lr * (1.0 + (std::f64::consts::PI",
        "0.5 * lr * (1.0 + (std::f64::consts::E",
    );
    // fidelity reads images through the classifier's resampling
    // (`train_classifier::augment`), and `gpu-check` trains with the
    // classifier's step, so both are in the closure too.
    assert_eq!(
        changed(&before, &tree.identities()),
        vec!["fidelity", "gpu_check", "train_classifier"]
    );
}

/// The report is `evaluate`'s alone: the classifiers' validation AUC comes
/// from the top-level `metrics` module, so editing a figure or the report's
/// HTML re-runs `evaluate` and no training stage. (`exp_report`, the
/// experiments' page, is a command, not a stage: it draws with `evaluate`.)
#[test]
fn a_report_edit_changes_evaluate_only() {
    let tree = Tree::copy();
    let before = tree.identities();
    tree.edit(
        "stages/evaluate/report.rs",
        "<h2>Reproducing this report</h2>",
        "<h2>Reproducing this report.</h2>",
    );
    assert_eq!(
        changed(&before, &tree.identities()),
        vec!["evaluate", "exp_report"]
    );
}

#[test]
fn a_shared_module_changes_every_kind_that_uses_it() {
    let tree = Tree::copy();
    let before = tree.identities();
    tree.edit(
        "stages/models/layers.rs",
        "const EPS: f64 = 1e-5;",
        "const EPS: f64 = 1.0e-5;",
    );
    let changed = changed(&before, &tree.identities());
    for kind in ["models", "train_cyclegan", "generate", "train_classifier"] {
        assert!(
            changed.contains(&kind.to_string()),
            "{kind} not in {changed:?}"
        );
    }
    for kind in ["synth", "ingest", "preprocess"] {
        assert!(
            !changed.contains(&kind.to_string()),
            "{kind} in {changed:?}"
        );
    }
}

#[test]
fn a_locked_crate_version_changes_the_kinds_that_compute_with_it() {
    let tree = Tree::copy();
    let before = tree.identities();
    let lock = std::fs::read_to_string(tree.path("Cargo.lock")).unwrap();
    // Pretend `cargo update` moved gemm-common (reached only through candle
    // and the kernels) to a new release.
    let at = lock
        .find("name = \"gemm-common\"\nversion = \"")
        .expect("gemm-common locked");
    let version_at = at + "name = \"gemm-common\"\nversion = \"".len();
    let mut bumped = lock.clone();
    bumped.insert(version_at, '9');
    // Dependants name it without a version when only one is locked.
    std::fs::write(tree.path("Cargo.lock"), bumped).unwrap();
    let changed = changed(&before, &tree.identities());
    assert!(
        changed.contains(&"train_cyclegan".to_string()),
        "{changed:?}"
    );
    assert!(
        changed.contains(&"train_classifier".to_string()),
        "{changed:?}"
    );
    assert!(!changed.contains(&"ingest".to_string()), "{changed:?}");
    assert!(!changed.contains(&"synth".to_string()), "{changed:?}");
}

#[test]
fn the_schemas_crate_counts_for_the_kinds_that_use_it() {
    let tree = Tree::copy();
    let before = tree.identities();
    tree.append(
        "schemas/src/lib.rs",
        "\npub const EXTRA_COLUMN: &str = \"x\";\n",
    );
    let changed = changed(&before, &tree.identities());
    assert!(changed.contains(&"ingest".to_string()), "{changed:?}");
    assert!(!changed.contains(&"models".to_string()), "{changed:?}");
}
