//! Test helpers shared by the kernels' tests: the switch guard, seeded random
//! tensors, and the relative error every kernel is checked to.

use std::sync::RwLockReadGuard;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{SWITCH, fast_kernels_enabled};

/// Held (shared) by tests that assume the fast kernels are on; the tests that
/// flip the switch hold [`SWITCH`] exclusively.
pub fn switch_on() -> RwLockReadGuard<'static, ()> {
    let guard = SWITCH.read().unwrap_or_else(|e| e.into_inner());
    assert!(fast_kernels_enabled());
    guard
}

/// A CPU f32 tensor with values uniform in [lo, hi).
pub fn uniform(rng: &mut ChaCha8Rng, dims: &[usize], lo: f32, hi: f32) -> Tensor {
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// Values uniform in [-1, 1).
pub fn random(rng: &mut ChaCha8Rng, dims: &[usize]) -> Tensor {
    uniform(rng, dims, -1.0, 1.0)
}

pub fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// max|a - b| / max|b|, the denominator floored at 1e-3 so near-zero
/// references compare absolutely. Panics on a non-finite result.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (values(a), values(b));
    assert!(a.iter().all(|v| v.is_finite()), "non-finite result");
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(1e-3, f64::max);
    diff / scale
}

/// Median wall time of `runs` calls of `f`, in ms, after three warm-up calls
/// (page faults, thread-pool start and clock ramp would skew the first).
pub fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

/// The thread counts the determinism tests run at: one, the CI machine's two,
/// and an odd count that divides none of the kernels' chunk counts.
pub const THREADS: [usize; 3] = [1, 2, 7];

/// The f32 values of `t` as raw bits (so -0.0 and NaN payloads count too).
pub fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// Runs `f` inside rayon pools of each of [`THREADS`] threads and asserts
/// that every run returns bit-identical tensors (`f` names each one, for the
/// message). The kernels promise results that depend on the problem's shape
/// only, never on the thread count.
pub fn assert_same_bits_at_any_thread_count<F>(case: &str, f: F)
where
    F: Fn() -> Vec<(&'static str, Tensor)> + Sync,
{
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(&f)
            .into_iter()
            .map(|(name, t)| (name, t.dims().to_vec(), bits(&t)))
            .collect::<Vec<_>>()
    };
    let first = run(THREADS[0]);
    let mut differ = Vec::new();
    for threads in &THREADS[1..] {
        let other = run(*threads);
        assert_eq!(first.len(), other.len(), "{case}");
        for ((name, dims, a), (_, dims_b, b)) in first.iter().zip(&other) {
            assert_eq!(dims, dims_b, "{case}: {name} shape");
            let diff = a.iter().zip(b).filter(|(x, y)| x != y).count();
            if diff > 0 {
                differ.push(format!(
                    "{name} differs in {diff} of {} values between {} and {threads} threads",
                    a.len(),
                    THREADS[0]
                ));
            }
        }
    }
    assert!(differ.is_empty(), "{case}: {}", differ.join("; "));
}
