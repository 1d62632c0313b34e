use super::*;

#[test]
fn parses_scontrol_lines() {
    let line = "JobId=4 JobName=dep UserId=root(0) JobState=CANCELLED Reason=DependencyNeverSatisfied \
                Dependency=afterok:3(failed) ExitCode=0:0 AllocNode:Sid=host:1 NodeList= StdOut=/tmp/ex/slurm-4.out ";
    let f = parse_fields(line);
    assert_eq!(f["JobState"], "CANCELLED");
    assert_eq!(f["Dependency"], "afterok:3(failed)");
    assert_eq!(f["NodeList"], "");
    assert_eq!(f["AllocNode:Sid"], "host:1");
}

#[test]
fn an_array_is_one_state() {
    let task = |state: &str, node: &str| {
        parse_fields(&format!(
            "JobId=7 ArrayTaskId=0 JobState={state} NodeList={node} ExitCode=0:0"
        ))
    };
    let state = |tasks| aggregate(tasks).unwrap()["JobState"].clone();
    assert_eq!(
        state(vec![task("COMPLETED", "n1"), task("RUNNING", "n2")]),
        "RUNNING"
    );
    assert_eq!(
        state(vec![task("COMPLETED", "n1"), task("PENDING", "")]),
        "PENDING"
    );
    assert_eq!(
        state(vec![task("RUNNING", "n1"), task("FAILED", "n2")]),
        "FAILED"
    );
    assert_eq!(
        state(vec![task("COMPLETED", "n1"), task("COMPLETED", "n2")]),
        "COMPLETED"
    );
    assert_eq!(
        aggregate(vec![
            task("COMPLETED", "n1"),
            task("COMPLETED", "n2"),
            task("COMPLETED", "n1")
        ])
        .unwrap()["NodeList"],
        "n1,n2"
    );
    assert!(aggregate(vec![]).is_none());
}

#[test]
fn resources_become_sbatch_options() {
    let r = Resources {
        cpus: Some(4),
        mem: Some("16G".into()),
        gpus: Some(1),
        time: Some("2:00:00".into()),
        partition: None,
        array: None,
        gpus_if_available: None,
    };
    let cfg = ExecutorConfig {
        partition: Some("batch".into()),
        account: Some("lab".into()),
        ..Default::default()
    };
    assert_eq!(
        resource_args(&r, &cfg),
        [
            "--cpus-per-task=4",
            "--mem=16G",
            "--gres=gpu:1",
            "--time=2:00:00",
            "--partition=batch",
            "--account=lab"
        ]
    );
    let own = Resources {
        partition: Some("gpu".into()),
        gpus: Some(0),
        ..Default::default()
    };
    assert_eq!(
        resource_args(&own, &ExecutorConfig::default()),
        ["--partition=gpu"]
    );
}

/// A stage that can use a GPU (`device = "auto"` in a CUDA build) asks
/// for one only when `[executor] gpus = true`; an explicit `gpus` (the
/// kind's for `cuda:N`, or the pipeline's, 0 included) always wins.
#[test]
fn gpus_if_available_follow_the_executor() {
    let auto = Resources {
        gpus_if_available: Some(1),
        ..Default::default()
    };
    let with_gpus = ExecutorConfig {
        gpus: true,
        ..Default::default()
    };
    assert_eq!(resource_args(&auto, &with_gpus), ["--gres=gpu:1"]);
    assert!(resource_args(&auto, &ExecutorConfig::default()).is_empty());
    assert!(resource_args(&Resources::default(), &with_gpus).is_empty());
    let opted_out = Resources {
        gpus: Some(0),
        ..auto.clone()
    };
    assert!(resource_args(&opted_out, &with_gpus).is_empty());
    let two = Resources {
        gpus: Some(2),
        ..auto
    };
    assert_eq!(
        resource_args(&two, &ExecutorConfig::default()),
        ["--gres=gpu:2"]
    );
}

#[test]
fn job_states_and_lines() {
    let mut job = Job {
        stage: "train".into(),
        id: "15".into(),
        log_pattern: PathBuf::from("/x/train-%j.log"),
        state: "PENDING".into(),
        exit_code: "0:0".into(),
        node: String::new(),
        started: Instant::now(),
    };
    assert!(!job.finished());
    job.state = "FAILED".into();
    job.exit_code = "1:0".into();
    job.node = "n2".into();
    assert!(job.finished());
    assert_eq!(
        event_line(&job, Some("NonZeroExitCode")),
        "FAILED   train: job 15 FAILED (NonZeroExitCode), exit code 1:0 on n2; log: /x/train-15.log"
    );
    job.state = "CANCELLED".into();
    assert!(event_line(&job, Some("DependencyNeverSatisfied")).contains("an upstream job failed"));
}

#[test]
fn quotes_for_the_shell() {
    assert_eq!(shell_quote("/a/b-c.toml"), "/a/b-c.toml");
    assert_eq!(shell_quote("it's here"), "'it'\\''s here'");
    assert_eq!(shell_quote(""), "''");
}
