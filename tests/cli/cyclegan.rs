//! Stage `train_cyclegan` through the binary on a tiny configuration:
//! outputs a person and PyTorch can use, caching, and resume after SIGKILL.

use crate::fixture::*;

fn tiny(epochs: usize) -> String {
    format!(
        r#"
[stages.synth]
kind = "synth"
count = 300
malignant_fraction = 0.1
image_size = 32
patients = 60
seed = 3

[stages.ingest]
kind = "ingest"
inputs = ["synth"]

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
batch_size = 4
n_epochs = {epochs}
n_epochs_decay = {epochs}
checkpoint_every = 2
device = "cpu"
"#
    )
}

#[test]
fn trains_and_writes_weights_losses_and_a_sample_grid() {
    let p = Project::new(&tiny(1));
    let r = p.ok(&["run"]);
    let line = r.line("gan");
    assert!(line.contains("steps (2 epochs x"), "{line}");
    let out = p.path("data/out/gan");
    for f in [
        "G_A.safetensors",
        "G_B.safetensors",
        "D_A.safetensors",
        "D_B.safetensors",
        "losses.parquet",
        "samples.png",
        "config.json",
        "train.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let grid = image::open(out.join("samples.png")).unwrap();
    assert_eq!(
        grid.height(),
        3 * 128 + 4 * 2,
        "three rows of 32 px images scaled x4"
    );
    let g = candle_core::safetensors::load(out.join("G_A.safetensors"), &candle_core::Device::Cpu)
        .unwrap();
    assert_eq!(
        g["model.1.weight"].dims(),
        [4, 3, 7, 7],
        "PyTorch layout and names"
    );
    melanoflow_schemas::check_parquet(
        &out.join("losses.parquet"),
        &melanoflow_schemas::CYCLEGAN_LOSSES,
    )
    .unwrap();
    assert!(
        !p.path("data/.melanoflow/scratch")
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(false),
        "checkpoints removed after commit"
    );
    let lock = p.lock();
    assert_eq!(p.ok(&["run"]).state("gan"), "cached");
    // Same inputs, same machine: the same bytes (no timings in the outputs).
    let r = p.ok(&["run", "--force", "gan"]);
    assert_eq!(r.state("gan"), "ran");
    assert_eq!(p.lock(), lock, "a re-run reproduces every output byte");
}

#[test]
fn a_killed_training_run_resumes_from_its_checkpoint() {
    let p = Project::new(&tiny(8));
    p.ok(&["run", "preprocess"]);
    let mut child = p.spawn(&["run"]);
    // Wait for a checkpoint, then SIGKILL.
    let scratch = p.path("data/.melanoflow/scratch");
    for _ in 0..600 {
        let found = scratch
            .read_dir()
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| d.path().join("checkpoint.json").is_file());
        if found {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!p.lock().contains("[stages.gan]"), "nothing committed");
    let r = p.ok(&["run"]);
    assert!(r.line("gan").contains("resumed at step"), "{}", r.stdout);
}

/// `precision` through the binary: `bf16` runs (on the CPU: F32 arithmetic
/// rounded to BF16), says so in train.json, and is a new fingerprint, while
/// naming the default ("auto") is not; a bad value is a config error naming
/// the stage, the key and the allowed values.
#[test]
fn precision_bf16_runs_and_is_part_of_the_fingerprint() {
    let p = Project::new(&tiny(1));
    p.ok(&["run"]);
    let fingerprint = |lock: &str| -> String {
        let t: toml::Table = toml::from_str(lock).unwrap();
        t["stages"]["gan"]["fingerprint"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let train_json = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.path("data/out/gan/train.json")).unwrap())
            .unwrap()
    };
    let auto = fingerprint(&p.lock());
    assert_eq!(train_json()["precision"], "f32", "auto on the CPU");
    let r = p.ok(&["status", "--set", "gan.precision=auto"]);
    assert_eq!(r.state("gan"), "cached", "the default, named: {}", r.stdout);
    let r = p.ok(&["status", "--set", "gan.precision=bf16"]);
    assert!(
        r.line("gan")
            .contains("parameter `precision` (unset -> \"bf16\")"),
        "{}",
        r.stdout
    );
    let r = p.ok(&["status", "--set", "gan.precision=f32"]);
    assert_eq!(
        r.state("gan"),
        "would run",
        "an explicit value: {}",
        r.stdout
    );
    let r = p.ok(&["run", "--set", "gan.precision=bf16"]);
    assert_eq!(r.state("gan"), "ran", "{}", r.stdout);
    assert_eq!(train_json()["precision"], "bf16");
    assert_ne!(fingerprint(&p.lock()), auto);

    let bad = Project::new(
        &tiny(1).replace("device = \"cpu\"", "device = \"cpu\"\nprecision = \"fp16\""),
    );
    let r = bad.fails(&["status"]);
    assert!(
        r.stderr
            .contains("stages.gan.precision (kind `train_cyclegan`)")
            && r.stderr
                .contains("unknown variant `fp16`, expected one of `auto`, `f32`, `tf32`, `bf16`"),
        "{}",
        r.stderr
    );
}
