//! `make gpu-check`: a few CycleGAN training steps on the CPU and on the GPU
//! from the same seed and data, losses side by side, and the step time on
//! each. Exits non-zero when the first step's losses differ by more than
//! 1e-3 (relative): float summation order differs between devices, so later
//! steps drift apart slowly; the first must agree.
//!
//!   gpu_check [PREPROCESS_DIR=data/out/preprocess] [STEPS=5]

use std::time::Instant;

use melanoflow::train_cyclegan::data::Images;
use melanoflow::train_cyclegan::train::{LossRow, train};
use melanoflow::train_cyclegan::{TrainCycleGanParams, select_device};

fn run(device: &str, images: &Images, steps: u64) -> anyhow::Result<(Vec<LossRow>, f64)> {
    let params: TrainCycleGanParams =
        serde_json::from_value(serde_json::json!({ "device": device }))?;
    let dev = select_device(device)?;
    let scratch = tempfile::tempdir()?;
    let t = Instant::now();
    // F32 on both devices: the check compares the arithmetic, not precisions.
    let trained = train(
        &params.resolve(),
        images,
        &dev,
        candle_core::DType::F32,
        scratch.path(),
        Some(steps),
        &|_, _| {},
    )?;
    Ok((
        trained.losses,
        t.elapsed().as_secs_f64() * 1000.0 / steps as f64,
    ))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args
        .first()
        .cloned()
        .unwrap_or_else(|| "data/out/preprocess".into());
    let steps: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let images = Images::open(std::path::Path::new(&dir))?;
    let (cpu, cpu_ms) = run("cpu", &images, steps)?;
    println!(
        "cuda available to this build: {}",
        candle_core::utils::cuda_is_available()
    );
    let (gpu, gpu_ms) = run("cuda:0", &images, steps)?;
    println!("step  loss_g(cpu)  loss_g(gpu)  loss_d_a(cpu)  loss_d_a(gpu)");
    for (c, g) in cpu.iter().zip(&gpu) {
        println!(
            "{:>4}  {:>11.6}  {:>11.6}  {:>13.6}  {:>13.6}",
            c.step, c.g, g.g, c.d_a, g.d_a
        );
    }
    println!(
        "ms/step: cpu {cpu_ms:.1}, gpu {gpu_ms:.1} (default preset, includes the first-step warm-up)"
    );
    let rel = |a: f32, b: f32| (a - b).abs() / a.abs().max(1e-6);
    let (c, g) = (&cpu[0], &gpu[0]);
    let worst = [
        rel(c.g, g.g),
        rel(c.d_a, g.d_a),
        rel(c.d_b, g.d_b),
        rel(c.cycle_a, g.cycle_a),
    ]
    .into_iter()
    .fold(0f32, f32::max);
    println!("first-step worst relative difference: {worst:.2e}");
    if worst > 1e-3 {
        anyhow::bail!("CPU and GPU disagree on the first step");
    }
    Ok(())
}
