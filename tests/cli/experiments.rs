//! Experiments end to end on `data/ci_small.toml`: `diff HEAD` after a
//! `--set`, a 2x2 sweep that runs each shared stage once and leaves the
//! workspace alone, `exp show`, `report`, `exp apply` (nothing runs), and
//! `gc` keeping what experiments reference.

use std::collections::BTreeMap;
use std::process::Command;

use crate::fixture::*;

const CI_PIPELINE: &str = include_str!("../../data/ci_small.toml");

fn git(p: &Project, args: &[&str]) {
    let out = Command::new("git")
        .current_dir(p.path(""))
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn json(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

/// Each arm's mean test ROC-AUC over its seeds, from an evaluate folder.
fn arm_aucs(p: &Project, evaluate: &str) -> BTreeMap<String, f64> {
    let text = std::fs::read_to_string(p.path(evaluate).join("metrics.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["arms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let aucs: Vec<f64> = a["seeds"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["auc"].as_f64().unwrap())
                .collect();
            (
                format!("{} auc", a["arm"].as_str().unwrap()),
                aucs.iter().sum::<f64>() / aucs.len() as f64,
            )
        })
        .collect()
}

#[test]
fn sweeps_share_stages_show_apply_and_diff() {
    let p = Project::new(CI_PIPELINE);
    p.ok(&["run", "-q"]);
    git(&p, &["init", "-q"]);
    git(&p, &["add", "data/pipeline.toml", "data/pipeline.lock"]);
    git(&p, &["commit", "-q", "-m", "baseline"]);

    // `diff HEAD` after a --set: the parameter, the changed metric, and a
    // paired test on the same test images.
    p.ok(&["run", "-q", "--set", "classical.lr=3e-3"]);
    let d = json(&p.ok(&["diff", "HEAD", "--json"]));
    assert_eq!(d["params"]["classical.lr"]["a"], "0.001", "{d:#}");
    assert_eq!(d["params"]["classical.lr"]["b"], "0.003", "{d:#}");
    let metrics = d["metrics"].as_array().unwrap();
    let classical = metrics
        .iter()
        .find(|m| m["metric"] == "classical auc")
        .unwrap();
    assert_ne!(classical["a"], classical["b"], "{d:#}");
    let paired = metrics
        .iter()
        .find(|m| m["metric"] == "classical auc (seed ensemble)")
        .unwrap_or_else(|| panic!("no paired test: {d:#}"));
    let p_value = paired["paired"]["p"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p_value), "{d:#}");
    assert_eq!(paired["paired"]["test"], "DeLong");
    let md = p.ok(&["diff", "--md"]).stdout;
    assert!(md.contains("| `classical.lr` | 0.001 | 0.003 |"), "{md}");
    // Back to the committed state: everything restored from the store.
    let back = p.ok(&["run"]);
    assert_eq!(back.state("classical"), "restored", "{}", back.stdout);
    let lock_before = p.lock();
    let metrics_before = std::fs::read(p.path("data/out/ci_small/evaluate/metrics.json")).unwrap();

    // A 2x2 sweep. (ngf 4, lr 1e-3) is the workspace, so sw-1 runs nothing;
    // gan ngf=6 runs once (sw-3) and is restored in sw-4; classical lr=3e-3
    // was run by the --set above, so it is restored everywhere.
    let sweep = p.ok(&[
        "exp",
        "run",
        "--name",
        "sw",
        "--sweep",
        "gan.ngf=4,6",
        "--sweep",
        "classical.lr=1e-3,3e-3",
    ]);
    let records: Vec<serde_json::Value> = (1..=4)
        .map(|i| {
            let path = p.path(&format!(
                "data/.melanoflow/experiments/pipeline/sw-{i}/record.json"
            ));
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
        })
        .collect();
    let ran = |stage: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["stages"][stage] == "ran")
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect()
    };
    for stage in ["synth", "ingest", "preprocess", "classical"] {
        assert!(
            ran(stage).is_empty(),
            "{stage} ran in {:?}\n{}",
            ran(stage),
            sweep.stdout
        );
    }
    assert_eq!(ran("gan"), ["sw-3"], "{}", sweep.stdout);
    assert_eq!(ran("generate"), ["sw-3"], "{}", sweep.stdout);
    assert_eq!(ran("cyclegan"), ["sw-3"], "{}", sweep.stdout);
    assert_eq!(ran("evaluate"), ["sw-3", "sw-4"], "{}", sweep.stdout);
    assert_eq!(records[0]["stages"]["evaluate"], "restored");
    // The workspace is untouched.
    assert_eq!(p.lock(), lock_before);
    assert_eq!(
        std::fs::read(p.path("data/out/ci_small/evaluate/metrics.json")).unwrap(),
        metrics_before
    );

    // exp show: the workspace and 4 experiments, the two swept parameters
    // as columns, each row's metrics as its evaluate wrote them.
    let show = json(&p.ok(&["exp", "show", "--json"]));
    assert_eq!(
        show["params"],
        serde_json::json!(["classical.lr", "gan.ngf"]),
        "{show:#}"
    );
    let rows = show["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["workspace", "sw-1", "sw-2", "sw-3", "sw-4"]);
    let expected = [
        ("0.001", "4"),
        ("0.003", "4"),
        ("0.001", "6"),
        ("0.003", "6"),
    ];
    for (row, (lr, ngf)) in rows[1..].iter().zip(expected) {
        let name = row["name"].as_str().unwrap();
        assert_eq!(row["params"]["classical.lr"], lr, "{name}");
        assert_eq!(row["params"]["gan.ngf"], ngf, "{name}");
        let aucs = arm_aucs(
            &p,
            &format!("data/.melanoflow/experiments/pipeline/{name}/out/evaluate"),
        );
        assert_eq!(aucs.len(), 2);
        for (metric, value) in aucs {
            assert_eq!(
                row["metrics"][&metric].as_f64(),
                Some(value),
                "{name} {metric}"
            );
        }
    }
    assert_eq!(
        rows[0]["metrics"], rows[1]["metrics"],
        "sw-1 is the workspace"
    );
    let table = p.ok(&["exp", "show", "--sort", "cyclegan auc"]).stdout;
    assert!(table.lines().all(|l| l.chars().count() <= 100), "{table}");
    assert!(table.starts_with("experiment"), "{table}");
    let unknown = p.fails(&["exp", "show", "--sort", "nope"]);
    assert!(
        unknown.stderr.contains("classical auc"),
        "{}",
        unknown.stderr
    );

    // The report: one page, both arms' ROC curves overlaid.
    let report = p.ok(&["report", "sw-1", "sw-3", "-o", "exp.html"]);
    assert!(report.stdout.contains("exp.html"), "{}", report.stdout);
    let html = std::fs::read_to_string(p.path("exp.html")).unwrap();
    assert_eq!(
        html.matches("<figure>").count(),
        2,
        "one ROC figure per arm"
    );
    assert!(html.contains("Paired tests against <code>sw-1</code>"));

    // diff between experiments: only ngf differs; paired tests present.
    let d = json(&p.ok(&["diff", "exp:sw-1", "exp:sw-3", "--json"]));
    let params: Vec<&String> = d["params"].as_object().unwrap().keys().collect();
    assert_eq!(params, ["gan.ngf"], "{d:#}");

    // exp apply: the overrides land in the pipeline file, the lock file and
    // folders are the experiment's, and nothing runs afterwards.
    let applied = p.ok(&["exp", "apply", "sw-4"]);
    assert!(applied.stdout.contains("nothing ran"), "{}", applied.stdout);
    let file = std::fs::read_to_string(p.path("data/pipeline.toml")).unwrap();
    assert!(
        file.contains("ngf = 6") && file.contains("lr = 3e-3"),
        "{file}"
    );
    let record_lock: toml::Value = toml::Value::try_from(&records[3]["lock"]).unwrap();
    let lock: toml::Value = toml::from_str(&p.lock()).unwrap();
    assert_eq!(lock, record_lock);
    let after = p.ok(&["run"]);
    assert!(after.stdout.contains("8 cached"), "{}", after.stdout);
    assert_eq!(
        arm_aucs(&p, "data/out/ci_small/evaluate"),
        arm_aucs(
            &p,
            "data/.melanoflow/experiments/pipeline/sw-4/out/evaluate"
        )
    );

    // gc keeps what experiments reference; --workspace-only does not, and
    // apply then refuses, changing nothing.
    let kept = p.ok(&["gc"]);
    assert!(kept.stdout.contains("lock file(s)"), "{}", kept.stdout);
    p.ok(&["exp", "apply", "sw-1"]);
    p.ok(&["exp", "remove", "sw-2"]);
    assert!(
        !p.path("data/.melanoflow/experiments/pipeline/sw-2")
            .exists()
    );
    p.ok(&["gc", "--workspace-only"]);
    let before = std::fs::read_to_string(p.path("data/pipeline.toml")).unwrap();
    let refused = p.fails(&["exp", "apply", "sw-3"]);
    assert!(
        refused.stderr.contains("not in the store"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        std::fs::read_to_string(p.path("data/pipeline.toml")).unwrap(),
        before
    );
}

/// An experiment run in one clone is listed, compared and applied in
/// another through the remote store, without running anything there.
#[test]
fn experiments_travel_through_the_remote() {
    let remote = tempfile::tempdir().unwrap();
    let pipeline = CI_PIPELINE.replace(
        "url = \"out/ci_small.store\"",
        &format!(
            "url = \"out/ci_small.store\"\nremote = \"{}\"",
            remote.path().display()
        ),
    );
    assert_ne!(pipeline, CI_PIPELINE, "data/ci_small.toml changed shape");
    let a = Project::new(&pipeline);
    a.ok(&[
        "exp",
        "run",
        "-q",
        "--name",
        "shared",
        "--set",
        "classical.lr=3e-3",
    ]);
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            a.path("data/.melanoflow/experiments/pipeline/shared/record.json"),
        )
        .unwrap(),
    )
    .unwrap();

    let b = Project::new(&pipeline);
    let show = json(&b.ok(&["exp", "show", "--json"]));
    let rows = show["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{show:#}");
    assert_eq!(rows[0]["name"], "shared");
    assert_eq!(rows[0]["here"], false);
    for m in record["metrics"].as_array().unwrap() {
        assert_eq!(rows[0]["metrics"][m["name"].as_str().unwrap()], m["value"]);
    }
    let table = b.ok(&["exp", "show"]).stdout;
    assert!(table.contains("shared *"), "{table}");

    let applied = b.ok(&["exp", "apply", "shared"]);
    assert!(applied.stdout.contains("nothing ran"), "{}", applied.stdout);
    let after = b.ok(&["run"]);
    assert!(after.stdout.contains("8 cached"), "{}", after.stdout);
    let lock: toml::Value = toml::from_str(&b.lock()).unwrap();
    assert_eq!(lock, toml::Value::try_from(&record["lock"]).unwrap());
}
