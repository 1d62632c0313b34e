//! Times one EfficientNet training step (forward, backward, Adam) on CPU:
//! `cargo run --release --example classifier_step -- [variant] [size] [batch] [steps]`.
//! Prints milliseconds per step with melanoflow's kernels and with candle's own
//! ops (`MODES=fast` or `MODES=candle` for one of them).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use melanoflow::models::adam::{Adam, named_vars};
use melanoflow::models::efficientnet::{EfficientNet, EfficientNetConfig, Variant, init_weights};
use melanoflow::models::kernels::set_fast_kernels;
use rand::SeedableRng;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let variant: Variant = serde_json::from_value(serde_json::Value::String(
        args.get(1).cloned().unwrap_or("b0".into()),
    ))?;
    let size: usize = args.get(2).map_or(Ok(64), |s| s.parse())?;
    let batch: usize = args.get(3).map_or(Ok(32), |s| s.parse())?;
    let steps: usize = args.get(4).map_or(Ok(5), |s| s.parse())?;
    let device = Device::Cpu;
    melanoflow::tune_threads();
    melanoflow::tune_allocator();
    let modes = std::env::var("MODES").unwrap_or_else(|_| "fast,candle".into());
    for fast in [true, false]
        .into_iter()
        .filter(|f| modes.contains(if *f { "fast" } else { "candle" }))
    {
        set_fast_kernels(fast);
        let vm = VarMap::new();
        let model = EfficientNet::new(
            &EfficientNetConfig::new(variant, 1),
            VarBuilder::from_varmap(&vm, DType::F32, &device),
        )?;
        init_weights(&vm, 0)?;
        let mut adam = Adam::new(named_vars("", &vm), 1e-3, 0.9, 0.999)?;
        let x = Tensor::zeros((batch, 3, size, size), DType::F32, &device)?.randn_like(0.0, 1.0)?;
        let t = Tensor::zeros(batch, DType::F32, &device)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let mut times = Vec::new();
        for _ in 0..steps + 1 {
            let start = std::time::Instant::now();
            let logits = model.forward_t(&x, Some(&mut rng))?.flatten_all()?;
            let loss = melanoflow::train_classifier::train::bce_with_logits(&logits, &t)?;
            adam.step(&loss.backward()?)?;
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        times.remove(0);
        times.sort_by(f64::total_cmp);
        println!(
            "{variant:?} {size}px batch {batch}: {:.0} ms/step median ({} kernels)",
            times[times.len() / 2],
            if fast { "melanoflow" } else { "candle" }
        );
    }
    Ok(())
}
