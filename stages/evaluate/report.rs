//! The comparison `evaluate` reports: per-arm summary tables (GitHub
//! Markdown and aligned plain text), and a whole report as Markdown or as
//! one self-contained HTML page (inline CSS, figures embedded as base64
//! `data:` URIs).
//!
//! Promises:
//! - Every metric is printed with 3 decimals. An arm with one seed shows its
//!   test ROC-AUC with the bootstrap interval, `0.812 [0.741, 0.874]`; an arm
//!   with several shows mean ± sample std over seeds, `0.812 ± 0.013` (the
//!   per-seed values and intervals are in the report's per-seed table).
//!   The interval is labelled "95% CI": compute it at level 0.95.
//! - The paper's reported numbers are printed verbatim, as given, in their
//!   own table: they are not recomputed or compared numerically.
//! - All caller text is escaped for its target: `|` in Markdown table cells,
//!   `& < > " '` everywhere in HTML. Markdown titles, captions and notes are
//!   passed through, so they may carry Markdown.
//! - Non-finite numbers print as "n/a".

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::metrics::{Interval, mean_std};

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
struct IntervalDef {
    low: f64,
    high: f64,
}

/// The per-arm summary as a GitHub Markdown table, followed by the paper's
/// reported numbers, `paper` = (label, reported ROC-AUC as printed), in a
/// small table of their own (left out when `paper` is empty).
pub fn table_markdown(arms: &[ArmSummary], paper: &[(&str, &str)]) -> String {
    let mut out = markdown_table(&summary_table(arms));
    if !paper.is_empty() {
        out.push_str("\nReported in the paper:\n\n");
        out.push_str(&markdown_table(&paper_table(paper)));
    }
    out
}

/// The per-arm summary as plain text with aligned columns, for a terminal.
pub fn table_terminal(arms: &[ArmSummary]) -> String {
    let table = summary_table(arms);
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

/// A whole report in Markdown: the summary and paper tables, what each arm
/// is, per-seed results, the figures (`images` = (caption, path relative to
/// the report)), and the notes.
pub fn report_markdown(
    title: &str,
    arms: &[ArmSummary],
    paper: &[(&str, &str)],
    images: &[(&str, &str)],
    notes: &[String],
) -> String {
    let mut out = format!(
        "# {title}\n\n## Test-set results\n\n{}",
        table_markdown(arms, paper)
    );
    out.push_str("\n### Arms\n\n");
    for arm in arms {
        let _ = writeln!(out, "- **{}**: {}", arm.arm, arm.description);
    }
    let _ = write!(
        out,
        "\n### Per-seed results\n\n{}",
        markdown_table(&seed_table(arms))
    );
    if !images.is_empty() {
        out.push_str("\n## Figures\n\n");
        for (caption, path) in images {
            let _ = write!(out, "![{caption}]({path})\n\n*{caption}*\n\n");
        }
    }
    if !notes.is_empty() {
        out.push_str(if images.is_empty() {
            "\n## Notes\n\n"
        } else {
            "## Notes\n\n"
        });
        for note in notes {
            let _ = writeln!(out, "- {note}");
        }
    }
    out
}

/// The same report as one self-contained HTML page: inline CSS, figures
/// (`images` = (caption, PNG bytes)) embedded as base64 `data:` URIs, every
/// piece of caller text HTML-escaped.
pub fn report_html(
    title: &str,
    arms: &[ArmSummary],
    paper: &[(&str, &str)],
    images: &[(&str, &[u8])],
    notes: &[String],
) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n<h1>{}</h1>\n",
        escape_html(title),
        escape_html(title)
    );
    out.push_str("<h2>Test-set results</h2>\n<div class=\"tables\">\n");
    out.push_str(&html_table(&summary_table(arms), None));
    if !paper.is_empty() {
        out.push_str(&html_table(
            &paper_table(paper),
            Some("Reported in the paper"),
        ));
    }
    out.push_str("</div>\n<h3>Arms</h3>\n<dl>\n");
    for arm in arms {
        let _ = writeln!(
            out,
            "<dt>{}</dt><dd>{}</dd>",
            escape_html(&arm.arm),
            escape_html(&arm.description)
        );
    }
    out.push_str("</dl>\n<h3>Per-seed results</h3>\n");
    out.push_str(&html_table(&seed_table(arms), None));
    if !images.is_empty() {
        out.push_str("<h2>Figures</h2>\n");
        for (caption, png) in images {
            let caption = escape_html(caption);
            let _ = writeln!(
                out,
                "<figure><img src=\"data:image/png;base64,{}\" alt=\"{caption}\"><figcaption>{caption}</figcaption></figure>",
                base64_encode(png)
            );
        }
    }
    if !notes.is_empty() {
        out.push_str("<h2>Notes</h2>\n<ul>\n");
        for note in notes {
            let _ = writeln!(out, "<li>{}</li>", escape_html(note));
        }
        out.push_str("</ul>\n");
    }
    out.push_str("</main>\n</body>\n</html>\n");
    out
}

const STYLE: &str = "\
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
                join(seeds.iter().map(|s| s.seed)),
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
        numeric: vec![false, true, true, true, true, false, false],
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

fn escape_html(text: &str) -> String {
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

/// Standard base64 (RFC 4648) with padding.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            // A chunk of k bytes yields k + 1 significant characters.
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(seed: u64, auc: f64, low: f64, high: f64) -> SeedMetrics {
        SeedMetrics {
            seed,
            auc,
            auc_ci: Interval { low, high },
            average_precision: auc - 0.2,
            sensitivity_at_90_specificity: auc - 0.4,
            n_test: 600,
            n_test_malignant: 117,
            best_epoch: 10 + seed as usize,
            val_auc: auc + 0.01,
        }
    }

    fn arms() -> Vec<ArmSummary> {
        vec![
            ArmSummary {
                arm: "classical".into(),
                description: "Flips, rotations and colour jitter".into(),
                seeds: vec![seed(1, 0.8123, 0.7412, 0.8744)],
            },
            ArmSummary {
                arm: "cyclegan".into(),
                description: "Adds CycleGAN-synthesised malignant images".into(),
                seeds: vec![
                    seed(1, 0.80, 0.7, 0.9),
                    seed(2, 0.82, 0.7, 0.9),
                    seed(3, 0.84, 0.7, 0.9),
                ],
            },
        ]
    }

    const PAPER: &[(&str, &str)] = &[("Classical augmentation", "0.81"), ("CycleGAN", "0.83")];

    #[test]
    fn tables_print_three_decimals() {
        let md = table_markdown(&arms(), PAPER);
        assert!(
            md.contains(
                "| classical | 0.812 [0.741, 0.874] | 0.612 | 0.412 | 600 (117) | 1 | 11 |"
            ),
            "{md}"
        );
        // mean 0.82, sample std 0.02 over seeds.
        assert!(
            md.contains(
                "| cyclegan | 0.820 ± 0.020 | 0.620 ± 0.020 | 0.420 ± 0.020 | 600 (117) | 1, 2, 3 | 11, 12, 13 |"
            ),
            "{md}"
        );
        assert!(md.contains("| Classical augmentation | 0.81 |"), "{md}");
        assert!(md.contains("| --- | ---: |"));
        let terminal = table_terminal(&arms());
        assert!(
            terminal.contains("0.812 [0.741, 0.874]") && terminal.contains("0.820 ± 0.020"),
            "{terminal}"
        );
        // Right-aligned numeric columns line up: every "ROC-AUC" cell ends at the same column.
        let lines: Vec<&str> = terminal.lines().collect();
        assert_eq!(lines.len(), 4);
        let end = |line: &str, needle: &str| {
            line.find(needle)
                .map(|i| line[..i + needle.len()].chars().count())
        };
        assert_eq!(end(lines[2], "0.874]"), end(lines[3], "0.020"));
    }

    #[test]
    fn seedless_arm_and_pipes() {
        let arm = ArmSummary {
            arm: "a|b".into(),
            description: String::new(),
            seeds: vec![],
        };
        let md = table_markdown(&[arm], &[]);
        assert!(md.contains("| a\\|b | n/a | n/a | n/a |  |  |  |"), "{md}");
        assert!(!md.contains("Reported in the paper"));
    }

    #[test]
    fn reports_have_every_part() {
        let notes = vec!["Test split is patient-disjoint.".to_string()];
        let md = report_markdown(
            "Melanoma",
            &arms(),
            PAPER,
            &[("ROC curves", "roc.png")],
            &notes,
        );
        for part in [
            "# Melanoma",
            "![ROC curves](roc.png)",
            "- **cyclegan**: Adds",
            "| cyclegan | 3 | 0.840 [0.700, 0.900] |",
            "- Test split",
        ] {
            assert!(md.contains(part), "missing {part:?} in\n{md}");
        }
        let png: &[u8] = b"\x89PNG";
        let html = report_html("Melanoma", &arms(), PAPER, &[("ROC curves", png)], &notes);
        assert!(html.contains("src=\"data:image/png;base64,iVBORw==\""));
        assert!(html.contains("<td class=\"num\">0.812 [0.741, 0.874]</td>"));
        assert!(html.contains("<figcaption>ROC curves</figcaption>"));
        assert!(html.contains("<caption>Reported in the paper</caption>"));
    }

    #[test]
    fn html_escapes_caller_text() {
        let mut evil = arms();
        evil[0].arm = "<script>alert('x')</script>".into();
        evil[0].description = "a & b".into();
        let html = report_html(
            "1 < 2",
            &evil,
            &[("<b>", "\"0.8\"")],
            &[("<img>", &[])],
            &["<i>note</i>".into()],
        );
        assert!(!html.contains("<script>") && !html.contains("<b>") && !html.contains("<i>"));
        for escaped in [
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;",
            "a &amp; b",
            "<title>1 &lt; 2</title>",
            "&quot;0.8&quot;",
            "&lt;i&gt;note",
        ] {
            assert!(html.contains(escaped), "missing {escaped}");
        }
    }

    #[test]
    fn base64_known_vectors() {
        // RFC 4648, section 10.
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
        }
        assert_eq!(base64_encode(&[0xFF, 0xEF, 0xBE]), "/+++");
    }

    #[test]
    fn summaries_round_trip_through_json() {
        let json = serde_json::to_string(&arms()).unwrap();
        assert!(
            json.contains("\"auc_ci\":{\"low\":0.7412,\"high\":0.8744}"),
            "{json}"
        );
        let back: Vec<ArmSummary> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, arms());
    }
}
