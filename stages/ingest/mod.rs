//! Stage `ingest`: ISIC metadata in, `metadata.parquet` out.
//!
//! Reads the metadata CSV (from an upstream `synth` stage or a path), checks
//! every row (see [`metadata_csv`]), checks that every row's image exists in
//! the image folder, drops one image of each duplicate pair (see
//! [`duplicates`]), assigns each patient to train/val/test (see [`split`]),
//! and writes:
//!   - `metadata.parquet` (schema `metadata/1`): the kept rows, each with its
//!     image file's name, size and BLAKE3 digest, and its split;
//!   - `duplicates_dropped.parquet` (schema `duplicates_dropped/1`);
//!   - `ingest.json`: counts per split, for people and CI;
//!   - `source.json`: where the images are (`images`, relative to the
//!     pipeline file's folder), for the stages that read pixels.
//!
//! On any bad input the stage fails with a message naming the file, line,
//! column and value; the engine then commits nothing.

pub mod duplicates;
pub mod metadata_csv;
pub mod split;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use arrow_array::{ArrayRef, Int32Array, Int64Array, StringArray};
use melanoflow_pipeline::manifest::Entry;
use melanoflow_pipeline::{
    BoxError, ExternalFiles, ExternalInput, Source, Stage, StageContext, StageReport,
};
use serde::{Deserialize, Serialize};

pub struct Ingest;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestParams {
    /// The metadata CSV, relative to the pipeline file. Leave unset to read
    /// `train.csv` from the upstream source stage.
    #[serde(default)]
    pub metadata: Option<String>,
    /// The image folder. Leave unset to use the upstream source's `train/`.
    #[serde(default)]
    pub images: Option<String>,
    /// ISIC's duplicates CSV (image_name_1,image_name_2); unset = keep all.
    #[serde(default)]
    pub duplicates: Option<String>,
    /// Image file extensions tried, in order, for each image_name.
    #[serde(default = "defaults::extensions")]
    pub image_extensions: Vec<String>,
    #[serde(default = "defaults::fraction")]
    pub val_fraction: f64,
    /// Unset: 0.15. Not with `folds` (the test split is then one fold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_fraction: Option<f64>,
    /// Cross-validation: the patients in this many folds of equal shares
    /// (stratified by label); fold `fold` is the test split and
    /// `val_fraction` of the other patients validate. One pipeline stage per
    /// fold (`foreach = [0, 1, ...]`, `fold = "${item}"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folds: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fold: Option<usize>,
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    /// The metadata has no `patient_id` (an ISIC archive export): each image
    /// is its own patient, so the split cannot keep a patient's lesions together.
    #[serde(default)]
    pub patient_per_image: bool,
}

impl IngestParams {
    pub fn test_fraction(&self) -> f64 {
        self.test_fraction.unwrap_or(defaults::fraction())
    }
}

mod defaults {
    pub fn extensions() -> Vec<String> {
        vec!["jpg".into(), "jpeg".into(), "png".into()]
    }
    pub fn fraction() -> f64 {
        0.15
    }
    pub fn seed() -> u64 {
        42
    }
}

/// File names an upstream source stage provides.
const UPSTREAM_CSV: &str = "train.csv";
const UPSTREAM_IMAGES: &str = "train";

impl Stage for Ingest {
    type Params = IngestParams;
    const KIND: &'static str = "ingest";
    const CODE: &'static str = crate::code_identity::INGEST;
    const ABOUT: &'static str = "validate ISIC metadata, check images, drop duplicates, split by patient -> metadata.parquet";

    fn check(&self, p: &IngestParams, inputs: &[String]) -> Result<(), String> {
        match (inputs.len(), &p.metadata, &p.images) {
            (0, Some(_), Some(_)) => {}
            (0, _, _) => return Err("without `inputs`, both `metadata` (CSV) and `images` (folder) must be set".into()),
            (1, None, None) => {}
            (1, _, _) => return Err("with an upstream in `inputs`, leave `metadata` and `images` unset (they come from it)".into()),
            _ => return Err("takes at most one upstream (a source such as `synth`)".into()),
        }
        match (p.folds, p.fold, p.test_fraction) {
            (None, None, _) => {
                let (v, t) = (p.val_fraction, p.test_fraction());
                if !(0.0..1.0).contains(&v) || !(0.0..1.0).contains(&t) || v + t >= 1.0 {
                    return Err(format!(
                        "`val_fraction` ({v}) and `test_fraction` ({t}) must be >= 0 and sum to less than 1"
                    ));
                }
            }
            (Some(k), Some(f), None) => {
                if k < 2 || f >= k {
                    return Err(format!(
                        "`folds` ({k}) must be at least 2 and `fold` ({f}) one of 0..{k}"
                    ));
                }
                if !(0.0..1.0).contains(&p.val_fraction) {
                    return Err(format!(
                        "`val_fraction` ({}) must be >= 0 and less than 1",
                        p.val_fraction
                    ));
                }
            }
            (Some(_), Some(_), Some(_)) => {
                return Err(
                    "with `folds`, the test split is fold `fold`: leave `test_fraction` unset"
                        .into(),
                );
            }
            _ => return Err("`folds` and `fold` go together: set both or neither".into()),
        }
        for (key, v) in [("metadata", &p.metadata), ("duplicates", &p.duplicates)] {
            if v.as_deref().is_some_and(|v| v.contains("://")) {
                return Err(format!(
                    "`{key}` must be a local file (only `images` may be an object-store URL)"
                ));
            }
        }
        if p.image_extensions.is_empty() {
            return Err("`image_extensions` must list at least one extension".into());
        }
        Ok(())
    }

    fn external_inputs(&self, p: &IngestParams, base_dir: &Path) -> Vec<ExternalInput> {
        [
            ("metadata", &p.metadata),
            ("images", &p.images),
            ("duplicates", &p.duplicates),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.as_ref().map(|v| ExternalInput::new(name, v, base_dir)))
        .collect()
    }

    fn run(&self, p: &IngestParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
        Ok(run(p, ctx)?)
    }
}

/// The image folder's files: name -> manifest entry.
struct ImageFolder<'a> {
    /// For messages: a local path or a URL.
    root: String,
    /// The folder as later stages should find it: relative to the pipeline
    /// file's folder (machine-independent) when possible.
    portable: String,
    files: HashMap<&'a str, &'a Entry>,
}

fn locate<'a>(p: &IngestParams, ctx: &'a StageContext) -> Result<(PathBuf, ImageFolder<'a>)> {
    if let Some(up) = ctx.upstream.first() {
        let csv = up.dir.join(UPSTREAM_CSV);
        if up.manifest.get(UPSTREAM_CSV).is_none() {
            bail!(
                "upstream `{}` has no `{UPSTREAM_CSV}`; an ingest upstream must be an ISIC-format source",
                up.name
            );
        }
        let prefix = format!("{UPSTREAM_IMAGES}/");
        let files = up
            .manifest
            .entries()
            .iter()
            .filter_map(|e| {
                e.path
                    .strip_prefix(&prefix)
                    .filter(|n| !n.contains('/'))
                    .map(|n| (n, e))
            })
            .collect();
        let root = up.dir.join(UPSTREAM_IMAGES);
        let portable = root
            .strip_prefix(&ctx.base_dir)
            .unwrap_or(&root)
            .to_string_lossy()
            .into_owned();
        return Ok((
            csv,
            ImageFolder {
                root: root.display().to_string(),
                portable,
                files,
            },
        ));
    }
    let csv = ctx
        .external("metadata")
        .ok_or_else(|| anyhow!("no metadata input"))?;
    let images = ctx
        .external("images")
        .ok_or_else(|| anyhow!("no images input"))?;
    if !images.is_dir {
        bail!("`images` ({}) must be a folder", images.source);
    }
    let Source::Local(csv_path) = &csv.source else {
        bail!(
            "`metadata` ({}) must be a local file: download it first",
            csv.source
        );
    };
    let files = images
        .manifest
        .entries()
        .iter()
        .filter(|e| !e.path.contains('/'))
        .map(|e| (e.path.as_str(), e))
        .collect();
    let portable = p
        .images
        .clone()
        .unwrap_or_else(|| images.source.to_string());
    Ok((
        csv_path.clone(),
        ImageFolder {
            root: images.source.to_string(),
            portable,
            files,
        },
    ))
}

fn run(p: &IngestParams, ctx: &StageContext) -> Result<StageReport> {
    let (csv_path, folder) = locate(p, ctx)?;
    let records = metadata_csv::read(&csv_path, p.patient_per_image)?;
    let rows_read = records.len();

    // Every row's image must exist: report how many are missing and which.
    let mut image_of: Vec<(&str, &Entry)> = Vec::with_capacity(records.len());
    let mut missing: Vec<String> = Vec::new();
    for (i, name) in records.image_name.iter().enumerate() {
        let found = p.image_extensions.iter().find_map(|ext| {
            let file = format!("{name}.{ext}");
            folder
                .files
                .get_key_value(file.as_str())
                .map(|(k, e)| (*k, *e))
        });
        match found {
            Some(f) => image_of.push(f),
            None => missing.push(format!("{name} (line {})", records.line[i])),
        }
    }
    if !missing.is_empty() {
        bail!(
            "{} of {} images listed in {} are missing from {} (looked for .{}): {}{}",
            missing.len(),
            records.len(),
            csv_path.display(),
            folder.root,
            p.image_extensions.join(", ."),
            missing
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            if missing.len() > 5 { ", ..." } else { "" }
        );
    }

    let drops = match (&p.duplicates, ctx.external("duplicates")) {
        (
            Some(_),
            Some(ExternalFiles {
                source: Source::Local(path),
                ..
            }),
        ) => duplicates::choose(path, &records)?,
        (Some(v), Some(_)) => bail!("`duplicates` ({v}) must be a local file"),
        _ => duplicates::Drops {
            dropped: Vec::new(),
            unmatched_pairs: 0,
        },
    };
    let mut keep = vec![true; records.len()];
    for &(d, _) in &drops.dropped {
        keep[d] = false;
    }
    let kept: Vec<usize> = (0..records.len()).filter(|&i| keep[i]).collect();

    let pick_str = |v: &Vec<String>| kept.iter().map(|&i| v[i].clone()).collect::<Vec<_>>();
    let patient_id = pick_str(&records.patient_id);
    let target: Vec<i32> = kept.iter().map(|&i| records.target[i]).collect();
    let splits = match (p.folds, p.fold) {
        (Some(folds), Some(fold)) => {
            split::assign_fold(&patient_id, &target, folds, fold, p.val_fraction, p.seed)?
        }
        _ => {
            let t = p.test_fraction();
            let fractions = [1.0 - p.val_fraction - t, p.val_fraction, t];
            split::assign(&patient_id, &target, fractions, p.seed)?
        }
    };

    let opt = |v: &Vec<Option<String>>| -> ArrayRef {
        Arc::new(kept.iter().map(|&i| v[i].clone()).collect::<StringArray>())
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(pick_str(&records.image_name))),
        Arc::new(StringArray::from(patient_id.clone())),
        opt(&records.lesion_id),
        opt(&records.sex),
        Arc::new(
            kept.iter()
                .map(|&i| records.age_approx[i])
                .collect::<Int32Array>(),
        ),
        opt(&records.site),
        opt(&records.diagnosis),
        Arc::new(StringArray::from(pick_str(&records.benign_malignant))),
        Arc::new(Int32Array::from(target.clone())),
        Arc::new(
            kept.iter()
                .map(|&i| Some(image_of[i].0))
                .collect::<StringArray>(),
        ),
        Arc::new(
            kept.iter()
                .map(|&i| Some(image_of[i].1.size as i64))
                .collect::<Int64Array>(),
        ),
        Arc::new(
            kept.iter()
                .map(|&i| Some(image_of[i].1.digest.to_hex()))
                .collect::<StringArray>(),
        ),
        Arc::new(StringArray::from(splits.clone())),
    ];
    melanoflow_schemas::write_parquet(
        &ctx.out_dir.join("metadata.parquet"),
        &melanoflow_schemas::METADATA,
        columns,
    )?;

    let dropped_columns: Vec<ArrayRef> = vec![
        Arc::new(
            drops
                .dropped
                .iter()
                .map(|&(d, _)| Some(records.image_name[d].clone()))
                .collect::<StringArray>(),
        ),
        Arc::new(
            drops
                .dropped
                .iter()
                .map(|&(_, k)| Some(records.image_name[k].clone()))
                .collect::<StringArray>(),
        ),
        Arc::new(
            drops
                .dropped
                .iter()
                .map(|&(d, _)| Some(records.patient_id[d].clone()))
                .collect::<StringArray>(),
        ),
        Arc::new(
            drops
                .dropped
                .iter()
                .map(|&(d, _)| Some(records.target[d]))
                .collect::<Int32Array>(),
        ),
    ];
    melanoflow_schemas::write_parquet(
        &ctx.out_dir.join("duplicates_dropped.parquet"),
        &melanoflow_schemas::DUPLICATES_DROPPED,
        dropped_columns,
    )?;

    let source = serde_json::json!({ "images": folder.portable });
    std::fs::write(
        ctx.out_dir.join("source.json"),
        serde_json::to_string_pretty(&source)? + "\n",
    )
    .context("writing source.json")?;

    let summary = Summary::of(rows_read, &drops, &patient_id, &target, &splits);
    let json = serde_json::to_string_pretty(&summary)? + "\n";
    std::fs::write(ctx.out_dir.join("ingest.json"), json).context("writing ingest.json")?;
    if let Some(w) = summary.rate_warning() {
        tracing::warn!("{w}");
    }
    Ok(StageReport::new(summary.line()))
}

#[derive(Serialize)]
struct SplitCounts {
    images: usize,
    malignant: usize,
    patients: usize,
    malignant_rate: f64,
}

#[derive(Serialize)]
struct Summary {
    rows_read: usize,
    duplicates_dropped: usize,
    duplicate_pairs_not_in_metadata: usize,
    images: usize,
    malignant: usize,
    patients: usize,
    malignant_rate: f64,
    splits: std::collections::BTreeMap<&'static str, SplitCounts>,
}

impl Summary {
    fn of(
        rows_read: usize,
        drops: &duplicates::Drops,
        patient_id: &[String],
        target: &[i32],
        splits: &[&'static str],
    ) -> Self {
        let rate = |m: usize, n: usize| if n == 0 { 0.0 } else { m as f64 / n as f64 };
        let count = |filter: &dyn Fn(usize) -> bool| {
            let idx: Vec<usize> = (0..target.len()).filter(|&i| filter(i)).collect();
            let malignant = idx.iter().filter(|&&i| target[i] == 1).count();
            let patients = idx
                .iter()
                .map(|&i| patient_id[i].as_str())
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            SplitCounts {
                images: idx.len(),
                malignant,
                patients,
                malignant_rate: rate(malignant, idx.len()),
            }
        };
        let all = count(&|_| true);
        Summary {
            rows_read,
            duplicates_dropped: drops.dropped.len(),
            duplicate_pairs_not_in_metadata: drops.unmatched_pairs,
            images: all.images,
            malignant: all.malignant,
            patients: all.patients,
            malignant_rate: all.malignant_rate,
            splits: split::SPLITS
                .iter()
                .map(|&s| (s, count(&|i| splits[i] == s)))
                .collect(),
        }
    }

    fn line(&self) -> String {
        let parts: Vec<String> = split::SPLITS
            .iter()
            .map(|name| {
                let c = &self.splits[name];
                format!(
                    "{name} {} ({} malignant, {} patients)",
                    c.images, c.malignant, c.patients
                )
            })
            .collect();
        format!(
            "{} rows, {} duplicates dropped, {} images of {} patients: {}",
            self.rows_read,
            self.duplicates_dropped,
            self.images,
            self.patients,
            parts.join(", ")
        )
    }

    /// A split whose malignant rate is more than one point off the whole.
    fn rate_warning(&self) -> Option<String> {
        self.splits
            .iter()
            .find(|(_, c)| c.images > 0 && (c.malignant_rate - self.malignant_rate).abs() > 0.01)
            .map(|(name, c)| {
                format!(
                    "split `{name}` has a malignant rate of {:.2}% vs {:.2}% overall (too few patients to stratify closer)",
                    100.0 * c.malignant_rate,
                    100.0 * self.malignant_rate
                )
            })
    }
}
