//! The `fidelity` stage through the binary on a tiny pipeline: two generate
//! stages measured against the real malignant images with a randomly
//! initialised Lite0 (the stage does not care where its weights come from,
//! and tests cannot fetch ImageNet's); a finite number per row, the
//! two-sample AUC within [0, 1], the table in evaluate's report, the same
//! bytes at one thread, and a clear error without `weights`.

use crate::fixture::*;

const PIPELINE: &str = r#"
[stages.synth]
kind = "synth"
count = 240
malignant_fraction = 0.15
image_size = 32
patients = 60
seed = 5

[stages.ingest]
kind = "ingest"
inputs = ["synth"]
val_fraction = 0.2
test_fraction = 0.2

[stages.preprocess]
kind = "preprocess"
inputs = ["ingest"]
size = 32

[stages.gan]
kind = "train_cyclegan"
inputs = ["preprocess"]
ngf = 4
n_blocks = 1
ndf = 4
n_layers_d = 2
n_epochs = 1
n_epochs_decay = 0
device = "cpu"

[stages.generate]
kind = "generate"
inputs = ["preprocess", "gan"]
device = "cpu"

[stages.generate_half]
kind = "generate"
inputs = ["preprocess", "gan"]
target_ratio = 0.5
seed = 1
device = "cpu"

[stages.fidelity]
kind = "fidelity"
inputs = ["preprocess", "generate", "generate_half"]
weights = "weights/lite0.safetensors"
kid_subsets = 20
device = "cpu"

[stages.classical]
kind = "train_classifier"
inputs = ["preprocess"]
augmentation = "classical"
variant = "lite0"
epochs = 1
batch_size = 16
device = "cpu"

[stages.evaluate]
kind = "evaluate"
inputs = ["classical", "fidelity"]
bootstrap_resamples = 200
"#;

/// A Lite0 with weights drawn from `seed`, saved as safetensors with
/// torchvision's names and a 1000-class head (like ImageNet's).
fn write_random_lite0(path: &std::path::Path, seed: u64) {
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use melanoflow::models::efficientnet::{
        EfficientNet, EfficientNetConfig, Variant, init_weights,
    };
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let vm = VarMap::new();
    EfficientNet::new(
        &EfficientNetConfig::new(Variant::Lite0, 1000),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    init_weights(&vm, seed).unwrap();
    vm.save(path).unwrap();
}

#[test]
fn fidelity_measures_every_generator_against_the_real_malignant_images() {
    let mut p = Project::new(PIPELINE);
    write_random_lite0(&p.path("data/weights/lite0.safetensors"), 7);
    let r = p.ok(&["run"]);
    assert_eq!(r.state("fidelity"), "ran");

    let text = std::fs::read_to_string(p.path("data/out/fidelity/fidelity.json")).unwrap();
    let f: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(f["feature_dims"], 1280);
    assert!(f["note"].as_str().unwrap().contains("NOT Inception-v3"));
    let rows = f["rows"].as_array().unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["generate", "generate_half", "real benign"],
        "generators in input order, then the benign reference row"
    );
    let gen_json = |stage: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(p.path(&format!("data/out/{stage}/generate.json"))).unwrap(),
        )
        .unwrap()
    };
    for (row, stage) in rows.iter().zip(["generate", "generate_half"]) {
        assert_eq!(row["images"], gen_json(stage)["synthetic"], "{row}");
    }
    assert!(
        rows[1]["images"].as_u64() < rows[0]["images"].as_u64(),
        "target_ratio 0.5 makes fewer images"
    );
    for row in rows {
        let num = |path: &[&str]| -> f64 {
            let mut v = row;
            for k in path {
                v = &v[*k];
            }
            v.as_f64()
                .unwrap_or_else(|| panic!("{path:?} is not a number in {row}"))
        };
        for path in [
            &["frechet", "distance"][..],
            &["frechet", "mean_term"],
            &["kid", "mean"],
            &["kid", "std"],
            &["precision_recall", "precision"],
            &["precision_recall", "recall"],
            &["two_sample", "auc"],
        ] {
            assert!(num(path).is_finite(), "{path:?} in {row}");
        }
        assert!(num(&["frechet", "distance"]) > 0.0, "{row}");
        assert!(num(&["kid", "std"]) >= 0.0, "{row}");
        for path in [
            &["precision_recall", "precision"][..],
            &["precision_recall", "recall"],
            &["two_sample", "auc"],
        ] {
            assert!((0.0..=1.0).contains(&num(path)), "{path:?} in {row}");
        }
        let folds = row["two_sample"]["fold_aucs"].as_array().unwrap();
        assert_eq!(folds.len(), 5);
        assert_eq!(row["kid"]["subsets"], 20);
    }
    let md = std::fs::read_to_string(p.path("data/out/fidelity/fidelity.md")).unwrap();
    assert!(
        md.contains("| `generate` |")
            && md.contains("| `generate_half` |")
            && md.contains("real benign"),
        "{md}"
    );

    let html = std::fs::read_to_string(p.path("data/out/fidelity/fidelity.html")).unwrap();
    assert!(html.contains("<td>`generate_half`</td>"), "{html}");

    // evaluate puts the table in its reports, before how to reproduce them.
    let report = std::fs::read_to_string(p.path("data/out/evaluate/report.md")).unwrap();
    let at = report
        .find("## How good are the synthetic images? (`fidelity`)")
        .unwrap_or_else(|| panic!("{report}"));
    assert!(at < report.find("## Reproducing this report").unwrap());
    assert!(report[at..].contains("| `generate_half` |"));
    let page = std::fs::read_to_string(p.path("data/out/evaluate/report.html")).unwrap();
    assert!(page.contains("<h2>How good are the synthetic images? (fidelity)</h2>"));
    assert!(page.contains("<td>`generate`</td>"));

    // Same bytes on one thread (every stage re-run from scratch).
    p.env
        .push(("RAYON_NUM_THREADS".to_string(), "1".to_string()));
    let v = p.ok(&["verify", "--rerun"]);
    assert!(
        v.stdout.contains("every output matches the lock file"),
        "{}",
        v.stdout
    );
    p.env.clear();

    // Other weights: only fidelity (and the report) re-run, and its numbers move.
    write_random_lite0(&p.path("data/weights/lite0.safetensors"), 8);
    let r = p.ok(&["run"]);
    assert_eq!(r.state("fidelity"), "ran");
    assert_eq!(r.state("evaluate"), "ran");
    assert_eq!(r.state("generate"), "cached");
    assert_eq!(r.state("classical"), "cached");
    let again = std::fs::read_to_string(p.path("data/out/fidelity/fidelity.json")).unwrap();
    assert_ne!(again, text);
}

#[test]
fn fidelity_without_weights_says_how_to_get_them() {
    let p = Project::new(&PIPELINE.replace("weights = \"weights/lite0.safetensors\"\n", ""));
    let r = p.fails(&["status"]);
    assert!(
        r.stderr.contains("`weights` is required") && r.stderr.contains("make weights"),
        "{}",
        r.stderr
    );
    assert_eq!(r.status.code(), Some(2));
}
