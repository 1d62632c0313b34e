//! The Slurm executor on a real two-node Slurm cluster on this machine
//! (`scripts/slurm/cluster.sh`: Debian's slurm-wlm, munge, slurmctld and two
//! slurmd), started and stopped by the test. One test, several scenarios in
//! order, because a cluster takes seconds to start and restarting it resets
//! job ids:
//!
//! 1. the CI pipeline (every stage kind; preprocess and generate as job
//!    arrays of parts, each then an assembling job) through Slurm writes the
//!    same lock file as a local run, and a second run submits nothing;
//! 2. a changed parameter submits only that stage and its downstream; a
//!    sweep of two experiments submits the stages they share once;
//! 3. a worker killed mid-stage commits nothing, and the re-run succeeds;
//! 4. a failing stage cancels its dependants and is reported with job id,
//!    exit code and log; a stage on `device = "cuda"` asks for a GPU and
//!    lands on the node that has one;
//! 5. with `--keep-going`, the stages that completed are written and the
//!    failure and its skipped dependant are listed.
//!
//! `make test` installs Slurm and then sets `MELANOFLOW_REQUIRE_SLURM=1`, so
//! there this test cannot skip; where Slurm is absent (no root or apt) it
//! skips with a message.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::fixture::{Project, Run, files_under};

const CI_PIPELINE: &str = include_str!("../../data/ci_small.toml");
const CLUSTER_DIR: &str = "/tmp/melanoflow-slurm-test";
/// Ports apart from the script's defaults, so a developer's cluster can run beside.
const PORTS: [(&str, &str); 3] = [
    ("MF_SLURM_CTLD_PORT", "16917"),
    ("MF_SLURM_N1_PORT", "17101"),
    ("MF_SLURM_N2_PORT", "17102"),
];

struct Cluster {
    conf: PathBuf,
}

impl Cluster {
    fn start() -> Option<Cluster> {
        if Command::new("sh")
            .args(["-c", "command -v slurmctld && command -v sbatch"])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            let how = "scripts/slurm/cluster.sh install (apt-get; `make test` does this)";
            assert!(
                std::env::var("MELANOFLOW_REQUIRE_SLURM").as_deref() != Ok("1"),
                "Slurm is not installed: {how}"
            );
            eprintln!("SKIPPED: the Slurm test needs slurm-wlm and munge: {how}");
            return None;
        }
        let out = script()
            .args(["start", CLUSTER_DIR])
            .envs(PORTS)
            .env("MF_SLURM_CLUSTER", "mftest")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cluster.sh start failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Cluster {
            conf: Path::new(CLUSTER_DIR).join("slurm.conf"),
        })
    }

    /// A project whose commands talk to this cluster.
    fn project(&self, pipeline: &str) -> Project {
        let mut p = Project::new(pipeline);
        p.env
            .push(("SLURM_CONF".into(), self.conf.display().to_string()));
        p
    }

    fn scontrol(&self, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .arg("20")
            .arg("scontrol")
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = script().args(["stop", CLUSTER_DIR]).envs(PORTS).output();
    }
}

fn script() -> Command {
    Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm/cluster.sh"))
}

/// The job ids the run submitted, by stage.
fn submitted(r: &Run) -> Vec<(String, String)> {
    r.stdout
        .lines()
        .filter_map(|l| l.strip_prefix("submit   "))
        .map(|l| {
            let (stage, rest) = l.split_once(": job ").unwrap();
            (
                stage.to_string(),
                rest.split_whitespace().next().unwrap().to_string(),
            )
        })
        .collect()
}

fn stages_of(jobs: &[(String, String)]) -> Vec<&str> {
    jobs.iter().map(|(s, _)| s.as_str()).collect()
}

#[test]
fn the_pipeline_runs_on_a_real_slurm_cluster() {
    let Some(cluster) = Cluster::start() else {
        return;
    };

    // 1. Same lock file as a local run; a second run submits nothing.
    let local = Project::new(CI_PIPELINE);
    local.ok(&["run", "-q", "-j", "2"]);
    // preprocess fans out as a job array of 3 parts plus an assembling job.
    let arrays =
        "\n[stages.preprocess.resources]\narray = 3\n\n[stages.generate.resources]\narray = 2\n";
    let p = cluster.project(&format!("{CI_PIPELINE}{arrays}"));
    let first = p.ok(&["run", "--executor", "slurm"]);
    let jobs = submitted(&first);
    let expected = [
        "synth",
        "ingest",
        "preprocess[0-2]",
        "preprocess",
        "gan",
        "generate[0-1]",
        "generate",
        "classical",
        "cyclegan",
        "evaluate",
    ];
    assert_eq!(stages_of(&jobs), expected, "{}", first.stdout);
    assert!(
        first.stdout.contains(&format!(
            "preprocess: job {} (after {})",
            jobs[3].1, jobs[2].1
        )),
        "{}",
        first.stdout
    );
    assert!(
        first.stdout.contains(&format!(
            "generate: job {} (after {})",
            jobs[6].1, jobs[5].1
        )),
        "{}",
        first.stdout
    );
    assert!(
        first
            .stdout
            .contains(&format!("done     evaluate: job {}", jobs[9].1)),
        "{}",
        first.stdout
    );
    assert_eq!(
        p.lock(),
        local.lock(),
        "the Slurm run must write the lock file a local run writes"
    );
    let again = p.ok(&["run", "--executor", "slurm"]);
    assert!(
        submitted(&again).is_empty() && again.stdout.contains("8 cached"),
        "{}",
        again.stdout
    );

    // 2. A changed parameter: only that stage and its downstream are submitted.
    let changed = p.ok(&[
        "run",
        "--executor",
        "slurm",
        "--set",
        "evaluate.bootstrap_resamples=300",
    ]);
    assert_eq!(
        stages_of(&submitted(&changed)),
        ["evaluate"],
        "{}",
        changed.stdout
    );

    // 2b. A sweep of two experiments in one batch: the stages they share
    // (gan at ngf 6 and what follows it up to cyclegan) are submitted once,
    // and both experiments' evaluate jobs wait for that one cyclegan job.
    let sweep = p.ok(&[
        "exp",
        "run",
        "--executor",
        "slurm",
        "--name",
        "sw",
        "--set",
        "gan.ngf=6",
        "--sweep",
        "classical.lr=2e-3,4e-3",
    ]);
    let jobs = submitted(&sweep);
    assert_eq!(
        stages_of(&jobs),
        [
            "gan",
            "generate[0-1]",
            "generate",
            "classical",
            "cyclegan",
            "evaluate",
            "classical",
            "evaluate"
        ],
        "{}",
        sweep.stdout
    );
    let cyclegan = &jobs[4].1;
    let evaluates: Vec<&str> = sweep
        .stdout
        .lines()
        .filter(|l| l.starts_with("submit   evaluate:"))
        .collect();
    assert!(
        evaluates.len() == 2 && evaluates.iter().all(|l| l.contains(cyclegan.as_str())),
        "{}",
        sweep.stdout
    );
    let show: serde_json::Value =
        serde_json::from_str(&p.ok(&["exp", "show", "--json"]).stdout).unwrap();
    let rows = show["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{show:#}");
    assert!(
        rows.iter()
            .all(|r| r["metrics"]["classical auc"].as_f64().is_some()),
        "{show:#}"
    );

    // 3. Kill a worker mid-stage: nothing of it is committed; the re-run succeeds.
    let killed = cluster.project(CI_PIPELINE);
    let child = killed.spawn(&["run", "--executor", "slurm"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let job = loop {
        let running = cluster.scontrol(&["show", "job", "-o"]);
        if let Some(line) = running.lines().find(|l| {
            l.contains("JobName=mf-classical")
                && l.contains("JobState=RUNNING")
                && l.contains(&format!("WorkDir={}", killed.path("data").display()))
        }) {
            break line
                .split_whitespace()
                .next()
                .unwrap()
                .trim_start_matches("JobId=")
                .to_string();
        }
        assert!(Instant::now() < deadline, "the classical job never ran");
        std::thread::sleep(Duration::from_millis(50));
    };
    let status = Command::new("scancel")
        .args(["--signal=KILL", &job])
        .env("SLURM_CONF", &cluster.conf)
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !out.status.success(),
        "a killed job fails the run:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!("FAILED   classical: job {job}")),
        "{stdout}"
    );
    let done = stdout.lines().filter(|l| l.starts_with("done ")).count();
    let records = files_under(&killed.path("data/out/ci_small.store/runs")).len();
    assert_eq!(
        records, done,
        "only completed jobs have run records:\n{stdout}"
    );
    assert!(
        !killed.path("data/pipeline.lock").exists(),
        "a failed Slurm run writes no lock file"
    );
    let rerun = killed.ok(&["run", "--executor", "slurm"]);
    assert!(
        stages_of(&submitted(&rerun)).contains(&"classical")
            && !stages_of(&submitted(&rerun)).contains(&"synth"),
        "{}",
        rerun.stdout
    );
    assert_eq!(killed.lock(), local.lock());

    // 4. A failing stage, its cancelled dependants, and a GPU request.
    let on_gpu = CI_PIPELINE.replace(
        "device = \"cpu\"\n\n[stages.cyclegan]",
        "device = \"cuda:0\"\n\n[stages.cyclegan]",
    );
    assert_ne!(on_gpu, CI_PIPELINE, "data/ci_small.toml changed shape");
    let failing = cluster.project(&on_gpu);
    let r = failing.fails(&["run", "--executor", "slurm"]);
    let jobs = submitted(&r);
    let classical = &jobs.iter().find(|(s, _)| s == "classical").unwrap().1;
    let failed = r
        .stdout
        .lines()
        .find(|l| l.starts_with("FAILED   classical:"))
        .unwrap_or_else(|| panic!("{}", r.stdout));
    assert!(
        failed.contains(&format!("job {classical} FAILED"))
            && failed.contains("exit code 1:0")
            && failed.contains(" on n2;"),
        "{failed}"
    );
    let log = PathBuf::from(failed.rsplit("log: ").next().unwrap());
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .to_lowercase()
            .contains("cuda"),
        "the log says why: {}",
        log.display()
    );
    assert!(
        r.stdout.contains("CANCELLED evaluate:") && r.stdout.contains("an upstream job failed"),
        "{}",
        r.stdout
    );
    assert!(
        r.stderr.contains("did not complete") && r.stderr.contains("classical"),
        "{}",
        r.stderr
    );
    assert!(
        !failing.path("data/pipeline.lock").exists(),
        "without --keep-going a failed Slurm run writes no lock file"
    );

    // 5. --keep-going: the same failure, but every stage that completed gets
    //    its folder and lock entry, and the report lists the failure with its
    //    job and the dependant it skipped.
    let r = failing.fails(&["run", "--executor", "slurm", "--keep-going"]);
    let jobs = submitted(&r);
    assert_eq!(
        stages_of(&jobs),
        ["classical", "evaluate"],
        "the others are in the store: {}",
        r.stdout
    );
    assert_eq!(r.state("cyclegan"), "restored", "{}", r.stdout);
    assert!(
        r.stdout
            .contains("8 stage(s): 1 restored, 5 cached, 1 failed, 1 skipped"),
        "{}",
        r.stdout
    );
    let lock = failing.lock();
    assert!(
        lock.contains("[stages.cyclegan]")
            && !lock.contains("[stages.classical]")
            && !lock.contains("[stages.evaluate]"),
        "{lock}"
    );
    assert!(
        failing.path("data/out/ci_small/cyclegan").is_dir()
            && !failing.path("data/out/ci_small/evaluate").exists()
    );
    assert!(
        r.stderr
            .contains("1 stage(s) failed, 1 skipped because an upstream failed:"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!(
            "  classical: slurm: job {} FAILED, exit code 1:0; log: ",
            jobs[0].1
        )),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("  evaluate: skipped (upstream `classical` failed)"),
        "{}",
        r.stderr
    );
}
