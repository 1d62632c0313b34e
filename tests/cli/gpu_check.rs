//! `melanoflow gpu-check` through the binary, CPU against CPU at toy sizes
//! (what scripts/gpu-check.sh runs CPU against GPU): the gradient check
//! passes and writes its JSON; a gradient perturbed on the candidate side by
//! a relative 1e-3 (`--inject`) fails with exit code 1 and names it; the
//! timings run every model and precision, skip bf16 with a note, and export
//! the weights and probes the PyTorch half loads.

use crate::fixture::*;

const PIPELINE: &str = r#"
[stages.synth]
kind = "synth"
count = 60
malignant_fraction = 0.3
image_size = 32
patients = 20
seed = 3

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

const TINY: &[&str] = &[
    "--data",
    "data/out/preprocess",
    "--reference",
    "cpu",
    "--device",
    "cpu",
    "--ngf",
    "4",
    "--blocks",
    "1",
    "--ndf",
    "4",
    "--gan-batch",
    "2",
    "--batch",
    "2",
    "--steps",
    "2",
];

#[test]
fn gradient_check_passes_cpu_vs_cpu_and_fails_on_an_injected_mismatch() {
    let p = Project::new(PIPELINE);
    p.ok(&["run", "-q"]);
    let mut args = vec!["gpu-check", "grads"];
    args.extend_from_slice(TINY);
    args.extend(["--json", "grads.json"]);
    let r = p.ok(&args);
    for model in ["cyclegan", "b0", "lite0"] {
        assert!(
            r.stdout
                .lines()
                .any(|l| l.starts_with(&format!("ok: {model}"))),
            "{model}:\n{}",
            r.stdout
        );
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.path("grads.json")).unwrap()).unwrap();
    assert_eq!(json["passed"], true);
    assert_eq!(json["tolerances"]["gradient"], 1e-4);
    let models = json["models"].as_array().unwrap();
    assert_eq!(models.len(), 3);
    // Same device, same code: the two sides agree exactly.
    for m in models {
        assert_eq!(m["worst_grad_err"], 0.0, "{}", m["model"]);
        assert!(m["rows"].as_array().unwrap().len() > 10);
    }

    args.truncate(2 + TINY.len());
    args.extend([
        "--models",
        "cyclegan",
        "--inject",
        "cyclegan/G_A.model.1.weight",
    ]);
    let r = p.fails(&args);
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("cyclegan on cpu does not match cpu: 1 variable(s) beyond tolerance")
            && r.stderr.contains(
                "cyclegan G_A.model.1.weight: gradient relative L2 error 1.00e-3 >= 1e-4"
            ),
        "{}",
        r.stderr
    );
    assert!(r.stdout.starts_with("FAILED: cyclegan"), "{}", r.stdout);

    let r = p.fails(&[&args[..args.len() - 1], &["cyclegan/nope"]].concat());
    assert!(
        r.stderr.contains("--inject nope: no such gradient"),
        "{}",
        r.stderr
    );
    let r = p.fails(&[&args[..args.len() - 1], &["b0/G_A.model.1.weight"]].concat());
    assert!(
        r.stderr.contains("MODEL one of the models checked"),
        "{}",
        r.stderr
    );
}

#[test]
fn bench_times_each_model_and_precision_and_exports_for_pytorch() {
    let p = Project::new("");
    let r = p.ok(&[
        "gpu-check",
        "bench",
        "--device",
        "cpu",
        "--gan-size",
        "32",
        "--gan-batch",
        "1",
        "--ngf",
        "4",
        "--blocks",
        "1",
        "--ndf",
        "4",
        "--size",
        "32",
        "--batch",
        "2",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--export",
        "weights",
        "--json",
        "bench.json",
    ]);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.path("bench.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 9, "{}", r.stdout);
    for row in rows {
        // bf16 on the CPU is the emulation (models::precision): it runs.
        assert_eq!(row["status"], "ok", "{row}");
        assert!(row["ms_per_step"].as_f64().unwrap() > 0.0);
        assert!(row["last_loss"].as_f64().unwrap().is_finite());
    }
    for f in [
        "cyclegan-G_A.safetensors",
        "cyclegan-D_B.safetensors",
        "cyclegan-probe.safetensors",
        "b0.safetensors",
        "b0-probe.safetensors",
        "lite0.safetensors",
        "lite0-probe.safetensors",
    ] {
        assert!(p.path("weights").join(f).is_file(), "{f}");
    }
}
