//! Stage kinds: the trait a stage implements, and the registry the binary
//! fills with every kind it knows. The engine knows nothing of any kind's
//! meaning; it sees typed parameters (for validation and hashing), declared
//! external inputs (for hashing) and a `run` function.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::DeValue;

use crate::context::{StageContext, StageReport};

/// What a stage's `run` returns on failure: any error, with its chain of causes.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One kind of stage (`synth`, `ingest`, ...), implemented by the app crate.
pub trait Stage: Send + Sync + 'static {
    /// The stage's parameters: a struct with `#[serde(deny_unknown_fields)]`
    /// and a default for every optional key.
    type Params: DeserializeOwned + Serialize + Send + Sync + 'static;
    /// The `kind` name used in pipeline files.
    const KIND: &'static str;
    /// The code identity of the sources that compute this kind's bytes: a
    /// digest the app derives at build time from its sources and locked crate
    /// versions (melanoflow's `code_identity` module). Part of the fingerprint,
    /// so a stage re-runs whenever its code changes.
    const CODE: &'static str;
    /// An explicit override on top of [`Stage::CODE`]: bump it only for a
    /// change the code identity cannot see (an input the sources read at run
    /// time, say). Also part of the fingerprint.
    const VERSION: u32 = 0;
    /// One line for `melanoflow kinds` and error messages.
    const ABOUT: &'static str;

    /// Files outside the pipeline this stage reads (source CSVs, image folders),
    /// resolved against `base_dir`. Their bytes are hashed into the fingerprint.
    fn external_inputs(&self, _params: &Self::Params, _base_dir: &Path) -> Vec<ExternalInput> {
        Vec::new()
    }

    /// Checks that need more than one key, or the upstream list; the message
    /// becomes a pipeline-file error at the stage's line.
    fn check(&self, _params: &Self::Params, _inputs: &[String]) -> Result<(), String> {
        Ok(())
    }

    /// What a run of this stage needs from a cluster scheduler (a GPU when
    /// its device is CUDA, say). `[stages.NAME.resources]` overrides it.
    fn resources(&self, _params: &Self::Params) -> Resources {
        Resources::default()
    }

    /// Does the work, writing every output under `ctx.out_dir`.
    fn run(&self, params: &Self::Params, ctx: &StageContext) -> Result<StageReport, BoxError>;

    /// Map stages whose items can be processed apart: `run_part` and
    /// `assemble` are implemented, and a cluster may fan the stage out as a
    /// job array (`[stages.NAME.resources] array = N`).
    const SPLITS: bool = false;

    /// Part `part` of `parts` (0-based) of the work: writes its share under
    /// `ctx.out_dir`, in whatever layout `assemble` reads.
    fn run_part(
        &self,
        _params: &Self::Params,
        _ctx: &StageContext,
        _part: usize,
        _parts: usize,
    ) -> Result<StageReport, BoxError> {
        Err(format!("stage kind `{}` cannot be split into parts", Self::KIND).into())
    }

    /// Joins the parts' folders (in part order) into the stage's output under
    /// `ctx.out_dir`: byte for byte what `run` writes.
    fn assemble(
        &self,
        _params: &Self::Params,
        _ctx: &StageContext,
        _parts: &[PathBuf],
    ) -> Result<StageReport, BoxError> {
        Err(format!("stage kind `{}` cannot be split into parts", Self::KIND).into())
    }
}

/// Scheduler hints for one stage (`[stages.NAME.resources]`): under the Slurm
/// executor they become `sbatch` options. Not part of the fingerprint: where
/// a stage runs does not change what it writes.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores (`--cpus-per-task`).
    pub cpus: Option<u32>,
    /// Memory per node, Slurm syntax: `16G`, `4000M` (`--mem`).
    pub mem: Option<String>,
    /// GPUs (`--gres=gpu:N`).
    pub gpus: Option<u32>,
    /// GPUs the stage would use if its job landed on a node with them (its
    /// `device` is `auto`), requested only when `[executor] gpus = true` says
    /// the cluster has GPUs; `gpus` above, when set, wins. Set by the stage
    /// kind, never by the pipeline file.
    #[serde(skip)]
    pub gpus_if_available: Option<u32>,
    /// Wall-clock limit, Slurm syntax: `90`, `4:00:00`, `1-00:00:00` (`--time`).
    pub time: Option<String>,
    /// Partition (`--partition`), overriding `[executor] partition`.
    pub partition: Option<String>,
    /// Map stages: run as a job array of this many parts, then one job that
    /// assembles them (`--array=0-(N-1)`).
    pub array: Option<u32>,
}

impl Resources {
    /// These hints, with `other`'s where these have none.
    pub fn or(self, other: Resources) -> Resources {
        Resources {
            cpus: self.cpus.or(other.cpus),
            mem: self.mem.or(other.mem),
            gpus: self.gpus.or(other.gpus),
            gpus_if_available: self.gpus_if_available.or(other.gpus_if_available),
            time: self.time.or(other.time),
            partition: self.partition.or(other.partition),
            array: self.array.or(other.array),
        }
    }
}

/// A file or folder outside the pipeline that a stage reads.
#[derive(Clone, Debug)]
pub struct ExternalInput {
    /// The parameter it came from (`metadata`, `images`): names the input in
    /// messages and prefixes its manifest entries.
    pub name: String,
    pub source: Source,
}

/// Where an external input lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A file or folder on this machine.
    Local(PathBuf),
    /// A folder of objects behind a URL (`s3://bucket/prefix`, `gs://`,
    /// `az://`, `file:///abs/dir`), listed and read through object_store.
    Remote(String),
}

impl Source {
    /// A parameter value: a URL (`scheme://...`) or a path relative to `base_dir`.
    pub fn from_param(value: &str, base_dir: &Path) -> Source {
        if value.contains("://") {
            Source::Remote(value.to_string())
        } else {
            Source::Local(base_dir.join(value))
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Local(p) => write!(f, "{}", p.display()),
            Source::Remote(u) => f.write_str(u),
        }
    }
}

impl ExternalInput {
    pub fn new(name: &str, value: &str, base_dir: &Path) -> Self {
        ExternalInput {
            name: name.to_string(),
            source: Source::from_param(value, base_dir),
        }
    }
}

/// A stage's parameters after validation: the typed value, and its canonical
/// JSON form (defaults filled in) used for fingerprints and the lock file.
#[derive(Clone)]
pub struct ParsedParams {
    typed: Arc<dyn Any + Send + Sync>,
    pub canonical: serde_json::Value,
}

impl std::fmt::Debug for ParsedParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.canonical)
    }
}

impl ParsedParams {
    pub fn typed<T: 'static>(&self) -> &T {
        self.typed
            .downcast_ref()
            .expect("params parsed by this stage's kind")
    }
}

/// The object-safe face of a [`Stage`], used by the engine.
pub trait DynStage: Send + Sync {
    fn kind(&self) -> &'static str;
    fn version(&self) -> u32;
    fn code(&self) -> &'static str;
    fn about(&self) -> &'static str;
    fn parse_params(&self, table: Spanned<DeValue<'_>>) -> Result<ParsedParams, toml::de::Error>;
    fn check(&self, params: &ParsedParams, inputs: &[String]) -> Result<(), String>;
    fn external_inputs(&self, params: &ParsedParams, base_dir: &Path) -> Vec<ExternalInput>;
    fn resources(&self, params: &ParsedParams) -> Resources;
    fn splits(&self) -> bool;
    fn run_part(
        &self,
        params: &ParsedParams,
        ctx: &StageContext,
        part: usize,
        parts: usize,
    ) -> Result<StageReport, BoxError>;
    fn assemble(
        &self,
        params: &ParsedParams,
        ctx: &StageContext,
        parts: &[PathBuf],
    ) -> Result<StageReport, BoxError>;
    fn run(&self, params: &ParsedParams, ctx: &StageContext) -> Result<StageReport, BoxError>;
}

struct Typed<S>(S);

impl<S: Stage> DynStage for Typed<S> {
    fn kind(&self) -> &'static str {
        S::KIND
    }
    fn version(&self) -> u32 {
        S::VERSION
    }
    fn code(&self) -> &'static str {
        S::CODE
    }
    fn about(&self) -> &'static str {
        S::ABOUT
    }
    fn parse_params(&self, table: Spanned<DeValue<'_>>) -> Result<ParsedParams, toml::de::Error> {
        let typed: S::Params =
            serde::Deserialize::deserialize(toml::de::ValueDeserializer::from(table))?;
        let canonical = serde_json::to_value(&typed).expect("parameters serialise to JSON");
        Ok(ParsedParams {
            typed: Arc::new(typed),
            canonical,
        })
    }
    fn check(&self, params: &ParsedParams, inputs: &[String]) -> Result<(), String> {
        self.0.check(params.typed(), inputs)
    }
    fn external_inputs(&self, params: &ParsedParams, base_dir: &Path) -> Vec<ExternalInput> {
        self.0.external_inputs(params.typed(), base_dir)
    }
    fn resources(&self, params: &ParsedParams) -> Resources {
        self.0.resources(params.typed())
    }
    fn splits(&self) -> bool {
        S::SPLITS
    }
    fn run_part(
        &self,
        params: &ParsedParams,
        ctx: &StageContext,
        part: usize,
        parts: usize,
    ) -> Result<StageReport, BoxError> {
        self.0.run_part(params.typed(), ctx, part, parts)
    }
    fn assemble(
        &self,
        params: &ParsedParams,
        ctx: &StageContext,
        parts: &[PathBuf],
    ) -> Result<StageReport, BoxError> {
        self.0.assemble(params.typed(), ctx, parts)
    }
    fn run(&self, params: &ParsedParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
        self.0.run(params.typed(), ctx)
    }
}

/// Every stage kind the binary knows, and how to read its results.
#[derive(Default)]
pub struct Registry {
    kinds: Vec<Box<dyn DynStage>>,
    results: Option<Box<dyn crate::experiments::ResultReader>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register<S: Stage>(&mut self, stage: S) -> &mut Self {
        assert!(
            self.get(S::KIND).is_none(),
            "stage kind `{}` registered twice",
            S::KIND
        );
        self.kinds.push(Box::new(Typed(stage)));
        self
    }

    pub fn get(&self, kind: &str) -> Option<&dyn DynStage> {
        self.kinds
            .iter()
            .find(|k| k.kind() == kind)
            .map(|k| k.as_ref())
    }

    /// How `exp` and `diff` read metrics and paired tests out of a finished
    /// workspace (the application's; without one they show parameters and
    /// outputs only).
    pub fn set_results(
        &mut self,
        reader: impl crate::experiments::ResultReader + 'static,
    ) -> &mut Self {
        self.results = Some(Box::new(reader));
        self
    }

    pub fn results(&self) -> Option<&dyn crate::experiments::ResultReader> {
        self.results.as_deref()
    }

    pub fn kinds(&self) -> impl Iterator<Item = &dyn DynStage> {
        self.kinds.iter().map(|k| k.as_ref())
    }

    pub(crate) fn kinds_list(&self) -> String {
        self.kinds
            .iter()
            .map(|k| format!("`{}`", k.kind()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A code identity as people read it: its first 12 hex digits (`none` for a
/// lock entry written before code identities existed).
pub fn short_code(code: &str) -> &str {
    if code.is_empty() {
        "none"
    } else {
        &code[..code.len().min(12)]
    }
}
