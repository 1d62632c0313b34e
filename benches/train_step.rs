//! Training-speed pieces on CPU, for `benches/train.sh` to print beside
//! PyTorch (`benches/train_step_torch.py`). One JSON line per run; times are
//! the median over `--steps` timed steps after `--warmup` untimed ones.
//! `--kernels fast|candle` sets melanoflow's fast-kernel switch (candle's own
//! ops when off), so a run measures whatever kernels are wired in at the time.
//!
//!   train_step generator    --size 128 --ngf 64 --blocks 9 --batch 1 --steps 5 --warmup 1 --kernels fast
//!   train_step efficientnet --variant b0 --size 224 --batch 8 --steps 5 --warmup 1 --kernels fast
//!   train_step depthwise    --channels 96 --size 112 --k 3 --stride 2 --batch 8 --steps 5 --warmup 1 --kernels fast
//!
//! generator: forward ms (`fwd_ms`) and backward ms (`bwd_ms`, L1 loss to a
//! fixed target + backward) of one ResNet generator, no optimizer.
//! efficientnet: forward + BCE-with-logits (one logit) + backward + Adam (`ms_per_step`).
//! depthwise: forward ms and backward ms (loss = sum(y * g) for a fixed random
//! g, so the incoming gradient is dense and random; input and weight both need
//! gradients, as inside a network).

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use melanoflow::models::adam::{Adam, named_vars};
use melanoflow::models::cyclegan::{Generator, GeneratorConfig, Upsample};
use melanoflow::models::efficientnet::{EfficientNet, EfficientNetConfig, Variant, init_weights};
use melanoflow::models::init::normal_init;
use melanoflow::models::kernels::{depthwise::depthwise_conv2d, set_fast_kernels};
use rand::SeedableRng;
use serde_json::json;

/// The value after `name`, or `default`.
fn opt(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn num(args: &[String], name: &str, default: usize) -> anyhow::Result<usize> {
    let v = opt(args, name, &default.to_string());
    v.parse()
        .map_err(|_| anyhow::anyhow!("{name} wants a number, not {v:?}"))
}

/// Median (mean of the two middle values for an even count, like Python's
/// `statistics.median`, so candle and PyTorch rows are reduced alike).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Times `forward` and the backward pass of `loss(forward())` separately,
/// `steps` times after `warmup` untimed rounds: (forward ms, backward ms).
fn time_fwd_bwd(
    warmup: usize,
    steps: usize,
    forward: impl Fn() -> anyhow::Result<Tensor>,
    loss: impl Fn(Tensor) -> anyhow::Result<Tensor>,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for i in 0..warmup + steps {
        let t = Instant::now();
        let y = forward()?;
        let f = ms(t);
        let t = Instant::now();
        let grads = loss(y)?.backward()?;
        let b = ms(t);
        drop(grads);
        if i >= warmup {
            fwd.push(f);
            bwd.push(b);
        }
    }
    Ok((fwd, bwd))
}

fn main() -> anyhow::Result<()> {
    melanoflow::tune_threads();
    melanoflow::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    let work = args.get(1).cloned().unwrap_or_default();
    let kernels = opt(&args, "--kernels", "fast");
    match kernels.as_str() {
        "fast" => set_fast_kernels(true),
        "candle" => set_fast_kernels(false),
        k => anyhow::bail!("--kernels fast|candle, not {k:?}"),
    }
    let (steps, warmup) = (num(&args, "--steps", 5)?.max(1), num(&args, "--warmup", 1)?);
    let device = Device::Cpu;
    let mut out = json!({
        "framework": "candle",
        "work": work,
        "kernels": kernels,
        "threads": rayon::current_num_threads(),
        "steps": steps,
    });
    match work.as_str() {
        "generator" => {
            let (size, ngf, blocks, batch) = (
                num(&args, "--size", 128)?,
                num(&args, "--ngf", 64)?,
                num(&args, "--blocks", 9)?,
                num(&args, "--batch", 1)?,
            );
            let vm = VarMap::new();
            // The stage's defaults (train_cyclegan: transposed upsampling, slope 0.01, N(0, 0.02) weights).
            let cfg = GeneratorConfig {
                ngf,
                n_blocks: blocks,
                upsample: Upsample::Transposed,
                slope: 0.01,
            };
            let g = Generator::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &device))?;
            normal_init(&vm, 0, 0.02)?;
            let x = Tensor::rand(-1f32, 1., (batch, 3, size, size), &device)?;
            let target = Tensor::rand(-1f32, 1., (batch, 3, size, size), &device)?;
            let (fwd, bwd) = time_fwd_bwd(
                warmup,
                steps,
                || Ok(g.forward(&x)?),
                |y| Ok((y - &target)?.abs()?.mean_all()?),
            )?;
            out["size"] = json!(size);
            out["ngf"] = json!(ngf);
            out["blocks"] = json!(blocks);
            out["batch"] = json!(batch);
            out["fwd_ms"] = json!(round1(median(fwd)));
            out["bwd_ms"] = json!(round1(median(bwd)));
        }
        "efficientnet" => {
            let name = opt(&args, "--variant", "b0");
            let variant: Variant = serde_json::from_value(serde_json::Value::String(name.clone()))?;
            let (size, batch) = (num(&args, "--size", 224)?, num(&args, "--batch", 8)?);
            let vm = VarMap::new();
            let model = EfficientNet::new(
                &EfficientNetConfig::new(variant, 1),
                VarBuilder::from_varmap(&vm, DType::F32, &device),
            )?;
            init_weights(&vm, 0)?;
            let mut adam = Adam::new(named_vars("", &vm), 1e-3, 0.9, 0.999)?;
            let x = Tensor::randn(0f32, 1., (batch, 3, size, size), &device)?;
            let target = Tensor::zeros(batch, DType::F32, &device)?;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
            let mut times = Vec::new();
            for i in 0..warmup + steps {
                let t = Instant::now();
                let logits = model.forward_t(&x, Some(&mut rng))?.flatten_all()?;
                let loss = melanoflow::train_classifier::train::bce_with_logits(&logits, &target)?;
                adam.step(&loss.backward()?)?;
                if i >= warmup {
                    times.push(ms(t));
                }
            }
            out["variant"] = json!(name);
            out["size"] = json!(size);
            out["batch"] = json!(batch);
            out["ms_per_step"] = json!(round1(median(times)));
        }
        "depthwise" => {
            let (c, size, k, stride, batch) = (
                num(&args, "--channels", 96)?,
                num(&args, "--size", 112)?,
                num(&args, "--k", 3)?,
                num(&args, "--stride", 2)?,
                num(&args, "--batch", 8)?,
            );
            let pad = k / 2;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (batch, c, size, size), &device)?)?;
            let w = Var::from_tensor(
                &(Tensor::randn(0f32, 1., (c, 1, k, k), &device)? * (1.0 / k as f64))?,
            )?;
            let y0 = depthwise_conv2d(x.as_tensor(), w.as_tensor(), stride, pad)?;
            let g = Tensor::randn(0f32, 1., y0.shape(), &device)?;
            drop(y0);
            let (fwd, bwd) = time_fwd_bwd(
                warmup,
                steps,
                || Ok(depthwise_conv2d(x.as_tensor(), w.as_tensor(), stride, pad)?),
                |y| Ok((y * &g)?.sum_all()?),
            )?;
            out["channels"] = json!(c);
            out["size"] = json!(size);
            out["k"] = json!(k);
            out["stride"] = json!(stride);
            out["batch"] = json!(batch);
            out["fwd_ms"] = json!(round1(median(fwd)));
            out["bwd_ms"] = json!(round1(median(bwd)));
        }
        w => anyhow::bail!(
            "usage: train_step generator|efficientnet|depthwise [--options]; got {w:?}"
        ),
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
