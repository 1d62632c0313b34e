//! Per-channel bias addition, `y[n, c, h, w] = x[n, c, h, w] + b[c]`, on CPU
//! with its own backward.
//!
//! candle's `broadcast_add` backward sums the output gradient over dims
//! (0, 2, 3) through its generic strided reduction, one value at a time: at
//! the CycleGAN's default preset (64 px, 8 channels, batch 4) that reduction
//! was 12.8% of a training step. Here the bias gradient is one pass over the
//! contiguous `[h, w]` planes, eight running sums per plane.
//!
//! Promises:
//! * [`add_channel_bias`] computes `x.broadcast_add(b.reshape((1, C, 1, 1)))`;
//!   the forward bit for bit (the same one addition per value), the input
//!   gradient is the output gradient itself, and the bias gradient matches
//!   candle's to f32 rounding (the terms are added in another order).
//! * Each channel's sum is taken by one task in a fixed order (planes by
//!   batch item, eight lanes per plane combined pairwise), so the result is
//!   the same bytes on any number of threads.
//! * Only CPU F32 tensors take this path (`kernels::path`); anything else
//!   runs candle's `broadcast_add`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::cpu::{dims4, f32_values};
use super::{Path, path};

/// `x [N, C, H, W] + b [C]` broadcast over N, H and W.
pub fn add_channel_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let c = b.dim(0)?;
    match path(&[x, b]) {
        Path::Cpu => x.apply_op2(b, ChannelBias),
        _ => x.broadcast_add(&b.reshape((1, c, 1, 1))?),
    }
}

/// The forward op: image (arg 1) plus bias (arg 2).
struct ChannelBias;

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "channel-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = dims4(l1, "channel bias", "input")?;
        if l2.dims() != [c] {
            bail!(
                "channel bias: bias is {:?}, expected [{c}] for input {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let (x, b) = (f32_values(s1, l1)?, f32_values(s2, l2)?);
        let plane = h * w;
        let mut y = vec![0f32; x.len()];
        if plane > 0 {
            y.par_chunks_mut(plane)
                .zip(x.par_chunks(plane))
                .enumerate()
                .for_each(|(i, (y, x))| {
                    let bias = b[i % c];
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = x + bias;
                    }
                });
        }
        Ok((CpuStorage::F32(y), Shape::from((n, c, h, w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.track_op().then(|| grad_res.clone());
        let db = if b.track_op() {
            Some(grad_res.apply_op1_no_bwd(&ChannelSums)?)
        } else {
            None
        };
        Ok((dx, db))
    }
}

/// `[N, C, H, W]` → `[C]`, the sum over N, H and W of each channel.
struct ChannelSums;

impl CustomOp1 for ChannelSums {
    fn name(&self) -> &'static str {
        "channel-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = dims4(l, "channel bias", "output gradient")?;
        let g = f32_values(s, l)?;
        let plane = h * w;
        let sums: Vec<f32> = (0..c)
            .into_par_iter()
            .map(|ch| {
                (0..n).fold(0f32, |acc, item| {
                    acc + plane_sum(&g[(item * c + ch) * plane..][..plane])
                })
            })
            .collect();
        Ok((CpuStorage::F32(sums), Shape::from(c)))
    }
}

/// Sum of one plane: eight running sums (vectorised by LLVM), combined
/// pairwise, then the tail. A fixed order, and more accurate than one
/// running sum.
fn plane_sum(v: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            *l += x;
        }
    }
    let quads = [
        lanes[0] + lanes[4],
        lanes[1] + lanes[5],
        lanes[2] + lanes[6],
        lanes[3] + lanes[7],
    ];
    let pairs = [quads[0] + quads[2], quads[1] + quads[3]];
    tail.iter().fold(pairs[0] + pairs[1], |acc, &x| acc + x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::super::testing::{
        assert_same_bits_at_any_thread_count, bits, random, rel_err, switch_on,
    };

    fn reference(x: &Tensor, b: &Tensor) -> Result<Tensor> {
        x.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)
    }

    /// Output and both gradients against a random cotangent `r`.
    fn run(
        add: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
        x: &Var,
        b: &Var,
        r: &Tensor,
    ) -> [Tensor; 3] {
        let y = add(x.as_tensor(), b.as_tensor()).unwrap();
        let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        [
            y,
            grads.get(x.as_tensor()).unwrap().clone(),
            grads.get(b.as_tensor()).unwrap().clone(),
        ]
    }

    #[test]
    fn matches_broadcast_add_forward_bitwise_and_gradients_to_rounding() {
        let _on = switch_on();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        // Planes shorter than, equal to and longer than the eight lanes with
        // a tail; one channel; a batch of 5; a 1x1 plane.
        for &(n, c, h, w) in &[
            (4, 8, 64, 64),
            (1, 256, 7, 9),
            (5, 1, 2, 4),
            (3, 6, 1, 1),
            (2, 3, 13, 11),
        ] {
            let x = Var::from_tensor(&random(&mut rng, &[n, c, h, w])).unwrap();
            let b = Var::from_tensor(&random(&mut rng, &[c])).unwrap();
            let r = random(&mut rng, &[n, c, h, w]);
            let case = format!("{n}x{c}x{h}x{w}");
            let [y, dx, db] = run(add_channel_bias, &x, &b, &r);
            let [y_ref, dx_ref, db_ref] = run(reference, &x, &b, &r);
            assert_eq!(bits(&y), bits(&y_ref), "{case}: forward");
            assert_eq!(bits(&dx), bits(&dx_ref), "{case}: input gradient");
            let e = rel_err(&db, &db_ref);
            assert!(e <= 1e-5, "{case}: bias gradient rel err {e:e}");
        }
    }

    #[test]
    fn same_bits_at_any_thread_count_and_strided_input() {
        let _on = switch_on();
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let x = Var::from_tensor(&random(&mut rng, &[3, 16, 21, 19])).unwrap();
        let b = Var::from_tensor(&random(&mut rng, &[16])).unwrap();
        let r = random(&mut rng, &[3, 16, 19, 21]);
        assert_same_bits_at_any_thread_count("bias 3x16x21x19 transposed", || {
            // A transposed (strided) view: the op gathers it.
            let xt = |x: &Tensor, b: &Tensor| add_channel_bias(&x.transpose(2, 3)?, b);
            let [y, dx, db] = run(xt, &x, &b, &r);
            vec![("y", y), ("dx", dx), ("db", db)]
        });
        let bad = add_channel_bias(x.as_tensor(), &random(&mut rng, &[15])).unwrap_err();
        assert!(
            bad.to_string().contains("bias is [15], expected [16]"),
            "{bad}"
        );
    }
}
