//! `melanoflow report EXP...`: one self-contained HTML page comparing
//! experiments (and `workspace`): their overrides and metrics side by side,
//! DeLong's paired test of every arm against the first one named, and per
//! arm the ROC curves of every experiment overlaid.
//!
//! Promises: reads only what the experiments recorded and their output
//! folders (nothing runs); the page goes to `-o FILE`, else
//! `.melanoflow/experiments/STEM/report.html`, written atomically; an
//! experiment whose folder no longer holds `test_scores.parquet` is still in
//! the tables, and left out of the figures and tests, which say so.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use base64::Engine as _;
use melanoflow_pipeline::BoxError;
use melanoflow_pipeline::cli::AppInvocation;
use melanoflow_pipeline::experiments::{self, ResultReader, table};

use crate::evaluate::compare::ArmScores;
use crate::evaluate::plot::{self, RocSeries};
use crate::evaluate::report::{STYLE, escape_html};
use crate::evaluate::results::EvaluateResults;
use crate::evaluate::scores;
use crate::metrics::roc_curve;

/// One experiment (or the workspace) in the report.
struct Entry {
    name: String,
    overrides: Vec<String>,
    out_dir: PathBuf,
}

pub fn report_command(inv: &AppInvocation) -> Result<std::process::ExitCode, BoxError> {
    let mut names = Vec::new();
    let mut output: Option<PathBuf> = None;
    let mut args = inv.args[1..].iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "-o" | "--output" => {
                output = Some(args.next().context("-o needs a file")?.into());
            }
            "-h" | "--help" => {
                println!(
                    "usage: melanoflow report EXP... [-o FILE]\n\n\
                     One HTML page comparing experiments (`workspace` is the workspace): \
                     metrics side by side, paired tests against the first, ROC curves overlaid."
                );
                return Ok(std::process::ExitCode::SUCCESS);
            }
            _ => names.push(a.clone()),
        }
    }
    if names.is_empty() {
        return Err(
            "report: name at least one experiment (`melanoflow exp show` lists them)".into(),
        );
    }
    let pipeline = inv.pipeline()?;
    let dest =
        output.unwrap_or_else(|| experiments::experiments_dir(&pipeline).join("report.html"));
    let html = render(&pipeline, &names)?;
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    melanoflow_pipeline::fsutil::write_atomic(&dest, html.as_bytes())
        .with_context(|| format!("writing {}", dest.display()))?;
    println!("report: {}", dest.display());
    Ok(std::process::ExitCode::SUCCESS)
}

fn render(pipeline: &melanoflow_pipeline::config::Pipeline, names: &[String]) -> Result<String> {
    let mut entries = Vec::new();
    let mut records = Vec::new();
    let mut workspace_lock = None;
    for name in names {
        if name == "workspace" {
            let lock = melanoflow_pipeline::lockfile::LockFile::load(&pipeline.lock_path())?;
            workspace_lock = Some(lock);
            entries.push(Entry {
                name: name.clone(),
                overrides: Vec::new(),
                out_dir: pipeline.out_dir.clone(),
            });
        } else {
            let record = experiments::load(pipeline, name)?;
            entries.push(Entry {
                name: name.clone(),
                overrides: record.overrides.clone(),
                out_dir: experiments::experiment_dir(pipeline, name).join("out"),
            });
            records.push((record, true));
        }
    }
    let reader = EvaluateResults;
    let workspace_metrics = match &workspace_lock {
        Some(_) => reader
            .metrics(pipeline, &pipeline.out_dir)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        None => Vec::new(),
    };
    let t = table::build(
        workspace_lock
            .as_ref()
            .map(|l| (l, workspace_metrics.as_slice())),
        &records,
        None,
    );
    let title = format!("Experiments of {}", pipeline.file.display());
    let mut out = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>{0}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n<h1>{0}</h1>\n",
        escape_html(&title)
    );
    // The table in the order the experiments were named.
    out.push_str("<h2>Parameters and metrics</h2>\n<table>\n<thead><tr><th>Experiment</th><th>Overrides</th>");
    for h in t.params.iter().chain(&t.metrics) {
        let _ = write!(out, "<th class=\"num\">{}</th>", escape_html(h));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for e in &entries {
        let Some(row) = t.rows.iter().find(|r| r.name == e.name) else {
            continue;
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td>",
            escape_html(&e.name),
            escape_html(&e.overrides.join(" "))
        );
        for p in &t.params {
            let _ = write!(
                out,
                "<td class=\"num\">{}</td>",
                escape_html(&row.params[p])
            );
        }
        for m in &t.metrics {
            let cell = row
                .metrics
                .get(m)
                .map(|v| format!("{v:.3}"))
                .unwrap_or("-".into());
            let _ = write!(out, "<td class=\"num\">{cell}</td>");
        }
        out.push_str("</tr>\n");
    }
    out.push_str(
        "</tbody>\n</table>\n<p>Metrics: each arm's test ROC-AUC, mean over its seeds.</p>\n",
    );

    // Paired tests against the first experiment.
    let first = &entries[0];
    let mut rows = String::new();
    for e in &entries[1..] {
        let tests = reader
            .paired(pipeline, &first.out_dir, &e.out_dir)
            .map_err(|err| anyhow::anyhow!("{err}"))?;
        for t in tests {
            let _ = writeln!(
                rows,
                "<tr><td>{}</td><td>{}</td><td class=\"num\">{:.3}</td><td class=\"num\">{:.3}</td>\
                 <td class=\"num\">{:+.3} [{:+.3}, {:+.3}]</td><td class=\"num\">{}</td></tr>",
                escape_html(&e.name),
                escape_html(&t.metric),
                t.a,
                t.b,
                0.0 - t.difference,
                0.0 - t.ci.1,
                0.0 - t.ci.0,
                if t.p < 0.001 {
                    "&lt; 0.001".to_string()
                } else {
                    format!("{:.3}", t.p)
                }
            );
        }
    }
    if entries.len() > 1 {
        let _ = writeln!(
            out,
            "<h2>Paired tests against <code>{}</code></h2>\n",
            escape_html(&first.name)
        );
        if rows.is_empty() {
            out.push_str("<p>No arm was scored on the same test images in both.</p>\n");
        } else {
            let _ = writeln!(
                out,
                "<table>\n<thead><tr><th>Experiment</th><th>Metric</th><th class=\"num\">{}</th>\
                 <th class=\"num\">This one</th><th class=\"num\">Difference [95% CI]</th>\
                 <th class=\"num\">p (DeLong)</th></tr></thead>\n<tbody>\n{rows}</tbody>\n</table>",
                escape_html(&first.name)
            );
        }
    }

    // ROC curves: per arm, one curve per experiment.
    let mut scored: Vec<(&Entry, Vec<ArmScores>)> = Vec::new();
    let mut missing = Vec::new();
    for e in &entries {
        let stage = reader.result_stages(pipeline);
        let Some(path) = stage
            .iter()
            .map(|s| e.out_dir.join(s).join(scores::FILE))
            .find(|p| p.is_file())
        else {
            missing.push(e.name.clone());
            continue;
        };
        scored.push((e, scores::read(&path)?));
    }
    let mut arms: Vec<String> = Vec::new();
    for (_, a) in &scored {
        for s in a {
            if !arms.contains(&s.arm) {
                arms.push(s.arm.clone());
            }
        }
    }
    if !arms.is_empty() {
        out.push_str("<h2>ROC curves (seed ensembles)</h2>\n");
    }
    for arm in &arms {
        let mut series = Vec::new();
        for (k, (e, a)) in scored.iter().enumerate() {
            let Some(s) = a.iter().find(|s| &s.arm == arm) else {
                continue;
            };
            let labels: Vec<bool> = s.images.iter().map(|(_, t)| *t).collect();
            let points = roc_curve(&s.pooled(), &labels)?;
            let auc = crate::metrics::roc_auc(&s.pooled(), &labels)?;
            series.push(RocSeries {
                label: format!("{} (AUC {auc:.3})", e.name),
                points,
                color_index: k,
            });
        }
        let png = plot::roc_png_bytes(&series)?;
        let caption = escape_html(&format!("arm `{arm}`"));
        let _ = writeln!(
            out,
            "<figure><img src=\"data:image/png;base64,{}\" alt=\"{caption}\"><figcaption>{caption}</figcaption></figure>",
            base64::engine::general_purpose::STANDARD.encode(png)
        );
    }
    if !missing.is_empty() {
        let _ = writeln!(
            out,
            "<p>No test scores in the output folders of: {} (run them again, or `exp apply` one).</p>",
            escape_html(&missing.join(", "))
        );
    }
    out.push_str("</main>\n</body>\n</html>\n");
    Ok(out)
}
