//! The pipeline file: TOML with a `[store]` table, an optional `[outputs]`
//! table, and one `[stages.NAME]` table per stage (`kind`, upstream `inputs`,
//! and the kind's parameters).
//!
//! Parsing is separate from running, like ripgrep's LowArgs -> HiArgs: this
//! module turns text plus `--set` overrides into a validated [`Pipeline`]
//! (every stage's parameters typed by its kind, every upstream present, no
//! cycle) or an error naming the file, line and key, before anything runs.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::dag;

pub mod foreach;
use crate::registry::{ParsedParams, Registry, Resources};

/// A validated pipeline, ready to plan.
#[derive(Debug)]
pub struct Pipeline {
    /// The pipeline file, as the user named it.
    pub file: PathBuf,
    /// The directory holding the pipeline file: relative paths start here.
    pub base_dir: PathBuf,
    pub store_url: String,
    /// A shared store behind the local one (`[store] remote`), if any.
    pub remote: Option<RemoteConfig>,
    /// Where stage outputs are materialised: `OUT/STAGE/`.
    pub out_dir: PathBuf,
    /// The lock file: beside the pipeline file (`pipeline.toml` ->
    /// `pipeline.lock`), or an experiment's own (`experiments.rs`).
    pub lock_file: PathBuf,
    /// How stages are run (`[executor]`).
    pub executor: ExecutorConfig,
    /// Stages in a topological order (upstreams first), ties in file order.
    pub stages: Vec<StageDecl>,
}

/// `[executor]`: where stages run. Local by default; `kind = "slurm"` submits
/// each stage that must run as a Slurm job (see `slurm.rs`).
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorConfig {
    #[serde(default)]
    pub kind: ExecutorKind,
    /// Local executor: independent stages run at once (`-j`).
    pub jobs: Option<usize>,
    /// Slurm: the default partition (`--partition`).
    pub partition: Option<String>,
    /// Slurm: the account to charge (`--account`).
    pub account: Option<String>,
    /// Slurm: extra `sbatch` arguments for every job (`["--qos=normal"]`).
    #[serde(default)]
    pub sbatch_args: Vec<String>,
    /// Slurm: seconds between job-state polls (default 1).
    pub poll_seconds: Option<f64>,
    /// Slurm: the melanoflow binary as the compute nodes see it (default:
    /// this binary's path, which suits a shared filesystem).
    pub command: Option<String>,
    /// Slurm: the cluster has GPUs, so a stage that would use one where
    /// present (its kind says so: `device = "auto"`) asks for it
    /// (`--gres=gpu:1`). Off by default: such a stage then runs wherever its
    /// job lands, on the CPU if there is no GPU.
    #[serde(default)]
    pub gpus: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    #[default]
    Local,
    Slurm,
}

/// `[store] remote = URL` and its options: an object store shared between
/// machines, looked up when the local store misses.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteConfig {
    /// `s3://bucket/prefix`, `gs://...`, `az://...`, `file://...`.
    pub url: String,
    /// An S3-compatible server's URL (MinIO, Ceph, s3s); `http://` allows plain HTTP.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Read from the remote, never write to it (CI runners).
    pub read_only: bool,
}

#[derive(Debug)]
pub struct StageDecl {
    pub name: String,
    pub kind: String,
    pub inputs: Vec<String>,
    pub line: usize,
    pub params: ParsedParams,
    /// Scheduler hints: the kind's, overridden by `[stages.NAME.resources]`.
    pub resources: Resources,
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&StageDecl> {
        self.stages.iter().find(|s| s.name == name)
    }

    pub fn lock_path(&self) -> PathBuf {
        self.lock_file.clone()
    }

    /// Engine state that is neither output nor store: the file hash cache, staging.
    pub fn state_dir(&self) -> PathBuf {
        self.base_dir.join(".melanoflow")
    }

    pub fn stage_out_dir(&self, stage: &str) -> PathBuf {
        self.out_dir.join(stage)
    }
}

/// A pipeline-file error: where, and what was expected.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", file.display(), location(*line, *column))]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

/// A `--set STAGE.KEY=VALUE` override from the command line.
#[derive(Clone, Debug)]
pub struct Override {
    pub stage: String,
    pub key: String,
    pub value: String,
}

impl std::str::FromStr for Override {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (lhs, value) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: expected STAGE.KEY=VALUE"))?;
        let (stage, key) = lhs
            .split_once('.')
            .ok_or_else(|| format!("`{s}`: expected STAGE.KEY=VALUE"))?;
        if stage.is_empty() || key.is_empty() {
            return Err(format!("`{s}`: expected STAGE.KEY=VALUE"));
        }
        Ok(Override {
            stage: stage.into(),
            key: key.into(),
            value: value.into(),
        })
    }
}

impl std::fmt::Display for Override {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}={}", self.stage, self.key, self.value)
    }
}

const STAGE_RESERVED: &[&str] = &["kind", "inputs", "resources", "foreach"];

/// Reads, parses and validates a pipeline file.
pub fn load(
    file: &Path,
    registry: &Registry,
    overrides: &[Override],
) -> Result<Pipeline, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: file.into(),
        line: None,
        column: None,
        message: format!("cannot read the pipeline file: {e}"),
    })?;
    parse(file, &text, registry, overrides)
}

/// Parses and validates pipeline text; `file` is used for paths and messages.
pub fn parse(
    file: &Path,
    text: &str,
    registry: &Registry,
    overrides: &[Override],
) -> Result<Pipeline, ConfigError> {
    let err_at = |span: Option<std::ops::Range<usize>>, message: String| {
        let (line, column) = match span {
            Some(s) if s.start <= text.len() => {
                let (l, c) = line_col(text, s.start);
                (Some(l), Some(c))
            }
            _ => (None, None),
        };
        ConfigError {
            file: file.into(),
            line,
            column,
            message,
        }
    };
    let root = DeTable::parse(text).map_err(|e| err_at(e.span(), e.message().to_string()))?;
    let base_dir = absolute(file.parent().unwrap_or(Path::new("")));

    let mut store_url = "store".to_string();
    let mut remote = None;
    let mut executor = ExecutorConfig::default();
    let mut out = "out".to_string();
    let mut stage_tables: Vec<(String, Spanned<DeValue>, usize)> = Vec::new();
    for (key, value) in root.into_inner() {
        let key_span = key.span();
        match key.get_ref().as_ref() {
            "store" => {
                store_url = string_field(&value, "url", "store", &err_at)?.unwrap_or(store_url);
                only_keys(
                    &value,
                    &["url", "remote", "endpoint", "region", "remote_read_only"],
                    "store",
                    &err_at,
                )?;
                remote = remote_config(&value, &err_at)?;
            }
            "executor" => {
                use serde::Deserialize;
                executor = ExecutorConfig::deserialize(toml::de::ValueDeserializer::from(value))
                    .map_err(|e| err_at(e.span(), format!("executor: {}", e.message())))?;
            }
            "outputs" => {
                out = string_field(&value, "dir", "outputs", &err_at)?.unwrap_or(out);
                only_keys(&value, &["dir"], "outputs", &err_at)?;
            }
            "stages" => {
                let DeValue::Table(stages) = value.into_inner() else {
                    return Err(err_at(
                        Some(key_span),
                        "`stages` must be a table of `[stages.NAME]` tables".into(),
                    ));
                };
                for (name, table) in stages {
                    let line = line_col(text, name.span().start).0;
                    for (name, table) in foreach::expand(name.get_ref(), table)
                        .map_err(|(span, message)| err_at(Some(span), message))?
                    {
                        stage_tables.push((name, table, line));
                    }
                }
            }
            other => {
                return Err(err_at(
                    Some(key_span),
                    format!(
                        "unknown key `{other}`, expected one of `store`, `outputs`, `executor`, `stages`"
                    ),
                ));
            }
        }
    }
    stage_tables.sort_by_key(|(_, _, line)| *line);

    for o in overrides {
        if !stage_tables
            .iter()
            .any(|(n, _, _)| *n == o.stage || foreach::base_name(n) == o.stage)
        {
            return Err(ConfigError {
                file: file.into(),
                line: None,
                column: None,
                message: format!("--set {o}: there is no stage `{}`", o.stage),
            });
        }
    }

    let mut stages = Vec::new();
    for (name, table, line) in stage_tables {
        let span = table.span();
        let DeValue::Table(mut table) = table.into_inner() else {
            return Err(err_at(
                Some(span.clone()),
                format!("stage `{name}` must be a table"),
            ));
        };
        if !is_valid_name(foreach::base_name(&name)) {
            return Err(err_at(
                Some(span.clone()),
                format!(
                    "stage name `{name}` must be letters, digits, `_` or `-` (it names a folder)"
                ),
            ));
        }
        let kind = match take(&mut table, "kind") {
            Some(v) => match v.get_ref() {
                DeValue::String(s) => s.to_string(),
                _ => {
                    return Err(err_at(
                        Some(v.span()),
                        format!("stages.{name}.kind must be a string"),
                    ));
                }
            },
            None => {
                return Err(err_at(
                    Some(span.clone()),
                    format!(
                        "stage `{name}` has no `kind` (one of {})",
                        registry.kinds_list()
                    ),
                ));
            }
        };
        let stage_kind = registry.get(&kind).ok_or_else(|| {
            err_at(
                Some(span.clone()),
                format!(
                    "stages.{name}: unknown kind `{kind}`, expected one of {}",
                    registry.kinds_list()
                ),
            )
        })?;
        let inputs = match take(&mut table, "inputs") {
            None => Vec::new(),
            Some(v) => string_list(&v).ok_or_else(|| {
                err_at(
                    Some(v.span()),
                    format!("stages.{name}.inputs must be a list of stage names"),
                )
            })?,
        };
        let explicit = match take(&mut table, "resources") {
            None => Resources::default(),
            Some(v) => {
                use serde::Deserialize;
                Resources::deserialize(toml::de::ValueDeserializer::from(v)).map_err(|e| {
                    err_at(
                        e.span(),
                        format!("stages.{name}.resources: {}", e.message()),
                    )
                })?
            }
        };
        let file_table = table.clone();
        let key_spans: Vec<(String, std::ops::Range<usize>)> = table
            .iter()
            .map(|(k, v)| (k.get_ref().to_string(), k.span().start..v.span().end))
            .collect();
        let my_overrides: Vec<&Override> = overrides
            .iter()
            .filter(|o| o.stage == name || o.stage == foreach::base_name(&name))
            .collect();
        for o in &my_overrides {
            if STAGE_RESERVED.contains(&o.key.as_str()) {
                return Err(ConfigError {
                    file: file.into(),
                    line: None,
                    column: None,
                    message: format!("--set {o}: `{}` cannot be overridden", o.key),
                });
            }
            let value = match DeValue::parse(&o.value) {
                Ok(v) => v.into_inner(),
                // A bare word is a string: `--set ingest.duplicates=dups.csv`.
                Err(_) => DeValue::String(Cow::Borrowed(o.value.as_str())),
            };
            table.insert(
                Spanned::new(0..0, Cow::Borrowed(o.key.as_str())),
                Spanned::new(0..0, value),
            );
        }
        let params =
            match stage_kind.parse_params(Spanned::new(span.clone(), DeValue::Table(table))) {
                Ok(p) => p,
                Err(e) => {
                    let blame_overrides = !my_overrides.is_empty()
                        && stage_kind
                            .parse_params(Spanned::new(span.clone(), DeValue::Table(file_table)))
                            .is_ok();
                    if blame_overrides {
                        let list = my_overrides
                            .iter()
                            .map(|o| format!("--set {o}"))
                            .collect::<Vec<_>>()
                            .join(", ");
                        return Err(ConfigError {
                            file: file.into(),
                            line: None,
                            column: None,
                            message: format!("{list}: {}", e.message()),
                        });
                    }
                    let key = e
                        .span()
                        .and_then(|at| key_spans.iter().find(|(_, span)| span.contains(&at.start)))
                        .map(|(k, _)| format!(".{k}"))
                        .unwrap_or_default();
                    return Err(err_at(
                        e.span(),
                        format!("stages.{name}{key} (kind `{kind}`): {}", e.message()),
                    ));
                }
            };
        stage_kind
            .check(&params, &inputs)
            .map_err(|m| err_at(Some(span.clone()), format!("stages.{name}: {m}")))?;
        if explicit.array.is_some_and(|n| n > 1) && !stage_kind.splits() {
            return Err(err_at(
                Some(span.clone()),
                format!(
                    "stages.{name}.resources.array: kind `{kind}` cannot be split into parts (only map stages can)"
                ),
            ));
        }
        let resources = explicit.or(stage_kind.resources(&params));
        stages.push(StageDecl {
            name,
            kind,
            inputs,
            line,
            params,
            resources,
        });
    }

    let order = dag::topo_order(&stages).map_err(|e| {
        let line = stages.iter().find(|s| s.name == e.stage()).map(|s| s.line);
        ConfigError {
            file: file.into(),
            line,
            column: None,
            message: e.to_string(),
        }
    })?;
    let mut slots: Vec<Option<StageDecl>> = stages.into_iter().map(Some).collect();
    let stages = order
        .into_iter()
        .map(|i| slots[i].take().expect("each index once"))
        .collect();

    Ok(Pipeline {
        file: file.into(),
        lock_file: file.with_extension("lock"),
        out_dir: base_dir.join(out),
        base_dir,
        store_url,
        remote,
        executor,
        stages,
    })
}

fn remote_config(
    store: &Spanned<DeValue>,
    err_at: &ErrAt,
) -> Result<Option<RemoteConfig>, ConfigError> {
    let url = string_field(store, "remote", "store", err_at)?;
    let endpoint = string_field(store, "endpoint", "store", err_at)?;
    let region = string_field(store, "region", "store", err_at)?;
    let read_only = match field(store, "remote_read_only") {
        None => false,
        Some(v) => match v.get_ref() {
            DeValue::Boolean(b) => *b,
            other => {
                return Err(err_at(
                    Some(v.span()),
                    format!(
                        "store.remote_read_only: expected true or false, found {}",
                        other.type_str()
                    ),
                ));
            }
        },
    };
    match url {
        Some(url) => Ok(Some(RemoteConfig { url, endpoint, region, read_only })),
        None if endpoint.is_some() || region.is_some() => {
            Err(err_at(Some(store.span()), "store: `endpoint` and `region` configure a remote: set `remote = \"s3://bucket/prefix\"` too".into()))
        }
        None => Ok(None),
    }
}

fn field<'a, 'i>(v: &'a Spanned<DeValue<'i>>, key: &str) -> Option<&'a Spanned<DeValue<'i>>> {
    let DeValue::Table(t) = v.get_ref() else {
        return None;
    };
    t.iter()
        .find(|(k, _)| k.get_ref().as_ref() == key)
        .map(|(_, v)| v)
}

fn take<'i>(table: &mut DeTable<'i>, key: &str) -> Option<Spanned<DeValue<'i>>> {
    let k = table.keys().find(|k| k.get_ref().as_ref() == key)?.clone();
    table.remove(&k)
}

fn string_list(v: &Spanned<DeValue>) -> Option<Vec<String>> {
    match v.get_ref() {
        DeValue::Array(items) => items
            .iter()
            .map(|i| match i.get_ref() {
                DeValue::String(s) => Some(s.to_string()),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

type ErrAt<'a> = dyn Fn(Option<std::ops::Range<usize>>, String) -> ConfigError + 'a;

fn string_field(
    v: &Spanned<DeValue>,
    key: &str,
    table: &str,
    err_at: &ErrAt,
) -> Result<Option<String>, ConfigError> {
    if !matches!(v.get_ref(), DeValue::Table(_)) {
        return Err(err_at(Some(v.span()), format!("`{table}` must be a table")));
    }
    match field(v, key) {
        None => Ok(None),
        Some(val) => match val.get_ref() {
            DeValue::String(s) => Ok(Some(s.to_string())),
            other => Err(err_at(
                Some(val.span()),
                format!(
                    "{table}.{key}: expected a string, found {}",
                    other.type_str()
                ),
            )),
        },
    }
}

fn only_keys(
    v: &Spanned<DeValue>,
    allowed: &[&str],
    table: &str,
    err_at: &ErrAt,
) -> Result<(), ConfigError> {
    if let DeValue::Table(t) = v.get_ref() {
        for k in t.keys() {
            if !allowed.contains(&k.get_ref().as_ref()) {
                let expected = allowed
                    .iter()
                    .map(|a| format!("`{a}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(err_at(
                    Some(k.span()),
                    format!(
                        "{table}: unknown key `{}`, expected {expected}",
                        k.get_ref()
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

fn absolute(p: &Path) -> PathBuf {
    let p = if p.as_os_str().is_empty() {
        Path::new(".")
    } else {
        p
    };
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests;
