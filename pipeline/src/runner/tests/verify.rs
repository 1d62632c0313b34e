//! `verify --rerun`, and the fingerprint a stage sees in `run` and in a
//! re-run.

use super::*;
use crate::error::Error;
use crate::lockfile::LockFile;
use crate::runner::{RunOptions, State};

/// Writes the fingerprint its context carries.
struct Fingerprinted;
impl Stage for Fingerprinted {
    type Params = NoParams;
    const KIND: &'static str = "fingerprinted";
    const CODE: &'static str = "fingerprinted-code";
    const ABOUT: &'static str = "test kind";
    fn run(&self, _: &NoParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
        std::fs::write(ctx.out_dir.join("fp.txt"), ctx.fingerprint.to_hex())?;
        Ok(StageReport::default())
    }
}

/// The context's fingerprint is the one the lock file records, in `run`
/// and in `verify --rerun` (which therefore reproduces the bytes), and it
/// differs between stages with different inputs.
#[test]
fn a_stage_sees_its_own_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(
        &file,
        "[stages.top]\nkind = \"fingerprinted\"\n\n[stages.below]\nkind = \"fingerprinted\"\ninputs = [\"top\"]\n",
    )
    .unwrap();
    let mut registry = Registry::new();
    registry.register(Fingerprinted);
    let open = || open_engine(&file, &registry);
    open().run(&RunOptions::default(), &mut |_| {}).unwrap();
    let lock = LockFile::load(&dir.path().join("p.lock")).unwrap();
    for stage in ["top", "below"] {
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out").join(stage).join("fp.txt")).unwrap(),
            lock.stages[stage].fingerprint.to_hex(),
            "{stage}"
        );
    }
    assert_ne!(
        lock.stages["top"].fingerprint,
        lock.stages["below"].fingerprint
    );
    let outcomes = open().verify_rerun(&[], &mut |_| {}).unwrap();
    assert!(outcomes.iter().all(|o| o.reproduced()), "{outcomes:?}");
}

#[test]
fn verify_rerun_names_the_differing_file_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, "[stages.same]\nkind = \"counter\"\ndeterministic = true\n\n[stages.drifts]\nkind = \"counter\"\ninputs = [\"same\"]\n").unwrap();
    let mut registry = Registry::new();
    registry.register(Counter);
    let open = || open_engine(&file, &registry);
    open().run(&RunOptions::default(), &mut |_| {}).unwrap();
    let lock_before = std::fs::read_to_string(dir.path().join("p.lock")).unwrap();
    let count_before = std::fs::read_to_string(dir.path().join("out/drifts/count.txt")).unwrap();

    let outcomes = open().verify_rerun(&[], &mut |_| {}).unwrap();
    assert_eq!(outcomes.len(), 2);
    assert!(outcomes[0].reproduced(), "{:?}", outcomes[0]);
    assert!(!outcomes[1].reproduced());
    let diff = outcomes[1].differences.as_deref().unwrap();
    assert!(
        diff.contains("count.txt") && !diff.contains("fixed.txt"),
        "{diff}"
    );
    // Only one stage when named.
    assert_eq!(
        open()
            .verify_rerun(&["same".into()], &mut |_| {})
            .unwrap()
            .len(),
        1
    );
    // Nothing committed: lock, outputs, every stage still cached; no leftovers.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("p.lock")).unwrap(),
        lock_before
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out/drifts/count.txt")).unwrap(),
        count_before
    );
    assert!(
        open()
            .plan(&RunOptions::default())
            .unwrap()
            .iter()
            .all(|o| o.state == State::Cached)
    );
    assert!(!dir.path().join("out/.verify").exists());
}

/// A stage that panics on re-execution fails `verify --rerun` the way it
/// fails `run`: an error naming the stage and the panic, no leftovers,
/// nothing changed.
#[test]
fn verify_rerun_catches_a_panicking_stage() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = "[stages.a]\nkind = \"counter\"\ndeterministic = true\n\n\
                    [stages.flaky]\nkind = \"broken\"\ninputs = [\"a\"]\npanic = true\nwhen_exists = \"now-panic\"\n";
    let (registry, file) = parallel_engine(dir.path(), pipeline);
    let open = || open_engine(&file, &registry);
    open().run(&RunOptions::default(), &mut |_| {}).unwrap();
    let lock_before = std::fs::read_to_string(dir.path().join("p.lock")).unwrap();
    std::fs::write(dir.path().join("now-panic"), "").unwrap();
    let mut reproduced = Vec::new();
    let err = open()
        .verify_rerun(&[], &mut |o| reproduced.push(o.stage.clone()))
        .unwrap_err();
    assert!(
        matches!(err, Error::StageFailed { ref stage, .. } if stage == "flaky"),
        "{err}"
    );
    assert_eq!(
        crate::error::chain(&err),
        "stage `flaky` failed; nothing of it was committed: panicked: deliberate panic in flaky"
    );
    assert_eq!(reproduced, ["a"], "the stage before it was compared");
    assert!(
        !dir.path().join("out/.verify").exists(),
        "re-run folders removed"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("p.lock")).unwrap(),
        lock_before
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out/flaky/ok.txt")).unwrap(),
        "fine this time"
    );
}

#[test]
fn verify_rerun_refuses_stale_stages() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, "[stages.a]\nkind = \"counter\"\n").unwrap();
    let mut registry = Registry::new();
    registry.register(Counter);
    let mut engine = open_engine(&file, &registry);
    let err = engine
        .verify_rerun(&[], &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not up to date: a") && err.contains("melanoflow run"),
        "{err}"
    );
}
