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
        for (_, var, m, v) in &mut self.params {
            let Some(g) = grads.get(var) else { continue };
            // Detached: otherwise each moment would keep the previous step's
            // whole autograd graph alive, and memory would grow every step.
            let g = g.detach();
            *m = ((&*m * self.beta1)? + (&g * (1.0 - self.beta1))?)?.detach();
            *v = ((&*v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?.detach();
            let denom = ((v.sqrt()? / bc2.sqrt())? + self.eps)?;
            let update = (m.div(&denom)? * (self.lr / bc1))?;
            let p = var.as_tensor().detach();
            let p = if self.weight_decay > 0.0 {
                (&p * (1.0 - self.lr * self.weight_decay))?
            } else {
                p
            };
            var.set(&p.sub(&update)?)?;
        }
        Ok(())
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
}
