//! Stage `synth`: the default data source. Writes a deterministic synthetic
//! dataset in ISIC 2020 (Kaggle) format: `train.csv` with the real columns and
//! one JPEG per row under `train/`.
//!
//! Promises: the same parameters give the same bytes on any thread count
//! (each image draws from its own ChaCha stream, indexed by its row); several
//! images per patient with a skewed count per patient like ISIC's; malignant
//! images concentrated in a minority of patients; metadata distributions
//! (sex, age, site, diagnosis, blanks) shaped like ISIC 2020's; lesions drawn
//! by [`render`] so the classes differ by the ABCD rule, with overlap.

pub mod render;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use melanoflow_pipeline::{BoxError, Stage, StageContext, StageReport};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub struct Synth;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthParams {
    /// Number of images (rows).
    #[serde(default = "defaults::count")]
    pub count: u32,
    /// Share of malignant images (ISIC 2020: 584 / 33,126 = 1.76%).
    #[serde(default = "defaults::malignant_fraction")]
    pub malignant_fraction: f64,
    /// Width and height of each JPEG, in pixels.
    #[serde(default = "defaults::image_size")]
    pub image_size: u32,
    /// Number of patients (ISIC 2020: 2,056, about 16 images each).
    #[serde(default = "defaults::patients")]
    pub patients: u32,
    /// How far malignant lesions sit from benign ones on the latent severity that drives
    /// every ABCD feature, in standard deviations: it sets the task's difficulty, since no
    /// classifier can beat the Bayes ROC-AUC `Φ(shift / √2)` (1.9: 0.91; 2.3: 0.95, about
    /// the winning score of the ISIC 2020 challenge).
    #[serde(default = "defaults::severity_shift")]
    pub severity_shift: f64,
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    #[serde(default = "defaults::jpeg_quality")]
    pub jpeg_quality: u8,
}

mod defaults {
    pub fn count() -> u32 {
        4000
    }
    pub fn malignant_fraction() -> f64 {
        0.018
    }
    pub fn image_size() -> u32 {
        128
    }
    pub fn patients() -> u32 {
        250
    }
    pub fn severity_shift() -> f64 {
        super::render::DEFAULT_SEVERITY_SHIFT
    }
    pub fn seed() -> u64 {
        2020
    }
    pub fn jpeg_quality() -> u8 {
        90
    }
}

/// The columns of ISIC 2020's `train.csv`, in its order.
pub const CSV_HEADER: &str = "image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target";

impl Stage for Synth {
    type Params = SynthParams;
    const KIND: &'static str = "synth";
    const CODE: &'static str = crate::code_identity::SYNTH;
    const ABOUT: &'static str =
        "synthetic ISIC-format dataset (train.csv + JPEGs), the default source";

    fn check(&self, p: &SynthParams, inputs: &[String]) -> Result<(), String> {
        if !inputs.is_empty() {
            return Err("a `synth` stage is a source: it takes no `inputs`".into());
        }
        if p.count == 0 {
            return Err("`count` must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&p.malignant_fraction) {
            return Err(format!(
                "`malignant_fraction` must be within 0..1, not {}",
                p.malignant_fraction
            ));
        }
        if !(32..=1024).contains(&p.image_size) {
            return Err(format!(
                "`image_size` must be within 32..=1024 pixels, not {}",
                p.image_size
            ));
        }
        if p.patients == 0 || p.patients > p.count {
            return Err(format!(
                "`patients` must be within 1..=count ({}), not {}",
                p.count, p.patients
            ));
        }
        if !(0.0..=8.0).contains(&p.severity_shift) {
            return Err(format!(
                "`severity_shift` must be within 0..=8 standard deviations, not {}",
                p.severity_shift
            ));
        }
        if !(1..=100).contains(&p.jpeg_quality) {
            return Err(format!(
                "`jpeg_quality` must be within 1..=100, not {}",
                p.jpeg_quality
            ));
        }
        Ok(())
    }

    fn run(&self, p: &SynthParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
        let rows = plan_rows(p);
        let images_dir = ctx.out_dir.join("train");
        std::fs::create_dir_all(&images_dir).with_context(|| images_dir.display().to_string())?;
        let bar = ctx.progress.bar(rows.len() as u64, "rendering lesions");
        rows.par_iter()
            .enumerate()
            .try_for_each(|(i, row)| -> Result<()> {
                // One ChaCha stream per row: the image does not depend on which thread draws it.
                let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
                rng.set_stream(1 + i as u64);
                let severity = render::severity_mean(row.target == 1, p.severity_shift);
                let img = render::render_lesion(&row.appearance, severity, p.image_size, &mut rng);
                write_jpeg(
                    &images_dir.join(format!("{}.jpg", row.image_name)),
                    &img,
                    p.jpeg_quality,
                )?;
                bar.inc(1);
                Ok(())
            })?;
        bar.finish_and_clear();
        let csv_path = ctx.out_dir.join("train.csv");
        std::fs::write(&csv_path, to_csv(&rows)).with_context(|| csv_path.display().to_string())?;
        let malignant = rows.iter().filter(|r| r.target == 1).count();
        Ok(StageReport::new(format!(
            "{} images ({} malignant) of {} patients at {} px",
            rows.len(),
            malignant,
            p.patients,
            p.image_size
        )))
    }
}

/// One row of the synthetic `train.csv`, plus how to draw its image.
pub struct Row {
    pub image_name: String,
    pub patient_id: String,
    pub sex: Option<&'static str>,
    pub age_approx: Option<u32>,
    pub site: Option<&'static str>,
    pub diagnosis: &'static str,
    pub target: u8,
    appearance: render::Patient,
}

/// ISIC 2020's anatomical sites with their approximate shares.
const SITES: &[(&str, f64)] = &[
    ("torso", 0.509),
    ("lower extremity", 0.254),
    ("upper extremity", 0.151),
    ("head/neck", 0.056),
    ("palms/soles", 0.011),
    ("oral/genital", 0.004),
];
/// ISIC 2020's benign diagnoses with their approximate shares.
const BENIGN_DIAGNOSES: &[(&str, f64)] = &[
    ("unknown", 0.823),
    ("nevus", 0.161),
    ("seborrheic keratosis", 0.006),
    ("lentigo NOS", 0.002),
    ("lichenoid keratosis", 0.001),
    ("solar lentigo", 0.001),
    ("cafe-au-lait macule", 0.0001),
    ("atypical melanocytic proliferation", 0.0001),
];

fn pick<'a>(rng: &mut impl Rng, table: &[(&'a str, f64)]) -> &'a str {
    let total: f64 = table.iter().map(|(_, w)| w).sum();
    let mut x = rng.random::<f64>() * total;
    for (v, w) in table {
        if x < *w {
            return v;
        }
        x -= w;
    }
    table[table.len() - 1].0
}

/// Distinct `PREFIX_NNNNNNN` identifiers, like ISIC's.
fn ids(rng: &mut impl Rng, prefix: &str, n: usize) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let v: u32 = rng.random_range(0..10_000_000);
        if seen.insert(v) {
            out.push(format!("{prefix}_{v:07}"));
        }
    }
    out
}

struct PatientMeta {
    id: String,
    sex: Option<&'static str>,
    age: Option<u32>,
    appearance: render::Patient,
    /// Share of images each patient contributes (heavy-tailed, as in ISIC).
    weight: f64,
}

/// Draws the metadata of every row (images are drawn later, in parallel).
pub fn plan_rows(p: &SynthParams) -> Vec<Row> {
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
    let n_patients = p.patients as usize;
    let count = p.count as usize;
    let patient_ids = ids(&mut rng, "IP", n_patients);
    let patients: Vec<PatientMeta> = patient_ids
        .into_iter()
        .map(|id| {
            let sex = match rng.random::<f64>() {
                x if x < 0.515 => Some("male"),
                x if x < 0.998 => Some("female"),
                _ => None,
            };
            // Ages in ISIC 2020 are rounded to 5 years, mostly 35-70.
            let age = (rng.random::<f64>() > 0.002).then(|| {
                let a: f64 = 20.0
                    + 50.0 * (rng.random::<f64>() + rng.random::<f64>()) / 2.0
                    + rng.random_range(-10.0..15.0);
                ((a / 5.0).round() * 5.0).clamp(0.0, 90.0) as u32
            });
            // Log-normal-ish weights: a few patients with many images.
            let z: f64 = (0..4).map(|_| rng.random::<f64>()).sum::<f64>() - 2.0;
            let weight = (1.2 * z).exp();
            PatientMeta {
                id,
                sex,
                age,
                appearance: render::Patient::random(&mut rng),
                weight,
            }
        })
        .collect();

    // Every patient gets one image; the rest follow the weights.
    let mut owner: Vec<usize> = (0..n_patients).collect();
    let total_weight: f64 = patients.iter().map(|p| p.weight).sum();
    while owner.len() < count {
        let mut x = rng.random::<f64>() * total_weight;
        let mut k = 0;
        while k + 1 < n_patients && x >= patients[k].weight {
            x -= patients[k].weight;
            k += 1;
        }
        owner.push(k);
    }
    owner.shuffle(&mut rng);

    // Malignant images: mostly one per affected patient, older patients more
    // often, as in ISIC (584 melanomas among 428 patients).
    let n_malignant = ((count as f64) * p.malignant_fraction).round() as usize;
    let mut order: Vec<usize> = (0..count).collect();
    order.shuffle(&mut rng);
    let mut malignant = vec![false; count];
    let mut per_patient = vec![0usize; n_patients];
    let mut chosen = 0;
    for pass in 0..3 {
        for &i in &order {
            if chosen == n_malignant {
                break;
            }
            let pt = &patients[owner[i]];
            let older = pt.age.unwrap_or(50) as f64 / 90.0;
            let accept = per_patient[owner[i]] <= pass && rng.random::<f64>() < 0.35 + 0.5 * older;
            if !malignant[i] && accept {
                malignant[i] = true;
                per_patient[owner[i]] += 1;
                chosen += 1;
            }
        }
    }
    for &i in &order {
        if chosen == n_malignant {
            break;
        }
        if !malignant[i] {
            malignant[i] = true;
            chosen += 1;
        }
    }

    let names = ids(&mut rng, "ISIC", count);
    (0..count)
        .map(|i| {
            let pt = &patients[owner[i]];
            let target = malignant[i] as u8;
            let site = (rng.random::<f64>() > 0.016).then(|| pick(&mut rng, SITES));
            let diagnosis = if target == 1 {
                "melanoma"
            } else {
                pick(&mut rng, BENIGN_DIAGNOSES)
            };
            // A patient's images span a few years, so the age may step up by 5.
            let age = pt.age.map(|a| {
                if rng.random::<f64>() < 0.2 {
                    (a + 5).min(90)
                } else {
                    a
                }
            });
            Row {
                image_name: names[i].clone(),
                patient_id: pt.id.clone(),
                sex: pt.sex,
                age_approx: age,
                site,
                diagnosis,
                target,
                appearance: pt.appearance.clone(),
            }
        })
        .collect()
}

fn to_csv(rows: &[Row]) -> String {
    let mut out = String::with_capacity(rows.len() * 80);
    out.push_str(CSV_HEADER);
    out.push('\n');
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{}",
            r.image_name,
            r.patient_id,
            r.sex.unwrap_or(""),
            r.age_approx.map(|a| a.to_string()).unwrap_or_default(),
            r.site.unwrap_or(""),
            r.diagnosis,
            if r.target == 1 { "malignant" } else { "benign" },
            r.target
        );
    }
    out
}

fn write_jpeg(path: &Path, img: &image::RgbImage, quality: u8) -> Result<()> {
    let mut bytes = Vec::with_capacity(16 * 1024);
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality)
        .encode_image(img)
        .with_context(|| format!("encoding {}", path.display()))?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(count: u32, patients: u32) -> SynthParams {
        SynthParams {
            count,
            malignant_fraction: 0.05,
            image_size: 64,
            patients,
            severity_shift: super::render::DEFAULT_SEVERITY_SHIFT,
            seed: 7,
            jpeg_quality: 90,
        }
    }

    #[test]
    fn rows_are_deterministic_and_shaped_like_isic() {
        let p = params(2000, 120);
        let a = plan_rows(&p);
        let b = plan_rows(&p);
        assert_eq!(to_csv(&a), to_csv(&b));
        assert_eq!(a.len(), 2000);
        assert_eq!(a.iter().filter(|r| r.target == 1).count(), 100);
        let names: BTreeSet<_> = a.iter().map(|r| r.image_name.as_str()).collect();
        assert_eq!(names.len(), 2000, "image names are unique");
        let patients: BTreeSet<_> = a.iter().map(|r| r.patient_id.as_str()).collect();
        assert_eq!(patients.len(), 120, "every patient has an image");
        let with_melanoma: BTreeSet<_> = a
            .iter()
            .filter(|r| r.target == 1)
            .map(|r| r.patient_id.as_str())
            .collect();
        assert!(
            with_melanoma.len() < 120,
            "malignant images concentrate in some patients"
        );
        assert!(
            a.iter()
                .all(|r| (r.target == 1) == (r.diagnosis == "melanoma"))
        );
        assert_eq!(to_csv(&a).lines().next().unwrap(), CSV_HEADER);
    }

    #[test]
    fn a_different_seed_gives_a_different_dataset() {
        let mut q = params(100, 10);
        let a = to_csv(&plan_rows(&q));
        q.seed = 8;
        assert_ne!(a, to_csv(&plan_rows(&q)));
    }
}
