//! Deterministic weight initialisation. candle draws `Init::Randn` from an
//! unseeded generator on CPU, so after a model is built every variable is
//! overwritten from the pipeline seed: weights ~ N(0, 0.02) (the reference
//! CycleGAN's `init_type = normal`), biases 0. Variables are visited in name
//! order, so the values depend only on the seed and the architecture.

use candle_core::{Result, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn normal_init(varmap: &VarMap, seed: u64, stdev: f32) -> Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let n = var.elem_count();
        let values: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| stdev * standard_normal(&mut rng)).collect()
        };
        var.set(&Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// A standard normal draw (Box-Muller), portable across rand versions.
pub fn standard_normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}
