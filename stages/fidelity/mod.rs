//! Stage `fidelity`: how good are the synthetic images? Each `generate`
//! stage's images are measured against the real malignant training images on
//! the features of an ImageNet-pretrained EfficientNet (Lite0 by default).
//!
//! Upstreams: one `preprocess` stage and one or more `generate` stages (rows
//! in the order listed). `weights` (required) is the pretrained safetensors
//! file `make weights` writes; its digest is part of the fingerprint.
//!
//! Sets, in this order: the real malignant training images (the reference),
//! each generator's synthetic images, and the real benign training images
//! (the generators' sources: how far translation moved them, and the scale
//! the synthetic rows read against). A set larger than `max_images` is a
//! seeded sample of that many (names sorted, then shuffled), so every row is
//! measured on a comparable number of images.
//!
//! Per row against the reference: the Fréchet distance (on these features:
//! NOT comparable with published Inception-v3 FIDs), KID (mean and std over
//! seeded subsets), k-NN precision and recall, and the classifier two-sample
//! test's cross-validated ROC-AUC (0.5 = indistinguishable); see `measures`
//! and `probe` for the definitions.
//!
//! Outputs: `fidelity.json` (every number, per row), `fidelity.md` (the
//! table) and `fidelity.html` (the same as an HTML fragment, which
//! `evaluate` puts in its report). Same inputs, parameters and seed, same
//! bytes.

pub mod features;
pub mod linalg;
pub mod measures;
pub mod probe;

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use melanoflow_pipeline::{
    BoxError, ExternalInput, Resources, Stage, StageContext, StageReport, Upstream,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::imageset::{ImageRecord, ImageSet};
use crate::models::efficientnet::Variant;
use crate::train_cyclegan::{check_device_spec, select_device};
use features::Extractor;
use linalg::Mat;
use measures::{Frechet, Kernels, Kid, PrecisionRecall, Products};
use probe::{ProbeConfig, TwoSample};

pub struct Fidelity;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FidelityParams {
    /// Pretrained weights (safetensors, torchvision names): required.
    #[serde(default)]
    pub weights: Option<String>,
    #[serde(default = "defaults::variant")]
    pub variant: Variant,
    /// Input side in pixels; unset = the preprocessed size (resampled
    /// bilinearly when it differs, as the classifier does).
    #[serde(default)]
    pub image_size: Option<usize>,
    /// Images per forward pass.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// At most this many images per set (a seeded sample beyond it).
    #[serde(default = "defaults::max_images")]
    pub max_images: usize,
    #[serde(default = "defaults::kid_subsets")]
    pub kid_subsets: usize,
    /// Images per KID subset, capped by the smaller set.
    #[serde(default = "defaults::kid_subset_size")]
    pub kid_subset_size: usize,
    /// Neighbours for precision and recall (Kynkäänniemi et al. 2019: 3).
    #[serde(default = "defaults::k")]
    pub k: usize,
    /// Cross-validation folds of the two-sample test's probe.
    #[serde(default = "defaults::probe_folds")]
    pub probe_folds: usize,
    /// The probe's L2 penalty λ (loss: class-balanced mean log-loss + λ/2 |w|²).
    #[serde(default = "defaults::probe_l2")]
    pub probe_l2: f64,
    /// Seeds the samples, the KID subsets and the folds.
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "defaults::device")]
    pub device: String,
}

mod defaults {
    use super::Variant;
    pub fn variant() -> Variant {
        Variant::Lite0
    }
    pub fn batch_size() -> usize {
        64
    }
    pub fn max_images() -> usize {
        1000
    }
    pub fn kid_subsets() -> usize {
        100
    }
    pub fn kid_subset_size() -> usize {
        1000
    }
    pub fn k() -> usize {
        3
    }
    pub fn probe_folds() -> usize {
        5
    }
    pub fn probe_l2() -> f64 {
        1e-2
    }
    pub fn device() -> String {
        "auto".into()
    }
}

/// What the output says the distances are computed on.
const FEATURE_NOTE: &str = "Fréchet distance and KID on EfficientNet ImageNet features (global-average-pooled, last convolution), NOT Inception-v3: not comparable with published FIDs; compare rows with each other";

impl Stage for Fidelity {
    type Params = FidelityParams;
    const KIND: &'static str = "fidelity";
    const CODE: &'static str = crate::code_identity::FIDELITY;
    const ABOUT: &'static str = "synthetic vs real malignant images on EfficientNet features: Fréchet distance, KID, precision/recall, classifier two-sample ROC-AUC -> fidelity.json, fidelity.md";

    fn check(&self, p: &FidelityParams, inputs: &[String]) -> Result<(), String> {
        if inputs.len() < 2 {
            return Err(
                "takes a `preprocess` stage and one or more `generate` stages as `inputs`".into(),
            );
        }
        match p.weights.as_deref() {
            None => {
                return Err("`weights` is required: the ImageNet EfficientNet-Lite0 safetensors file that `make weights` writes to data/weights/efficientnet_lite0.safetensors (in a pipeline file in data/: weights = \"weights/efficientnet_lite0.safetensors\")".into());
            }
            Some(w) if w.contains("://") => {
                return Err("`weights` must be a local safetensors file".into());
            }
            Some(_) => {}
        }
        if p.image_size.is_some_and(|s| s < 32) {
            return Err("`image_size` must be at least 32 (EfficientNet downsamples 32x)".into());
        }
        if p.batch_size == 0 {
            return Err("`batch_size` must be at least 1".into());
        }
        if p.k == 0 || p.max_images <= p.k || p.max_images < p.probe_folds {
            return Err(format!(
                "`k` must be at least 1 and `max_images` ({}) above `k` ({}) and `probe_folds` ({})",
                p.max_images, p.k, p.probe_folds
            ));
        }
        if p.kid_subsets == 0 || p.kid_subset_size < 2 {
            return Err("`kid_subsets` must be at least 1 and `kid_subset_size` at least 2".into());
        }
        if p.probe_folds < 2 || !p.probe_l2.is_finite() || p.probe_l2 <= 0.0 {
            return Err("`probe_folds` must be at least 2 and `probe_l2` positive".into());
        }
        check_device_spec(&p.device)
    }

    fn external_inputs(&self, p: &FidelityParams, base_dir: &Path) -> Vec<ExternalInput> {
        p.weights
            .iter()
            .map(|w| ExternalInput::new("weights", w, base_dir))
            .collect()
    }

    /// A cluster run asks for one GPU when the device is CUDA.
    fn resources(&self, p: &FidelityParams) -> Resources {
        Resources {
            gpus: p.device.starts_with("cuda").then_some(1),
            ..Resources::default()
        }
    }

    fn run(&self, p: &FidelityParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
        Ok(run(p, ctx)?)
    }
}

/// One set measured against the reference.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The `generate` stage's name, or `real benign` for the reference row.
    pub name: String,
    /// `synthetic` or `real_benign`.
    pub kind: &'static str,
    /// Images measured (at most `max_images`) and available.
    pub images: usize,
    pub available: usize,
    pub frechet: Frechet,
    pub kid: Kid,
    pub precision_recall: PrecisionRecall,
    pub two_sample: TwoSample,
}

/// Everything `fidelity.json` holds.
#[derive(Clone, Debug, Serialize)]
pub struct FidelityFile {
    pub note: &'static str,
    pub network: String,
    pub weights_digest: String,
    pub feature_dims: usize,
    pub image_size: usize,
    /// The reference set: real malignant training images.
    pub reference_images: usize,
    pub reference_available: usize,
    pub params: FidelityParams,
    pub rows: Vec<Row>,
}

/// A stable 64-bit hash of a set's label: its random stream, so adding a
/// generator leaves the other sets' samples alone.
fn stream_of(label: &str) -> u64 {
    label.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// At most `max` of `records`: all of them, or a seeded sample, in name order.
fn sample<'a>(
    mut records: Vec<&'a ImageRecord>,
    max: usize,
    seed: u64,
    label: &str,
) -> Vec<&'a ImageRecord> {
    records.sort_by(|a, b| a.image_name.cmp(&b.image_name));
    if records.len() > max {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream_of(label));
        records.shuffle(&mut rng);
        records.truncate(max);
        records.sort_by(|a, b| a.image_name.cmp(&b.image_name));
    }
    records
}

/// One set to measure: where its images are and which.
struct Set<'a> {
    name: String,
    kind: &'static str,
    images: &'a ImageSet,
    records: Vec<&'a ImageRecord>,
    available: usize,
}

fn local_weights(ctx: &StageContext) -> Result<(std::path::PathBuf, String)> {
    let w = ctx
        .external("weights")
        .ok_or_else(|| anyhow!("`weights` is required (run `make weights`)"))?;
    let path = match &w.source {
        melanoflow_pipeline::Source::Local(path) => path.clone(),
        other => bail!("`weights` must be a local file, not {other}"),
    };
    let digest = w
        .manifest
        .entries()
        .first()
        .map(|e| e.digest.to_hex())
        .context("`weights` has no file")?;
    Ok((path, digest))
}

fn run(p: &FidelityParams, ctx: &StageContext) -> Result<StageReport> {
    let device = select_device(&p.device)?;
    let pre = ctx
        .upstream_of_kind("preprocess")
        .ok_or_else(|| anyhow!("exactly one upstream must be a `preprocess` stage"))?;
    let generators: Vec<&Upstream> = ctx
        .upstream
        .iter()
        .filter(|u| u.kind == "generate")
        .collect();
    if generators.is_empty() {
        bail!("no `generate` stage among the inputs");
    }
    if let Some(u) = ctx
        .upstream
        .iter()
        .find(|u| u.kind != "generate" && u.kind != "preprocess")
    {
        bail!(
            "input `{}` is a `{}` stage: only `preprocess` and `generate` stages are measured",
            u.name,
            u.kind
        );
    }
    let real = ImageSet::open(&pre.dir)?;
    let synthetic: Vec<(String, ImageSet)> = generators
        .iter()
        .map(|u| Ok((u.name.clone(), ImageSet::open(&u.dir)?)))
        .collect::<Result<_>>()?;
    for (name, s) in &synthetic {
        if s.size != real.size {
            bail!(
                "`{name}`'s images are {} px but `{}`'s {} px",
                s.size,
                pre.name,
                real.size
            );
        }
    }

    let train_of = |malignant: bool| -> Vec<&ImageRecord> {
        real.split("train")
            .filter(|r| r.malignant == malignant)
            .collect()
    };
    let mut sets: Vec<Set> = Vec::new();
    let reference = train_of(true);
    sets.push(Set {
        name: "real malignant".into(),
        kind: "real_malignant",
        images: &real,
        available: reference.len(),
        records: sample(reference, p.max_images, p.seed, "real malignant"),
    });
    for (name, s) in &synthetic {
        let records: Vec<&ImageRecord> = s.records.iter().collect();
        sets.push(Set {
            name: name.clone(),
            kind: "synthetic",
            images: s,
            available: records.len(),
            records: sample(records, p.max_images, p.seed, &format!("generate {name}")),
        });
    }
    let benign = train_of(false);
    sets.push(Set {
        name: "real benign".into(),
        kind: "real_benign",
        images: &real,
        available: benign.len(),
        records: sample(benign, p.max_images, p.seed, "real benign"),
    });
    for s in &sets {
        if s.records.len() <= p.k.max(p.probe_folds).max(1) {
            bail!(
                "{} `{}` images in the training split: the measures need more than {} (k = {}, {} folds)",
                s.records.len(),
                s.name,
                p.k.max(p.probe_folds),
                p.k,
                p.probe_folds
            );
        }
    }

    let (weights_path, weights_digest) = local_weights(ctx)?;
    let tensors = candle_core::safetensors::load(&weights_path, &device)
        .with_context(|| format!("reading weights {}", weights_path.display()))?;
    let side = p.image_size.unwrap_or(real.size as usize);
    let extractor = Extractor::new(p.variant, &tensors, side, p.batch_size, &device)
        .with_context(|| format!("{} as {:?}", weights_path.display(), p.variant))?;
    drop(tensors);

    let total: u64 = sets.iter().map(|s| s.records.len() as u64).sum();
    let bar = ctx.progress.bar(total, "image features");
    let feats: Vec<Mat> = sets
        .iter()
        .map(|s| {
            extractor
                .features(s.images, &s.records, &|n| bar.inc(n))
                .with_context(|| format!("features of the {} images", s.name))
        })
        .collect::<Result<_>>()?;
    bar.finish_and_clear();

    let reference_feats = &feats[0];
    let xx = Products::new(reference_feats, reference_feats);
    let probe = ProbeConfig {
        folds: p.probe_folds,
        l2: p.probe_l2,
        seed: p.seed,
        max_iterations: 1000,
    };
    let mut rows = Vec::new();
    for (s, f) in sets.iter().zip(&feats).skip(1) {
        let what = || format!("measuring `{}` against the real malignant images", s.name);
        let frechet = measures::frechet_distance(reference_feats, f).with_context(what)?;
        let (yy, xy) = (Products::new(f, f), Products::new(reference_feats, f));
        let kernels = Kernels::new(&xx, &yy, &xy, f.cols);
        let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
        rng.set_stream(stream_of(&format!("kid {}", s.name)));
        let kid = measures::kid(
            &kernels,
            reference_feats.rows,
            f.rows,
            p.kid_subsets,
            p.kid_subset_size,
            &mut rng,
        )
        .with_context(what)?;
        let precision_recall = measures::precision_recall(&xx, &yy, &xy, p.k).with_context(what)?;
        let two_sample = probe::two_sample_test(reference_feats, f, &probe).with_context(what)?;
        rows.push(Row {
            name: s.name.clone(),
            kind: s.kind,
            images: s.records.len(),
            available: s.available,
            frechet,
            kid,
            precision_recall,
            two_sample,
        });
    }
    let file = FidelityFile {
        note: FEATURE_NOTE,
        network: format!("EfficientNet-{:?}", p.variant),
        weights_digest,
        feature_dims: extractor.dims,
        image_size: side,
        reference_images: sets[0].records.len(),
        reference_available: sets[0].available,
        params: p.clone(),
        rows,
    };
    check_finite(&file)?;
    std::fs::write(
        ctx.out_dir.join("fidelity.json"),
        serde_json::to_string_pretty(&file)? + "\n",
    )?;
    std::fs::write(ctx.out_dir.join("fidelity.md"), markdown(&file))?;
    std::fs::write(ctx.out_dir.join("fidelity.html"), html(&file))?;
    let summary: Vec<String> = file
        .rows
        .iter()
        .map(|r| {
            format!(
                "{}: FD {:.2}, probe AUC {:.3}",
                r.name, r.frechet.distance, r.two_sample.auc
            )
        })
        .collect();
    Ok(StageReport::new(format!(
        "{} real malignant images vs {}",
        file.reference_images,
        summary.join("; ")
    )))
}

/// Every number of every row is finite (serde_json would write NaN as null).
fn check_finite(f: &FidelityFile) -> Result<()> {
    for r in &f.rows {
        let numbers = [
            ("Fréchet distance", r.frechet.distance),
            ("KID", r.kid.mean),
            ("KID std", r.kid.std),
            ("precision", r.precision_recall.precision),
            ("recall", r.precision_recall.recall),
            ("two-sample ROC-AUC", r.two_sample.auc),
        ];
        if let Some((what, v)) = numbers.iter().find(|(_, v)| !v.is_finite()) {
            bail!("`{}`: {what} is {v}", r.name);
        }
    }
    Ok(())
}

/// The cells of one row: set, images, FD, KID x 1000, precision, recall, AUC.
fn cells(r: &Row) -> [String; 7] {
    [
        match r.kind {
            "real_benign" => format!("{} (reference: the generators' sources)", r.name),
            _ => format!("`{}`", r.name),
        },
        r.images.to_string(),
        format!("{:.2}", r.frechet.distance),
        format!("{:.2} ± {:.2}", 1000.0 * r.kid.mean, 1000.0 * r.kid.std),
        format!("{:.3}", r.precision_recall.precision),
        format!("{:.3}", r.precision_recall.recall),
        format!("{:.3} ± {:.3}", r.two_sample.auc, r.two_sample.auc_std),
    ]
}

const HEADER: [&str; 7] = [
    "set",
    "images",
    "FD",
    "KID x 1000",
    "precision",
    "recall",
    "two-sample ROC-AUC",
];

fn caption(f: &FidelityFile) -> String {
    format!(
        "Synthetic vs real malignant training images ({} of {} real; {}, {} px, {} features).",
        f.reference_images, f.reference_available, f.network, f.image_size, f.feature_dims
    )
}

fn explanation(f: &FidelityFile) -> String {
    format!(
        "{FEATURE_NOTE}. Lower FD and KID = closer to the real malignant images. \
         KID: unbiased MMD² with the kernel (x·y/d + 1)³, mean ± std over {} subsets of min({}, the two sets' sizes) images. \
         Precision (synthetic inside the real images' manifold) and recall (real inside the synthetic ones'): k = {}. \
         Two-sample ROC-AUC: a logistic-regression probe telling synthetic from real, {}-fold cross-validated \
         (mean ± std over folds); 0.5 = indistinguishable, 1 = always told apart.",
        f.params.kid_subsets, f.params.kid_subset_size, f.params.k, f.params.probe_folds,
    )
}

/// The table in Markdown: one row per set.
pub fn markdown(f: &FidelityFile) -> String {
    let mut s = format!("{}\n\n| {} |\n", caption(f), HEADER.join(" | "));
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
    for r in &f.rows {
        let _ = writeln!(s, "| {} |", cells(r).join(" | "));
    }
    let _ = writeln!(s, "\n{}", explanation(f));
    s
}

/// The same as an HTML fragment (a table and a paragraph), text escaped.
pub fn html(f: &FidelityFile) -> String {
    let esc = |t: &str| {
        t.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let mut s = format!(
        "<table>\n<caption>{}</caption>\n<thead><tr>",
        esc(&caption(f))
    );
    for (i, h) in HEADER.iter().enumerate() {
        let class = if i > 0 { " class=\"num\"" } else { "" };
        let _ = write!(s, "<th{class}>{}</th>", esc(h));
    }
    s.push_str("</tr></thead>\n<tbody>\n");
    for r in &f.rows {
        s.push_str("<tr>");
        for (i, c) in cells(r).iter().enumerate() {
            let class = if i > 0 { " class=\"num\"" } else { "" };
            let _ = write!(s, "<td{class}>{}</td>", esc(c));
        }
        s.push_str("</tr>\n");
    }
    let _ = writeln!(s, "</tbody>\n</table>\n<p>{}</p>", esc(&explanation(f)));
    s
}
