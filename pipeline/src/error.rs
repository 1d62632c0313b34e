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
    MissingInput { stage: String, name: String, location: String },
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
    #[error("unknown command `{0}`; see `melanoflow --help`")]
    UnknownCommand(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
