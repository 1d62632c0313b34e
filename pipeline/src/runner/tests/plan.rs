//! Why a stage re-runs: a new code identity re-runs its kind and what is
//! downstream of it, and says so.

use std::collections::BTreeMap;

use super::*;
use crate::lockfile::LockFile;
use crate::runner::{RunOptions, State};

/// `counter` as a later build would see it: same kind and behaviour,
/// other sources, so another code identity.
struct RecodedCounter;
impl Stage for RecodedCounter {
    type Params = CounterParams;
    const KIND: &'static str = "counter";
    const CODE: &'static str = "test-code-2";
    const ABOUT: &'static str = "test kind";
    fn run(&self, p: &CounterParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
        Counter.run(p, ctx)
    }
}

/// Copies nothing, writes a constant: a kind whose code never changes here.
struct Constant;
impl Stage for Constant {
    type Params = NoParams;
    const KIND: &'static str = "constant";
    const CODE: &'static str = "constant-code";
    const ABOUT: &'static str = "test kind";
    fn run(&self, _: &NoParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
        std::fs::write(ctx.out_dir.join("c.txt"), "c")?;
        Ok(StageReport::default())
    }
}

#[test]
fn new_code_reruns_its_kind_and_downstream_only_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(
        &file,
        "[stages.counted]\nkind = \"counter\"\n\n[stages.below]\nkind = \"constant\"\ninputs = [\"counted\"]\n\n\
         [stages.apart]\nkind = \"constant\"\n",
    )
    .unwrap();
    let run = |registry: &Registry| {
        let pipeline = crate::config::load(&file, registry, &[]).unwrap();
        let mut outcomes = BTreeMap::new();
        Engine::open(pipeline, registry, Progress::new(true))
            .unwrap()
            .run(&RunOptions::default(), &mut |o| {
                outcomes.insert(o.stage.clone(), (o.state, o.reasons.join("; ")));
            })
            .unwrap();
        outcomes
    };
    let mut old = Registry::new();
    old.register(Counter).register(Constant);
    run(&old);
    let lock = LockFile::load(&dir.path().join("p.lock")).unwrap();
    assert_eq!(lock.stages["counted"].code, "test-code");

    let mut new = Registry::new();
    new.register(RecodedCounter).register(Constant);
    let outcomes = run(&new);
    assert_eq!(outcomes["counted"].0, State::Ran);
    assert_eq!(
        outcomes["counted"].1,
        "code of kind `counter` changed (test-code -> test-code-2)"
    );
    assert_eq!(outcomes["below"].0, State::Ran);
    assert_eq!(outcomes["below"].1, "upstream `counted` output changed");
    assert_eq!(outcomes["apart"].0, State::Cached);
    assert_eq!(
        LockFile::load(&dir.path().join("p.lock")).unwrap().stages["counted"].code,
        "test-code-2"
    );
}
