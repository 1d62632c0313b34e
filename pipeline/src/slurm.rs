//! The Slurm executor: `melanoflow run --executor slurm`.
//!
//! It plans as a local run does (cached and restorable stages are not
//! submitted), then submits each stage that must run as one `sbatch` job that
//! runs this same binary on that one stage (`run-stage`, see
//! `runner/worker.rs`), chained with `--dependency=afterok:...` and
//! `--kill-on-invalid-dep=yes` so that a failure cancels everything
//! downstream. It follows the jobs (`scontrol`, else `sacct`), printing each
//! state change; Ctrl-C cancels the jobs it submitted. When every job has
//! succeeded, a local pass that may only restore (never compute) writes the
//! output folders and the lock file exactly as a local run does.
//!
//! Workers share the store: the pipeline's store must be a path on a shared
//! filesystem or an object-store URL. Every Slurm client call runs under
//! `timeout`, because the clients block for minutes when slurmctld is down.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::config::{ExecutorConfig, StageDecl};
use crate::error::{Error, Result, Skipped, StageFailure};
use crate::registry::Resources;
use crate::runner::{Engine, RunOptions, StageOutcome, State};

/// Seconds a Slurm client call may take before it counts as failed.
const CLIENT_TIMEOUT: &str = "60";

/// How the submitting command calls the worker: the binary and the global
/// options that must reach it unchanged (pipeline file, `--set`, ...).
#[derive(Clone)]
pub struct WorkerCommand {
    pub program: String,
    pub global_args: Vec<String>,
}

/// One submitted stage.
#[derive(Debug)]
struct Job {
    stage: String,
    id: String,
    log_pattern: PathBuf,
    state: String,
    exit_code: String,
    node: String,
    started: Instant,
}

impl Job {
    fn log(&self) -> PathBuf {
        PathBuf::from(
            self.log_pattern
                .to_string_lossy()
                .replace("%j", &self.id)
                .replace("%A", &self.id)
                .replace("%a", "*"),
        )
    }

    fn finished(&self) -> bool {
        !matches!(
            self.state.as_str(),
            "" | "PENDING"
                | "CONFIGURING"
                | "RUNNING"
                | "COMPLETING"
                | "SUSPENDED"
                | "REQUEUED"
                | "RESIZING"
        )
    }
}

/// Runs the selected stages on Slurm; returns the outcomes of the final
/// (restore-only) local pass. `on_line` gets one line per job event.
pub fn run(
    engine: &mut Engine,
    opts: &RunOptions,
    worker: &WorkerCommand,
    on_line: &mut dyn FnMut(&str),
    on_stage: &mut dyn FnMut(&StageOutcome),
) -> Result<Vec<StageOutcome>> {
    let plan = engine.plan(opts)?;
    let log_dir = engine.pipeline.state_dir().join("slurm");
    let mut batch = Batch::default();
    let by_name = |stage: &str| stage.to_string();
    batch.submit_keyed(engine, opts, worker, &plan, &log_dir, &by_name, on_line)?;
    let failed = batch.follow(&engine.pipeline.executor.clone(), on_line)?;
    if !failed.is_empty() && opts.keep_going {
        return finish_keep_going(engine, opts, &plan, &batch.jobs, on_stage);
    }
    batch.check(&failed)?;
    restore_pass(engine, opts, on_stage)
}

/// Everything is in the store now: write the folders and the lock file.
pub fn restore_pass(
    engine: &mut Engine,
    opts: &RunOptions,
    on_stage: &mut dyn FnMut(&StageOutcome),
) -> Result<Vec<StageOutcome>> {
    let final_pass = RunOptions {
        force: false,
        jobs: 1,
        restore_only: true,
        ..opts.clone()
    };
    engine.run(&final_pass, on_stage)
}

/// The jobs of one or more plans submitted together (a sweep of
/// experiments): a stage planned by several of them with the same `key` is
/// submitted once, and every plan's downstream jobs depend on that one job.
#[derive(Default)]
pub struct Batch {
    jobs: Vec<Job>,
    /// Job id of each submitted stage, by key.
    ids: BTreeMap<String, String>,
    interrupted: Option<Arc<AtomicBool>>,
}

impl Batch {
    /// Submits the stages of `plan` that must run and whose `key` has not
    /// been submitted yet; upstream jobs are found by their keys.
    #[allow(clippy::too_many_arguments)]
    pub fn submit_keyed(
        &mut self,
        engine: &Engine,
        opts: &RunOptions,
        worker: &WorkerCommand,
        plan: &[StageOutcome],
        log_dir: &Path,
        key: &dyn Fn(&str) -> String,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<()> {
        let to_run: Vec<&StageOutcome> =
            plan.iter().filter(|o| o.state == State::WouldRun).collect();
        if to_run.is_empty() {
            return Ok(());
        }
        std::fs::create_dir_all(log_dir).map_err(|e| Error::io(log_dir, e))?;
        if self.interrupted.is_none() {
            let interrupted = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, interrupted.clone())
                    .map_err(|e| Error::io("signal handler", e))?;
            }
            self.interrupted = Some(interrupted);
        }
        let cfg = &engine.pipeline.executor;
        let submitted = submit_all(
            engine,
            opts,
            cfg,
            worker,
            &to_run,
            log_dir,
            key,
            &mut self.ids,
            &mut self.jobs,
            on_line,
        );
        if let Err(e) = submitted {
            cancel(&self.jobs, on_line);
            return Err(e);
        }
        Ok(())
    }

    /// Follows every submitted job to its end; returns the ones that did not
    /// complete.
    pub fn follow(
        &mut self,
        cfg: &ExecutorConfig,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<Vec<String>> {
        if self.jobs.is_empty() {
            return Ok(Vec::new());
        }
        let interrupted = self.interrupted.clone().unwrap_or_default();
        follow(&mut self.jobs, cfg, &interrupted, on_line)?;
        Ok(self
            .jobs
            .iter()
            .filter(|j| j.state != "COMPLETED")
            .map(|j| format!("{} (job {} {})", j.stage, j.id, j.state))
            .collect())
    }

    /// An error naming the jobs that did not complete, if any.
    pub fn check(&self, failed: &[String]) -> Result<()> {
        if failed.is_empty() {
            return Ok(());
        }
        Err(Error::Slurm(format!(
            "{} of {} job(s) did not complete: {}",
            failed.len(),
            self.jobs.len(),
            failed.join(", ")
        )))
    }
}

/// `--keep-going` after some jobs failed: Slurm has already run every job
/// that did not depend on a failed one (`afterok` cancelled the others), so
/// the final pass writes the folders and lock entries of every stage that
/// is not failed or cancelled, then the error lists the failed stages (job,
/// state, exit code, log) and the skipped ones.
fn finish_keep_going(
    engine: &mut Engine,
    opts: &RunOptions,
    plan: &[StageOutcome],
    jobs: &[Job],
    on_stage: &mut dyn FnMut(&StageOutcome),
) -> Result<Vec<StageOutcome>> {
    // A job array is labelled `stage[0-N]`.
    let stage_of = |j: &Job| j.stage.split('[').next().unwrap_or_default().to_string();
    let mut failed: Vec<StageFailure> = Vec::new();
    let mut skipped: Vec<Skipped> = Vec::new();
    // Stages in pipeline (topological) order: a stage's upstreams come first.
    for o in plan {
        let mine: Vec<&Job> = jobs
            .iter()
            .filter(|j| stage_of(j) == o.stage && j.state != "COMPLETED")
            .collect();
        if mine.is_empty() {
            continue;
        }
        let decl = engine
            .pipeline
            .stage(&o.stage)
            .expect("planned stages exist");
        // The failed stage an upstream is, or is skipped because of.
        let root = decl
            .inputs
            .iter()
            .find_map(|n| match failed.iter().any(|f| &f.stage == n) {
                true => Some(n.clone()),
                false => skipped
                    .iter()
                    .find(|k| &k.stage == n)
                    .map(|k| k.upstream.clone()),
            });
        match root {
            Some(upstream) if mine.iter().all(|j| j.state == "CANCELLED") => {
                skipped.push(Skipped {
                    stage: o.stage.clone(),
                    upstream,
                })
            }
            _ => {
                let why: Vec<String> = mine
                    .iter()
                    .map(|j| {
                        format!(
                            "job {} {}, exit code {}; log: {}",
                            j.id,
                            j.state,
                            j.exit_code,
                            j.log().display()
                        )
                    })
                    .collect();
                failed.push(StageFailure {
                    stage: o.stage.clone(),
                    error: Error::Slurm(why.join("; ")),
                });
            }
        }
    }
    let left_out = |name: &str| {
        failed.iter().any(|f| f.stage == name) || skipped.iter().any(|k| k.stage == name)
    };
    let targets: Vec<String> = plan
        .iter()
        .map(|o| o.stage.clone())
        .filter(|n| !left_out(n))
        .collect();
    if !targets.is_empty() {
        let final_pass = RunOptions {
            force: false,
            jobs: 1,
            restore_only: true,
            targets,
            ..opts.clone()
        };
        engine.run(&final_pass, on_stage)?;
    }
    let lines = failed.iter().map(|f| (&f.stage, State::Failed, f.why()));
    for (stage, state, why) in lines.chain(skipped.iter().map(|k| {
        (
            &k.stage,
            State::Skipped,
            format!("upstream `{}` failed", k.upstream),
        )
    })) {
        let kind = engine
            .pipeline
            .stage(stage)
            .map(|d| d.kind.clone())
            .unwrap_or_default();
        let (fingerprint, output, summary) = (None, None, None);
        on_stage(&StageOutcome {
            stage: stage.clone(),
            kind,
            state,
            reasons: vec![why],
            fingerprint,
            output,
            summary,
            seconds: 0.0,
        });
    }
    Err(Error::StagesFailed { failed, skipped })
}

#[allow(clippy::too_many_arguments)]
fn submit_all(
    engine: &Engine,
    opts: &RunOptions,
    cfg: &ExecutorConfig,
    worker: &WorkerCommand,
    to_run: &[&StageOutcome],
    log_dir: &Path,
    key: &dyn Fn(&str) -> String,
    ids: &mut BTreeMap<String, String>,
    jobs: &mut Vec<Job>,
    on_line: &mut dyn FnMut(&str),
) -> Result<()> {
    for o in to_run {
        if ids.contains_key(&key(&o.stage)) {
            continue;
        }
        let decl = engine
            .pipeline
            .stage(&o.stage)
            .expect("planned stages exist");
        let mut deps: Vec<String> = decl
            .inputs
            .iter()
            .filter_map(|n| ids.get(&key(n)).cloned())
            .collect();
        let mut stage_args = vec!["run-stage".to_string(), decl.name.clone()];
        // Known now when every upstream is cached: the worker then refuses to
        // run if anything changed between planning and running.
        if let Some(fp) = o.fingerprint {
            stage_args.extend(["--fingerprint".to_string(), fp.to_hex()]);
        }
        if opts.forces(&decl.name) {
            stage_args.push("--force".into());
        }
        let array = decl.resources.array.filter(|n| *n > 1).map(|n| n as usize);
        if let Some(parts) = array {
            // A job array of parts, then one job that assembles them.
            let mut part_args = stage_args.clone();
            part_args.extend(["--parts".to_string(), parts.to_string()]);
            let label = format!("{}[0-{}]", decl.name, parts - 1);
            let id = submit(
                engine,
                cfg,
                worker,
                decl,
                &part_args,
                &deps,
                Some(parts),
                &label,
                log_dir,
                jobs,
                on_line,
            )?;
            deps = vec![id];
            stage_args.extend(["--assemble".to_string(), parts.to_string()]);
        }
        let id = submit(
            engine,
            cfg,
            worker,
            decl,
            &stage_args,
            &deps,
            None,
            &decl.name,
            log_dir,
            jobs,
            on_line,
        )?;
        ids.insert(key(&o.stage), id);
    }
    Ok(())
}

/// Writes a stage's batch script and submits it; returns the job id.
#[allow(clippy::too_many_arguments)]
fn submit(
    engine: &Engine,
    cfg: &ExecutorConfig,
    worker: &WorkerCommand,
    decl: &StageDecl,
    stage_args: &[String],
    deps: &[String],
    array: Option<usize>,
    label: &str,
    log_dir: &Path,
    jobs: &mut Vec<Job>,
    on_line: &mut dyn FnMut(&str),
) -> Result<String> {
    let file_stem = if array.is_some() {
        format!("{}-parts", decl.name)
    } else {
        decl.name.clone()
    };
    let script = log_dir.join(format!("{file_stem}.sh"));
    std::fs::write(&script, job_script(engine, decl, worker, stage_args))
        .map_err(|e| Error::io(&script, e))?;
    let log_pattern = log_dir.join(if array.is_some() {
        format!("{file_stem}-%A_%a.log")
    } else {
        format!("{file_stem}-%j.log")
    });
    let mut args = sbatch_args(cfg, decl, &engine.pipeline.base_dir, &log_pattern, deps);
    if let Some(n) = array {
        args.push(format!("--array=0-{}", n - 1));
    }
    let out = client(
        "sbatch",
        &args
            .iter()
            .map(String::as_str)
            .chain([script.to_str().unwrap_or_default()])
            .collect::<Vec<_>>(),
    )?;
    let id = out.trim().split(';').next().unwrap_or_default().to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(Error::Slurm(format!(
            "stage `{}`: sbatch printed `{}`, not a job id",
            decl.name,
            out.trim()
        )));
    }
    let after = if deps.is_empty() {
        String::new()
    } else {
        format!(" (after {})", deps.join(", "))
    };
    on_line(&format!("submit   {label}: job {id}{after}"));
    let job = Job {
        stage: label.to_string(),
        id: id.clone(),
        log_pattern,
        state: String::new(),
        exit_code: String::new(),
        node: String::new(),
        started: Instant::now(),
    };
    jobs.push(job);
    Ok(id)
}

/// The batch script: this binary, on one stage, from the pipeline's folder.
fn job_script(
    engine: &Engine,
    decl: &StageDecl,
    worker: &WorkerCommand,
    stage_args: &[String],
) -> String {
    let words: Vec<String> = std::iter::once(worker.program.clone())
        .chain(worker.global_args.iter().cloned())
        .chain(stage_args.iter().cloned())
        .collect();
    format!(
        "#!/bin/sh\n# melanoflow: stage `{}` of {}\ncd {} || exit 1\nexec {}\n",
        decl.name,
        engine.pipeline.file.display(),
        shell_quote(&engine.pipeline.base_dir.to_string_lossy()),
        words
            .iter()
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// `sbatch` options for a stage: name, log, folder, dependencies, resources.
fn sbatch_args(
    cfg: &ExecutorConfig,
    decl: &StageDecl,
    base_dir: &Path,
    log: &Path,
    deps: &[String],
) -> Vec<String> {
    let mut args = vec![
        "--parsable".to_string(),
        format!("--job-name=mf-{}", decl.name),
        format!("--output={}", log.display()),
        format!("--chdir={}", base_dir.display()),
    ];
    if !deps.is_empty() {
        args.push(format!("--dependency=afterok:{}", deps.join(":")));
        args.push("--kill-on-invalid-dep=yes".into());
    }
    args.extend(resource_args(&decl.resources, cfg));
    args.extend(cfg.sbatch_args.iter().cloned());
    args
}

/// A stage's resource hints as `sbatch` options.
pub fn resource_args(r: &Resources, cfg: &ExecutorConfig) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(c) = r.cpus {
        args.push(format!("--cpus-per-task={c}"));
    }
    if let Some(m) = &r.mem {
        args.push(format!("--mem={m}"));
    }
    // An explicit count (the pipeline's, or the kind's for `cuda:N`) wins;
    // else a stage that can use a GPU gets one when the cluster has them.
    let gpus = match r.gpus {
        Some(g) => g,
        None if cfg.gpus => r.gpus_if_available.unwrap_or(0),
        None => 0,
    };
    if gpus > 0 {
        args.push(format!("--gres=gpu:{gpus}"));
    }
    if let Some(t) = &r.time {
        args.push(format!("--time={t}"));
    }
    if let Some(p) = r.partition.as_ref().or(cfg.partition.as_ref()) {
        args.push(format!("--partition={p}"));
    }
    if let Some(a) = &cfg.account {
        args.push(format!("--account={a}"));
    }
    args
}

/// Polls until every job has finished, printing state changes; on Ctrl-C,
/// cancels the jobs still queued or running.
fn follow(
    jobs: &mut [Job],
    cfg: &ExecutorConfig,
    interrupted: &AtomicBool,
    on_line: &mut dyn FnMut(&str),
) -> Result<()> {
    let poll = Duration::from_secs_f64(cfg.poll_seconds.unwrap_or(1.0).max(0.05));
    loop {
        if interrupted.load(Ordering::SeqCst) {
            cancel(jobs, on_line);
            return Err(Error::Slurm(
                "interrupted: the submitted jobs were cancelled".into(),
            ));
        }
        for job in jobs.iter_mut().filter(|j| !j.finished()) {
            let Some(info) = job_info(&job.id)? else {
                continue;
            };
            let state = info.get("JobState").cloned().unwrap_or_default();
            if state == job.state {
                continue;
            }
            job.state = state;
            job.exit_code = info.get("ExitCode").cloned().unwrap_or_default();
            job.node = info
                .get("NodeList")
                .cloned()
                .filter(|n| !n.is_empty() && n != "(null)")
                .unwrap_or(job.node.clone());
            on_line(&event_line(job, info.get("Reason").map(String::as_str)));
        }
        if jobs.iter().all(Job::finished) {
            return Ok(());
        }
        std::thread::sleep(poll);
    }
}

fn event_line(job: &Job, reason: Option<&str>) -> String {
    let on = if job.node.is_empty() {
        String::new()
    } else {
        format!(" on {}", job.node)
    };
    match job.state.as_str() {
        "PENDING" => format!(
            "pending  {}: job {} ({})",
            job.stage,
            job.id,
            reason.unwrap_or("queued")
        ),
        "RUNNING" => format!("running  {}: job {}{on}", job.stage, job.id),
        "COMPLETED" => format!(
            "done     {}: job {}{on} ({:.1}s)",
            job.stage,
            job.id,
            job.started.elapsed().as_secs_f64()
        ),
        "CANCELLED" if reason == Some("DependencyNeverSatisfied") => {
            format!(
                "CANCELLED {}: job {} (an upstream job failed)",
                job.stage, job.id
            )
        }
        other => format!(
            "FAILED   {}: job {} {other}{}, exit code {}{on}; log: {}",
            job.stage,
            job.id,
            reason
                .filter(|r| *r != "None")
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            job.exit_code,
            job.log().display()
        ),
    }
}

fn cancel(jobs: &[Job], on_line: &mut dyn FnMut(&str)) {
    let ids: Vec<&str> = jobs
        .iter()
        .filter(|j| !j.finished())
        .map(|j| j.id.as_str())
        .collect();
    if ids.is_empty() {
        return;
    }
    match client("scancel", &ids) {
        Ok(_) => on_line(&format!("cancelled job(s) {}", ids.join(", "))),
        Err(e) => on_line(&format!("could not cancel job(s) {}: {e}", ids.join(", "))),
    }
}

/// A job's `Key=Value` fields from `scontrol show job -o`, or from `sacct`
/// once slurmctld has forgotten it; `None` while neither knows it yet.
fn job_info(id: &str) -> Result<Option<BTreeMap<String, String>>> {
    match client("scontrol", &["show", "job", "-o", id]) {
        Ok(out) => Ok(aggregate(out.lines().map(parse_fields).collect())),
        Err(scontrol) => match client(
            "sacct",
            &["-n", "-P", "-X", "-j", id, "-o", "State,ExitCode"],
        ) {
            Ok(out) => Ok(out.lines().next().map(|l| {
                let mut it = l.split('|');
                let state = it
                    .next()
                    .unwrap_or_default()
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                BTreeMap::from([
                    ("JobState".to_string(), state),
                    (
                        "ExitCode".to_string(),
                        it.next().unwrap_or_default().to_string(),
                    ),
                ])
            })),
            Err(_) => Err(scontrol),
        },
    }
}

/// One state for a job array's tasks (one line each): the first failure,
/// else running while any runs, else pending while any waits, else completed.
fn aggregate(mut tasks: Vec<BTreeMap<String, String>>) -> Option<BTreeMap<String, String>> {
    let state = |t: &BTreeMap<String, String>| t.get("JobState").cloned().unwrap_or_default();
    let rank = |s: &str| match s {
        "COMPLETED" => 0,
        "PENDING" | "CONFIGURING" | "REQUEUED" | "SUSPENDED" => 1,
        "RUNNING" | "COMPLETING" | "RESIZING" => 2,
        _ => 3,
    };
    let nodes: Vec<String> = tasks
        .iter()
        .filter_map(|t| t.get("NodeList").cloned())
        .filter(|n| !n.is_empty() && n != "(null)")
        .collect();
    tasks.sort_by_key(|t| std::cmp::Reverse(rank(&state(t))));
    let mut first = tasks.into_iter().next()?;
    let mut unique: Vec<String> = Vec::new();
    for n in nodes {
        if !unique.contains(&n) {
            unique.push(n);
        }
    }
    first.insert("NodeList".into(), unique.join(","));
    Some(first)
}

/// `Key=Value Key=Value ...` (scontrol's one-line format) as a map.
fn parse_fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Runs a Slurm client under `timeout`; its stdout, or an error with stderr.
fn client(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("timeout")
        .arg(CLIENT_TIMEOUT)
        .arg(program)
        .args(args)
        .output()
        .map_err(|e| {
            Error::Slurm(format!(
                "cannot run `{program}` (is Slurm installed here?): {e}"
            ))
        })?;
    if !out.status.success() {
        let why = if out.status.code() == Some(124) {
            format!("no answer within {CLIENT_TIMEOUT} s (is slurmctld up?)")
        } else {
            String::from_utf8_lossy(&out.stderr).trim().to_string()
        };
        return Err(Error::Slurm(format!(
            "`{program} {}` failed: {why}",
            args.join(" ")
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests;
