//! Milliseconds per CycleGAN training step in candle (the stage's own
//! `train_step`: 2 generators + 2 discriminators forward, backward, two Adam
//! steps),
//! for `benches/cyclegan.sh` to print beside PyTorch.
//!
//!   cyclegan_step --size 128 --ngf 64 --ndf 64 --blocks 9 --batch 1 --steps 5 --warmup 2 [--kernels fast|candle] [--precision f32|bf16]
//!
//! `--kernels` sets melanoflow's fast-kernel switch (default fast); `candle`
//! runs every layer on candle's own ops, the before-the-kernels reference
//! (`benches/train.sh`). `--precision bf16` runs the networks in BF16 with
//! F32 weights (on the CPU an emulation: F32 arithmetic rounded to BF16).

use std::time::Instant;

use candle_core::{Device, Tensor};
use melanoflow::models::adam::Adam;
use melanoflow::models::precision::Precision;
use melanoflow::train_cyclegan::TrainCycleGanParams;
use melanoflow::train_cyclegan::train::{Nets, Pool, train_step};
use rand::SeedableRng;

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    melanoflow::tune_threads();
    melanoflow::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    let text = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default.to_string(), String::clone)
    };
    let kernels = text("--kernels", "fast");
    let precision: Precision = serde_json::from_value(text("--precision", "f32").into())?;
    let dtype = precision.resolve(&Device::Cpu).compute_dtype();
    match kernels.as_str() {
        "fast" => melanoflow::models::kernels::set_fast_kernels(true),
        "candle" => melanoflow::models::kernels::set_fast_kernels(false),
        k => anyhow::bail!("--kernels fast|candle, not {k:?}"),
    }
    let (size, ngf, ndf, blocks, batch) = (
        arg(&args, "--size", 128),
        arg(&args, "--ngf", 64),
        arg(&args, "--ndf", 64),
        arg(&args, "--blocks", 9),
        arg(&args, "--batch", 1),
    );
    let (steps, warmup) = (arg(&args, "--steps", 5), arg(&args, "--warmup", 2));
    let params: TrainCycleGanParams = serde_json::from_value(serde_json::json!({
        "preset": "default", "ngf": ngf, "ndf": ndf, "n_blocks": blocks, "batch_size": batch, "device": "cpu"
    }))?;
    let cfg = params.resolve();
    let device = Device::Cpu;
    let nets = Nets::new(&cfg, &device)?;
    let mut adam_g = Adam::new(nets.named(&[0, 1]), cfg.lr, cfg.beta1, cfg.beta2)?;
    let mut adam_d = Adam::new(nets.named(&[2, 3]), cfg.lr, cfg.beta1, cfg.beta2)?;
    let (mut pool_a, mut pool_b) = (Pool::new(cfg.pool_size), Pool::new(cfg.pool_size));
    let real_a = Tensor::rand(-1f32, 1., (batch, 3, size, size), &device)?;
    let real_b = Tensor::rand(-1f32, 1., (batch, 3, size, size), &device)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut times = Vec::new();
    for i in 0..warmup + steps {
        let t = Instant::now();
        train_step(
            &cfg,
            &nets,
            &mut adam_g,
            &mut adam_d,
            &mut pool_a,
            &mut pool_b,
            &real_a,
            &real_b,
            dtype,
            &mut rng,
        )?;
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    // The median as Python's `statistics.median` takes it (the PyTorch side),
    // which matters with the few steps the slow candle-only runs get.
    let n = times.len();
    let median = if n % 2 == 1 {
        times[n / 2]
    } else {
        (times[n / 2 - 1] + times[n / 2]) / 2.0
    };
    println!(
        "{{\"framework\":\"candle\",\"kernels\":\"{kernels}\",\"precision\":\"{}\",\"size\":{size},\"ngf\":{ngf},\"blocks\":{blocks},\"batch\":{batch},\"threads\":{},\"ms_per_step\":{:.1}}}",
        precision.name(),
        rayon::current_num_threads(),
        median
    );
    Ok(())
}
