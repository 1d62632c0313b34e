//! The engine's error type: every variant names what the user must look at
//! (file, stage, key, digest), and keeps its cause for `main` to print.

use std::path::PathBuf;

use crate::artifacts::ArtifactError;
use crate::config::ConfigError;
use crate::lockfile::LockFileError;
use crate::registry::BoxError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    LockFile(#[from] LockFileError),
    #[error("stage `{stage}`: input `{name}` not found at {location}")]
    MissingInput {
        stage: String,
        name: String,
        location: String,
    },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stage `{stage}` failed; nothing of it was committed")]
    StageFailed {
        stage: String,
        #[source]
        source: BoxError,
    },
    /// `run --keep-going`: every stage that failed, with its error, and every
    /// stage left out because an upstream failed.
    #[error("{}", failure_report(failed, skipped))]
    StagesFailed {
        failed: Vec<StageFailure>,
        skipped: Vec<Skipped>,
    },
    #[error("another melanoflow run (pid {pid}) is using this store (lock {}); try again when it ends", path.display())]
    Busy { path: PathBuf, pid: String },
    #[error("no stage named `{name}`; the pipeline has: {known}")]
    UnknownStage { name: String, known: String },
    #[error("`{command}` failed")]
    Command {
        command: String,
        #[source]
        source: BoxError,
    },
    #[error("not up to date: {stages}; run `melanoflow run` first, then verify")]
    NotUpToDate { stages: String },
    #[error("{0}")]
    Remote(String),
    #[error("{0}")]
    Worker(String),
    #[error("slurm: {0}")]
    Slurm(String),
    #[error("{0}")]
    Experiment(String),
    #[error("unknown command `{0}`; see `melanoflow --help`")]
    UnknownCommand(String),
}

/// One failed stage of a `--keep-going` run.
#[derive(Debug)]
pub struct StageFailure {
    pub stage: String,
    pub error: Error,
}

/// A stage not run because `upstream` (a stage it depends on, directly or
/// not) failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub stage: String,
    pub upstream: String,
}

/// An error and its causes on one line (`a: b: c`).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

impl StageFailure {
    /// Why it failed, without repeating the stage's name where the error
    /// starts with it.
    pub fn why(&self) -> String {
        match &self.error {
            Error::StageFailed { source, .. } => chain(source.as_ref()),
            e => chain(e),
        }
    }
}

fn failure_report(failed: &[StageFailure], skipped: &[Skipped]) -> String {
    let mut s = format!("{} stage(s) failed", failed.len());
    if !skipped.is_empty() {
        s.push_str(&format!(
            ", {} skipped because an upstream failed",
            skipped.len()
        ));
    }
    s.push(':');
    for f in failed {
        s.push_str(&format!("\n  {}: {}", f.stage, f.why()));
    }
    for k in skipped {
        s.push_str(&format!(
            "\n  {}: skipped (upstream `{}` failed)",
            k.stage, k.upstream
        ));
    }
    s
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
