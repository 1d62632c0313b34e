//! `exp show`: one row per experiment and one for the workspace, with the
//! parameters that differ between them and every metric.
//!
//! Promises: rows are the workspace first, then experiments by name, or by
//! a metric (`--sort`, best first, rows without it last); a parameter is a
//! column only when its value is not the same in every row; the terminal
//! table fits 100 columns (the columns that do not fit are named below it,
//! and are all in `--json`, `--csv` and `--md`).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{ExperimentRecord, Metric};
use crate::lockfile::LockFile;

/// One row of `exp show`.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub name: String,
    /// `--set`s it ran with (none for the workspace).
    pub overrides: Vec<String>,
    /// The parameters that differ between rows: `STAGE.KEY` -> value.
    pub params: BTreeMap<String, String>,
    pub metrics: BTreeMap<String, f64>,
    /// How many stages ran, were restored, were cached when it ran.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub stages: BTreeMap<String, usize>,
    /// Its folders are here (false: a record from the store or the remote,
    /// run elsewhere; `exp apply` restores it).
    pub here: bool,
}

/// The table: its rows and the order of its columns.
#[derive(Clone, Debug, Serialize)]
pub struct Table {
    pub params: Vec<String>,
    pub metrics: Vec<String>,
    pub rows: Vec<Row>,
}

/// Every parameter of a lock file, flattened: `STAGE.KEY` -> TOML text.
pub fn flat_params(lock: &LockFile) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (stage, entry) in &lock.stages {
        for (k, v) in &entry.params {
            out.insert(format!("{stage}.{k}"), v.to_string());
        }
    }
    out
}

/// Builds the table from the workspace (its lock file and metrics, when it
/// has run) and the experiments (each with whether its folders are here).
pub fn build(
    workspace: Option<(&LockFile, &[Metric])>,
    experiments: &[(ExperimentRecord, bool)],
    sort: Option<&str>,
) -> Table {
    let mut sources: Vec<(Row, BTreeMap<String, String>, &[Metric])> = Vec::new();
    if let Some((lock, metrics)) = workspace {
        let row = Row {
            name: "workspace".into(),
            overrides: Vec::new(),
            params: BTreeMap::new(),
            metrics: BTreeMap::new(),
            stages: BTreeMap::new(),
            here: true,
        };
        sources.push((row, flat_params(lock), metrics));
    }
    for (e, here) in experiments {
        let mut stages = BTreeMap::new();
        for state in e.stages.values() {
            *stages.entry(state.clone()).or_insert(0) += 1;
        }
        let row = Row {
            name: e.name.clone(),
            overrides: e.overrides.clone(),
            params: BTreeMap::new(),
            metrics: BTreeMap::new(),
            stages,
            here: *here,
        };
        sources.push((row, flat_params(&e.lock), &e.metrics));
    }
    let mut all_keys: Vec<&String> = sources.iter().flat_map(|(_, p, _)| p.keys()).collect();
    all_keys.sort();
    all_keys.dedup();
    let params: Vec<String> = all_keys
        .into_iter()
        .filter(|k| {
            let first = sources[0].1.get(*k);
            sources.iter().any(|(_, p, _)| p.get(*k) != first)
        })
        .cloned()
        .collect();
    let mut metrics: Vec<String> = Vec::new();
    for (_, _, ms) in &sources {
        for m in ms.iter() {
            if !metrics.contains(&m.name) {
                metrics.push(m.name.clone());
            }
        }
    }
    let mut rows: Vec<Row> = sources
        .into_iter()
        .map(|(mut row, p, ms)| {
            row.params = params
                .iter()
                .map(|k| (k.clone(), p.get(k).cloned().unwrap_or_else(|| "-".into())))
                .collect();
            row.metrics = ms.iter().map(|m| (m.name.clone(), m.value)).collect();
            row
        })
        .collect();
    if let Some(metric) = sort {
        // Best first; NaN and missing last; ties keep their order.
        let key = |r: &Row| r.metrics.get(metric).copied().filter(|v| v.is_finite());
        rows.sort_by(|a, b| match (key(a), key(b)) {
            (Some(x), Some(y)) => y.total_cmp(&x),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        });
    }
    Table {
        params,
        metrics,
        rows,
    }
}

impl Table {
    fn header(&self) -> Vec<String> {
        let mut h = vec!["experiment".to_string()];
        h.extend(self.params.iter().cloned());
        h.extend(self.metrics.iter().cloned());
        h
    }

    /// A row's cells; `mark` stars an experiment whose folders are not here.
    fn cells(&self, row: &Row, mark: bool) -> Vec<String> {
        let mut c = vec![if row.here || !mark {
            row.name.clone()
        } else {
            format!("{} *", row.name)
        }];
        c.extend(self.params.iter().map(|k| row.params[k].clone()));
        c.extend(self.metrics.iter().map(|m| match row.metrics.get(m) {
            Some(v) => format!("{v:.4}"),
            None => "-".into(),
        }));
        c
    }

    /// Aligned columns, at most `width` characters a line. A suffix every
    /// metric shares (` auc`) is said once, under the table, to save width.
    pub fn terminal(&self, width: usize) -> String {
        let mut header = self.header();
        let suffix = common_suffix(&self.metrics);
        if !suffix.is_empty() {
            for h in &mut header[1 + self.params.len()..] {
                h.truncate(h.len() - suffix.len());
            }
        }
        let body: Vec<Vec<String>> = self.rows.iter().map(|r| self.cells(r, true)).collect();
        let widths: Vec<usize> = (0..header.len())
            .map(|j| {
                body.iter()
                    .map(|r| r[j].chars().count())
                    .chain([header[j].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut shown = 0;
        let mut used = 0;
        for w in &widths {
            let add = if shown == 0 { *w } else { w + 2 };
            if shown > 0 && used + add > width {
                break;
            }
            used += add;
            shown += 1;
        }
        let line = |cells: &[String]| {
            let parts: Vec<String> = cells[..shown]
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(j, (c, w))| match j {
                    0 => format!("{c:<w$}"),
                    _ => format!("{c:>w$}"),
                })
                .collect();
            parts.join("  ").trim_end().to_string() + "\n"
        };
        let mut out = line(&header);
        for r in &body {
            out.push_str(&line(r));
        }
        if self.rows.iter().any(|r| !r.here) {
            out.push_str("(* shared through the store, run elsewhere: `exp apply` restores it)\n");
        }
        if !suffix.is_empty() {
            out.push_str(&format!(
                "(each metric column NAME is the metric `NAME{suffix}`)\n"
            ));
        }
        if shown < header.len() {
            let note = format!(
                "({} more column(s) in --json, --csv, --md: {})",
                header.len() - shown,
                self.header()[shown..].join(", ")
            );
            out.push_str(&wrap(&note, width));
        }
        out
    }

    pub fn markdown(&self) -> String {
        let header = self.header();
        let mut out = format!("| {} |\n", header.join(" | "));
        let align: Vec<&str> = (0..header.len())
            .map(|j| if j == 0 { "---" } else { "---:" })
            .collect();
        out.push_str(&format!("|{}|\n", align.join("|")));
        for r in &self.rows {
            out.push_str(&format!("| {} |\n", self.cells(r, true).join(" | ")));
        }
        if self.rows.iter().any(|r| !r.here) {
            out.push_str("\n\\* shared through the store, run elsewhere.\n");
        }
        out
    }

    pub fn csv(&self) -> String {
        let quote = |s: &str| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_string()
            }
        };
        let line = |cells: Vec<String>| {
            cells.iter().map(|c| quote(c)).collect::<Vec<_>>().join(",") + "\n"
        };
        let mut out = line(self.header());
        for r in &self.rows {
            let mut cells = self.cells(r, false);
            // Full precision where a program reads it.
            for (j, m) in self.metrics.iter().enumerate() {
                if let Some(v) = r.metrics.get(m) {
                    cells[1 + self.params.len() + j] = v.to_string();
                }
            }
            out.push_str(&line(cells));
        }
        out
    }
}

/// `text` in lines of at most `width` characters, broken at spaces.
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split(' ') {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            out.push_str(&line);
            out.push('\n');
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// The ` word` suffix every name shares (after a space, never a whole
/// name), or "".
fn common_suffix(names: &[String]) -> String {
    let Some(first) = names.first() else {
        return String::new();
    };
    let Some(at) = first.rfind(' ') else {
        return String::new();
    };
    let suffix = &first[at..];
    let shared = names
        .iter()
        .all(|n| n.len() > suffix.len() && n.ends_with(suffix));
    if shared {
        suffix.to_string()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::lockfile::{LockEntry, params_to_toml};

    fn lock(seed: i64, lr: f64) -> LockFile {
        let entry = |params: serde_json::Value| LockEntry {
            kind: "k".into(),
            code: String::new(),
            code_version: 1,
            fingerprint: Digest::of_bytes(b"f"),
            output: Digest::of_bytes(b"o"),
            files: 1,
            bytes: 1,
            contents: Default::default(),
            upstream: Default::default(),
            external: None,
            params: params_to_toml(&params),
        };
        LockFile {
            cache_version: 1,
            stages: [
                ("ingest".to_string(), entry(serde_json::json!({"seed": 1}))),
                (
                    "arm".to_string(),
                    entry(serde_json::json!({"seed": seed, "lr": lr})),
                ),
            ]
            .into(),
        }
    }

    fn record(name: &str, seed: i64, lr: f64, auc: f64) -> ExperimentRecord {
        ExperimentRecord {
            name: name.into(),
            pipeline: "p.toml".into(),
            overrides: vec![format!("arm.lr={lr}")],
            git_revision: None,
            lock: lock(seed, lr),
            metrics: vec![Metric {
                name: "arm auc".into(),
                value: auc,
            }],
            stages: [("arm".to_string(), "ran".to_string())].into(),
        }
    }

    #[test]
    fn only_differing_parameters_are_columns_and_sorting_puts_the_best_first() {
        let ws_metrics = vec![Metric {
            name: "arm auc".into(),
            value: 0.7,
        }];
        let ws = lock(0, 0.001);
        let exps = [
            (record("a", 0, 0.01, 0.65), true),
            (record("b", 0, 0.0003, 0.8), false),
        ];
        let t = build(Some((&ws, &ws_metrics)), &exps, Some("arm auc"));
        assert_eq!(t.params, ["arm.lr"]);
        let names: Vec<&str> = t.rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["b", "workspace", "a"]);
        let text = t.terminal(100);
        assert!(text.starts_with("experiment"), "{text}");
        assert!(text.contains("0.8000"), "{text}");
        assert!(text.lines().next().unwrap().ends_with("  arm"), "{text}");
        assert!(
            text.contains("(each metric column NAME is the metric `NAME auc`)"),
            "{text}"
        );
        assert!(
            t.markdown().contains("| b * | 0.0003 | 0.8000 |"),
            "{}",
            t.markdown()
        );
        assert!(t.csv().contains("\nb,0.0003,0.8\n"), "{}", t.csv());
        assert!(text.contains("b *"), "{text}");
        assert!(text.contains("(* shared through the store"), "{text}");
    }

    #[test]
    fn the_terminal_table_fits_the_width_and_names_what_it_left_out() {
        let metrics: Vec<Metric> = (0..12)
            .map(|i| Metric {
                name: format!("augmentation_arm_{i} auc"),
                value: 0.5,
            })
            .collect();
        let mut e = record("a", 0, 0.1, 0.5);
        e.metrics = metrics;
        let t = build(None, &[(e, true)], None);
        let text = t.terminal(100);
        assert!(text.lines().all(|l| l.chars().count() <= 100), "{text}");
        assert!(text.contains("more column(s)"), "{text}");
    }
}
