//! Reading and validating an ISIC metadata CSV (Kaggle `train.csv`, or the
//! ISIC GroundTruth CSV v1/v2 with `lesion_id`).
//!
//! Promises: every problem is reported with the file, line, column and value,
//! all of them at once (up to a limit) rather than one per run; blanks become
//! nulls; `age_approx` may be written `45` or `45.0`; an `image_name` must be a
//! plain file name so a metadata file can never make the pipeline read or
//! write outside its folders.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Result, bail};
use polars::prelude::*;

/// Columns every metadata file must have (`patient_id` unless each image is
/// its own patient). The anatomical site may be missing or named
/// `anatom_site_general` (ISIC archive exports); it is then null.
pub const REQUIRED: &[&str] = &[
    "image_name",
    "patient_id",
    "sex",
    "age_approx",
    "diagnosis",
    "benign_malignant",
    "target",
];
const SITE_COLUMNS: [&str; 2] = ["anatom_site_general_challenge", "anatom_site_general"];
/// How many problems to list before saying "and N more".
const MAX_LISTED: usize = 20;

/// Validated rows, in file order.
#[derive(Debug, Default)]
pub struct Records {
    pub image_name: Vec<String>,
    pub patient_id: Vec<String>,
    pub lesion_id: Vec<Option<String>>,
    pub sex: Vec<Option<String>>,
    pub age_approx: Vec<Option<i32>>,
    pub site: Vec<Option<String>>,
    pub diagnosis: Vec<Option<String>>,
    pub benign_malignant: Vec<String>,
    pub target: Vec<i32>,
    /// 1-based line in the CSV (the header is line 1).
    pub line: Vec<usize>,
}

impl Records {
    pub fn len(&self) -> usize {
        self.image_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.image_name.is_empty()
    }
}

/// Reads a CSV with every column as text (validation below decides types).
pub fn read_text_csv(path: &Path) -> Result<DataFrame> {
    CsvReadOptions::default()
        .with_has_header(true)
        .with_infer_schema_length(Some(0))
        .try_into_reader_with_file_path(Some(path.to_path_buf()))
        .and_then(|r| r.finish())
        .map_err(|e| anyhow::anyhow!("{}: not a readable CSV file: {e}", path.display()))
}

/// A text column as a vector of optional trimmed strings.
pub fn text_column(df: &DataFrame, name: &str) -> Result<Vec<Option<String>>> {
    let col = df.column(name)?.str()?;
    Ok(col
        .iter()
        .map(|v| {
            v.map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        })
        .collect())
}

/// Whether `name` can be used as a file name inside the image folder.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0', ':'])
}

/// Reads and validates a metadata CSV. With `patient_per_image`, the file
/// needs no `patient_id` column: each image is its own patient (named after it).
pub fn read(path: &Path, patient_per_image: bool) -> Result<Records> {
    let df = read_text_csv(path)?;
    let file = path.display().to_string();
    let names: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let missing: Vec<&str> = REQUIRED
        .iter()
        .copied()
        .filter(|c| !(patient_per_image && *c == "patient_id"))
        .filter(|c| !names.iter().any(|n| n == c))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{file}: missing column(s) {}; found {}",
            missing
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(", "),
            names
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let col = |name: &str| text_column(&df, name);
    let image_name = col("image_name")?;
    let patient_id = if patient_per_image {
        image_name
            .iter()
            .map(|n| n.as_ref().map(|n| format!("IP_{n}")))
            .collect()
    } else {
        col("patient_id")?
    };
    let lesion_id = if names.iter().any(|n| n == "lesion_id") {
        col("lesion_id")?
    } else {
        vec![None; df.height()]
    };
    let sex = col("sex")?;
    let age = col("age_approx")?;
    let site = match SITE_COLUMNS.iter().find(|c| names.iter().any(|n| n == *c)) {
        Some(c) => col(c)?,
        None => vec![None; df.height()],
    };
    let diagnosis = col("diagnosis")?;
    let benign_malignant = col("benign_malignant")?;
    let target = col("target")?;

    let mut problems: Vec<String> = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(df.height());
    let mut out = Records::default();
    for i in 0..df.height() {
        let line = i + 2;
        let mut bad = |column: &str, what: String| {
            problems.push(format!("line {line}, column `{column}`: {what}"))
        };
        let name = match image_name[i].as_deref() {
            None => {
                bad("image_name", "blank".into());
                ""
            }
            Some(n) if !is_plain_file_name(n) => {
                bad(
                    "image_name",
                    format!("`{n}` is not a plain file name (no path separators, no leading `.`)"),
                );
                ""
            }
            Some(n) => {
                if let Some(first) = seen.insert(n, line) {
                    bad("image_name", format!("`{n}` repeats line {first}"));
                }
                n
            }
        };
        if patient_id[i].is_none() {
            bad("patient_id", "blank".into());
        }
        let age_value = match age[i].as_deref() {
            None => None,
            Some(a) => match parse_age(a) {
                Some(v) => Some(v),
                None => {
                    bad(
                        "age_approx",
                        format!("`{a}` is not a whole number of years"),
                    );
                    None
                }
            },
        };
        let t = match target[i].as_deref() {
            Some("0") => Some(0),
            Some("1") => Some(1),
            other => {
                bad("target", format!("`{}` is not 0 or 1", other.unwrap_or("")));
                None
            }
        };
        let bm = benign_malignant[i].as_deref().map(str::to_ascii_lowercase);
        match (bm.as_deref(), t) {
            (Some("benign"), Some(0)) | (Some("malignant"), Some(1)) => {}
            (Some(v @ ("benign" | "malignant")), Some(t)) => {
                bad("target", format!("{t} contradicts benign_malignant `{v}`"));
            }
            (Some("benign" | "malignant"), None) => {}
            (other, _) => bad(
                "benign_malignant",
                format!("`{}` is not `benign` or `malignant`", other.unwrap_or("")),
            ),
        }
        out.image_name.push(name.to_string());
        out.patient_id
            .push(patient_id[i].clone().unwrap_or_default());
        out.lesion_id.push(lesion_id[i].clone());
        out.sex.push(sex[i].clone());
        out.age_approx.push(age_value);
        out.site.push(site[i].clone());
        out.diagnosis.push(diagnosis[i].clone());
        out.benign_malignant.push(bm.unwrap_or_default());
        out.target.push(t.unwrap_or(0));
        out.line.push(line);
    }
    if !problems.is_empty() {
        bail!("{file}: {}", list_problems(&problems));
    }
    if out.is_empty() {
        bail!("{file}: no rows");
    }
    Ok(out)
}

/// `45`, `45.0` -> 45; anything else (45.5, 4x5, -3) -> None.
fn parse_age(s: &str) -> Option<i32> {
    if let Ok(v) = s.parse::<i32>() {
        return (0..=130).contains(&v).then_some(v);
    }
    let f: f64 = s.parse().ok()?;
    (f.fract() == 0.0 && (0.0..=130.0).contains(&f)).then_some(f as i32)
}

/// "N problem(s):" followed by up to `MAX_LISTED` lines.
pub fn list_problems(problems: &[String]) -> String {
    let mut s = format!("{} problem(s):", problems.len());
    for p in problems.iter().take(MAX_LISTED) {
        s.push_str("\n    ");
        s.push_str(p);
    }
    if problems.len() > MAX_LISTED {
        s.push_str(&format!(
            "\n    ... and {} more",
            problems.len() - MAX_LISTED
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(parse_age("45"), Some(45));
        assert_eq!(parse_age("45.0"), Some(45));
        assert_eq!(parse_age("45.5"), None);
        assert_eq!(parse_age("4x5"), None);
        assert_eq!(parse_age("-5"), None);
    }

    #[test]
    fn plain_names() {
        assert!(is_plain_file_name("ISIC_0015719"));
        for bad in [
            "",
            ".",
            "..",
            "../etc/passwd",
            "a/b",
            "a\\b",
            ".hidden",
            "c:x",
        ] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
    }
}
