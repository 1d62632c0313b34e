//! `diff [A [B]]`: parameters, output digests and metrics between two states
//! of a pipeline: a git revision of its lock file (`HEAD`, `main~3`, a tag),
//! an experiment (`exp:NAME`) or the workspace (`workspace`, the default B;
//! A defaults to `HEAD`).
//!
//! Promises: a git revision's results are read from the store (its result
//! stages' outputs restored into a temporary folder), never from the
//! workspace; a metric that both sides measured on the same test items
//! carries the application's paired test (DeLong for ROC-AUC), so the table
//! says whether a difference is evidence; nothing is written anywhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::table::flat_params;
use super::{Metric, PairedTest};
use crate::error::{Error, Result};
use crate::lockfile::LockFile;
use crate::registry::Registry;
use crate::runner::Engine;

/// One side of a diff, as the user named it.
#[derive(Clone, Debug, PartialEq)]
pub enum Side {
    Workspace,
    Revision(String),
    Experiment(String),
}

impl Side {
    pub fn parse(s: &str) -> Side {
        match s {
            "workspace" => Side::Workspace,
            _ => match s.strip_prefix("exp:") {
                Some(name) => Side::Experiment(name.to_string()),
                None => Side::Revision(s.to_string()),
            },
        }
    }

    pub fn label(&self) -> String {
        match self {
            Side::Workspace => "workspace".into(),
            Side::Revision(r) => r.clone(),
            Side::Experiment(n) => format!("exp:{n}"),
        }
    }
}

/// A side, loaded: its lock file and the folder its results are under.
struct Loaded {
    lock: LockFile,
    out_dir: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct ParamChange {
    pub param: String,
    pub a: Option<String>,
    pub b: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct OutputChange {
    pub stage: String,
    pub a: Option<String>,
    pub b: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct MetricChange {
    pub metric: String,
    pub a: Option<f64>,
    pub b: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paired: Option<PairedTest>,
}

#[derive(Debug, Serialize)]
pub struct Diff {
    pub a: String,
    pub b: String,
    pub params: Vec<ParamChange>,
    pub outputs: Vec<OutputChange>,
    pub metrics: Vec<MetricChange>,
}

/// Compares two sides of the pipeline `engine` has open (the workspace).
pub fn diff(engine: &Engine, registry: &Registry, a: &Side, b: &Side) -> Result<Diff> {
    let scratch = tempfile_dir(engine)?;
    let la = load_side(engine, registry, a, &scratch.join("a"))?;
    let lb = load_side(engine, registry, b, &scratch.join("b"))?;
    let result = compare(engine, registry, a, b, &la, &lb);
    let _ = crate::fsutil::remove_dir_if_exists(&scratch);
    result
}

fn compare(
    engine: &Engine,
    registry: &Registry,
    a: &Side,
    b: &Side,
    la: &Loaded,
    lb: &Loaded,
) -> Result<Diff> {
    let (pa, pb) = (flat_params(&la.lock), flat_params(&lb.lock));
    let mut keys: Vec<&String> = pa.keys().chain(pb.keys()).collect();
    keys.sort();
    keys.dedup();
    let params = keys
        .into_iter()
        .filter(|k| pa.get(*k) != pb.get(*k))
        .map(|k| ParamChange {
            param: k.clone(),
            a: pa.get(k).cloned(),
            b: pb.get(k).cloned(),
        })
        .collect();
    let mut stages: Vec<&String> = la.lock.stages.keys().chain(lb.lock.stages.keys()).collect();
    stages.sort();
    stages.dedup();
    let output = |l: &Loaded, s: &str| l.lock.stages.get(s).map(|e| e.output.to_hex());
    let outputs = stages
        .into_iter()
        .filter(|s| output(la, s) != output(lb, s))
        .map(|s| OutputChange {
            stage: s.clone(),
            a: output(la, s),
            b: output(lb, s),
        })
        .collect();
    let mut metrics = Vec::new();
    if let Some(reader) = registry.results() {
        let read = |l: &Loaded| -> Result<Vec<Metric>> {
            match &l.out_dir {
                Some(dir) => reader
                    .metrics(&engine.pipeline, dir)
                    .map_err(|e| Error::Experiment(format!("reading metrics: {e}"))),
                None => Ok(Vec::new()),
            }
        };
        let (ma, mb) = (read(la)?, read(lb)?);
        let value = |ms: &[Metric], n: &str| ms.iter().find(|m| m.name == n).map(|m| m.value);
        let mut names: Vec<String> = Vec::new();
        for m in ma.iter().chain(&mb) {
            if !names.contains(&m.name) {
                names.push(m.name.clone());
            }
        }
        for n in names {
            metrics.push(MetricChange {
                a: value(&ma, &n),
                b: value(&mb, &n),
                metric: n,
                paired: None,
            });
        }
        if let (Some(da), Some(db)) = (&la.out_dir, &lb.out_dir) {
            let paired = reader
                .paired(&engine.pipeline, da, db)
                .map_err(|e| Error::Experiment(format!("paired tests: {e}")))?;
            for t in paired {
                metrics.push(MetricChange {
                    metric: t.metric.clone(),
                    a: Some(t.a),
                    b: Some(t.b),
                    paired: Some(t),
                });
            }
        }
    }
    Ok(Diff {
        a: a.label(),
        b: b.label(),
        params,
        outputs,
        metrics,
    })
}

fn tempfile_dir(engine: &Engine) -> Result<PathBuf> {
    let dir = engine
        .pipeline
        .state_dir()
        .join("tmp")
        .join(format!("diff-{}", std::process::id()));
    crate::fsutil::remove_dir_if_exists(&dir).map_err(|e| Error::io(&dir, e))?;
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

fn load_side(engine: &Engine, registry: &Registry, side: &Side, scratch: &Path) -> Result<Loaded> {
    let pipeline = &engine.pipeline;
    match side {
        Side::Workspace => Ok(Loaded {
            lock: LockFile::load(&pipeline.lock_path())?,
            out_dir: Some(pipeline.out_dir.clone()),
        }),
        Side::Experiment(name) => {
            let record = super::load_shared(pipeline, engine.artifacts(), name)?;
            let dir = super::experiment_dir(pipeline, name).join("out");
            let out_dir = if dir.is_dir() {
                Some(dir)
            } else {
                restore_results(engine, registry, &record.lock, scratch)?
            };
            Ok(Loaded {
                lock: record.lock,
                out_dir,
            })
        }
        Side::Revision(rev) => {
            let lock = lock_at_revision(pipeline, rev)?;
            let out_dir = restore_results(engine, registry, &lock, scratch)?;
            Ok(Loaded { lock, out_dir })
        }
    }
}

/// The lock file as committed at `rev` (an empty lock where it did not
/// exist yet).
fn lock_at_revision(pipeline: &crate::config::Pipeline, rev: &str) -> Result<LockFile> {
    let lock = pipeline.lock_path();
    let name = lock
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(&pipeline.base_dir)
        .args(["show", &format!("{rev}:./{name}")])
        .output()
        .map_err(|e| Error::io("git", e))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("exists on disk, but not in") || stderr.contains("does not exist in") {
            return Ok(LockFile::default());
        }
        return Err(Error::Experiment(format!(
            "`{rev}` is neither `workspace`, `exp:NAME` nor a git revision holding {}: {}",
            lock.display(),
            stderr.trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    toml::from_str(&text).map_err(|e| {
        Error::Experiment(format!("{} at {rev}: not a lock file: {e}", lock.display()))
    })
}

/// Restores the result stages' outputs of `lock` into `dir`; `None` when
/// the lock file has none of them or the store no longer holds them.
fn restore_results(
    engine: &Engine,
    registry: &Registry,
    lock: &LockFile,
    dir: &Path,
) -> Result<Option<PathBuf>> {
    let Some(reader) = registry.results() else {
        return Ok(None);
    };
    let mut any = false;
    for stage in reader.result_stages(&engine.pipeline) {
        let Some(entry) = lock.stages.get(&stage) else {
            continue;
        };
        let Some(manifest) = engine.artifacts().get_manifest(&entry.output)? else {
            tracing::warn!(
                "stage `{stage}`'s output {} is not in the store: its metrics are left out",
                entry.output.short()
            );
            continue;
        };
        engine
            .artifacts()
            .materialize(&manifest, &dir.join(&stage))?;
        any = true;
    }
    Ok(any.then(|| dir.to_path_buf()))
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "-".into())
}

fn num(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())
}

fn p_value(p: f64) -> String {
    if p < 0.001 {
        "< 0.001".into()
    } else {
        format!("{p:.3}")
    }
}

impl Diff {
    fn metric_cells(m: &MetricChange) -> [String; 6] {
        let delta = match (m.a, m.b) {
            (Some(a), Some(b)) => format!("{:+.4}", b - a),
            _ => "-".into(),
        };
        let (ci, p) = match &m.paired {
            // The test's difference is A - B; the table's is B - A.
            Some(t) => (
                // `0.0 - x`, not `-x`: no "-0.0000" for a zero bound.
                format!("[{:+.4}, {:+.4}]", 0.0 - t.ci.1, 0.0 - t.ci.0),
                format!("{} ({})", p_value(t.p), t.test),
            ),
            None => ("".into(), "".into()),
        };
        [m.metric.clone(), num(m.a), num(m.b), delta, ci, p]
    }

    /// For people: three short sections, empty ones said so.
    pub fn terminal(&self) -> String {
        let mut out = format!("A = {}, B = {}\n\nParameters\n", self.a, self.b);
        if self.params.is_empty() {
            out.push_str("  (none differ)\n");
        }
        for p in &self.params {
            out.push_str(&format!("  {}: {} -> {}\n", p.param, opt(&p.a), opt(&p.b)));
        }
        out.push_str("\nOutputs\n");
        if self.outputs.is_empty() {
            out.push_str("  (all the same)\n");
        }
        for o in &self.outputs {
            let short = |d: &Option<String>| d.as_ref().map(|h| h[..12].to_string());
            out.push_str(&format!(
                "  {}: {} -> {}\n",
                o.stage,
                opt(&short(&o.a)),
                opt(&short(&o.b))
            ));
        }
        if !self.metrics.is_empty() {
            out.push_str("\nMetrics (difference B - A; the interval and p from a paired test on the same test images)\n");
            let rows: Vec<[String; 6]> = self.metrics.iter().map(Self::metric_cells).collect();
            let header = ["metric", "A", "B", "B - A", "95% CI", "p"].map(String::from);
            let widths: Vec<usize> = (0..6)
                .map(|j| {
                    rows.iter()
                        .chain([&header])
                        .map(|r| r[j].len())
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            for r in std::iter::once(&header).chain(&rows) {
                let cells: Vec<String> = r
                    .iter()
                    .zip(&widths)
                    .enumerate()
                    .map(|(j, (c, w))| {
                        if j == 0 {
                            format!("{c:<w$}")
                        } else {
                            format!("{c:>w$}")
                        }
                    })
                    .collect();
                out.push_str(&format!("  {}\n", cells.join("  ").trim_end()));
            }
        }
        out
    }

    /// For a CI comment.
    pub fn markdown(&self) -> String {
        let mut out = format!("### melanoflow diff: `{}` → `{}`\n\n", self.a, self.b);
        if self.params.is_empty() {
            out.push_str("No parameter differs.\n\n");
        } else {
            out.push_str("| Parameter | A | B |\n|---|---|---|\n");
            for p in &self.params {
                out.push_str(&format!(
                    "| `{}` | {} | {} |\n",
                    p.param,
                    opt(&p.a),
                    opt(&p.b)
                ));
            }
            out.push('\n');
        }
        let stages: Vec<String> = self
            .outputs
            .iter()
            .map(|o| format!("`{}`", o.stage))
            .collect();
        out.push_str(&match stages.is_empty() {
            true => "Every output is the same.\n\n".to_string(),
            false => format!("Outputs that differ: {}.\n\n", stages.join(", ")),
        });
        if !self.metrics.is_empty() {
            out.push_str(
                "| Metric | A | B | B − A | 95% CI | p |\n|---|---:|---:|---:|---:|---:|\n",
            );
            for m in &self.metrics {
                out.push_str(&format!("| {} |\n", Self::metric_cells(m).join(" | ")));
            }
        }
        out
    }

    /// Every value, for programs: parameters and outputs by name.
    pub fn json(&self) -> serde_json::Value {
        let by_name: BTreeMap<&str, &ParamChange> =
            self.params.iter().map(|p| (p.param.as_str(), p)).collect();
        serde_json::json!({
            "a": self.a,
            "b": self.b,
            "params": by_name,
            "outputs": self.outputs,
            "metrics": self.metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_parse() {
        assert_eq!(Side::parse("HEAD"), Side::Revision("HEAD".into()));
        assert_eq!(Side::parse("exp:lr-1"), Side::Experiment("lr-1".into()));
        assert_eq!(Side::parse("workspace"), Side::Workspace);
        assert_eq!(Side::parse("exp:lr-1").label(), "exp:lr-1");
    }

    #[test]
    fn the_table_shows_b_minus_a_and_the_paired_interval_the_same_way() {
        let d = Diff {
            a: "HEAD".into(),
            b: "workspace".into(),
            params: vec![ParamChange {
                param: "arm.lr".into(),
                a: Some("0.001".into()),
                b: Some("0.01".into()),
            }],
            outputs: vec![],
            metrics: vec![MetricChange {
                metric: "arm auc (ensemble)".into(),
                a: Some(0.8),
                b: Some(0.85),
                paired: Some(PairedTest {
                    metric: "arm auc (ensemble)".into(),
                    a: 0.8,
                    b: 0.85,
                    difference: -0.05,
                    ci: (-0.08, -0.02),
                    p: 0.0004,
                    test: "DeLong".into(),
                    n: 100,
                }),
            }],
        };
        let t = d.terminal();
        assert!(t.contains("arm.lr: 0.001 -> 0.01"), "{t}");
        assert!(t.contains("+0.0500"), "{t}");
        assert!(t.contains("[+0.0200, +0.0800]"), "{t}");
        assert!(t.contains("< 0.001 (DeLong)"), "{t}");
        assert!(t.contains("(all the same)"), "{t}");
        let md = d.markdown();
        assert!(md.contains("| `arm.lr` | 0.001 | 0.01 |"), "{md}");
        assert_eq!(d.json()["params"]["arm.lr"]["b"], "0.01");
    }
}
