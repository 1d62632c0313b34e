//! Milliseconds per CycleGAN training step in candle (the stage's own loop
//! body: 2 generators + 2 discriminators forward, backward, two Adam steps),
//! for `benches/cyclegan.sh` to print beside PyTorch.
//!
//!   cyclegan_step --size 128 --ngf 64 --ndf 64 --blocks 9 --batch 1 --steps 5 --warmup 2

use std::time::Instant;

use candle_core::{Device, Module, Tensor};
use melanoflow::models::layers::{l1, mse};
use melanoflow::train_cyclegan::adam::Adam;
use melanoflow::train_cyclegan::train::Nets;
use melanoflow::train_cyclegan::{Preset, TrainCycleGanParams};

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(|v| v.parse().expect("a number")).unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (size, ngf, ndf, blocks, batch) = (arg(&args, "--size", 128), arg(&args, "--ngf", 64), arg(&args, "--ndf", 64), arg(&args, "--blocks", 9), arg(&args, "--batch", 1));
    let (steps, warmup) = (arg(&args, "--steps", 5), arg(&args, "--warmup", 2));
    let params: TrainCycleGanParams = serde_json::from_value(serde_json::json!({
        "preset": "default", "ngf": ngf, "ndf": ndf, "n_blocks": blocks, "batch_size": batch, "device": "cpu"
    }))?;
    let _ = Preset::Default;
    let cfg = params.resolve();
    let device = Device::Cpu;
    let nets = Nets::new(&cfg, &device)?;
    let vars = |ks: &[usize]| -> Vec<_> { ks.iter().flat_map(|&k| melanoflow::train_cyclegan::adam::named_vars(nets.vars[k].0, &nets.vars[k].1)).collect() };
    let mut adam_g = Adam::new(vars(&[0, 1]), 2e-4, 0.5, 0.999)?;
    let mut adam_d = Adam::new(vars(&[2, 3]), 2e-4, 0.5, 0.999)?;
    let real_a = Tensor::rand(-1f32, 1., (batch, 3, size, size), &device)?;
    let real_b = Tensor::rand(-1f32, 1., (batch, 3, size, size), &device)?;
    let mut times = Vec::new();
    for i in 0..warmup + steps {
        let t = Instant::now();
        let fake_b = nets.g_a.forward(&real_a)?;
        let rec_a = nets.g_b.forward(&fake_b)?;
        let fake_a = nets.g_b.forward(&real_b)?;
        let rec_b = nets.g_a.forward(&fake_a)?;
        let pb = nets.d_a.forward(&fake_b)?;
        let pa = nets.d_b.forward(&fake_a)?;
        let loss_g = (((mse(&pb, &pb.ones_like()?)? + mse(&pa, &pa.ones_like()?)?)? + (l1(&rec_a, &real_a)? * 10.0)?)? + (l1(&rec_b, &real_b)? * 10.0)?)?;
        adam_g.step(&loss_g.backward()?)?;
        let (fb, fa) = (fake_b.detach(), fake_a.detach());
        let rb = nets.d_a.forward(&real_b)?;
        let ra = nets.d_b.forward(&real_a)?;
        let loss_d_a = ((mse(&rb, &rb.ones_like()?)? + mse(&nets.d_a.forward(&fb)?, &rb.zeros_like()?)?)? * 0.5)?;
        let loss_d_b = ((mse(&ra, &ra.ones_like()?)? + mse(&nets.d_b.forward(&fa)?, &ra.zeros_like()?)?)? * 0.5)?;
        let loss_d = (loss_d_a + loss_d_b)?;
        adam_d.step(&loss_d.backward()?)?;
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{{\"framework\":\"candle\",\"size\":{size},\"ngf\":{ngf},\"blocks\":{blocks},\"batch\":{batch},\"threads\":{},\"ms_per_step\":{:.1}}}",
        rayon::current_num_threads(),
        times[times.len() / 2]
    );
    Ok(())
}
