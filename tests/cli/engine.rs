//! The engine's promises, through the real binary: caching, reasons, early
//! cut-off, atomic commit under SIGKILL, one run at a time, gc and verify.

use crate::fixture::*;

#[test]
fn first_run_runs_everything_second_run_nothing() {
    let p = Project::new(SMALL);
    let first = p.ok(&["run"]);
    assert_eq!(first.state("synth"), "ran");
    assert_eq!(first.state("ingest"), "ran");
    assert!(
        first.line("synth").contains("never run"),
        "{}",
        first.stdout
    );
    assert!(
        first
            .line("synth")
            .contains("300 images (15 malignant) of 30 patients at 32 px"),
        "{}",
        first.stdout
    );
    let lock = p.lock();
    assert!(
        lock.contains("[stages.synth]") && lock.contains("[stages.ingest]"),
        "{lock}"
    );

    let second = p.ok(&["run"]);
    assert_eq!(second.state("synth"), "cached");
    assert_eq!(second.state("ingest"), "cached");
    assert!(
        second.stdout.contains("2 stage(s): 2 cached"),
        "{}",
        second.stdout
    );
    assert_eq!(
        p.lock(),
        lock,
        "a no-op run leaves the lock file byte-identical"
    );
    assert!(p.path("data/out/ingest/metadata.parquet").is_file());
    assert!(p.path("data/out/synth/train.csv").is_file());
}

#[test]
fn a_changed_parameter_reruns_that_stage_and_its_downstream_only() {
    let two_arms =
        format!("{SMALL}\n[stages.ingest_b]\nkind = \"ingest\"\ninputs = [\"synth\"]\nseed = 5\n");
    let p = Project::new(&two_arms);
    p.ok(&["run"]);
    p.write(
        "data/pipeline.toml",
        two_arms.replace("seed = 5", "seed = 6"),
    );
    let r = p.ok(&["run"]);
    assert_eq!(r.state("synth"), "cached");
    assert_eq!(r.state("ingest"), "cached");
    assert_eq!(r.state("ingest_b"), "ran");
    assert!(
        r.line("ingest_b").contains("parameter `seed` (5 -> 6)"),
        "{}",
        r.stdout
    );

    // An upstream change re-runs everything below it, and says so.
    let r = p.ok(&["run", "--set", "synth.seed=2"]);
    assert_eq!(r.state("synth"), "ran");
    assert!(
        r.line("synth").contains("parameter `seed` (1 -> 2)"),
        "{}",
        r.stdout
    );
    assert_eq!(r.state("ingest"), "ran");
    assert!(
        r.line("ingest").contains("upstream `synth` output changed"),
        "{}",
        r.stdout
    );
    assert_eq!(r.state("ingest_b"), "ran");

    // Going back to an earlier parameter set restores from the store, without running.
    let r = p.ok(&["run"]);
    assert_eq!(r.state("synth"), "restored");
    assert!(
        r.line("synth").contains("result found in the store"),
        "{}",
        r.stdout
    );
    assert_eq!(r.state("ingest"), "restored");
}

#[test]
fn dry_run_and_status_say_what_would_run_and_why_without_running() {
    let p = Project::new(SMALL);
    let r = p.ok(&["run", "--dry-run"]);
    assert_eq!(r.state("synth"), "would run");
    assert!(
        r.line("ingest").contains("upstream `synth` will run"),
        "{}",
        r.stdout
    );
    assert!(
        !p.path("data/out/synth").exists(),
        "a dry run writes no output"
    );
    assert!(!p.path("data/pipeline.lock").exists());
    p.ok(&["run"]);
    let r = p.ok(&["status", "--set", "ingest.val_fraction=0.2"]);
    assert_eq!(r.state("synth"), "cached");
    assert!(
        r.line("ingest")
            .contains("parameter `val_fraction` (0.15 -> 0.2)"),
        "{}",
        r.stdout
    );
    let json = p.ok(&["status", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let stages = doc["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2);
    assert_eq!(stages[1]["stage"], "ingest");
    assert_eq!(stages[1]["state"], "cached");
    assert_eq!(stages[1]["output"].as_str().unwrap().len(), 64);
}

#[test]
fn early_cutoff_a_rerun_with_identical_output_leaves_downstream_cached() {
    let p = Project::new(SMALL);
    p.ok(&["run"]);
    let lock = p.lock();
    let r = p.ok(&["run", "--force", "synth"]);
    assert_eq!(r.state("synth"), "ran");
    assert!(r.line("synth").contains("forced"), "{}", r.stdout);
    assert_eq!(
        p.lock(),
        lock,
        "synth wrote the same bytes: same output digest"
    );
    let r = p.ok(&["run"]);
    assert_eq!(
        r.state("ingest"),
        "cached",
        "same bytes from synth: ingest must not re-run"
    );
    // `--force` with no stage named forces every stage.
    let r = p.ok(&["run", "--force"]);
    assert_eq!(
        (r.state("synth"), r.state("ingest")),
        ("ran".into(), "ran".into())
    );
    assert_eq!(p.lock(), lock);
}

#[test]
fn output_folder_deleted_or_edited_is_restored_from_the_store() {
    let p = Project::new(SMALL);
    p.ok(&["run"]);
    std::fs::remove_dir_all(p.path("data/out/ingest")).unwrap();
    let csv = p.path("data/out/synth/train.csv");
    std::fs::write(&csv, "tampered").unwrap();
    let r = p.ok(&["run"]);
    assert_eq!(r.state("synth"), "restored");
    assert!(
        r.line("synth")
            .contains("output folder modified (changed `train.csv`)"),
        "{}",
        r.stdout
    );
    assert_eq!(r.state("ingest"), "restored");
    assert!(
        r.line("ingest").contains("output folder missing"),
        "{}",
        r.stdout
    );
    assert!(
        std::fs::read_to_string(&csv)
            .unwrap()
            .starts_with("image_name,patient_id")
    );
    p.ok(&["verify"]);
}

#[test]
fn sigkill_mid_stage_leaves_store_and_lock_intact_and_next_run_is_clean() {
    let p = Project::new(SMALL);
    p.ok(&["run"]);
    let lock = p.lock();
    let records = p.run_records();
    // A big synth: killed while it writes into its staging folder.
    let mut child = p.spawn(&[
        "run",
        "--set",
        "synth.count=40000",
        "--set",
        "synth.patients=400",
    ]);
    p.wait_for("data/out/.staging/synth/train");
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(p.lock(), lock, "the lock file is untouched");
    assert_eq!(p.run_records(), records, "no run record was committed");
    assert!(
        p.path("data/out/synth/train.csv").is_file(),
        "the previous output is still in place"
    );
    let r = p.ok(&["run"]);
    assert_eq!(r.state("synth"), "cached");
    assert_eq!(r.state("ingest"), "cached");
    assert!(
        !p.path("data/out/.staging").exists(),
        "leftover staging was cleaned up"
    );
    p.ok(&["verify"]);
}

#[test]
fn a_second_concurrent_run_refuses_or_waits() {
    let p = Project::new(SMALL);
    let mut first = p.spawn(&[
        "run",
        "--set",
        "synth.count=40000",
        "--set",
        "synth.patients=400",
    ]);
    p.wait_for("data/out/.staging/synth");
    let refused = p.fails(&["run", "--no-wait"]);
    assert!(
        refused.stderr.contains("another melanoflow run (pid"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains(&first.id().to_string()),
        "names the holder's pid: {}",
        refused.stderr
    );
    let mut waiter = p.spawn(&["run"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(waiter.try_wait().unwrap().is_none(), "the second run waits");
    first.kill().unwrap();
    first.wait().unwrap();
    let out = waiter.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("waiting for another melanoflow run"),
        "{stderr}"
    );
    p.ok(&["verify"]);
}

#[test]
fn config_errors_name_file_and_line_and_exit_2() {
    let p = Project::new(&SMALL.replace("seed = 42", "seed = 42\nval_fracton = 0.1"));
    let r = p.fails(&["run"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(r.stderr.contains("data/pipeline.toml:"), "{}", r.stderr);
    assert!(
        r.stderr.contains("unknown field `val_fracton`"),
        "{}",
        r.stderr
    );
    assert!(!p.path("data/out").exists(), "nothing ran");
    let p = Project::new(&SMALL.replace("inputs = [\"synth\"]", "inputs = [\"synt\"]"));
    let r = p.fails(&["status"]);
    assert!(r.stderr.contains("no stage named `synt`"), "{}", r.stderr);
    let p = Project::new(SMALL);
    let r = p.fails(&["run", "nosuch"]);
    assert!(
        r.stderr
            .contains("no stage named `nosuch`; the pipeline has: synth, ingest"),
        "{}",
        r.stderr
    );
}

#[test]
fn dag_renders_text_dot_and_mermaid() {
    let p = Project::new(SMALL);
    let text = p.ok(&["dag"]).stdout;
    assert!(text.contains("synth   [synth]  (source)"), "{text}");
    assert!(text.contains("ingest  [ingest]  <- synth"), "{text}");
    let dot = p.ok(&["dag", "--dot"]).stdout;
    assert!(
        dot.starts_with("digraph pipeline {") && dot.contains("\"synth\" -> \"ingest\";"),
        "{dot}"
    );
    let mermaid = p.ok(&["dag", "--mermaid"]).stdout;
    assert!(
        mermaid.starts_with("flowchart LR") && mermaid.contains("synth --> ingest"),
        "{mermaid}"
    );
}

/// The README's stage diagram is `melanoflow dag --mermaid` of the default
/// pipeline, so it cannot drift from the pipeline file; foreach names (`@`)
/// make valid, distinct Mermaid ids.
#[test]
fn the_readme_diagram_is_the_default_pipelines_dag() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(BIN)
        .args(["dag", "--mermaid", "--config"])
        .arg(root.join("data/pipeline.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dag = String::from_utf8(out.stdout).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let block = readme
        .split_once("```mermaid\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block)
        .expect("README.md has a ```mermaid block");
    assert_eq!(
        block, dag,
        "README.md's diagram differs from `melanoflow dag --mermaid`: paste the latter"
    );

    let p = Project::new(
        "[stages.a]\nkind = \"synth\"\nforeach = [0, 1]\n\n[stages.a-b]\nkind = \"synth\"\n\n[stages.a_b]\nkind = \"synth\"\n",
    );
    let mermaid = p.ok(&["dag", "--mermaid"]).stdout;
    for node in ["a_at_0[", "a_at_1[", "a_dash_b[", "a_b["] {
        assert!(mermaid.contains(node), "{node} in:\n{mermaid}");
    }
}

#[test]
fn gc_keeps_what_the_lock_references_and_verify_catches_corruption() {
    let p = Project::new(SMALL);
    p.ok(&["run", "--set", "synth.seed=9"]);
    p.ok(&["run"]);
    let dry = p.ok(&["gc", "--dry-run"]).stdout;
    assert!(
        dry.contains("would delete") && !dry.contains("would delete 0 blobs"),
        "{dry}"
    );
    let r = p.ok(&["gc"]).stdout;
    assert!(
        r.contains("and 2 run records"),
        "the seed=9 runs are unreferenced: {r}"
    );
    let again = p.ok(&["gc"]).stdout;
    assert!(
        again.starts_with("deleted 0 blobs and 0 run records"),
        "{again}"
    );
    p.ok(&["verify"]);
    let r = p.ok(&["run"]);
    assert_eq!(
        r.state("ingest"),
        "cached",
        "gc kept everything the current lock needs"
    );

    // Corrupt one stored blob: verify names it and fails.
    let blob = files_under(&p.path("data/store/blobs"))
        .into_iter()
        .next()
        .unwrap();
    std::fs::write(&blob, b"bit rot").unwrap();
    let v = p.fails(&["verify"]);
    assert!(
        v.stdout.contains("MISMATCH") && v.stdout.contains("corrupt"),
        "{}",
        v.stdout
    );
}

#[test]
fn a_fresh_clone_with_a_committed_lock_file_runs_and_reproduces_it() {
    let p = Project::new(SMALL);
    p.ok(&["run"]);
    let lock = p.lock();
    // A fresh clone: the pipeline and lock file, no store, no outputs.
    std::fs::remove_dir_all(p.path("data/store")).unwrap();
    std::fs::remove_dir_all(p.path("data/out")).unwrap();
    std::fs::remove_dir_all(p.path("data/.melanoflow")).unwrap();
    let r = p.ok(&["status"]);
    assert!(
        r.line("synth").contains("its result is not in the store"),
        "{}",
        r.stdout
    );
    let r = p.ok(&["run"]);
    assert_eq!(r.state("synth"), "ran");
    assert_eq!(
        p.lock(),
        lock,
        "the same inputs give the same bytes: the lock file is reproduced exactly"
    );
}

/// `run --keep-going`: a failing stage does not stop the ones that do not
/// depend on it; its dependants are skipped, and the run ends listing both,
/// with exit code 1. Without it, nothing new starts after the failure.
#[test]
fn keep_going_runs_what_does_not_depend_on_a_failure_and_lists_it() {
    let broken = "[stages.broken]\nkind = \"ingest\"\nmetadata = \"nowhere/train.csv\"\nimages = \"nowhere/jpeg\"\n\n\
                  [stages.after_broken]\nkind = \"preprocess\"\ninputs = [\"broken\"]\n\n[stages.ingest]";
    let pipeline = SMALL.replace("[stages.ingest]", broken);
    assert_ne!(pipeline, SMALL, "the fixture changed shape");
    let p = Project::new(&pipeline);
    let stopped = p.fails(&["run"]);
    assert_eq!(stopped.state("broken"), "FAILED", "{}", stopped.stdout);
    assert!(
        !stopped.stdout.contains("ingest:") && !stopped.stdout.contains("after_broken"),
        "{}",
        stopped.stdout
    );
    assert!(
        stopped.stderr.contains("input `metadata` not found"),
        "{}",
        stopped.stderr
    );

    let r = p.fails(&["run", "--keep-going"]);
    assert_eq!(r.status.code(), Some(1));
    assert_eq!(r.state("synth"), "cached");
    assert_eq!(r.state("ingest"), "ran", "{}", r.stdout);
    assert!(
        r.line("after_broken")
            .starts_with("skipped  after_broken: upstream `broken` failed"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("4 stage(s): 1 ran, 1 cached, 1 failed, 1 skipped"),
        "{}",
        r.stdout
    );
    assert!(r.stderr.contains("error: 1 stage(s) failed, 1 skipped because an upstream failed:\n  broken: stage `broken`: input `metadata` not found"), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("\n  after_broken: skipped (upstream `broken` failed)"),
        "{}",
        r.stderr
    );
    assert!(p.lock().contains("[stages.ingest]") && !p.lock().contains("[stages.broken]"));
}
