//! The comparison behind `melanoflow gpu-check grads`: two runs of the same
//! training steps (a reference device and a candidate device, from the same
//! weights and batches), every parameter gradient of the first step and every
//! variable after the last step, each compared as a relative L2 error.
//!
//! Pure host-side arithmetic on flat `f32` vectors, so it is tested without a
//! GPU (and the whole check runs CPU against CPU in `make test`).
//!
//! The rules (stated in the report too):
//! * gradient error = `‖g_cand − g_ref‖ / max(‖g_ref‖, ZERO_FLOOR · ‖G_ref‖)`,
//!   where `‖G_ref‖` is the L2 norm of the whole network's gradient. A tensor
//!   whose reference gradient is below that floor is "at rounding level": its
//!   true gradient is zero (the bias of a convolution followed by instance
//!   norm, which the norm subtracts again) and what both devices computed is
//!   summation noise, compared against the floor rather than against itself.
//! * weight error after the steps = `‖w_cand − w_ref‖ / ‖w_ref‖` (or the
//!   absolute difference for an all-zero tensor); for a BatchNorm running
//!   mean, over `max(‖w_ref‖, ‖√running_var‖)`, the scale of its activations. Variables whose gradient was
//!   at rounding level are reported but not judged: Adam divides the
//!   gradient by its own magnitude, so noise becomes a full `lr`-sized step in
//!   a random direction on each device (harmless: the instance norm removes
//!   those biases again).

use std::collections::BTreeMap;

use serde::Serialize;

/// Largest gradient error that passes (f32 on both sides).
pub const GRAD_TOL: f64 = 1e-4;
/// Largest weight error after the steps that passes. Adam's first steps are
/// `lr · m / sqrt(v)`, close to `±lr` per element whatever the gradient's
/// size, so an element whose gradient is near zero can step the other way on
/// the other device: the weights drift apart by a few such steps, not by
/// float rounding alone.
pub const WEIGHT_TOL: f64 = 1e-3;
/// A gradient below this fraction of the network's gradient norm is at
/// rounding level (see the header). 1e-3 was too tight: a discriminator's
/// pre-norm bias gradient (true value 0, ‖g‖ 1e-7 of the network's) differed
/// by 2e-7 of the network's norm between the CPU kernels and the GPU
/// formulations, both on the CPU: summation order, not a bug.
pub const ZERO_FLOOR: f64 = 1e-2;

/// One side's results: per network (`G_A`, `classifier`, ...), each
/// variable's first-step gradient and its value after the last step.
#[derive(Clone, Debug, Default)]
pub struct SideResult {
    /// network -> variable -> gradient (variables with no gradient are absent).
    pub grads: BTreeMap<String, BTreeMap<String, Vec<f32>>>,
    /// network -> variable -> value after the last step.
    pub weights: BTreeMap<String, BTreeMap<String, Vec<f32>>>,
}

/// One variable's comparison.
#[derive(Clone, Debug, Serialize)]
pub struct TensorRow {
    pub network: String,
    pub name: String,
    pub elements: usize,
    /// `None` for a variable without a gradient (BatchNorm running statistics).
    pub grad_err: Option<f64>,
    /// The reference gradient is at rounding level (see the module header).
    pub grad_at_rounding_level: bool,
    pub weight_err: f64,
    pub passed: bool,
}

/// Everything `grads` reports for one model (a CycleGAN or a classifier).
#[derive(Clone, Debug, Serialize)]
pub struct ModelReport {
    pub model: String,
    pub rows: Vec<TensorRow>,
    pub worst_grad_err: f64,
    pub worst_weight_err: f64,
    /// One line per failed variable.
    pub failures: Vec<String>,
}

impl ModelReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

fn diff_norm(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = x as f64 - y as f64;
            d * d
        })
        .sum::<f64>()
        .sqrt()
}

/// A value that is not finite fails every comparison.
fn err_or_inf(e: f64) -> f64 {
    if e.is_finite() { e } else { f64::INFINITY }
}

/// Compares the candidate side with the reference side, variable by
/// variable. A variable present on one side only, or with another number of
/// elements, is a failure too.
pub fn compare(
    model: &str,
    reference: &SideResult,
    candidate: &SideResult,
    steps: usize,
) -> ModelReport {
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    let empty = BTreeMap::new();
    for (network, ref_weights) in &reference.weights {
        let cand_weights = candidate.weights.get(network).unwrap_or(&empty);
        let ref_grads = reference.grads.get(network).unwrap_or(&empty);
        let cand_grads = candidate.grads.get(network).unwrap_or(&empty);
        let total = ref_grads
            .values()
            .map(|g| norm(g).powi(2))
            .sum::<f64>()
            .sqrt();
        let floor = ZERO_FLOOR * total;
        for (name, w_ref) in ref_weights {
            let label = format!("{model} {network}.{name}");
            let Some(w_cand) = cand_weights.get(name) else {
                failures.push(format!("{label}: missing on the candidate device"));
                continue;
            };
            if w_cand.len() != w_ref.len() {
                failures.push(format!(
                    "{label}: {} elements on the candidate device, {} on the reference",
                    w_cand.len(),
                    w_ref.len()
                ));
                continue;
            }
            let mut passed = true;
            let (grad_err, at_rounding) = match (ref_grads.get(name), cand_grads.get(name)) {
                (None, None) => (None, false),
                (Some(g_ref), Some(g_cand)) if g_ref.len() == g_cand.len() => {
                    let own = norm(g_ref);
                    let e = err_or_inf(
                        diff_norm(g_cand, g_ref) / own.max(floor).max(f64::MIN_POSITIVE),
                    );
                    if e >= GRAD_TOL {
                        passed = false;
                        failures.push(format!(
                            "{label}: gradient relative L2 error {e:.2e} >= {GRAD_TOL:.0e} (|g_ref| = {own:.3e}, network |G| = {total:.3e})"
                        ));
                    }
                    (Some(e), own < floor)
                }
                (g_ref, g_cand) => {
                    passed = false;
                    failures.push(format!(
                        "{label}: gradient on the reference device: {}, on the candidate: {}",
                        g_ref.map_or("none".to_string(), |g| format!("{} elements", g.len())),
                        g_cand.map_or("none".to_string(), |g| format!("{} elements", g.len())),
                    ));
                    (None, false)
                }
            };
            // A BatchNorm running mean is judged on the scale of its
            // activations (the running standard deviation): where the batch
            // means are zero up to rounding (a normalised block output through
            // a 1x1 convolution) the mean itself is no scale at all.
            let own = match name.strip_suffix("running_mean") {
                Some(stem) => ref_weights
                    .get(&format!("{stem}running_var"))
                    .map_or(0.0, |var| {
                        var.iter().map(|&v| v.max(0.0) as f64).sum::<f64>().sqrt()
                    })
                    .max(norm(w_ref)),
                None => norm(w_ref),
            };
            let d = diff_norm(w_cand, w_ref);
            let weight_err = err_or_inf(if own > 0.0 { d / own } else { d });
            if !at_rounding && weight_err >= WEIGHT_TOL {
                passed = false;
                failures.push(format!(
                    "{label}: after {steps} steps the weights differ by relative L2 {weight_err:.2e} >= {WEIGHT_TOL:.0e}"
                ));
            }
            rows.push(TensorRow {
                network: network.clone(),
                name: name.clone(),
                elements: w_ref.len(),
                grad_err,
                grad_at_rounding_level: at_rounding,
                weight_err,
                passed,
            });
        }
        for name in cand_weights
            .keys()
            .filter(|n| !ref_weights.contains_key(*n))
        {
            failures.push(format!(
                "{model} {network}.{name}: missing on the reference device"
            ));
        }
    }
    let worst = |f: fn(&TensorRow) -> Option<f64>| {
        rows.iter().filter_map(f).fold(
            0.0,
            |a: f64, b| if b.is_nan() { f64::INFINITY } else { a.max(b) },
        )
    };
    ModelReport {
        model: model.to_string(),
        worst_grad_err: worst(|r| r.grad_err.filter(|_| !r.grad_at_rounding_level)),
        worst_weight_err: worst(|r| (!r.grad_at_rounding_level).then_some(r.weight_err)),
        rows,
        failures,
    }
}

/// Perturbs one variable's gradient on a side by a relative `1e-3` (the test
/// hook behind `--inject`): the check must then fail, naming it.
pub fn inject(side: &mut SideResult, qualified: &str) -> Result<(), String> {
    for (network, grads) in side.grads.iter_mut() {
        if let Some(name) = qualified.strip_prefix(&format!("{network}."))
            && let Some(g) = grads.get_mut(name)
        {
            let n = g.len().max(1) as f32;
            // Adds 1e-3 · |g| spread evenly: a relative error of exactly 1e-3.
            let delta = (1e-3 * norm(g)) as f32 / n.sqrt();
            g.iter_mut().for_each(|x| *x += delta);
            return Ok(());
        }
    }
    let known: Vec<String> = side
        .grads
        .iter()
        .flat_map(|(n, g)| g.keys().map(move |k| format!("{n}.{k}")))
        .take(5)
        .collect();
    Err(format!(
        "--inject {qualified}: no such gradient (names look like {})",
        known.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(grads: &[(&str, Vec<f32>)], weights: &[(&str, Vec<f32>)]) -> SideResult {
        let map = |v: &[(&str, Vec<f32>)]| {
            BTreeMap::from([(
                "net".to_string(),
                v.iter()
                    .map(|(n, x)| (n.to_string(), x.clone()))
                    .collect::<BTreeMap<_, _>>(),
            )])
        };
        SideResult {
            grads: map(grads),
            weights: map(weights),
        }
    }

    #[test]
    fn identical_sides_pass_and_rounding_level_gradients_are_judged_against_the_floor() {
        let w = vec![("w", vec![1.0, 2.0]), ("b", vec![0.0, 0.0])];
        let r = side(&[("w", vec![3.0, 4.0]), ("b", vec![1e-9, -1e-9])], &w);
        // The bias gradient is pure noise on both sides but far below the floor
        // (1e-3 of |G| = 5e-3); its weights (Adam's noise steps) are not judged.
        let c = side(
            &[("w", vec![3.0, 4.0]), ("b", vec![-2e-9, 1e-9])],
            &[("w", vec![1.0, 2.0]), ("b", vec![2e-4, -2e-4])],
        );
        let rep = compare("m", &r, &c, 3);
        assert!(rep.passed(), "{:?}", rep.failures);
        let b = rep.rows.iter().find(|r| r.name == "b").unwrap();
        assert!(b.grad_at_rounding_level);
        assert!(b.grad_err.unwrap() < 1e-5);
        assert_eq!(rep.worst_grad_err, 0.0);
    }

    #[test]
    fn a_gradient_or_weight_beyond_tolerance_fails_by_name() {
        let r = side(&[("w", vec![3.0, 4.0])], &[("w", vec![1.0, 2.0])]);
        let c = side(&[("w", vec![3.0, 4.001])], &[("w", vec![1.0, 2.0])]);
        let rep = compare("m", &r, &c, 3);
        assert_eq!(rep.failures.len(), 1, "{:?}", rep.failures);
        assert!(
            rep.failures[0].contains("m net.w: gradient relative L2 error 2.00e-4"),
            "{}",
            rep.failures[0]
        );
        let c = side(&[("w", vec![3.0, 4.0])], &[("w", vec![1.0, 2.01])]);
        let rep = compare("m", &r, &c, 3);
        assert!(
            rep.failures[0].contains("after 3 steps the weights differ"),
            "{:?}",
            rep.failures
        );
        let c = side(&[("w", vec![3.0, f32::NAN])], &[("w", vec![1.0, 2.0])]);
        assert!(!compare("m", &r, &c, 3).passed(), "NaN never passes");
    }

    #[test]
    fn missing_or_reshaped_variables_fail() {
        let r = side(&[("w", vec![3.0, 4.0])], &[("w", vec![1.0, 2.0])]);
        let c = side(&[], &[("w", vec![1.0, 2.0])]);
        let rep = compare("m", &r, &c, 1);
        assert!(
            rep.failures[0]
                .contains("gradient on the reference device: 2 elements, on the candidate: none")
        );
        let c = side(&[("w", vec![3.0, 4.0])], &[("w", vec![1.0, 2.0, 3.0])]);
        assert!(compare("m", &r, &c, 1).failures[0].contains("3 elements on the candidate"));
        let c = side(&[("w", vec![3.0, 4.0])], &[("v", vec![1.0, 2.0])]);
        let rep = compare("m", &r, &c, 1);
        assert_eq!(rep.failures.len(), 2, "{:?}", rep.failures);
    }

    #[test]
    fn inject_adds_a_relative_error_of_1e_3() {
        let r = side(&[("w", vec![3.0, 4.0])], &[("w", vec![1.0, 2.0])]);
        let mut c = r.clone();
        inject(&mut c, "net.w").unwrap();
        let rep = compare("m", &r, &c, 1);
        let e = rep.rows[0].grad_err.unwrap();
        assert!((e - 1e-3).abs() < 1e-6, "{e}");
        assert!(
            inject(&mut c, "net.nope")
                .unwrap_err()
                .contains("no such gradient (names look like net.w)")
        );
    }
}
