//! Adam with state that can be saved and restored, so a resumed training run
//! continues bit for bit (candle-nn's AdamW keeps its moments private).
//! The update is PyTorch's `torch.optim.Adam` (no weight decay):
//!   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//!   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! with optional decoupled weight decay (`torch.optim.AdamW`): p -= lr wd p first.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;
use rayon::prelude::*;

use super::kernels::{Path, path};

pub struct Adam {
    /// (name, variable, first moment, second moment), sorted by name.
    params: Vec<(String, Var, Tensor, Tensor)>,
    pub lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// Decoupled weight decay (0 = Adam).
    pub weight_decay: f64,
    /// Steps taken.
    pub t: u64,
}

impl Adam {
    /// An optimiser over named variables (see [`named_vars`]).
    pub fn new(vars: Vec<(String, Var)>, lr: f64, beta1: f64, beta2: f64) -> Result<Adam> {
        let params = vars
            .into_iter()
            .map(|(n, var)| {
                let zeros = var.zeros_like()?;
                Ok((n, var, zeros.clone(), zeros))
            })
            .collect::<Result<_>>()?;
        Ok(Adam {
            params,
            lr,
            beta1,
            beta2,
            eps: 1e-8,
            weight_decay: 0.0,
            t: 0,
        })
    }

    /// One update of every variable that has a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        let coeffs = Coeffs::new(self, bc1, bc2);
        for i in 0..self.params.len() {
            let (_, var, m, v) = &self.params[i];
            let Some(g) = grads.get(var) else { continue };
            // Detached: otherwise each moment would keep the previous step's
            // whole autograd graph alive, and memory would grow every step.
            let (g, p) = (g.detach(), var.as_tensor().detach());
            let (p, m, v) = if fused_applies(&[&p, &g, m, v]) {
                fused_update(&p, &g, m, v, &coeffs)?
            } else {
                self.candle_update(&p, &g, m, v, bc1, bc2)?
            };
            self.params[i].1.set(&p)?;
            (self.params[i].2, self.params[i].3) = (m, v);
        }
        Ok(())
    }

    /// The update as candle ops (any device and dtype): the new `(p, m, v)`.
    fn candle_update(
        &self,
        p: &Tensor,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
        bc1: f64,
        bc2: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let m = ((m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
        let v = ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
        let denom = ((v.sqrt()? / bc2.sqrt())? + self.eps)?;
        let update = (m.div(&denom)? * (self.lr / bc1))?;
        let p = if self.weight_decay > 0.0 {
            (p * (1.0 - self.lr * self.weight_decay))?
        } else {
            p.clone()
        };
        Ok((p.sub(&update)?, m, v))
    }

    /// Moments by name (`m.NAME`, `v.NAME`), for a checkpoint.
    pub fn state(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .flat_map(|(n, _, m, v)| {
                [
                    (format!("{prefix}m.{n}"), m.clone()),
                    (format!("{prefix}v.{n}"), v.clone()),
                ]
            })
            .collect()
    }

    pub fn load_state(
        &mut self,
        prefix: &str,
        tensors: &HashMap<String, Tensor>,
        t: u64,
    ) -> Result<()> {
        for (n, _, m, v) in &mut self.params {
            let get = |k: String| {
                tensors
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint lacks `{k}`")))
            };
            *m = get(format!("{prefix}m.{n}"))?;
            *v = get(format!("{prefix}v.{n}"))?;
        }
        self.t = t;
        Ok(())
    }
}

/// A var map's variables as (`PREFIX` + name, var), sorted by name.
pub fn named_vars(prefix: &str, varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut v: Vec<(String, Var)> = data
        .iter()
        .map(|(n, var)| (format!("{prefix}{n}"), var.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

// ---------------------------------------------------------------------------
// The fused CPU update
// ---------------------------------------------------------------------------

/// The update's constants in F32, rounded from F64 exactly as the candle ops
/// above round them (`affine(mul, add)` takes `mul as f32`, `add as f32`).
struct Coeffs {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    inv_sqrt_bc2: f32,
    eps: f32,
    step: f32,
    /// `1 − lr·weight_decay`, when there is weight decay.
    decay: Option<f32>,
}

impl Coeffs {
    fn new(adam: &Adam, bc1: f64, bc2: f64) -> Self {
        Self {
            beta1: adam.beta1 as f32,
            one_minus_beta1: (1.0 - adam.beta1) as f32,
            beta2: adam.beta2 as f32,
            one_minus_beta2: (1.0 - adam.beta2) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
            eps: adam.eps as f32,
            step: (adam.lr / bc1) as f32,
            decay: (adam.weight_decay > 0.0).then_some((1.0 - adam.lr * adam.weight_decay) as f32),
        }
    }

    /// One element: `(p, m, v)` after the step, the candle ops' arithmetic
    /// operation for operation (each `affine` is `x·mul + add`, `+ 0.0`
    /// included), so both paths give the same bits.
    #[inline(always)]
    fn update(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let m = (m * self.beta1 + 0.0) + (g * self.one_minus_beta1 + 0.0);
        let v = (v * self.beta2 + 0.0) + ((g * g) * self.one_minus_beta2 + 0.0);
        let denom = (v.sqrt() * self.inv_sqrt_bc2 + 0.0) * 1.0 + self.eps;
        let update = (m / denom) * self.step + 0.0;
        let p = match self.decay {
            Some(d) => p * d + 0.0,
            None => p,
        };
        (p - update, m, v)
    }
}

/// Whether the fused update applies: where `kernels::path` sends a call to
/// the CPU kernels (F32 tensors on the CPU, fast kernels on). Elsewhere
/// (CUDA, the switch off) the candle ops run, which are also the reference
/// the fused update is tested against.
fn fused_applies(ts: &[&Tensor]) -> bool {
    path(ts) == Path::Cpu
}

/// Values per parallel chunk: elementwise, so the split never changes a bit.
const CHUNK: usize = 1 << 14;

/// One pass over `p, g, m, v` (candle's ops take thirteen, each allocating a
/// parameter-sized tensor): the new `(p, m, v)`.
fn fused_update(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    k: &Coeffs,
) -> Result<(Tensor, Tensor, Tensor)> {
    let values = |t: &Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1::<f32>() };
    let (mut p_new, g, mut m_new, mut v_new) = (values(p)?, values(g)?, values(m)?, values(v)?);
    if g.len() != p_new.len() {
        candle_core::bail!(
            "adam: gradient has {} values, parameter {}",
            g.len(),
            p_new.len()
        );
    }
    p_new
        .par_chunks_mut(CHUNK)
        .zip(m_new.par_chunks_mut(CHUNK))
        .zip(v_new.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((ps, ms), vs), gs)| {
            for (((p, m), v), &g) in ps.iter_mut().zip(ms.iter_mut()).zip(vs.iter_mut()).zip(gs) {
                (*p, *m, *v) = k.update(*p, g, *m, *v);
            }
        });
    let shape = p.shape();
    Ok((
        Tensor::from_vec(p_new, shape, p.device())?,
        Tensor::from_vec(m_new, shape, p.device())?,
        Tensor::from_vec(v_new, shape, p.device())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn matches_torch_adam_on_a_quadratic() {
        // torch: p = torch.tensor([1.0, -2.0], requires_grad=True); opt = torch.optim.Adam([p], lr=0.1, betas=(0.5, 0.999))
        // for _ in range(3): opt.zero_grad(); (p ** 2).sum().backward(); opt.step()
        // print(p.tolist()) -> [0.7069713..., -1.7032161...]
        let vm = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let p = vb
            .get_with_hints(2, "p", candle_nn::Init::Const(0.0))
            .unwrap();
        vm.data().lock().unwrap()["p"]
            .set(&Tensor::new(&[1f32, -2.], &Device::Cpu).unwrap())
            .unwrap();
        let mut adam = Adam::new(named_vars("", &vm), 0.1, 0.5, 0.999).unwrap();
        for _ in 0..3 {
            let loss = vm.data().lock().unwrap()["p"]
                .as_tensor()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            adam.step(&loss.backward().unwrap()).unwrap();
        }
        let _ = p;
        let got = vm.data().lock().unwrap()["p"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            (got[0] - 0.706_971_3).abs() < 1e-5 && (got[1] + 1.703_216_1).abs() < 1e-5,
            "{got:?}"
        );
    }

    /// The fused CPU update gives the candle ops' bits, over several steps,
    /// with and without weight decay, on a parameter longer than one chunk
    /// (so the parallel split is exercised) and with a non-contiguous gradient.
    #[test]
    fn fused_update_equals_the_candle_ops_bitwise() {
        use crate::models::kernels::testing::bits;
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let n = 5 * (CHUNK / 2 + 7);
        let mut random = |scale: f32| -> Tensor {
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
            Tensor::from_vec(v, (n / 5, 5), &Device::Cpu).unwrap()
        };
        for weight_decay in [0.0, 0.05] {
            let vm = VarMap::new();
            let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            vb.get_with_hints((n / 5, 5), "p", candle_nn::Init::Const(0.0))
                .unwrap();
            let mut adam = Adam::new(named_vars("", &vm), 2e-4, 0.5, 0.999).unwrap();
            adam.weight_decay = weight_decay;
            let p = random(1.0);
            let (mut m, mut v) = (p.zeros_like().unwrap(), p.zeros_like().unwrap());
            let (mut pf, mut mf, mut vf) = (p.clone(), m.clone(), v.clone());
            let mut p = p;
            for t in 1..=4 {
                adam.t = t;
                let bc1 = 1.0 - adam.beta1.powi(t as i32);
                let bc2 = 1.0 - adam.beta2.powi(t as i32);
                // Tiny, zero and large gradients, through a transposed view.
                let g = (random(1.0) * 10f64.powi(2 - 3 * t as i32)).unwrap();
                let g = g.t().unwrap().contiguous().unwrap().t().unwrap();
                (p, m, v) = adam.candle_update(&p, &g, &m, &v, bc1, bc2).unwrap();
                let k = Coeffs::new(&adam, bc1, bc2);
                (pf, mf, vf) = fused_update(&pf, &g, &mf, &vf, &k).unwrap();
                assert_eq!(bits(&pf), bits(&p), "p, step {t}, decay {weight_decay}");
                assert_eq!(bits(&mf), bits(&m), "m, step {t}");
                assert_eq!(bits(&vf), bits(&v), "v, step {t}");
            }
        }
    }
}
