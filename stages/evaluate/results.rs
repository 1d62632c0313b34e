//! What `melanoflow exp show` and `diff` read out of a finished run: each
//! arm's mean test ROC-AUC over its seeds (from `metrics.json`), and, between
//! two runs, DeLong's paired test of each arm's seed-ensemble ROC-AUC on the
//! test images both scored (from `test_scores.parquet`).
//!
//! Promises: metrics are named `ARM auc` (`STAGE/ARM auc` when the pipeline
//! has several `evaluate` stages), in the arms' order; a stage that has not
//! run there gives no metrics rather than an error; an arm whose test images
//! or labels differ between the two runs (another split) is not paired.

use std::path::Path;

use melanoflow_pipeline::BoxError;
use melanoflow_pipeline::config::Pipeline;
use melanoflow_pipeline::experiments::{Metric, PairedTest, ResultReader};

use super::{MetricsFile, compare, scores};
use crate::metrics;

/// The application's [`ResultReader`].
pub struct EvaluateResults;

fn evaluate_stages(pipeline: &Pipeline) -> Vec<String> {
    pipeline
        .stages
        .iter()
        .filter(|s| s.kind == "evaluate")
        .map(|s| s.name.clone())
        .collect()
}

impl ResultReader for EvaluateResults {
    fn result_stages(&self, pipeline: &Pipeline) -> Vec<String> {
        evaluate_stages(pipeline)
    }

    fn metrics(&self, pipeline: &Pipeline, out_dir: &Path) -> Result<Vec<Metric>, BoxError> {
        let stages = evaluate_stages(pipeline);
        let mut out = Vec::new();
        for stage in &stages {
            let path = out_dir.join(stage).join("metrics.json");
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("{}: {e}", path.display()).into()),
            };
            let file: MetricsFile =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            for arm in &file.arms {
                let aucs: Vec<f64> = arm.seeds.iter().map(|s| s.auc).collect();
                out.push(Metric {
                    name: prefixed(&stages, stage, &format!("{} auc", arm.arm)),
                    value: metrics::mean_std(&aucs).0,
                });
            }
        }
        Ok(out)
    }

    fn paired(
        &self,
        pipeline: &Pipeline,
        out_a: &Path,
        out_b: &Path,
    ) -> Result<Vec<PairedTest>, BoxError> {
        let stages = evaluate_stages(pipeline);
        let mut out = Vec::new();
        for stage in &stages {
            let (pa, pb) = (
                out_a.join(stage).join(scores::FILE),
                out_b.join(stage).join(scores::FILE),
            );
            if !pa.is_file() || !pb.is_file() {
                continue;
            }
            let (arms_a, arms_b) = (scores::read(&pa)?, scores::read(&pb)?);
            for a in &arms_a {
                let Some(b) = arms_b.iter().find(|b| b.arm == a.arm) else {
                    continue;
                };
                // Another test split: nothing to pair.
                let Ok(d) = compare::delong_pooled(a, b) else {
                    continue;
                };
                out.push(PairedTest {
                    metric: prefixed(&stages, stage, &format!("{} auc (seed ensemble)", a.arm)),
                    a: d.auc_a,
                    b: d.auc_b,
                    difference: d.difference,
                    ci: (d.ci.low, d.ci.high),
                    p: d.p,
                    test: "DeLong".into(),
                    n: a.images.len(),
                });
            }
        }
        Ok(out)
    }
}

fn prefixed(stages: &[String], stage: &str, name: &str) -> String {
    if stages.len() > 1 {
        format!("{stage}/{name}")
    } else {
        name.to_string()
    }
}
