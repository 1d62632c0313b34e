//! The back half of the pipeline through the binary, on a tiny configuration:
//! `generate`, three `train_classifier` arms and `evaluate`, then
//! `melanoflow metrics`; what is cached after a parameter change; the
//! weight converter command; the real-image pipeline's ingest.

use crate::fixture::*;

/// The data stages every configuration here starts from.
const DATA: &str = r#"
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
"#;

fn chain() -> String {
    format!(
        r#"{DATA}
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

[stages.none]
kind = "train_classifier"
inputs = ["preprocess"]
augmentation = "none"
variant = "lite0"
epochs = 1
batch_size = 16
device = "cpu"

[stages.classical]
kind = "train_classifier"
inputs = ["preprocess"]
augmentation = "classical"
variant = "lite0"
epochs = 1
batch_size = 16
seeds = [0, 1]
device = "cpu"

[stages.cyclegan]
kind = "train_classifier"
inputs = ["preprocess", "generate"]
augmentation = "cyclegan"
variant = "lite0"
epochs = 1
batch_size = 16
device = "cpu"

[stages.evaluate]
kind = "evaluate"
inputs = ["none", "classical", "cyclegan", "gan"]
bootstrap_resamples = 200
"#
    )
}

fn read_parquet(path: &std::path::Path) -> polars::prelude::DataFrame {
    use polars::prelude::*;
    ParquetReader::new(std::fs::File::open(path).unwrap())
        .finish()
        .unwrap()
}

#[test]
fn generate_train_evaluate_and_print_the_table() {
    let p = Project::new(&chain());
    let r = p.ok(&["run"]);
    for stage in ["generate", "none", "classical", "cyclegan", "evaluate"] {
        assert_eq!(r.state(stage), "ran", "{stage}");
    }
    // Arms are named as the pipeline file spells them.
    assert!(
        r.line("classical")
            .contains("-> lite0, augmentation classical, 2 seed(s)")
            && r.line("none").contains("augmentation none,"),
        "{}",
        r.stdout
    );

    // generate: sources are benign training images only, and balance the classes.
    let meta = read_parquet(&p.path("data/out/ingest/metadata.parquet"));
    let (names, splits, targets) = (
        meta.column("image_name").unwrap().str().unwrap(),
        meta.column("split").unwrap().str().unwrap(),
        meta.column("target").unwrap().i32().unwrap(),
    );
    let mut split_of = std::collections::HashMap::new();
    let (mut benign, mut malignant) = (0, 0);
    for i in 0..meta.height() {
        let (n, s, t) = (
            names.get(i).unwrap(),
            splits.get(i).unwrap(),
            targets.get(i).unwrap(),
        );
        split_of.insert(n.to_string(), (s.to_string(), t));
        if s == "train" {
            if t == 1 { malignant += 1 } else { benign += 1 }
        }
    }
    let prov = read_parquet(&p.path("data/out/generate/provenance.parquet"));
    assert_eq!(
        prov.height(),
        benign - malignant,
        "synthetic images balance the training split"
    );
    let sources = prov.column("source_image").unwrap().str().unwrap();
    for i in 0..prov.height() {
        let (split, target) = &split_of[sources.get(i).unwrap()];
        assert_eq!(
            (split.as_str(), *target),
            ("train", 0),
            "generate read a {split} image"
        );
    }
    melanoflow_schemas::check_parquet(
        &p.path("data/out/generate/index.parquet"),
        &melanoflow_schemas::IMAGE_INDEX,
    )
    .unwrap();

    // train_classifier: predictions for every val and test image, per seed.
    let preds = read_parquet(&p.path("data/out/classical/predictions.parquet"));
    let eval_images = split_of.values().filter(|(s, _)| s != "train").count();
    assert_eq!(preds.height(), 2 * eval_images, "two seeds x (val + test)");
    let scores = preds.column("score").unwrap().f64().unwrap();
    assert!((0..scores.len()).all(|i| scores.get(i).is_some_and(|s| (0.0..=1.0).contains(&s))));
    for f in [
        "model-seed0.safetensors",
        "model-seed1.safetensors",
        "history.parquet",
        "train.json",
    ] {
        assert!(p.path("data/out/classical").join(f).is_file(), "{f}");
    }
    let w = candle_core::safetensors::load(
        p.path("data/out/classical/model-seed0.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        w["classifier.1.weight"].dims(),
        [1, 1280],
        "torchvision names, one logit"
    );

    // evaluate: every arm, numbers in range, the figures and the report.
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.path("data/out/evaluate/metrics.json")).unwrap(),
    )
    .unwrap();
    let arms = m["arms"].as_array().unwrap();
    assert_eq!(
        arms.iter()
            .map(|a| a["arm"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["none", "classical", "cyclegan"]
    );
    assert_eq!(arms[1]["seeds"].as_array().unwrap().len(), 2);
    for a in arms {
        for s in a["seeds"].as_array().unwrap() {
            let (auc, lo, hi) = (
                s["auc"].as_f64().unwrap(),
                s["auc_ci"]["low"].as_f64().unwrap(),
                s["auc_ci"]["high"].as_f64().unwrap(),
            );
            assert!(
                (0.0..=1.0).contains(&auc) && lo <= auc + 1e-9 && auc <= hi + 1e-9,
                "{s}"
            );
        }
    }
    assert!(
        arms[2]["description"].as_str().unwrap().contains("`gan`"),
        "the CycleGAN arm names its generator: {}",
        arms[2]["description"]
    );
    // Every pair of arms, in the order listed, on the same test images,
    // with finite p-values and intervals that hold the difference.
    let comparisons = m["comparisons"].as_array().unwrap();
    let pairs: Vec<(&str, &str)> = comparisons
        .iter()
        .map(|c| (c["arm_a"].as_str().unwrap(), c["arm_b"].as_str().unwrap()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("none", "classical"),
            ("none", "cyclegan"),
            ("classical", "cyclegan")
        ]
    );
    let n_test = arms[0]["seeds"][0]["n_test"].as_u64().unwrap();
    let n_mal = arms[0]["seeds"][0]["n_test_malignant"].as_u64().unwrap();
    for c in comparisons {
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("{c}"));
        let d = f(&c["difference"]);
        assert!((d - (f(&c["auc_a"]) - f(&c["auc_b"]))).abs() < 1e-12, "{c}");
        for p in [
            &c["delong"]["p"],
            &c["delong"]["p_holm"],
            &c["bootstrap"]["p"],
        ] {
            assert!((0.0..=1.0).contains(&f(p)), "{c}");
        }
        assert!(f(&c["delong"]["p_holm"]) >= f(&c["delong"]["p"]), "{c}");
        assert!(
            f(&c["delong"]["ci"]["low"]) <= d && d <= f(&c["delong"]["ci"]["high"]),
            "{c}"
        );
        assert_eq!(c["bootstrap"]["resamples"], 200);
        assert_eq!(c["n_pos"].as_u64(), Some(n_mal), "{c}");
        assert_eq!(
            c["n_pos"].as_u64().unwrap() + c["n_neg"].as_u64().unwrap(),
            n_test
        );
    }
    // Each arm's seeds are pooled (classical has 2); seeds both arms trained
    // are also compared one by one.
    let seeds_of = |k: usize| -> Vec<u64> {
        arms[k]["seeds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["seed"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(seeds_of(1), [0, 1]);
    assert_eq!(
        (
            comparisons[0]["seeds_a"].as_u64(),
            comparisons[0]["seeds_b"].as_u64()
        ),
        (Some(seeds_of(0).len() as u64), Some(2))
    );
    let shared: Vec<u64> = seeds_of(0).into_iter().filter(|s| *s < 2).collect();
    let compared: Vec<u64> = comparisons[0]["per_seed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["seed"].as_u64().unwrap())
        .collect();
    assert_eq!(compared, shared);
    // The report names the run that wrote it: the fingerprint in the lock file.
    let lock: toml::Value = toml::from_str(&p.lock()).unwrap();
    assert_eq!(
        m["provenance"]["fingerprint"],
        lock["stages"]["evaluate"]["fingerprint"].as_str().unwrap()
    );
    assert_eq!(m["provenance"]["melanoflow"], env!("CARGO_PKG_VERSION"));
    let roc = image::open(p.path("data/out/evaluate/roc.png")).unwrap();
    assert_eq!((roc.width(), roc.height()), (640, 640));
    let html = std::fs::read_to_string(p.path("data/out/evaluate/report.html")).unwrap();
    assert!(
        html.contains("<table")
            && html.contains("data:image/png;base64,")
            && html.contains("cyclegan")
    );
    let md = std::fs::read_to_string(p.path("data/out/evaluate/report.md")).unwrap();
    let fingerprint = m["provenance"]["fingerprint"].as_str().unwrap();
    for part in [
        "## Paired comparisons",
        "| none vs classical |",
        "| classical vs cyclegan |",
        "seed-ensemble",
        "not corrected for multiple comparisons",
        "*CycleGAN-based data augmentation for melanoma image classification*",
        "## Reproducing this report",
        fingerprint,
    ] {
        assert!(md.contains(part), "missing {part:?} in\n{md}");
    }
    // The Seeds column counts seeds (it used to list them: `0` for one seed).
    let row = |arm: &str| {
        md.lines()
            .find(|l| l.starts_with(&format!("| {arm} |")))
            .unwrap()
            .split(" | ")
            .nth(5)
            .unwrap()
            .to_string()
    };
    assert_eq!(
        (row("classical"), row("none")),
        (
            "2".into(),
            arms[0]["seeds"].as_array().unwrap().len().to_string()
        ),
        "{md}"
    );
    assert!(html.contains("<h2>Paired comparisons</h2>") && html.contains(fingerprint));

    // `melanoflow metrics` prints the table.
    let t = p.ok(&["metrics"]);
    let lock_digest = blake3::hash(p.lock().as_bytes()).to_hex().to_string();
    for part in [
        "Test ROC-AUC",
        "classical",
        "0.79",
        "Paired comparisons",
        "none vs classical",
        "p (DeLong)",
        &format!("fingerprint {fingerprint}"),
        &format!("BLAKE3 {lock_digest}"),
        // The project is not a git checkout.
        "git revision unknown",
    ] {
        assert!(t.stdout.contains(part), "missing {part:?} in\n{}", t.stdout);
    }
    // The pipeline file may follow the command name.
    std::fs::rename(p.path("data/pipeline.toml"), p.path("data/other.toml")).unwrap();
    std::fs::rename(p.path("data/pipeline.lock"), p.path("data/other.lock")).unwrap();
    let t = p.ok(&["metrics", "--config", "data/other.toml"]);
    assert!(t.stdout.contains("classical"), "{}", t.stdout);
    std::fs::rename(p.path("data/other.toml"), p.path("data/pipeline.toml")).unwrap();
    std::fs::rename(p.path("data/other.lock"), p.path("data/pipeline.lock")).unwrap();

    // Every stage, re-executed from scratch, writes the same bytes (the CI
    // reproducibility check); nothing is committed by it.
    let lock = p.lock();
    let v = p.ok(&["verify", "--rerun"]);
    assert!(
        v.stdout
            .contains("re-ran 9 stage(s): every output matches the lock file"),
        "{}",
        v.stdout
    );
    assert_eq!(p.lock(), lock);

    // Changing one arm's parameter re-runs that arm and evaluate only.
    let r = p.ok(&["run", "--set", "cyclegan.lr=0.002"]);
    assert_eq!(r.state("cyclegan"), "ran");
    assert_eq!(r.state("evaluate"), "ran");
    for stage in ["gan", "generate", "none", "classical"] {
        assert_eq!(r.state(stage), "cached", "{stage}");
    }
}

/// The classifier learns, not just runs: on an easy synthetic task (malignant
/// lesions 4 standard deviations of latent severity away, so the Bayes
/// ROC-AUC of a reader of the five lesion features is about 0.99) a Lite0
/// trained from scratch for 8 epochs on 32 px images separates the test
/// classes well. Measured: 0.85, 0.84 and 0.83 for seeds 0, 1, 2 (about 23 s
/// each); with BatchNorm momentum 0.01 the same run stayed near 0.6.
#[test]
fn the_classifier_learns_an_easy_task() {
    let p = Project::new(
        r#"
[stages.synth]
kind = "synth"
count = 600
malignant_fraction = 0.25
image_size = 32
patients = 150
severity_shift = 4.0
seed = 11

[stages.ingest]
kind = "ingest"
inputs = ["synth"]
val_fraction = 0.15
test_fraction = 0.3

[stages.preprocess]
kind = "preprocess"
inputs = ["ingest"]
size = 32

[stages.classical]
kind = "train_classifier"
inputs = ["preprocess"]
augmentation = "classical"
variant = "lite0"
epochs = 8
batch_size = 16
lr = 2e-3
device = "cpu"

[stages.evaluate]
kind = "evaluate"
inputs = ["classical"]
bootstrap_resamples = 200
"#,
    );
    p.ok(&["run"]);
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.path("data/out/evaluate/metrics.json")).unwrap(),
    )
    .unwrap();
    let seed = &m["arms"][0]["seeds"][0];
    let auc = seed["auc"].as_f64().unwrap();
    assert!(auc > 0.8, "test ROC-AUC {auc} after training: {seed}");
}

/// Cross-validation through `foreach`: three folds of patients, two arms per
/// fold, and `evaluate` pooling each arm's out-of-fold predictions so that
/// every image is scored exactly once.
#[test]
fn cross_validation_pools_every_image_once_per_arm() {
    let arm = |name: &str, augmentation: &str| {
        format!(
            r#"
[stages.{name}]
kind = "train_classifier"
foreach = [0, 1, 2]
inputs = ["preprocess@${{item}}"]
augmentation = "{augmentation}"
variant = "lite0"
epochs = 1
batch_size = 16
device = "cpu"
"#
        )
    };
    let p = Project::new(&format!(
        r#"
[stages.synth]
kind = "synth"
count = 120
malignant_fraction = 0.25
image_size = 32
patients = 40
seed = 5

[stages.ingest]
kind = "ingest"
foreach = [0, 1, 2]
inputs = ["synth"]
folds = 3
fold = "${{item}}"
val_fraction = 0.2

[stages.preprocess]
kind = "preprocess"
foreach = [0, 1, 2]
inputs = ["ingest@${{item}}"]
size = 32
{}{}
[stages.evaluate]
kind = "evaluate"
inputs = ["none@0", "none@1", "none@2", "classical@0", "classical@1", "classical@2"]
bootstrap_resamples = 200
"#,
        arm("none", "none"),
        arm("classical", "classical")
    ));
    let r = p.ok(&["run"]);
    for stage in [
        "ingest@0",
        "ingest@2",
        "preprocess@1",
        "classical@2",
        "evaluate",
    ] {
        assert_eq!(r.state(stage), "ran", "{stage}");
    }
    // Each fold tests a third of the patients; together, every image once.
    let mut tested = std::collections::HashMap::new();
    let mut malignant = 0;
    for fold in 0..3 {
        let meta = read_parquet(&p.path(&format!("data/out/ingest@{fold}/metadata.parquet")));
        let (names, splits, targets) = (
            meta.column("image_name").unwrap().str().unwrap(),
            meta.column("split").unwrap().str().unwrap(),
            meta.column("target").unwrap().i32().unwrap(),
        );
        for i in 0..meta.height() {
            if splits.get(i) == Some("test") {
                *tested.entry(names.get(i).unwrap().to_string()).or_insert(0) += 1;
                malignant += targets.get(i).unwrap();
            }
        }
        assert_eq!(meta.height(), 120, "fold {fold}");
    }
    assert_eq!(tested.len(), 120, "every image is in one fold's test split");
    assert!(tested.values().all(|&n| n == 1));

    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.path("data/out/evaluate/metrics.json")).unwrap(),
    )
    .unwrap();
    let arms = m["arms"].as_array().unwrap();
    let names: Vec<&str> = arms.iter().map(|a| a["arm"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["none", "classical"],
        "one arm per foreach, not per fold"
    );
    for a in arms {
        let s = &a["seeds"][0];
        assert_eq!(s["n_test"], 120, "{a}");
        assert_eq!(s["n_test_malignant"], malignant, "{a}");
        assert!(
            a["description"]
                .as_str()
                .unwrap()
                .contains("pooled over 3 folds"),
            "{a}"
        );
    }
    assert_eq!(
        m["comparisons"].as_array().unwrap().len(),
        1,
        "none vs classical, paired"
    );
    assert!(
        m["notes"][0]
            .as_str()
            .unwrap()
            .contains("Cross-validation over 3 folds")
    );
}

#[test]
fn a_bad_arm_declaration_is_a_pipeline_error() {
    let p = Project::new(&chain().replace(
        "inputs = [\"preprocess\", \"generate\"]\naugmentation = \"cyclegan\"",
        "inputs = [\"preprocess\"]\naugmentation = \"cyclegan\"",
    ));
    let r = p.fails(&["status"]);
    assert!(
        r.stderr
            .contains("takes two upstreams: a `preprocess` and a `generate` stage"),
        "{}",
        r.stderr
    );
    assert_eq!(r.status.code(), Some(2));
}

#[test]
fn metrics_before_a_run_says_what_to_do() {
    let p = Project::new(&chain());
    let r = p.fails(&["metrics"]);
    assert!(
        r.stderr.contains("run `melanoflow run evaluate` first"),
        "{}",
        r.stderr
    );
}

#[test]
fn convert_weights_rejects_a_file_that_is_not_a_legacy_checkpoint() {
    let p = Project::new(&chain());
    p.write("bad.pth", b"PK\x03\x04 this is a zip file");
    let r = p.fails(&["convert-weights", "bad.pth", "out.safetensors"]);
    assert!(r.stderr.contains("bad.pth"), "{}", r.stderr);
    assert!(!p.path("out.safetensors").exists(), "nothing half-written");
}

/// The real-image pipeline's ingest: 100 ISIC archive images without
/// patient ids, each image its own patient.
#[test]
fn real_images_ingest_with_one_patient_per_image() {
    let Some(real) = realdata() else { return };
    let p = Project::new(&format!(
        r#"
[stages.ingest]
kind = "ingest"
metadata = "{dir}/labels.csv"
images = "{dir}/images"
patient_per_image = true
val_fraction = 0.2
test_fraction = 0.2

[stages.preprocess]
kind = "preprocess"
inputs = ["ingest"]
size = 64
"#,
        dir = real.join("isic_archive_uda1").display()
    ));
    let r = p.ok(&["run"]);
    assert!(
        r.line("ingest").contains("100 rows"),
        "{}",
        r.line("ingest")
    );
    let s: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.path("data/out/ingest/ingest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(s["patients"], 100);
    assert_eq!(s["malignant"], 50);
    for split in ["train", "val", "test"] {
        let m = s["splits"][split]["malignant_rate"].as_f64().unwrap();
        assert!((m - 0.5).abs() < 0.1, "{split}: {m}");
    }
}

/// One classifier arm, long enough to be killed between epochs.
fn one_arm() -> String {
    format!(
        r#"{DATA}
[stages.classical]
kind = "train_classifier"
inputs = ["preprocess"]
augmentation = "classical"
variant = "lite0"
epochs = 6
batch_size = 16
device = "cpu"
"#
    )
}

/// The `[stages.classical]` block of a lock file (fingerprint, output digest).
fn locked_arm(p: &Project) -> String {
    let lock = p.lock();
    let start = lock
        .find("[stages.classical]")
        .expect("classical in the lock");
    lock[start..].split("\n\n").next().unwrap().to_string()
}

#[test]
fn a_killed_classifier_resumes_after_its_last_epoch_and_ends_identical() {
    let uninterrupted = Project::new(&one_arm());
    uninterrupted.ok(&["run"]);

    let p = Project::new(&one_arm());
    p.ok(&["run", "preprocess"]);
    let mut child = p.spawn(&["run"]);
    // Wait for the first epoch's checkpoint, then SIGKILL.
    let scratch = p.path("data/.melanoflow/scratch");
    let checkpointed = || {
        scratch
            .read_dir()
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| d.path().join("seed-0/state.json").is_file())
    };
    for _ in 0..1200 {
        if checkpointed() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(checkpointed(), "no checkpoint within 60 s");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !p.lock().contains("[stages.classical]"),
        "nothing committed"
    );

    let r = p.ok(&["run"]);
    assert!(
        r.line("classical").contains("resumed after epoch"),
        "{}",
        r.stdout
    );
    assert_eq!(
        locked_arm(&p),
        locked_arm(&uninterrupted),
        "a resumed run writes the same bytes as an uninterrupted one"
    );
}

/// `generate` split the way a cluster job array splits it (three parts of
/// whole batches, then an assembling worker) writes the same artifact as a
/// whole run: shards, index, provenance and sample grid.
#[test]
fn generate_run_in_parts_and_assembled_equals_the_whole_run() {
    let batches = ["--set", "generate.batch_size=8"];
    let whole = Project::new(&chain());
    whole.ok(&[&["run", "generate"][..], &batches].concat());

    let split = Project::new(&chain());
    split.ok(&[&["run", "gan"][..], &batches].concat());
    for part in ["0", "1", "2"] {
        split.ok(&[
            &["run-stage", "generate", "--parts", "3", "--part", part][..],
            &batches,
        ]
        .concat());
    }
    split.ok(&[&["run-stage", "generate", "--assemble", "3"][..], &batches].concat());
    let r = split.ok(&[&["run", "generate"][..], &batches].concat());
    assert_eq!(r.state("generate"), "restored", "{}", r.stdout);
    assert_eq!(
        split.lock(),
        whole.lock(),
        "assembled parts must be the whole run's bytes"
    );
    assert!(split.path("data/out/generate/samples.png").exists());
}
