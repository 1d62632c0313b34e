//! What a running stage sees: where to write, what its upstreams produced, the
//! external files it declared (with their digests), and progress reporting.
//!
//! A stage must write only under `out_dir` (a private staging folder); the
//! engine hashes and commits it after `run` returns successfully, and throws
//! it away otherwise.

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::digest::Digest;
use crate::manifest::Manifest;

pub struct StageContext {
    pub stage: String,
    /// This run's fingerprint, as the lock file records it (code identity,
    /// parameters, input digests). A stage may write it into its outputs so
    /// that a reader can tell which run made them: it is a function of
    /// exactly what decides whether the stage runs, so the bytes stay
    /// reproducible.
    pub fingerprint: Digest,
    /// The staging folder the stage writes its outputs into.
    pub out_dir: PathBuf,
    /// The pipeline file's folder: relative paths in parameters start here.
    pub base_dir: PathBuf,
    /// Upstream stages' outputs, in the order of the stage's `inputs`.
    pub upstream: Vec<Upstream>,
    /// The external inputs the stage declared, in declaration order.
    pub external: Vec<ExternalFiles>,
    pub progress: Progress,
    /// This stage's last committed output folder, when it is intact (its
    /// digest matches the lock file): map stages reuse per-item results from
    /// it instead of recomputing them. Read-only; it is replaced only after
    /// this run commits.
    pub previous: Option<PathBuf>,
    /// A folder that survives a killed run of the same stage with the same
    /// fingerprint (and nothing else): for checkpoints, so a long training
    /// run resumes where it stopped. Deleted when the stage commits.
    pub scratch_dir: PathBuf,
}

impl StageContext {
    /// The upstream output of the given kind, if exactly one input has it.
    pub fn upstream_of_kind(&self, kind: &str) -> Option<&Upstream> {
        let mut it = self.upstream.iter().filter(|u| u.kind == kind);
        let first = it.next()?;
        it.next().is_none().then_some(first)
    }

    pub fn external(&self, name: &str) -> Option<&ExternalFiles> {
        self.external.iter().find(|e| e.name == name)
    }
}

/// One upstream stage's committed output.
pub struct Upstream {
    pub name: String,
    pub kind: String,
    /// The materialised output folder (read-only by convention).
    pub dir: PathBuf,
    /// Every file in `dir` with its digest.
    pub manifest: Manifest,
}

/// One external input: a file (manifest with one entry named after the input)
/// or a folder, local or remote (entries relative to it).
pub struct ExternalFiles {
    pub name: String,
    pub source: crate::registry::Source,
    pub is_dir: bool,
    pub manifest: Manifest,
}

/// What a stage tells the user when it finishes: one line of counts.
#[derive(Clone, Debug, Default)]
pub struct StageReport {
    pub summary: String,
}

impl StageReport {
    pub fn new(summary: impl Into<String>) -> Self {
        StageReport {
            summary: summary.into(),
        }
    }
}

/// Progress bars that respect `-q` and draw only on a terminal.
#[derive(Clone, Debug)]
pub struct Progress {
    quiet: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Progress { quiet }
    }

    fn target(&self) -> ProgressDrawTarget {
        if self.quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        }
    }

    /// A bar counting `len` items with a rate (`items/s`) and an ETA.
    pub fn bar(&self, len: u64, what: &str) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(Some(len), self.target());
        bar.set_style(
            ProgressStyle::with_template(
                "  {msg:<24} [{bar:30}] {human_pos}/{human_len} {per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        bar
    }

    /// A bar counting bytes (transfers); its length is set when known.
    pub fn bytes_bar(&self, what: &str) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(Some(0), self.target());
        bar.set_style(
            ProgressStyle::with_template("  {msg:<24} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        bar
    }

    /// A counter for work of unknown size (files hashed, objects fetched).
    pub fn counter(&self, what: &str) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(None, self.target());
        bar.set_style(
            ProgressStyle::with_template("  {msg:<24} {human_pos} {per_sec}")
                .expect("valid template"),
        );
        bar.set_message(what.to_string());
        bar
    }
}

/// Joins a `/`-separated manifest path onto a folder.
pub fn join_rel(dir: &Path, rel: &str) -> PathBuf {
    rel.split('/')
        .fold(dir.to_path_buf(), |p, part| p.join(part))
}
