//! `run`: stages in parallel with `-j`, failures and panics, `--keep-going`.

use super::*;
use crate::error::Error;
use crate::runner::{RunOptions, State};

/// Two failures, one a panic, in separate branches: with keep-going every
/// stage that depends on neither runs, the dependants (direct or not) are
/// skipped naming the failure they wait on, and the error lists them all.
#[test]
fn keep_going_runs_every_independent_stage_and_reports_every_failure() {
    let pipeline = "[stages.a]\nkind = \"counter\"\n\n\
                    [stages.bad]\nkind = \"broken\"\ninputs = [\"a\"]\n\n\
                    [stages.boom]\nkind = \"broken\"\npanic = true\n\n\
                    [stages.after_bad]\nkind = \"counter\"\ninputs = [\"bad\"]\n\n\
                    [stages.after_after]\nkind = \"counter\"\ninputs = [\"after_bad\"]\n\n\
                    [stages.fine]\nkind = \"counter\"\ninputs = [\"a\"]\n\n\
                    [stages.joined]\nkind = \"counter\"\ninputs = [\"fine\", \"boom\"]\n";
    for jobs in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let (registry, file) = parallel_engine(dir.path(), pipeline);
        let open = || open_engine(&file, &registry);
        let mut seen: Vec<(String, State, Vec<String>)> = Vec::new();
        let opts = RunOptions {
            jobs,
            keep_going: true,
            ..Default::default()
        };
        let err = open()
            .run(&opts, &mut |o| {
                seen.push((o.stage.clone(), o.state, o.reasons.clone()))
            })
            .unwrap_err();
        let state = |name: &str| {
            seen.iter()
                .find(|(s, ..)| s == name)
                .map(|(_, st, r)| (*st, r.join("; ")))
                .unwrap_or_else(|| panic!("no outcome for {name}: {seen:?}"))
        };
        assert_eq!(seen.len(), 7, "every stage has one outcome: {seen:?}");
        assert_eq!(state("a").0, State::Ran);
        assert_eq!(state("fine").0, State::Ran);
        assert_eq!(
            state("bad"),
            (State::Failed, "deliberate failure in bad".into())
        );
        assert_eq!(
            state("boom"),
            (State::Failed, "panicked: deliberate panic in boom".into())
        );
        assert_eq!(
            state("after_bad"),
            (State::Skipped, "upstream `bad` failed".into())
        );
        assert_eq!(
            state("after_after"),
            (State::Skipped, "upstream `bad` failed".into())
        );
        assert_eq!(
            state("joined"),
            (State::Skipped, "upstream `boom` failed".into())
        );
        let Error::StagesFailed { failed, skipped } = &err else {
            panic!("{err}")
        };
        let mut names: Vec<&str> = failed.iter().map(|f| f.stage.as_str()).collect();
        names.sort();
        assert_eq!(names, ["bad", "boom"]);
        assert_eq!(skipped.len(), 3);
        let report = err.to_string();
        assert!(
            report.starts_with("2 stage(s) failed, 3 skipped because an upstream failed:"),
            "{report}"
        );
        for line in [
            "\n  bad: deliberate failure in bad",
            "\n  boom: panicked: deliberate panic in boom",
            "\n  after_after: skipped (upstream `bad` failed)",
            "\n  joined: skipped (upstream `boom` failed)",
        ] {
            assert!(report.contains(line), "{line:?} in:\n{report}");
        }
        // What ran is committed; nothing of the failed or skipped stages.
        let lock = std::fs::read_to_string(dir.path().join("p.lock")).unwrap();
        assert!(
            lock.contains("[stages.a]") && lock.contains("[stages.fine]"),
            "{lock}"
        );
        for stage in ["bad", "boom", "after_bad", "joined"] {
            assert!(
                !lock.contains(&format!("[stages.{stage}]"))
                    && !dir.path().join("out").join(stage).exists(),
                "{stage}: {lock}"
            );
        }
        assert!(
            !dir.path()
                .join("out/.staging")
                .read_dir()
                .is_ok_and(|mut d| d.next().is_some()),
            "staging left behind"
        );

        // Without keep-going the first failure stops everything not yet started.
        let dir = tempfile::tempdir().unwrap();
        let (registry, file) = parallel_engine(dir.path(), pipeline);
        let mut engine = open_engine(&file, &registry);
        let mut seen = Vec::new();
        let err = engine
            .run(
                &RunOptions {
                    jobs: 1,
                    ..Default::default()
                },
                &mut |o| seen.push((o.stage.clone(), o.state)),
            )
            .unwrap_err();
        assert!(
            matches!(err, Error::StageFailed { ref stage, .. } if stage == "bad"),
            "{err}"
        );
        assert_eq!(
            seen,
            [
                ("a".to_string(), State::Ran),
                ("bad".to_string(), State::Failed)
            ]
        );
    }
}

#[test]
fn independent_stages_run_at_once_with_jobs_and_a_failure_keeps_the_rest() {
    // Every test stage here runs once per process: ARRIVED only grows.
    let dir = tempfile::tempdir().unwrap();
    let pipeline = "[stages.left]\nkind = \"rendezvous\"\ncount = 2\n\n[stages.right]\nkind = \"rendezvous\"\ncount = 2\n\n\
                    [stages.joined]\nkind = \"counter\"\ninputs = [\"left\", \"right\"]\n";
    let (registry, file) = parallel_engine(dir.path(), pipeline);
    let mut engine = open_engine(&file, &registry);
    let mut order = Vec::new();
    engine
        .run(
            &RunOptions {
                jobs: 2,
                ..Default::default()
            },
            &mut |o| order.push(o.stage.clone()),
        )
        .unwrap();
    assert_eq!(
        order.last().unwrap(),
        "joined",
        "the downstream stage waits for both"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out/right/done.txt")).unwrap(),
        "right"
    );

    // A failing and a panicking stage: both reported, the third (independent)
    // one commits, the downstream of a failure never starts.
    let dir = tempfile::tempdir().unwrap();
    let pipeline = "[stages.fails]\nkind = \"rendezvous\"\ncount = 5\nfail = \"deliberate failure\"\n\n\
                    [stages.panics]\nkind = \"rendezvous\"\ncount = 5\nfail = \"panic\"\n\n\
                    [stages.fine]\nkind = \"rendezvous\"\ncount = 5\n\n\
                    [stages.after]\nkind = \"counter\"\ninputs = [\"fails\"]\n";
    let (registry, file) = parallel_engine(dir.path(), pipeline);
    let mut engine = open_engine(&file, &registry);
    let mut finished = Vec::new();
    let err = engine
        .run(
            &RunOptions {
                jobs: 3,
                ..Default::default()
            },
            &mut |o| finished.push((o.stage.clone(), o.state)),
        )
        .unwrap_err();
    let chain = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|e| e.to_string())
            .unwrap_or_default()
    );
    assert!(
        chain.contains("fails") || chain.contains("panics"),
        "{chain}"
    );
    finished.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        finished,
        [
            ("fails".into(), State::Failed),
            ("fine".into(), State::Ran),
            ("panics".into(), State::Failed)
        ]
    );
    let lock = std::fs::read_to_string(dir.path().join("p.lock")).unwrap();
    assert!(
        lock.contains("[stages.fine]")
            && !lock.contains("[stages.after]")
            && !lock.contains("[stages.fails]"),
        "{lock}"
    );
    assert!(
        !dir.path().join("out/.staging/fails").exists()
            && !dir.path().join("out/.staging/panics").exists()
    );
}
