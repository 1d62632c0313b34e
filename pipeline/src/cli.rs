//! The command line: `run`, `status`, `dag`, `gc`, `verify`, `push`, `pull`, `kinds`, plus
//! the commands the application adds ([`AppCommand`]: e.g. `metrics`).
//!
//! `main` parses arguments, loads and validates the pipeline file (every error
//! there is reported before anything runs), dispatches, prints the error chain
//! on failure, and returns the exit code: 0 success, 1 a failed run or a
//! verification mismatch, 2 a usage or pipeline-file error.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

use crate::config::{self, ExecutorKind, Override};
use crate::context::Progress;
use crate::digest::Digest;
use crate::error::Error;
use crate::maintenance;
use crate::registry::Registry;
use crate::runner::{Engine, RunOptions, StageOutcome, State, Work, WorkerOutcome};
use crate::share;

#[derive(Parser, Debug)]
#[command(
    name = "melanoflow",
    version,
    about = "Content-hashed pipeline: CycleGAN augmentation for melanoma classification"
)]
pub struct Cli {
    /// The pipeline file.
    #[arg(long, short = 'c', global = true, default_value = "data/pipeline.toml")]
    pub config: PathBuf,
    /// Override a stage parameter for this invocation: STAGE.KEY=VALUE (repeatable).
    #[arg(long = "set", global = true, value_name = "STAGE.KEY=VALUE")]
    pub overrides: Vec<Override>,
    /// Print only errors.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Read from the remote store, never write to it (CI runners).
    #[arg(long, global = true)]
    pub remote_read_only: bool,
    /// Use this experiment's lock file and output folders instead of the
    /// workspace's (how `exp run --executor slurm` calls its workers).
    #[arg(long, global = true, hide = true, value_name = "NAME")]
    pub experiment: Option<String>,
    /// More logging (-v info, -vv debug).
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Bring stages up to date (all, or the named ones and their upstreams).
    Run {
        stages: Vec<String>,
        /// Re-run the named stages (or all) even when cached.
        #[arg(long)]
        force: bool,
        /// Say what would run, and why, without running it.
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Fail at once instead of waiting when another run holds the store.
        #[arg(long)]
        no_wait: bool,
        /// Run up to N independent stages at once (default: `[executor] jobs`, else 1).
        #[arg(long, short = 'j', value_name = "N")]
        jobs: Option<usize>,
        /// Where stages run (default: `[executor] kind`, else local).
        #[arg(long, value_enum)]
        executor: Option<ExecutorKind>,
        /// After a failure, still run every stage that does not depend on a
        /// failed one; then list every failure (exit code 1).
        #[arg(long, short = 'k')]
        keep_going: bool,
    },
    /// Run one stage as a worker (a Slurm job): its upstreams must be in the
    /// store; its result goes to the store only (no lock file, no `out/`).
    #[command(hide = true)]
    RunStage {
        stage: String,
        /// Refuse to run unless the stage's fingerprint is this one.
        #[arg(long)]
        fingerprint: Option<Digest>,
        /// Recompute even when the store has a result.
        #[arg(long)]
        force: bool,
        /// Do one part of a map stage split in N (a job-array task; the part
        /// is `--part`, else `$SLURM_ARRAY_TASK_ID`).
        #[arg(long, value_name = "N", conflicts_with = "assemble")]
        parts: Option<usize>,
        #[arg(long, requires = "parts")]
        part: Option<usize>,
        /// Join the N committed parts of a map stage into its result.
        #[arg(long, value_name = "N")]
        assemble: Option<usize>,
    },
    /// Say which stages are cached and why the others would run.
    Status {
        stages: Vec<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Draw the stage graph.
    Dag {
        /// Graphviz dot.
        #[arg(long, conflicts_with = "mermaid")]
        dot: bool,
        /// Mermaid flowchart (renders in GitHub markdown).
        #[arg(long)]
        mermaid: bool,
    },
    /// Delete store blobs and run records that no lock file beside the
    /// pipeline file, and no experiment, references.
    Gc {
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Keep only what the workspace's lock files reference: experiments'
        /// results go too (their records stay, and `exp apply` refuses them).
        #[arg(long)]
        workspace_only: bool,
    },
    /// Experiments: named runs with overrides, kept beside the workspace.
    Exp {
        #[command(subcommand)]
        command: crate::experiments::cli::ExpCommand,
    },
    /// Parameters, outputs and metrics between two states: git revisions of
    /// the lock file, experiments (`exp:NAME`) or the workspace (default:
    /// HEAD vs the workspace). Metrics on the same test images carry a
    /// paired test.
    Diff {
        /// A (default HEAD).
        a: Option<String>,
        /// B (default workspace).
        b: Option<String>,
        /// Markdown, for a CI comment.
        #[arg(long, conflicts_with = "json")]
        md: bool,
        #[arg(long)]
        json: bool,
    },
    /// Re-hash stored outputs and output folders against the lock file; with
    /// `--rerun`, re-execute stages from scratch and compare their outputs.
    Verify {
        /// Re-execute the named stages (or all) ignoring every cache, and
        /// compare the new output digests with the lock file.
        #[arg(long)]
        rerun: bool,
        /// Stages to re-run (with `--rerun`; default all).
        #[arg(requires = "rerun")]
        stages: Vec<String>,
        /// Compare the lock file (as the last run wrote it) with this
        /// committed one: fails when an output changed under an unchanged
        /// fingerprint (stale cache), or when a fingerprint changed and the
        /// committed lock was not updated with it.
        #[arg(long, value_name = "LOCK", conflicts_with = "rerun")]
        against: Option<PathBuf>,
    },
    /// Upload the lock file's results (all stages, or the named ones and
    /// their upstreams) to the remote store.
    Push { stages: Vec<String> },
    /// Download the lock file's results (all stages, or the named ones and
    /// their upstreams) from the remote store and write their output folders.
    Pull {
        stages: Vec<String>,
        /// Only fill the local store; leave the output folders alone.
        #[arg(long)]
        no_checkout: bool,
    },
    /// List the stage kinds this binary knows.
    Kinds,
    /// A command of the application (`melanoflow help` lists them).
    #[command(external_subcommand)]
    App(Vec<String>),
}

/// A subcommand the application adds beside the engine's. It parses its own
/// arguments (`args[0]` is its name) and gets the global options.
pub struct AppCommand {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&AppInvocation) -> Result<ExitCode, crate::BoxError>,
}

/// What an application command is called with.
pub struct AppInvocation<'a> {
    /// The pipeline file (`-c`), not yet loaded: commands that need no
    /// pipeline (a weights converter) must not fail without one.
    pub config: &'a std::path::Path,
    pub overrides: &'a [Override],
    pub quiet: bool,
    pub registry: &'a Registry,
    /// The command's name and its arguments.
    pub args: &'a [String],
}

/// Loads the invocation's pipeline file with its overrides.
impl AppInvocation<'_> {
    pub fn pipeline(&self) -> Result<config::Pipeline, Error> {
        Ok(config::load(self.config, self.registry, self.overrides)?)
    }
}

/// Runs the CLI with the given stage kinds; returns the process exit code.
pub fn main(registry: Registry) -> ExitCode {
    main_with(registry, &[])
}

/// Runs the CLI with the given stage kinds and application commands.
pub fn main_with(registry: Registry, app: &[AppCommand]) -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let listing: String = app
        .iter()
        .map(|c| format!("  {:<10} {}\n", c.name, c.about))
        .collect();
    let command = Cli::command().after_help(format!("Application commands:\n{listing}"));
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    init_logging(cli.quiet, cli.verbose);
    let result = match &cli.command {
        Command::App(args) => run_app(&cli, &registry, app, args),
        _ => dispatch(&cli, &registry),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            match e {
                Error::Config(_) | Error::UnknownStage { .. } | Error::UnknownCommand(_) => {
                    ExitCode::from(2)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn init_logging(quiet: bool, verbose: u8) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MELANOFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn run_app(
    cli: &Cli,
    registry: &Registry,
    app: &[AppCommand],
    args: &[String],
) -> Result<ExitCode, Error> {
    let name = args.first().map(String::as_str).unwrap_or_default();
    let command = app
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| Error::UnknownCommand(name.to_string()))?;
    // clap hands an external subcommand everything after its name, global
    // options included: take `--config`/`-c` and `--quiet`/`-q` back out.
    let mut config = cli.config.clone();
    let mut quiet = cli.quiet;
    let mut rest: Vec<String> = Vec::with_capacity(args.len());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" | "-c" => {
                config = it
                    .next()
                    .map(PathBuf::from)
                    .ok_or_else(|| Error::UnknownCommand(format!("{name} {a} (needs a file)")))?
            }
            "--quiet" | "-q" => quiet = true,
            _ => match a.strip_prefix("--config=") {
                Some(v) => config = PathBuf::from(v),
                None => rest.push(a.clone()),
            },
        }
    }
    let invocation = AppInvocation {
        config: &config,
        overrides: &cli.overrides,
        quiet,
        registry,
        args: &rest,
    };
    (command.run)(&invocation).map_err(|source| Error::Command {
        command: name.to_string(),
        source,
    })
}

fn dispatch(cli: &Cli, registry: &Registry) -> Result<ExitCode, Error> {
    match &cli.command {
        Command::Exp { command } => return crate::experiments::cli::exp(cli, registry, command),
        Command::Diff { a, b, md, json } => {
            use crate::experiments::cli::Format;
            let format = match (md, json) {
                (true, _) => Format::Markdown,
                (_, true) => Format::Json,
                _ => Format::Terminal,
            };
            return crate::experiments::cli::diff(
                cli,
                registry,
                a.as_deref(),
                b.as_deref(),
                format,
            );
        }
        _ => {}
    }
    if let Command::Kinds = cli.command {
        for k in registry.kinds() {
            println!(
                "{:<18} {:<12} {}",
                k.kind(),
                crate::registry::short_code(k.code()),
                k.about()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut pipeline = config::load(&cli.config, registry, &cli.overrides)?;
    if let Some(remote) = pipeline.remote.as_mut() {
        remote.read_only |= cli.remote_read_only;
    }
    if let Some(name) = &cli.experiment {
        crate::experiments::check_name(name)?;
        crate::experiments::redirect(&mut pipeline, name);
    }
    let progress = Progress::new(cli.quiet);
    match &cli.command {
        Command::Run {
            stages,
            force,
            dry_run,
            no_wait,
            jobs,
            executor,
            keep_going,
        } => {
            let started = Instant::now();
            let executor = executor.unwrap_or(pipeline.executor.kind);
            let jobs = jobs.or(pipeline.executor.jobs).unwrap_or(1);
            let mut engine = Engine::open(pipeline, registry, progress)?;
            let opts = RunOptions {
                targets: stages.clone(),
                force: *force,
                dry_run: *dry_run,
                wait: !*no_wait,
                jobs,
                restore_only: false,
                keep_going: *keep_going,
            };
            let quiet = cli.quiet;
            let mut seen: Vec<StageOutcome> = Vec::new();
            let mut print = |o: &StageOutcome| {
                if !quiet {
                    println!("{}", o.line());
                }
                seen.push(o.clone());
            };
            let result = match executor {
                ExecutorKind::Slurm if !*dry_run => {
                    let worker = worker_command(cli, &engine.pipeline)?;
                    crate::slurm::run(
                        &mut engine,
                        &opts,
                        &worker,
                        &mut |line| println!("{line}"),
                        &mut print,
                    )
                }
                _ => engine.run(&opts, &mut print),
            };
            match result {
                Ok(outcomes) => {
                    if !cli.quiet {
                        println!("{}", summary(&outcomes, started.elapsed().as_secs_f64()));
                    }
                    Ok(ExitCode::SUCCESS)
                }
                // Keep-going: the tally of what did run, then every failure.
                Err(e @ Error::StagesFailed { .. }) => {
                    if !cli.quiet {
                        println!("{}", summary(&seen, started.elapsed().as_secs_f64()));
                    }
                    Err(e)
                }
                Err(e) => Err(e),
            }
        }
        Command::Status { stages, json } => {
            let mut engine = Engine::open(pipeline, registry, progress)?;
            let outcomes = engine.plan(&RunOptions {
                targets: stages.clone(),
                ..Default::default()
            })?;
            if *json {
                let doc = serde_json::json!({
                    "pipeline": engine.pipeline.file,
                    "lock": engine.pipeline.lock_path(),
                    "stages": outcomes,
                });
                println!("{}", serde_json::to_string_pretty(&doc).expect("json"));
            } else {
                for o in &outcomes {
                    println!("{}", o.line());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dag { dot, mermaid } => {
            let text = if *dot {
                crate::dag::render_dot(&pipeline.stages)
            } else if *mermaid {
                crate::dag::render_mermaid(&pipeline.stages)
            } else {
                crate::dag::render_text(&pipeline.stages)
            };
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc {
            dry_run,
            workspace_only,
        } => {
            let engine = Engine::open(pipeline, registry, progress)?;
            let _guard = engine.run_lock(true)?;
            let mut locks: Vec<_> = maintenance::lock_files_in(&engine.pipeline.base_dir)?
                .into_iter()
                .map(|(_, l)| l)
                .collect();
            if !workspace_only {
                locks.extend(crate::experiments::all_lock_files(
                    &engine.pipeline.state_dir(),
                )?);
            }
            let r = maintenance::gc(engine.artifacts(), &locks, *dry_run)?;
            let verb = if *dry_run { "would delete" } else { "deleted" };
            let parts = if r.deleted_parts > 0 {
                format!(" (and {} part records of split stages)", r.deleted_parts)
            } else {
                String::new()
            };
            println!(
                "{verb} {} blobs and {} run records{parts}; kept {} blobs and {} run records referenced by {} lock file(s)",
                r.deleted_blobs,
                r.deleted_runs,
                r.kept_blobs,
                r.kept_runs,
                locks.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            against: Some(expected),
            ..
        } => {
            let expected = crate::lockfile::LockFile::load(expected)?;
            let actual = crate::lockfile::LockFile::load(&pipeline.lock_path())?;
            let report = crate::golden::compare(&expected, &actual);
            print!("{report}");
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Verify {
            rerun: true,
            stages,
            ..
        } => {
            let mut engine = Engine::open(pipeline, registry, progress)?;
            let quiet = cli.quiet;
            let outcomes = engine.verify_rerun(stages, &mut |o| {
                if !quiet || !o.reproduced() {
                    println!("{}", o.line());
                }
            })?;
            let differ = outcomes.iter().filter(|o| !o.reproduced()).count();
            println!(
                "re-ran {} stage(s): {}",
                outcomes.len(),
                if differ == 0 {
                    "every output matches the lock file".to_string()
                } else {
                    format!("{differ} differ from the lock file")
                }
            );
            Ok(if differ == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Verify { rerun: false, .. } => {
            let engine = Engine::open(pipeline, registry, progress)?;
            let r = maintenance::verify(
                engine.artifacts(),
                engine.lock_file(),
                &engine.pipeline.out_dir,
            )?;
            for p in &r.problems {
                println!("MISMATCH {}: {}", p.stage, p.what);
            }
            println!(
                "verified {} stage(s), {} stored file(s): {}",
                r.stages,
                r.blobs,
                if r.problems.is_empty() {
                    "all match the lock file".to_string()
                } else {
                    format!("{} problem(s)", r.problems.len())
                }
            );
            Ok(if r.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::RunStage {
            stage,
            fingerprint,
            force,
            parts,
            part,
            assemble,
        } => {
            let started = Instant::now();
            let work = match (parts, assemble) {
                (Some(parts), _) => {
                    let part = match part {
                        Some(p) => *p,
                        None => std::env::var("SLURM_ARRAY_TASK_ID").ok().and_then(|v| v.parse().ok()).ok_or_else(|| {
                            Error::Worker("--parts needs --part, or $SLURM_ARRAY_TASK_ID (a job-array task)".into())
                        })?,
                    };
                    if part >= *parts {
                        return Err(Error::Worker(format!(
                            "part {part} of {parts}: parts count from 0"
                        )));
                    }
                    Work::Part {
                        part,
                        parts: *parts,
                    }
                }
                (None, Some(parts)) => Work::Assemble { parts: *parts },
                (None, None) => Work::Whole,
            };
            let mut engine = Engine::open(pipeline, registry, progress)?;
            match engine.run_stage(stage, *fingerprint, *force, work)? {
                WorkerOutcome::Committed { output, summary } => {
                    let summary = if summary.is_empty() {
                        String::new()
                    } else {
                        format!(": {summary}")
                    };
                    println!(
                        "committed {stage} -> {} ({:.1}s){summary}",
                        output.short(),
                        started.elapsed().as_secs_f64()
                    )
                }
                WorkerOutcome::AlreadyCommitted { output } => {
                    println!("already committed {stage} -> {}", output.short())
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Push { stages } => {
            let engine = Engine::open(pipeline, registry, progress)?;
            let names = engine.locked_stages(stages)?;
            let report = share::push(engine.artifacts(), engine.lock_file(), &names)?;
            println!("{}", report.line("pushed"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Pull {
            stages,
            no_checkout,
        } => {
            let mut engine = Engine::open(pipeline, registry, progress)?;
            let names = engine.locked_stages(stages)?;
            let report = share::pull(engine.artifacts(), engine.lock_file(), &names)?;
            println!("{}", report.line("pulled"));
            if !no_checkout {
                let written = engine.checkout(stages)?;
                println!(
                    "checked out {} output folder(s){}",
                    written.len(),
                    if written.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", written.join(", "))
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Kinds | Command::Exp { .. } | Command::Diff { .. } => {
            unreachable!("handled above")
        }
        Command::App(_) => unreachable!("handled by run_app"),
    }
}

/// How Slurm jobs call this binary back: the same program (or `[executor]
/// command`), the same pipeline file and the same global options.
pub(crate) fn worker_command(
    cli: &Cli,
    pipeline: &config::Pipeline,
) -> Result<crate::slurm::WorkerCommand, Error> {
    let program = match &pipeline.executor.command {
        Some(c) => c.clone(),
        None => std::env::current_exe()
            .map_err(|e| Error::io("the melanoflow binary", e))?
            .display()
            .to_string(),
    };
    let config = std::path::absolute(&cli.config).map_err(|e| Error::io(&cli.config, e))?;
    let mut global_args = vec!["--config".to_string(), config.display().to_string()];
    for o in &cli.overrides {
        global_args.push(format!("--set={o}"));
    }
    if cli.remote_read_only {
        global_args.push("--remote-read-only".into());
    }
    Ok(crate::slurm::WorkerCommand {
        program,
        global_args,
    })
}

fn summary(outcomes: &[StageOutcome], seconds: f64) -> String {
    let count = |s: State| outcomes.iter().filter(|o| o.state == s).count();
    let mut parts = Vec::new();
    for (s, label) in [
        (State::Ran, "ran"),
        (State::Restored, "restored"),
        (State::Cached, "cached"),
        (State::WouldRun, "would run"),
        (State::WouldRestore, "would restore"),
        (State::Failed, "failed"),
        (State::Skipped, "skipped"),
    ] {
        let n = count(s);
        if n > 0 {
            parts.push(format!("{n} {label}"));
        }
    }
    format!(
        "{} stage(s): {} in {seconds:.2}s",
        outcomes.len(),
        parts.join(", ")
    )
}
