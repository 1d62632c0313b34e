//! The comparison `evaluate` reports: per-arm summary tables and the paired
//! comparisons of the arms (GitHub Markdown and aligned plain text), and a
//! whole report as Markdown or as one self-contained HTML page (inline CSS,
//! figures embedded as base64 `data:` URIs), naming the paper it reproduces
//! and how to reproduce it.
//!
//! Promises:
//! - Every metric is printed with 3 decimals; p-values below 0.001 print as
//!   "< 0.001" and AUC differences carry their sign. The "Seeds" column
//!   counts an arm's seeds (the seed numbers are in the per-seed table). An
//!   arm with one seed shows its test ROC-AUC with the bootstrap interval,
//!   `0.812 [0.741, 0.874]`; an arm with several shows mean ± sample std
//!   over seeds, `0.812 ± 0.013` (the per-seed values and intervals are in
//!   the report's per-seed table).
//!   The interval is labelled "95% CI": compute it at level 0.95.
//! - The paper's reported numbers are printed verbatim, as given, in their
//!   own table: they are not recomputed or compared numerically.
//! - All caller text is escaped for its target: `|` in Markdown table cells,
//!   `& < > " '` everywhere in HTML. Markdown titles, captions and notes are
//!   passed through, so they may carry Markdown.
//! - Non-finite numbers print as "n/a".
//! - Nothing here reads a clock or the environment: the report's bytes are
//!   a function of its arguments.

use std::fmt::Write as _;

use base64::Engine as _;

use serde::{Deserialize, Serialize};

use super::compare::Comparison;
use crate::metrics::{Interval, mean_std};

/// One augmentation arm's results over its seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArmSummary {
    pub arm: String,
    pub description: String,
    pub seeds: Vec<SeedMetrics>,
}

/// Test-split metrics of one trained classifier (one arm, one seed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeedMetrics {
    pub seed: u64,
    pub auc: f64,
    #[serde(with = "IntervalDef")]
    pub auc_ci: Interval,
    pub average_precision: f64,
    pub sensitivity_at_90_specificity: f64,
    pub n_test: usize,
    pub n_test_malignant: usize,
    pub best_epoch: usize,
    pub val_auc: f64,
}

/// Serde's view of `metrics::Interval`, which stays free of serde.
#[derive(Serialize, Deserialize)]
#[serde(remote = "Interval")]
pub(super) struct IntervalDef {
    low: f64,
    high: f64,
}

/// Where a report comes from: enough to find the run that made it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The `evaluate` stage's name in the pipeline.
    pub stage: String,
    /// Its fingerprint (hex), as the lock file records it.
    pub fingerprint: String,
    /// melanoflow's version.
    pub melanoflow: String,
}

/// Everything a whole report shows, except its figures.
pub struct Report<'a> {
    pub title: &'a str,
    pub arms: &'a [ArmSummary],
    pub comparisons: &'a [Comparison],
    /// The paper's table: (label, reported ROC-AUC as printed); may be empty.
    pub paper: &'a [(&'a str, &'a str)],
    /// How the paper is cited (Markdown: emphasis allowed).
    pub paper_citation: &'a str,
    pub notes: &'a [String],
    pub provenance: &'a Provenance,
}

/// The per-arm summary as plain text with aligned columns, for a terminal.
pub fn table_terminal(arms: &[ArmSummary]) -> String {
    terminal_table(&summary_table(arms))
}

/// The paired comparisons as plain text with aligned columns, followed by
/// what they mean; empty when there are none.
pub fn comparisons_terminal(comparisons: &[Comparison]) -> String {
    if comparisons.is_empty() {
        return String::new();
    }
    format!(
        "{}\n{}\n",
        terminal_table(&comparison_table(comparisons)),
        comparisons_explained(comparisons)
    )
}

fn terminal_table(table: &Table) -> String {
    let widths: Vec<usize> = (0..table.header.len())
        .map(|c| {
            table
                .rows
                .iter()
                .map(|r| r[c].chars().count())
                .chain([table.header[c].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .zip(&table.numeric)
            .map(|((cell, &width), &numeric)| {
                if numeric {
                    format!("{cell:>width$}")
                } else {
                    format!("{cell:<width$}")
                }
            })
            .collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let header: Vec<String> = table.header.iter().map(|h| h.to_string()).collect();
    let rule: Vec<String> = widths.iter().map(|&w| "─".repeat(w)).collect();
    let mut out = line(&header) + &line(&rule);
    for row in &table.rows {
        out += &line(row);
    }
    out
}

/// What the comparison table's numbers are and what p < 0.05 means.
fn comparisons_explained(comparisons: &[Comparison]) -> String {
    let c = &comparisons[0];
    let pooled = if comparisons.iter().all(|c| c.seeds_a == 1 && c.seeds_b == 1) {
        "each arm's test scores".to_string()
    } else {
        "each arm's seed-ensemble scores (per test image, the mean score of the arm's seeds)".into()
    };
    format!(
        "ΔAUC = AUC(A) - AUC(B), from {pooled}, on the same {} test images ({} malignant). \
         The interval and the first p-value are DeLong's test for two correlated ROC curves; \
         the bootstrap draws the malignant and the benign test images separately, {} times, \
         the same images for both arms. p < 0.05 means that if the two arms had equal ROC-AUC \
         on images like these, a difference at least this large would arise by chance less than \
         5% of the time; it says nothing about how large the difference is (read the interval). \
         The DeLong and bootstrap p-values are not corrected for multiple comparisons; \
         p (Holm) is DeLong's, adjusted by Holm's method over the {} comparison(s).",
        c.n_pos + c.n_neg,
        c.n_pos,
        c.bootstrap.resamples,
        comparisons.len()
    )
}

/// A whole report in Markdown: the summary and paper tables, what each arm
/// is, per-seed results, the paired comparisons, the figures (`images` =
/// (caption, path relative to the report)), the notes, and how to
/// reproduce it.
pub fn report_markdown(r: &Report, images: &[(&str, &str)]) -> String {
    let mut out = format!(
        "# {}\n\n## Test-set results\n\n{}",
        r.title,
        markdown_table(&summary_table(r.arms))
    );
    if !r.paper.is_empty() {
        let _ = write!(
            out,
            "\nReported in {}:\n\n{}",
            r.paper_citation,
            markdown_table(&paper_table(r.paper))
        );
    }
    out.push_str("\n### Arms\n\n");
    for arm in r.arms {
        let _ = writeln!(out, "- **{}**: {}", arm.arm, arm.description);
    }
    let _ = write!(
        out,
        "\n### Per-seed results\n\n{}",
        markdown_table(&seed_table(r.arms))
    );
    if !r.comparisons.is_empty() {
        let _ = write!(
            out,
            "\n## Paired comparisons\n\n{}\n{}\n",
            markdown_table(&comparison_table(r.comparisons)),
            comparisons_explained(r.comparisons)
        );
        let per_seed = per_seed_comparison_table(r.comparisons);
        if !per_seed.rows.is_empty() {
            let _ = write!(
                out,
                "\n### Per-seed comparisons (DeLong, seeds both arms trained)\n\n{}",
                markdown_table(&per_seed)
            );
        }
    }
    if !images.is_empty() {
        out.push_str("\n## Figures\n\n");
        for (caption, path) in images {
            let _ = write!(out, "![{caption}]({path})\n\n*{caption}*\n\n");
        }
    }
    if !r.notes.is_empty() {
        out.push_str(if images.is_empty() {
            "\n## Notes\n\n"
        } else {
            "## Notes\n\n"
        });
        for note in r.notes {
            let _ = writeln!(out, "- {note}");
        }
    }
    let _ = write!(
        out,
        "\n## Reproducing this report\n\n{}\n",
        reproduce_text(r, |code| format!("`{code}`"))
    );
    out
}

/// How to reproduce the report; `code` formats a command or digest.
fn reproduce_text(r: &Report, code: impl Fn(&str) -> String) -> String {
    let p = r.provenance;
    format!(
        "Written by stage {} with fingerprint {} (melanoflow {}). \
         The fingerprint covers the stage's code, its parameters and the digest of every input: \
         a run of the stage with this fingerprint writes these same bytes (the README says where \
         bitwise reproducibility holds). To reproduce: {} with the same pipeline file, \
         then {} re-executes the stage and compares its output with the lock file; \
         {} prints the table with the git revision and the lock file's digest.",
        code(&p.stage),
        code(&p.fingerprint),
        p.melanoflow,
        code("melanoflow run"),
        code(&format!("melanoflow verify --rerun {}", p.stage)),
        code("melanoflow metrics")
    )
}

/// The same report as one self-contained HTML page: inline CSS, figures
/// (`images` = (caption, PNG bytes)) embedded as base64 `data:` URIs, every
/// piece of caller text HTML-escaped (the paper citation's Markdown
/// emphasis becomes `<em>`).
pub fn report_html(r: &Report, images: &[(&str, &[u8])]) -> String {
    let mut out = String::new();
    let title = escape_html(r.title);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n<h1>{title}</h1>\n"
    );
    out.push_str("<h2>Test-set results</h2>\n<div class=\"tables\">\n");
    out.push_str(&html_table(&summary_table(r.arms), None));
    if !r.paper.is_empty() {
        out.push_str(&html_table(
            &paper_table(r.paper),
            Some("Reported in the paper"),
        ));
    }
    out.push_str("</div>\n");
    if !r.paper.is_empty() {
        let _ = writeln!(
            out,
            "<p>Reported in {}.</p>",
            emphasis_html(&escape_html(r.paper_citation))
        );
    }
    out.push_str("<h3>Arms</h3>\n<dl>\n");
    for arm in r.arms {
        let _ = writeln!(
            out,
            "<dt>{}</dt><dd>{}</dd>",
            escape_html(&arm.arm),
            escape_html(&arm.description)
        );
    }
    out.push_str("</dl>\n<h3>Per-seed results</h3>\n");
    out.push_str(&html_table(&seed_table(r.arms), None));
    if !r.comparisons.is_empty() {
        out.push_str("<h2>Paired comparisons</h2>\n");
        out.push_str(&html_table(&comparison_table(r.comparisons), None));
        let _ = writeln!(
            out,
            "<p>{}</p>",
            escape_html(&comparisons_explained(r.comparisons))
        );
        let per_seed = per_seed_comparison_table(r.comparisons);
        if !per_seed.rows.is_empty() {
            out.push_str("<h3>Per-seed comparisons (DeLong, seeds both arms trained)</h3>\n");
            out.push_str(&html_table(&per_seed, None));
        }
    }
    if !images.is_empty() {
        out.push_str("<h2>Figures</h2>\n");
        for (caption, png) in images {
            let caption = escape_html(caption);
            let _ = writeln!(
                out,
                "<figure><img src=\"data:image/png;base64,{}\" alt=\"{caption}\"><figcaption>{caption}</figcaption></figure>",
                base64::engine::general_purpose::STANDARD.encode(png)
            );
        }
    }
    if !r.notes.is_empty() {
        out.push_str("<h2>Notes</h2>\n<ul>\n");
        for note in r.notes {
            let _ = writeln!(out, "<li>{}</li>", escape_html(note));
        }
        out.push_str("</ul>\n");
    }
    let _ = writeln!(
        out,
        "<h2>Reproducing this report</h2>\n<p>{}</p>",
        reproduce_text(r, |code| format!("<code>{}</code>", escape_html(code)))
    );
    out.push_str("</main>\n</body>\n</html>\n");
    out
}

/// Markdown `*text*` spans of already-escaped text as `<em>`.
fn emphasis_html(escaped: &str) -> String {
    let mut out = String::new();
    for (i, part) in escaped.split('*').enumerate() {
        // Odd parts sit between a pair of stars; an unpaired last star stays.
        if i % 2 == 1 && escaped.matches('*').count() > i {
            let _ = write!(out, "<em>{part}</em>");
        } else {
            if i % 2 == 1 {
                out.push('*');
            }
            out.push_str(part);
        }
    }
    out
}

pub(crate) const STYLE: &str = "\
body{margin:0;background:#fafafa;color:#1a1a1a;\
font:16px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif}\
main{max-width:1000px;margin:0 auto;padding:2rem 1.5rem 4rem;background:#fff}\
h1{font-size:1.8rem;margin:0 0 1.5rem}h2{font-size:1.35rem;margin:2.2rem 0 .8rem;\
border-bottom:1px solid #e4e4e4;padding-bottom:.3rem}h3{font-size:1.1rem;margin:1.6rem 0 .6rem}\
.tables{display:flex;flex-wrap:wrap;gap:1.5rem;align-items:flex-start}\
table{border-collapse:collapse;font-size:.92rem;margin:.3rem 0}\
caption{text-align:left;font-weight:600;padding-bottom:.3rem}\
th,td{padding:.35rem .7rem;border-bottom:1px solid #e4e4e4;text-align:left;vertical-align:top}\
th{border-bottom:2px solid #555;font-weight:600}\
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}\
tbody tr:nth-child(even){background:#f6f8fa}\
dt{font-weight:600}dd{margin:0 0 .6rem 1.2rem}\
figure{margin:1.2rem 0;text-align:center}\
figure img{max-width:100%;height:auto;border:1px solid #e4e4e4}\
figcaption{font-size:.9rem;color:#555;margin-top:.4rem}\
li{margin:.25rem 0}";

/// A table before formatting; `numeric` columns are right-aligned.
struct Table {
    header: Vec<&'static str>,
    numeric: Vec<bool>,
    rows: Vec<Vec<String>>,
}

fn summary_table(arms: &[ArmSummary]) -> Table {
    let rows = arms
        .iter()
        .map(|arm| {
            let seeds = &arm.seeds;
            let auc = match seeds.as_slice() {
                [one] => format!(
                    "{} [{}, {}]",
                    f3(one.auc),
                    f3(one.auc_ci.low),
                    f3(one.auc_ci.high)
                ),
                _ => mean_pm_std(seeds, |s| s.auc),
            };
            let mut test_sizes: Vec<String> = Vec::new();
            for s in seeds {
                let size = format!("{} ({})", s.n_test, s.n_test_malignant);
                if !test_sizes.contains(&size) {
                    test_sizes.push(size);
                }
            }
            vec![
                arm.arm.clone(),
                auc,
                mean_pm_std(seeds, |s| s.average_precision),
                mean_pm_std(seeds, |s| s.sensitivity_at_90_specificity),
                test_sizes.join(", "),
                seeds.len().to_string(),
                join(seeds.iter().map(|s| s.best_epoch)),
            ]
        })
        .collect();
    Table {
        header: vec![
            "Arm",
            "Test ROC-AUC",
            "PR-AUC",
            "Sens. @ 90% spec.",
            "Test n (malignant)",
            "Seeds",
            "Best epoch(s)",
        ],
        numeric: vec![false, true, true, true, true, true, false],
        rows,
    }
}

fn comparison_table(comparisons: &[Comparison]) -> Table {
    let rows = comparisons
        .iter()
        .map(|c| {
            vec![
                format!("{} vs {}", c.arm_a, c.arm_b),
                format!("{} / {}", f3(c.auc_a), f3(c.auc_b)),
                format!(
                    "{} [{}, {}]",
                    signed3(c.difference),
                    signed3(c.delong.ci.low),
                    signed3(c.delong.ci.high)
                ),
                p_value(c.delong.p),
                p_value(c.delong.p_holm),
                format!(
                    "[{}, {}]",
                    signed3(c.bootstrap.ci.low),
                    signed3(c.bootstrap.ci.high)
                ),
                p_value(c.bootstrap.p),
            ]
        })
        .collect();
    Table {
        header: vec![
            "A vs B",
            "ROC-AUC A / B",
            "ΔAUC [95% CI]",
            "p (DeLong)",
            "p (Holm)",
            "Bootstrap 95% CI",
            "p (bootstrap)",
        ],
        numeric: vec![false, true, true, true, true, true, true],
        rows,
    }
}

fn per_seed_comparison_table(comparisons: &[Comparison]) -> Table {
    let rows = comparisons
        .iter()
        .flat_map(|c| {
            c.per_seed.iter().map(|s| {
                vec![
                    format!("{} vs {}", c.arm_a, c.arm_b),
                    s.seed.to_string(),
                    format!("{} / {}", f3(s.auc_a), f3(s.auc_b)),
                    signed3(s.difference),
                    p_value(s.p),
                ]
            })
        })
        .collect();
    Table {
        header: vec!["A vs B", "Seed", "ROC-AUC A / B", "ΔAUC", "p (DeLong)"],
        numeric: vec![false, true, true, true, true],
        rows,
    }
}

fn seed_table(arms: &[ArmSummary]) -> Table {
    let rows = arms
        .iter()
        .flat_map(|arm| {
            arm.seeds.iter().map(|s| {
                vec![
                    arm.arm.clone(),
                    s.seed.to_string(),
                    format!(
                        "{} [{}, {}]",
                        f3(s.auc),
                        f3(s.auc_ci.low),
                        f3(s.auc_ci.high)
                    ),
                    f3(s.average_precision),
                    f3(s.sensitivity_at_90_specificity),
                    s.best_epoch.to_string(),
                    f3(s.val_auc),
                    format!("{} ({})", s.n_test, s.n_test_malignant),
                ]
            })
        })
        .collect();
    Table {
        header: vec![
            "Arm",
            "Seed",
            "Test ROC-AUC [95% CI]",
            "PR-AUC",
            "Sens. @ 90% spec.",
            "Best epoch",
            "Val ROC-AUC",
            "Test n (malignant)",
        ],
        numeric: vec![false, true, true, true, true, true, true, true],
        rows,
    }
}

fn paper_table(paper: &[(&str, &str)]) -> Table {
    Table {
        header: vec!["Paper", "Reported ROC-AUC"],
        numeric: vec![false, true],
        rows: paper
            .iter()
            .map(|(label, auc)| vec![label.to_string(), auc.to_string()])
            .collect(),
    }
}

/// A difference with its sign; one that rounds to zero prints unsigned.
fn signed3(x: f64) -> String {
    if !x.is_finite() {
        "n/a".into()
    } else if (x * 1000.0).round() == 0.0 {
        "0.000".into()
    } else {
        format!("{x:+.3}")
    }
}

fn p_value(p: f64) -> String {
    if p.is_finite() && p < 0.001 {
        "< 0.001".into()
    } else {
        f3(p)
    }
}

fn f3(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "n/a".into()
    }
}

/// One seed: the value; several: mean ± sample std; none: n/a.
fn mean_pm_std(seeds: &[SeedMetrics], metric: impl Fn(&SeedMetrics) -> f64) -> String {
    let values: Vec<f64> = seeds.iter().map(metric).collect();
    let (mean, std) = mean_std(&values);
    if values.len() > 1 {
        format!("{} ± {}", f3(mean), f3(std))
    } else {
        f3(mean)
    }
}

fn join<T: ToString>(items: impl Iterator<Item = T>) -> String {
    items.map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
}

fn markdown_table(table: &Table) -> String {
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let header: Vec<String> = table.header.iter().map(|h| cell(h)).collect();
    let align: Vec<&str> = table
        .numeric
        .iter()
        .map(|&n| if n { "---:" } else { "---" })
        .collect();
    let mut out = format!("| {} |\n| {} |\n", header.join(" | "), align.join(" | "));
    for row in &table.rows {
        let cells: Vec<String> = row.iter().map(|c| cell(c)).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

fn html_table(table: &Table, caption: Option<&str>) -> String {
    let class = |numeric: bool| if numeric { " class=\"num\"" } else { "" };
    let mut out = String::from("<table>\n");
    if let Some(caption) = caption {
        let _ = writeln!(out, "<caption>{}</caption>", escape_html(caption));
    }
    out.push_str("<thead><tr>");
    for (h, &n) in table.header.iter().zip(&table.numeric) {
        let _ = write!(out, "<th{}>{}</th>", class(n), escape_html(h));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for row in &table.rows {
        out.push_str("<tr>");
        for (c, &n) in row.iter().zip(&table.numeric) {
            let _ = write!(out, "<td{}>{}</td>", class(n), escape_html(c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n");
    out
}

pub(crate) fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(ch),
        }
    }
    out
}

#[cfg(test)]
mod tests;
