//! The `exp` and `diff` commands: argument parsing and printing over the
//! functions of this module's siblings.

use std::process::ExitCode;
use std::time::Instant;

use clap::Subcommand;

use super::sweep::{self, Sweep};
use super::{diff, run, table};
use crate::cli::Cli;
use crate::config::{self, ExecutorKind};
use crate::context::Progress;
use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::runner::{Engine, RunOptions, State, open_artifacts};

#[derive(Subcommand, Debug)]
pub enum ExpCommand {
    /// Run the pipeline with overrides as named experiments, beside the
    /// workspace (its lock file and output folders are not touched). Stages
    /// whose results the store holds are restored, not run again.
    Run {
        /// The experiment's name (a sweep's are NAME-1, NAME-2, ...);
        /// default: exp- and a digest of its overrides.
        #[arg(long)]
        name: Option<String>,
        /// One experiment per value, the grid of every --sweep:
        /// STAGE.KEY=V1,V2,... (repeatable; `--set` applies to all).
        #[arg(long = "sweep", value_name = "STAGE.KEY=V1,V2,...")]
        sweeps: Vec<Sweep>,
        /// Run up to N independent stages at once within an experiment.
        #[arg(long, short = 'j', value_name = "N")]
        jobs: Option<usize>,
        /// Where stages run (default: `[executor] kind`, else local). On
        /// Slurm every experiment's jobs are submitted at once, a shared
        /// stage once.
        #[arg(long, value_enum)]
        executor: Option<ExecutorKind>,
    },
    /// One row per experiment and the workspace: the parameters that differ
    /// and every metric.
    Show {
        #[arg(long, conflicts_with_all = ["md", "csv"])]
        json: bool,
        #[arg(long, conflicts_with = "csv")]
        md: bool,
        #[arg(long)]
        csv: bool,
        /// Sort by this metric, best first (e.g. "classical auc").
        #[arg(long, value_name = "METRIC")]
        sort: Option<String>,
    },
    /// Make an experiment the workspace: its overrides written into the
    /// pipeline file, its lock file and output folders restored; nothing runs.
    Apply { name: String },
    /// Delete experiments (their results stay in the store until `gc`).
    Remove {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// `melanoflow exp ...`.
pub fn exp(cli: &Cli, registry: &Registry, command: &ExpCommand) -> Result<ExitCode> {
    let progress = Progress::new(cli.quiet);
    match command {
        ExpCommand::Run {
            name,
            sweeps,
            jobs,
            executor,
        } => {
            let started = Instant::now();
            let planned = sweep::grid(name.as_deref(), &cli.overrides, sweeps)?;
            // run::run loads every experiment's pipeline before anything runs.
            let base = config::load(&cli.config, registry, &cli.overrides)?;
            let executor = executor.unwrap_or(base.executor.kind);
            let slurm = match executor {
                ExecutorKind::Slurm => {
                    let mut worker = crate::cli::worker_command(cli, &base)?;
                    // Each experiment adds its own `--set`s.
                    worker.global_args.retain(|a| !a.starts_with("--set="));
                    Some(worker)
                }
                ExecutorKind::Local => None,
            };
            let opts = run::ExpRunOptions {
                file: &cli.config,
                registry,
                run: RunOptions {
                    jobs: jobs.or(base.executor.jobs).unwrap_or(1),
                    wait: true,
                    ..Default::default()
                },
                remote_read_only: cli.remote_read_only,
                progress,
                slurm,
            };
            let quiet = cli.quiet;
            let records = run::run(
                &opts,
                &planned,
                &mut |exp, o| {
                    if !quiet {
                        println!("[{exp}] {}", o.line())
                    }
                },
                &mut |line| {
                    if !quiet {
                        println!("{line}")
                    }
                },
            )?;
            if !quiet {
                let ran: usize = records
                    .iter()
                    .map(|r| {
                        r.stages
                            .values()
                            .filter(|s| *s == State::Ran.label())
                            .count()
                    })
                    .sum();
                println!(
                    "{} experiment(s) in {:.1}s ({ran} stage run(s) in all): {}",
                    records.len(),
                    started.elapsed().as_secs_f64(),
                    records
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                println!("`melanoflow exp show` compares them");
            }
            Ok(ExitCode::SUCCESS)
        }
        ExpCommand::Show {
            json,
            md,
            csv,
            sort,
        } => {
            let pipeline = &config::load(&cli.config, registry, &cli.overrides)?;
            let records = super::list_shared(pipeline, &open_artifacts(pipeline, &progress)?)?;
            let lock = crate::lockfile::LockFile::load(&pipeline.lock_path())?;
            let metrics = match registry.results() {
                Some(r) => r.metrics(pipeline, &pipeline.out_dir).map_err(|e| {
                    Error::Experiment(format!("reading the workspace's metrics: {e}"))
                })?,
                None => Vec::new(),
            };
            let workspace = (!lock.stages.is_empty()).then_some((&lock, metrics.as_slice()));
            let t = table::build(workspace, &records, sort.as_deref());
            if let Some(s) = sort
                && !t.metrics.contains(s)
            {
                return Err(Error::Experiment(format!(
                    "--sort `{s}`: no such metric (there are: {})",
                    t.metrics.join(", ")
                )));
            }
            let text = if *json {
                serde_json::to_string_pretty(&t).expect("json") + "\n"
            } else if *md {
                t.markdown()
            } else if *csv {
                t.csv()
            } else {
                t.terminal(100)
            };
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        ExpCommand::Apply { name } => {
            let pipeline = config::load(&cli.config, registry, &[])?;
            let record =
                super::load_shared(&pipeline, &open_artifacts(&pipeline, &progress)?, name)?;
            let applied = super::apply::apply(&cli.config, registry, &record, progress)?;
            println!(
                "applied experiment `{name}`: {} written into {}; {} output folder(s) restored; nothing ran",
                if applied.written.is_empty() {
                    "no override".to_string()
                } else {
                    applied.written.join(", ")
                },
                cli.config.display(),
                applied.restored.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        ExpCommand::Remove { names } => {
            let pipeline = config::load(&cli.config, registry, &[])?;
            let artifacts = open_artifacts(&pipeline, &progress)?;
            for name in names {
                super::remove(&pipeline, &artifacts, name)?;
                println!("removed experiment `{name}` (its results stay in the store until `gc`)");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Output formats of `diff`.
#[derive(Clone, Copy, Debug)]
pub enum Format {
    Terminal,
    Markdown,
    Json,
}

/// `melanoflow diff [A [B]]`.
pub fn diff(
    cli: &Cli,
    registry: &Registry,
    a: Option<&str>,
    b: Option<&str>,
    format: Format,
) -> Result<ExitCode> {
    let pipeline = config::load(&cli.config, registry, &cli.overrides)?;
    let engine = Engine::open(pipeline, registry, Progress::new(cli.quiet))?;
    let side_a = diff::Side::parse(a.unwrap_or("HEAD"));
    let side_b = diff::Side::parse(b.unwrap_or("workspace"));
    let d = diff::diff(&engine, registry, &side_a, &side_b)?;
    let text = match format {
        Format::Terminal => d.terminal(),
        Format::Markdown => d.markdown(),
        Format::Json => serde_json::to_string_pretty(&d.json()).expect("json") + "\n",
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}
