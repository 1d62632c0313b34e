//! Stage `evaluate`: the paper's comparison table, rebuilt on the
//! patient-held-out test split.
//!
//! Upstreams: one or more `train_classifier` stages (the arms, in the order
//! listed) and, optionally, `fidelity` stages (their tables of how good the
//! synthetic images are) and `train_cyclegan` stages (their sample grids and
//! loss curves go into the report). Per arm and seed, from the kept
//! checkpoint's test predictions: ROC-AUC (ties count one half), its
//! stratified bootstrap 95% interval, PR-AUC (average precision), and
//! sensitivity at 90% specificity; arms with several seeds report mean and
//! spread. The test set must hold both classes. Every pair of arms is
//! compared on the same test images (matched by image name), pooled over
//! seeds: DeLong's test and a paired bootstrap of the ROC-AUC difference
//! (`compare`, `paired`).
//!
//! Outputs: `metrics.json` (every number; what `melanoflow metrics` prints),
//! `test_scores.parquet` (every arm's test scores, what `diff` pairs),
//! `roc.png` (every arm), `training.png` (validation ROC-AUC per epoch),
//! `cyclegan_losses.png`, the CycleGAN sample grids, `report.md` and
//! `report.html` (self-contained). Same inputs and seed, same bytes: the
//! report names the stage's own fingerprint and melanoflow's version, never
//! a clock or a git revision (those would make the bytes depend on
//! something the fingerprint does not cover); `melanoflow metrics` prints
//! the git revision and the lock file's digest beside the table instead.

pub mod compare;
pub mod paired;
pub mod plot;
pub mod report;
pub mod results;
pub mod scores;

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use melanoflow_pipeline::{BoxError, Stage, StageContext, StageReport, Upstream};
use polars::prelude::{ParquetReader, SerReader};
use serde::{Deserialize, Serialize};

use crate::metrics::{
    self, average_precision, bootstrap_auc_ci, roc_auc, roc_curve, sensitivity_at_specificity,
};
use compare::{ArmScores, Comparison};
use report::{ArmSummary, Provenance, SeedMetrics};

pub struct Evaluate;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateParams {
    #[serde(default = "defaults::bootstrap_resamples")]
    pub bootstrap_resamples: usize,
    /// Seeds the bootstrap.
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "defaults::title")]
    pub title: String,
    /// Print the paper's published numbers beside ours.
    #[serde(default = "defaults::show_paper")]
    pub show_paper: bool,
}

mod defaults {
    pub fn bootstrap_resamples() -> usize {
        2000
    }
    pub fn title() -> String {
        "CycleGAN augmentation for melanoma classification".into()
    }
    pub fn show_paper() -> bool {
        true
    }
}

/// The paper, as the project's design notes cite it (they record its title
/// only: no authors or link).
const PAPER_CITATION: &str = "*CycleGAN-based data augmentation for melanoma image classification* (the paper this pipeline reproduces)";

/// melanoflow's version, as a literal so that it is part of this stage's code
/// identity (`CARGO_PKG_VERSION` is not): a version bump fails the test
/// below until this is updated, which re-runs the stage.
const MELANOFLOW_VERSION: &str = "0.1.0";

/// The paper's table (test ROC-AUC), printed verbatim beside ours.
const PAPER: [(&str, &str); 3] = [
    ("flip, crop, rotate (classical)", "0.79"),
    ("CycleGAN synthetic malignant images", "0.87"),
    ("CycleGAN trained with label smoothing", "0.89"),
];

impl Stage for Evaluate {
    type Params = EvaluateParams;
    const KIND: &'static str = "evaluate";
    const CODE: &'static str = crate::code_identity::EVALUATE;
    const ABOUT: &'static str = "test ROC-AUC (bootstrap CI), PR-AUC, sensitivity @ 90% specificity per arm -> metrics.json, ROC PNG, report";

    fn check(&self, p: &EvaluateParams, inputs: &[String]) -> Result<(), String> {
        if inputs.is_empty() {
            return Err("takes the `train_classifier` stages to compare (and optionally `train_cyclegan` and `fidelity` stages) as `inputs`".into());
        }
        if p.bootstrap_resamples < 100 {
            return Err("`bootstrap_resamples` must be at least 100".into());
        }
        Ok(())
    }

    fn run(&self, p: &EvaluateParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
        Ok(run(p, ctx)?)
    }
}

/// Everything `metrics.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MetricsFile {
    pub title: String,
    pub arms: Vec<ArmSummary>,
    pub paper: Vec<(String, String)>,
    pub notes: Vec<String>,
    /// Every pair of arms, in the order listed (absent before paired tests).
    #[serde(default)]
    pub comparisons: Vec<Comparison>,
    /// The run that wrote this file (absent in older files).
    #[serde(default)]
    pub provenance: Option<Provenance>,
}

/// One test prediction.
struct Prediction {
    seed: u64,
    image: String,
    split: String,
    target: bool,
    score: f64,
}

fn read_predictions(path: &Path) -> Result<Vec<Prediction>> {
    melanoflow_schemas::check_parquet(path, &melanoflow_schemas::PREDICTIONS)?;
    let df = ParquetReader::new(
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
    )
    .finish()?;
    let (seed, image, split, target, score) = (
        df.column("seed")?.i64()?,
        df.column("image_name")?.str()?,
        df.column("split")?.str()?,
        df.column("target")?.i32()?,
        df.column("score")?.f64()?,
    );
    (0..df.height())
        .map(|i| {
            match (
                seed.get(i),
                image.get(i),
                split.get(i),
                target.get(i),
                score.get(i),
            ) {
                (Some(s), Some(im), Some(sp), Some(t), Some(x)) => Ok(Prediction {
                    seed: s as u64,
                    image: im.to_string(),
                    split: sp.to_string(),
                    target: t == 1,
                    score: x,
                }),
                _ => bail!("{}: row {i} has a null", path.display()),
            }
        })
        .collect()
}

/// The classifier stages grouped into arms, in input order: a stage is its
/// own arm, and the stages of one `foreach` (`classical@0`, `classical@1`,
/// ...: cross-validation folds) are one arm named `classical`.
fn group_folds<'a>(stages: &[&'a Upstream]) -> Vec<(String, Vec<&'a Upstream>)> {
    let mut arms: Vec<(String, Vec<&Upstream>)> = Vec::new();
    for &u in stages {
        let arm = melanoflow_pipeline::config::foreach::base_name(&u.name);
        match arms.iter_mut().find(|(name, _)| name == arm) {
            Some((_, folds)) => folds.push(u),
            None => arms.push((arm.to_string(), vec![u])),
        }
    }
    arms
}

/// The predictions of an arm's folds, one list: every fold must train the
/// same seeds, and no image may be tested by two folds.
fn pooled_predictions(
    folds: &[&Upstream],
    trains: &[serde_json::Value],
) -> Result<Vec<Prediction>> {
    let seeds_of = |t: &serde_json::Value| -> Vec<u64> {
        t["seeds"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s["seed"].as_u64()).collect())
            .unwrap_or_default()
    };
    let mut pooled = Vec::new();
    let mut tested_by: std::collections::HashMap<(u64, String), &str> = Default::default();
    for (u, train) in folds.iter().zip(trains) {
        if seeds_of(train) != seeds_of(&trains[0]) {
            bail!(
                "`{}` trained seeds {:?}, `{}` {:?}: the folds of one arm must train the same seeds",
                u.name,
                seeds_of(train),
                folds[0].name,
                seeds_of(&trains[0])
            );
        }
        for p in read_predictions(&u.dir.join("predictions.parquet"))? {
            if p.split == "test"
                && let Some(other) = tested_by.insert((p.seed, p.image.clone()), &u.name)
            {
                bail!(
                    "test image `{}` is in the test split of both `{other}` and `{}`: folds must hold out disjoint patients",
                    p.image,
                    u.name
                );
            }
            pooled.push(p);
        }
    }
    Ok(pooled)
}

/// Validation ROC-AUC per epoch of one seed, from `history.parquet`.
fn read_val_auc(path: &Path, seed: u64) -> Result<Vec<f32>> {
    melanoflow_schemas::check_parquet(path, &melanoflow_schemas::CLASSIFIER_HISTORY)?;
    let df = ParquetReader::new(std::fs::File::open(path)?).finish()?;
    let (s, auc) = (df.column("seed")?.i64()?, df.column("val_auc")?.f64()?);
    Ok((0..df.height())
        .filter(|&i| s.get(i) == Some(seed as i64))
        .filter_map(|i| auc.get(i))
        .map(|v| v as f32)
        .collect())
}

fn describe(train: &serde_json::Value, gans: &[(&Upstream, serde_json::Value)]) -> String {
    let variant = train["variant"].as_str().unwrap_or("?");
    let size = train["image_size"].as_u64().unwrap_or(0);
    let weights = if train["pretrained"].is_null() {
        "from scratch"
    } else {
        "ImageNet weights"
    };
    let base = format!(
        "EfficientNet-{} at {size} px, {weights}",
        variant.to_uppercase()
    );
    let c = &train["epoch_composition"];
    let (b, m) = (
        c["benign"].as_u64().unwrap_or(0),
        c["malignant"].as_u64().unwrap_or(0),
    );
    match train["augmentation"].as_str() {
        Some("classical") => format!(
            "{base}; {m} malignant oversampled by {} rotated/cropped/mirrored copies to {b} benign",
            c["oversampled"]
        ),
        Some("cyclegan") => {
            let digest = train["generator_digest"].as_str().unwrap_or_default();
            let gan = gans.iter().find(|(u, _)| {
                u.manifest
                    .get("G_A.safetensors")
                    .is_some_and(|e| e.digest.to_hex() == digest)
            });
            let smoothing = gan.map_or("?".to_string(), |(u, cfg)| {
                format!(
                    "`{}`, label smoothing {}",
                    u.name,
                    cfg["label_smoothing"].as_str().unwrap_or("?")
                )
            });
            format!(
                "{base}; {m} malignant + {} CycleGAN-synthetic (generator {smoothing}) to {b} benign",
                c["synthetic"]
            )
        }
        _ => format!("{base}; no balancing ({m} malignant, {b} benign)"),
    }
}

fn run(p: &EvaluateParams, ctx: &StageContext) -> Result<StageReport> {
    let arms_up: Vec<&Upstream> = ctx
        .upstream
        .iter()
        .filter(|u| u.kind == "train_classifier")
        .collect();
    if arms_up.is_empty() {
        bail!("no `train_classifier` stage among the inputs");
    }
    let gans: Vec<(&Upstream, serde_json::Value)> = ctx
        .upstream
        .iter()
        .filter(|u| u.kind == "train_cyclegan")
        .map(|u| {
            Ok((
                u,
                serde_json::from_str(&std::fs::read_to_string(u.dir.join("config.json"))?)?,
            ))
        })
        .collect::<Result<_>>()?;

    let arm_folds = group_folds(&arms_up);
    let mut arms = Vec::new();
    let mut roc_series = Vec::new();
    let mut curves: Vec<(String, Vec<f32>)> = Vec::new();
    let mut test_sizes = std::collections::BTreeSet::new();
    let mut arm_scores = Vec::new();
    for (k, (arm, folds)) in arm_folds.iter().enumerate() {
        let up = folds[0];
        let read_train = |u: &Upstream| -> Result<serde_json::Value> {
            Ok(serde_json::from_str(
                &std::fs::read_to_string(u.dir.join("train.json"))
                    .with_context(|| format!("reading {}/train.json", u.name))?,
            )?)
        };
        let fold_trains = folds
            .iter()
            .map(|u| read_train(u))
            .collect::<Result<Vec<_>>>()?;
        // The arm's settings (seeds, model, balancing) are its first fold's.
        let train = &fold_trains[0];
        let preds = pooled_predictions(folds, &fold_trains)?;
        let mut seeds = Vec::new();
        let mut seed_predictions = Vec::new();
        let mut first_curve = 0;
        for s in train["seeds"]
            .as_array()
            .context("train.json lacks `seeds`")?
        {
            let seed = s["seed"].as_u64().context("seed")?;
            let test: Vec<&Prediction> = preds
                .iter()
                .filter(|x| x.seed == seed && x.split == "test")
                .collect();
            let (scores, labels): (Vec<f64>, Vec<bool>) =
                test.iter().map(|x| (x.score, x.target)).unzip();
            seed_predictions.push((
                seed,
                test.iter()
                    .map(|x| (x.image.clone(), x.target, x.score))
                    .collect(),
            ));
            let err = |what: &str, e: metrics::MetricError| {
                anyhow!("arm `{arm}` seed {seed}: {what}: {e}")
            };
            let auc = roc_auc(&scores, &labels).map_err(|e| err("test ROC-AUC", e))?;
            let curve = roc_curve(&scores, &labels).map_err(|e| err("ROC curve", e))?;
            // The first seed's curve carries the legend; its label is filled in below.
            roc_series.push(plot::RocSeries {
                label: String::new(),
                points: curve,
                color_index: k,
            });
            if seeds.is_empty() {
                first_curve = roc_series.len() - 1;
            }
            if seeds.is_empty() {
                curves.push((
                    format!("{} val ROC-AUC", up.name),
                    read_val_auc(&up.dir.join("history.parquet"), seed)?,
                ));
            }
            // Pooled over folds, the checkpoint statistics are the folds' means.
            let fold_seed = |key: &str| -> f64 {
                let values: Vec<f64> = fold_trains
                    .iter()
                    .filter_map(|t| {
                        t["seeds"]
                            .as_array()?
                            .iter()
                            .find(|x| x["seed"].as_u64() == Some(seed))?[key]
                            .as_f64()
                    })
                    .collect();
                metrics::mean_std(&values).0
            };
            test_sizes.insert((labels.len(), labels.iter().filter(|&&l| l).count()));
            seeds.push(SeedMetrics {
                seed,
                auc,
                auc_ci: bootstrap_auc_ci(&scores, &labels, p.bootstrap_resamples, 0.95, p.seed)
                    .map_err(|e| err("bootstrap", e))?,
                average_precision: average_precision(&scores, &labels)
                    .map_err(|e| err("PR-AUC", e))?,
                sensitivity_at_90_specificity: sensitivity_at_specificity(&scores, &labels, 0.9)
                    .map_err(|e| err("sensitivity", e))?,
                n_test: labels.len(),
                n_test_malignant: labels.iter().filter(|&&l| l).count(),
                best_epoch: fold_seed("best_epoch").round() as usize,
                val_auc: fold_seed("best_val_auc"),
            });
        }
        let aucs: Vec<f64> = seeds.iter().map(|s| s.auc).collect();
        roc_series[first_curve].label = match aucs.len() {
            1 => format!("{arm} (AUC {:.3})", aucs[0]),
            n => format!("{arm} (AUC {:.3}, mean of {n})", metrics::mean_std(&aucs).0),
        };
        let mut description = describe(train, &gans);
        if folds.len() > 1 {
            description += &format!(
                "; out-of-fold predictions pooled over {} folds (best epoch and validation AUC: fold means)",
                folds.len()
            );
        }
        arms.push(ArmSummary {
            arm: arm.clone(),
            description,
            seeds,
        });
        arm_scores.push(ArmScores::new(arm, seed_predictions)?);
    }
    if test_sizes.len() > 1 {
        bail!(
            "the arms were tested on different test sets (images, malignant): {test_sizes:?}; they must share one preprocess stage"
        );
    }
    let comparisons = compare::compare_arms(&arm_scores, p.bootstrap_resamples, p.seed)?;

    let out = &ctx.out_dir;
    scores::write(&out.join(scores::FILE), &arm_scores)?;
    plot::roc_png(&out.join("roc.png"), &roc_series)?;
    plot::loss_curves_png(
        &out.join("training.png"),
        &curves,
        "Validation ROC-AUC per epoch",
        "Epoch",
    )?;
    let mut images: Vec<(String, String)> = vec![
        (
            "ROC curves on the test split (thin: further seeds)".into(),
            "roc.png".into(),
        ),
        (
            "Classifier validation ROC-AUC per epoch (first seed of each arm)".into(),
            "training.png".into(),
        ),
    ];
    let mut gan_curves = Vec::new();
    for (u, _) in &gans {
        let grid = format!("cyclegan_samples_{}.png", u.name);
        std::fs::copy(u.dir.join("samples.png"), out.join(&grid))
            .with_context(|| format!("copying {}'s samples.png", u.name))?;
        images.push((
            format!(
                "`{}`: benign inputs, their malignant translations, reconstructions",
                u.name
            ),
            grid,
        ));
        gan_curves.extend(cyclegan_curves(&u.dir.join("losses.parquet"), &u.name)?);
    }
    if !gan_curves.is_empty() {
        plot::loss_curves_png(
            &out.join("cyclegan_losses.png"),
            &gan_curves,
            "CycleGAN losses (mean per epoch)",
            "Epoch",
        )?;
        images.push((
            "CycleGAN generator and discriminator losses (epoch means)".into(),
            "cyclegan_losses.png".into(),
        ));
    }

    let (n_test, n_mal) = test_sizes.into_iter().next().unwrap_or_default();
    let n_folds = arm_folds.iter().map(|(_, f)| f.len()).max().unwrap_or(1);
    let test_split = if n_folds > 1 {
        format!(
            "Cross-validation over {n_folds} folds of patients: each of the {n_test} images ({n_mal} malignant) \
             is scored once, by the model of the fold that held its patient out of training and validation; \
             the AUCs are of these pooled out-of-fold scores."
        )
    } else {
        format!(
            "Test split: {n_test} images, {n_mal} malignant, from patients never seen in training or validation."
        )
    };
    let notes = vec![
        format!(
            "{test_split} With {n_mal} positives the 95% intervals are wide: whether two arms differ is what the paired \
             comparisons test (on the same images), not whether their intervals overlap."
        ),
        "Each arm's checkpoint is the epoch with the best validation ROC-AUC (the original kept the worst).".into(),
        "Synthetic images come only from benign training images and stay in the training split.".into(),
    ];
    let paper: Vec<(&str, &str)> = if p.show_paper { PAPER.to_vec() } else { vec![] };
    let provenance = Provenance {
        stage: ctx.stage.clone(),
        fingerprint: ctx.fingerprint.to_hex(),
        melanoflow: MELANOFLOW_VERSION.into(),
    };
    let whole = report::Report {
        title: &p.title,
        arms: &arms,
        comparisons: &comparisons,
        paper: &paper,
        paper_citation: PAPER_CITATION,
        notes: &notes,
        provenance: &provenance,
    };
    let captions: Vec<(&str, &str)> = images
        .iter()
        .map(|(c, f)| (c.as_str(), f.as_str()))
        .collect();
    let fidelity = fidelity_sections(ctx)?;
    std::fs::write(
        out.join("report.md"),
        before(
            report::report_markdown(&whole, &captions),
            "\n## Reproducing this report",
            &fidelity.0,
        ),
    )?;
    let pngs: Vec<(String, Vec<u8>)> = images
        .iter()
        .map(|(c, f)| Ok((c.clone(), std::fs::read(out.join(f))?)))
        .collect::<Result<_>>()?;
    let embedded: Vec<(&str, &[u8])> = pngs
        .iter()
        .map(|(c, b)| (c.as_str(), b.as_slice()))
        .collect();
    std::fs::write(
        out.join("report.html"),
        before(
            report::report_html(&whole, &embedded),
            "<h2>Reproducing this report</h2>",
            &fidelity.1,
        ),
    )?;
    let file = MetricsFile {
        title: p.title.clone(),
        arms: arms.clone(),
        paper: paper
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        notes,
        comparisons: comparisons.clone(),
        provenance: Some(provenance),
    };
    std::fs::write(
        out.join("metrics.json"),
        serde_json::to_string_pretty(&file)? + "\n",
    )?;

    let best = arms
        .iter()
        .map(|a| {
            (
                a,
                metrics::mean_std(&a.seeds.iter().map(|s| s.auc).collect::<Vec<_>>()).0,
            )
        })
        .max_by(|x, y| x.1.total_cmp(&y.1))
        .map(|(a, auc)| format!("best `{}` {auc:.3}", a.arm))
        .unwrap_or_default();
    Ok(StageReport::new(format!(
        "{} arm(s) on {n_test} test images ({n_mal} malignant): {best}; {} paired comparison(s); report.html",
        arms.len(),
        comparisons.len()
    )))
}

/// The report sections (Markdown, HTML) of the `fidelity` upstreams: their
/// own `fidelity.md` and `fidelity.html`, read as text so that this stage
/// does not depend on the fidelity code.
fn fidelity_sections(ctx: &StageContext) -> Result<(String, String)> {
    let (mut md, mut html) = (String::new(), String::new());
    for u in ctx.upstream.iter().filter(|u| u.kind == "fidelity") {
        let read = |f: &str| {
            std::fs::read_to_string(u.dir.join(f))
                .with_context(|| format!("reading `{}`'s {f}", u.name))
        };
        md.push_str(&format!(
            "\n## How good are the synthetic images? (`{}`)\n\n{}",
            u.name,
            read("fidelity.md")?
        ));
        html.push_str(&format!(
            "<h2>How good are the synthetic images? ({})</h2>\n{}",
            u.name,
            read("fidelity.html")?
        ));
    }
    Ok((md, html))
}

/// `text` with `insert` placed before the first `marker` (at the end without one).
fn before(mut text: String, marker: &str, insert: &str) -> String {
    let at = text.find(marker).unwrap_or(text.len());
    text.insert_str(at, insert);
    text
}

/// Per-epoch means of the CycleGAN's generator and discriminator losses.
fn cyclegan_curves(path: &Path, name: &str) -> Result<Vec<(String, Vec<f32>)>> {
    melanoflow_schemas::check_parquet(path, &melanoflow_schemas::CYCLEGAN_LOSSES)?;
    let df = ParquetReader::new(std::fs::File::open(path)?).finish()?;
    let epoch = df.column("epoch")?.i64()?;
    let mut out = Vec::new();
    for (col, label) in [("loss_g", "G"), ("loss_d_a", "D_A"), ("loss_d_b", "D_B")] {
        let v = df.column(col)?.f32()?;
        let mut sums: Vec<(f32, u32)> = Vec::new();
        for i in 0..df.height() {
            let (Some(e), Some(x)) = (epoch.get(i), v.get(i)) else {
                continue;
            };
            let e = e as usize;
            if sums.len() <= e {
                sums.resize(e + 1, (0.0, 0));
            }
            sums[e].0 += x;
            sums[e].1 += 1;
        }
        out.push((
            format!("{name} {label}"),
            sums.iter().map(|(s, n)| s / (*n).max(1) as f32).collect(),
        ));
    }
    Ok(out)
}

/// `melanoflow metrics`: the comparison table of the pipeline's `evaluate`
/// stages, from their last committed `metrics.json`.
pub fn metrics_command(
    inv: &melanoflow_pipeline::cli::AppInvocation,
) -> Result<std::process::ExitCode, BoxError> {
    let pipeline = inv.pipeline()?;
    let stages: Vec<_> = pipeline
        .stages
        .iter()
        .filter(|s| s.kind == "evaluate")
        .collect();
    if stages.is_empty() {
        return Err(format!("{} has no `evaluate` stage", pipeline.file.display()).into());
    }
    for s in stages {
        let path = pipeline.out_dir.join(&s.name).join("metrics.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "{}: {e}; run `melanoflow run {}` first",
                path.display(),
                s.name
            )
        })?;
        let m: MetricsFile =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("{} (stage `{}`)\n", m.title, s.name);
        print!("{}", report::table_terminal(&m.arms));
        if !m.comparisons.is_empty() {
            println!("\nPaired comparisons:\n");
            print!("{}", report::comparisons_terminal(&m.comparisons));
        }
        if !m.paper.is_empty() {
            println!("\nReported in the paper (test ROC-AUC):");
            for (label, auc) in &m.paper {
                println!("  {label:<40} {auc}");
            }
        }
        for n in &m.notes {
            println!("\n{n}");
        }
        println!(
            "\nreport: {}",
            pipeline.out_dir.join(&s.name).join("report.html").display()
        );
        if let Some(p) = &m.provenance {
            println!(
                "stage `{}` fingerprint {} (melanoflow {})",
                p.stage, p.fingerprint, p.melanoflow
            );
        }
    }
    // Printed here, never written into a stage's output: neither is covered
    // by any fingerprint.
    let lock = pipeline.lock_path();
    match melanoflow_pipeline::Digest::of_file(&lock) {
        Ok(d) => println!("lock file {} BLAKE3 {}", lock.display(), d.to_hex()),
        Err(e) => println!("lock file {}: {e}", lock.display()),
    }
    println!(
        "git revision {}",
        melanoflow_pipeline::experiments::git_revision(&pipeline.base_dir)
            .unwrap_or_else(|| "unknown (not a git checkout)".into())
    );
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_literal_follows_cargo() {
        assert_eq!(
            MELANOFLOW_VERSION,
            env!("CARGO_PKG_VERSION"),
            "update MELANOFLOW_VERSION in stages/evaluate/mod.rs (it is what the report prints)"
        );
    }

    #[test]
    fn old_metrics_files_still_read() {
        // A metrics.json from before paired comparisons and provenance.
        let old = r#"{"title": "t", "arms": [], "paper": [["a", "0.79"]], "notes": ["n"]}"#;
        let m: MetricsFile = serde_json::from_str(old).unwrap();
        assert!(m.comparisons.is_empty() && m.provenance.is_none());
        assert_eq!(m.paper, [("a".to_string(), "0.79".to_string())]);
    }
}
