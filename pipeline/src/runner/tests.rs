//! The engine's own tests, on test stage kinds defined here: what `run`
//! schedules and reports (`schedule`), why a stage re-runs (`plan`), and what
//! `verify --rerun` compares (`verify`). End-to-end tests of the real stages
//! live in the `melanoflow` crate's `tests/cli`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use super::Engine;
use crate::context::{Progress, StageContext, StageReport};
use crate::error::Result;
use crate::registry::{BoxError, Registry, Stage};

mod plan;
mod schedule;
mod verify;

/// Writes `fixed.txt` (always the same) and `count.txt` (how many times
/// any `Counter` stage has run in this process): not reproducible on purpose.
struct Counter;
static RUNS: AtomicU32 = AtomicU32::new(0);
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CounterParams {
    #[serde(default)]
    deterministic: bool,
}
impl Stage for Counter {
    type Params = CounterParams;
    const KIND: &'static str = "counter";
    const CODE: &'static str = "test-code";
    const ABOUT: &'static str = "test kind";
    fn run(&self, p: &CounterParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
        std::fs::write(ctx.out_dir.join("fixed.txt"), "same")?;
        if !p.deterministic {
            std::fs::write(
                ctx.out_dir.join("count.txt"),
                RUNS.fetch_add(1, Ordering::SeqCst).to_string(),
            )?;
        }
        Ok(StageReport::default())
    }
}

/// Waits until `count` stages of this kind are running at once (or fails
/// after 30 s): proof that they ran in parallel, with no timing assert.
struct Rendezvous;
static ARRIVED: std::sync::Mutex<u32> = std::sync::Mutex::new(0);
static ARRIVAL: std::sync::Condvar = std::sync::Condvar::new();
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RendezvousParams {
    count: u32,
    #[serde(default)]
    fail: Option<String>,
}
impl Stage for Rendezvous {
    type Params = RendezvousParams;
    const KIND: &'static str = "rendezvous";
    const CODE: &'static str = "test-code";
    const ABOUT: &'static str = "test kind";
    fn run(&self, p: &RendezvousParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
        let mut arrived = ARRIVED.lock().unwrap();
        *arrived += 1;
        ARRIVAL.notify_all();
        let (arrived, timeout) = ARRIVAL
            .wait_timeout_while(arrived, std::time::Duration::from_secs(30), |n| {
                *n < p.count
            })
            .unwrap();
        drop(arrived);
        match p.fail.as_deref() {
            Some("panic") => panic!("deliberate panic in {}", ctx.stage),
            Some(message) => return Err(message.to_string().into()),
            None if timeout.timed_out() => {
                return Err("ran alone: the other stage never started".into());
            }
            None => {}
        }
        std::fs::write(ctx.out_dir.join("done.txt"), &ctx.stage)?;
        Ok(StageReport::default())
    }
}

/// Fails (or panics), unless `when_exists` names a file that is absent:
/// then it succeeds, so a test can make it fail later.
struct Broken;
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BrokenParams {
    #[serde(default)]
    panic: bool,
    #[serde(default)]
    when_exists: Option<String>,
}
impl Stage for Broken {
    type Params = BrokenParams;
    const KIND: &'static str = "broken";
    const CODE: &'static str = "test-code";
    const ABOUT: &'static str = "test kind";
    fn run(&self, p: &BrokenParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
        if p.when_exists
            .as_ref()
            .is_some_and(|f| !ctx.base_dir.join(f).exists())
        {
            std::fs::write(ctx.out_dir.join("ok.txt"), "fine this time")?;
            return Ok(StageReport::default());
        }
        if p.panic {
            panic!("deliberate panic in {}", ctx.stage);
        }
        Err(format!("deliberate failure in {}", ctx.stage).into())
    }
}

fn parallel_engine(dir: &Path, pipeline: &str) -> (Registry, PathBuf) {
    let file = dir.join("p.toml");
    std::fs::write(&file, pipeline).unwrap();
    let mut registry = Registry::new();
    registry.register(Rendezvous);
    registry.register(Counter);
    registry.register(Broken);
    (registry, file)
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// The engine over pipeline file `file`, with progress bars hidden.
fn open_engine<'r>(file: &Path, registry: &'r Registry) -> Engine<'r> {
    Engine::open(
        crate::config::load(file, registry, &[]).unwrap(),
        registry,
        Progress::new(true),
    )
    .unwrap()
}
