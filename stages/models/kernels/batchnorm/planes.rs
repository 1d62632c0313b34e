//! The per-plane kernels of the fused BatchNorm + activation (moments, forward,
//! gradient sums, input gradient) and their scalar building blocks, generic
//! over FMA; `batchnorm.rs` drives them over runs of planes.

use super::*;

// ---------------------------------------------------------------------------
// Scalar building blocks, generic over FMA (see `dispatch!`)
// ---------------------------------------------------------------------------

pub(super) const IDENTITY: u8 = 0;
pub(super) const SILU: u8 = 1;
pub(super) const RELU6: u8 = 2;
pub(super) const LEAKY: u8 = 3;

#[inline(always)]
pub(super) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    // `mul_add` is one instruction only where FMA is enabled; elsewhere it
    // would call libm's `fmaf`, so the baseline build keeps mul + add.
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

#[inline(always)]
pub(super) fn madd64<const FMA: bool>(a: f64, b: f64, c: f64) -> f64 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `e^x` for f32, Cephes `expf`: `x = n·ln2 + r`, `|r| ≤ ln2/2`, degree-6
/// polynomial for `e^r`, `2^n` built in the exponent bits. Unlike `f32::exp`
/// (a libm call) it is straight-line code, so loops around it vectorise.
/// Inputs are clamped to [−87, 88] (results stay normal, no overflow); NaN
/// stays NaN (the comparisons are false for it).
#[inline(always)]
pub(super) fn exp<const FMA: bool>(x: f32) -> f32 {
    const LO: f32 = -87.0;
    const HI: f32 = 88.0;
    // 1.5·2^23: adding it rounds to an integer that lands in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375, exactly; n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = if x < LO { LO } else { x };
    let x = if x > HI { HI } else { x };
    let kf = madd::<FMA>(x, std::f32::consts::LOG2_E, MAGIC);
    let n = kf - MAGIC;
    let r = madd::<FMA>(n, -LN2_HI, x);
    let r = madd::<FMA>(n, -LN2_LO, r);
    let mut p = 1.987_569_1e-4;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 0.5); // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
    let er = madd::<FMA>(p, r * r, r) + 1.0;
    // kf's bits are 0x4B40_0000 + n; adding the bias and shifting by 23 drops
    // the magic's bits and leaves n + 127 (in 1..=254) in the exponent field.
    let scale = f32::from_bits(kf.to_bits().wrapping_add(127) << 23);
    er * scale
}

#[inline(always)]
pub(super) fn act_fwd<const FMA: bool, const ACT: u8>(z: f32, slope: f32) -> f32 {
    match ACT {
        // `z·slope` is candle's `affine(slope, 0)` and the select its
        // `maximum`, so the values are the unfused ops' bit for bit.
        LEAKY => {
            let s = z * slope + 0.0;
            if z < s { s } else { z }
        }
        // candle's silu is `z / (1 + e^-z)` too.
        SILU => z / (1.0 + exp::<FMA>(-z)),
        RELU6 => {
            let t = if z < 0.0 { 0.0 } else { z };
            if t > 6.0 { 6.0 } else { t }
        }
        _ => z,
    }
}

/// `dy·act'(z)`, the gradient reaching `z`.
#[inline(always)]
pub(super) fn act_backward<const FMA: bool, const ACT: u8>(dy: f32, z: f32, slope: f32) -> f32 {
    match ACT {
        // The unfused ops' gradient, bit for bit: `maximum(z, s)`'s backward
        // gives z all of dy above 0, s all of it below, each half of it at a
        // tie (z = 0), and `s = affine(z, slope, 0)` passes its share on as
        // `share·slope + 0`, added after z's own share.
        LEAKY => {
            let s = z * slope + 0.0;
            if z > s {
                dy
            } else if z < s {
                dy * slope + 0.0
            } else {
                let half = dy * 0.5;
                half + (half * slope + 0.0)
            }
        }
        _ => dy * act_grad::<FMA, ACT>(z),
    }
}

/// `act'(z)` (all but [`LEAKY`], whose derivative [`act_backward`] applies).
#[inline(always)]
pub(super) fn act_grad<const FMA: bool, const ACT: u8>(z: f32) -> f32 {
    match ACT {
        SILU => {
            let s = 1.0 / (1.0 + exp::<FMA>(-z));
            s * (1.0 + z * (1.0 - s))
        }
        RELU6 => {
            // candle's clamp is maximum(0) then minimum(6), whose backward
            // splits the gradient in half on ties: ½ at exactly 0 or 6.
            let inside = (z > 0.0) & (z < 6.0);
            let edge = (z == 0.0) | (z == 6.0);
            if inside {
                1.0
            } else if edge {
                0.5
            } else {
                0.0
            }
        }
        _ => 1.0,
    }
}

// ---------------------------------------------------------------------------
// Plane kernels: one call handles a run of consecutive planes; plane `i` of
// the run is plane `p0 + i` of the tensor, channel `(p0 + i) % C`.
// ---------------------------------------------------------------------------

/// Accumulator lanes: independent f64 sums the compiler keeps in vector
/// registers (no reassociation of one float sum needed), reduced per plane.
pub(super) const LANES: usize = 8;

/// Per plane: (mean, Σ(x − mean)²), two passes over the (cache-resident) plane
/// with f64 accumulators.
#[inline(always)]
pub(super) fn moments_impl<const FMA: bool>(x: &[f32], hw: usize, out: &mut [(f64, f64)]) {
    for (xp, o) in x.chunks_exact(hw).zip(out) {
        let (body, tail) = xp.as_chunks::<LANES>();
        let mut acc = [0f64; LANES];
        for v in body {
            for i in 0..LANES {
                acc[i] += v[i] as f64;
            }
        }
        let sum = acc.iter().sum::<f64>() + tail.iter().map(|&v| v as f64).sum::<f64>();
        let mean = sum / hw as f64;
        let mut acc = [0f64; LANES];
        for v in body {
            for i in 0..LANES {
                let d = v[i] as f64 - mean;
                acc[i] = madd64::<FMA>(d, d, acc[i]);
            }
        }
        let tail_m2 = tail.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>();
        *o = (mean, acc.iter().sum::<f64>() + tail_m2);
    }
}

/// `y = act((x − μ)·a + β)`; also the eval forward (μ, a from running stats).
#[inline(always)]
pub(super) fn forward_impl<const FMA: bool, const ACT: u8>(
    x: &[f32],
    y: &mut [MaybeUninit<f32>],
    hw: usize,
    p0: usize,
    ch: Chan,
) {
    let c = ch.a.len();
    for (i, (xp, yp)) in x.chunks_exact(hw).zip(y.chunks_exact_mut(hw)).enumerate() {
        let k = (p0 + i) % c;
        let (mh, ml, a, b) = (ch.mean_hi[k], ch.mean_lo[k], ch.a[k], ch.beta[k]);
        for (o, &v) in yp.iter_mut().zip(xp) {
            o.write(act_fwd::<FMA, ACT>(
                madd::<FMA>((v - mh) - ml, a, b),
                ch.slope,
            ));
        }
    }
}

/// Adds `v` into f64 lanes (the tail into lane 0).
#[inline(always)]
pub(super) fn add_lanes(acc: &mut [f64; LANES], v: &[f32]) {
    let (body, tail) = v.as_chunks::<LANES>();
    for c in body {
        for i in 0..LANES {
            acc[i] += c[i] as f64;
        }
    }
    for &t in tail {
        acc[0] += t as f64;
    }
}

/// Values per block of [`grad_sums_impl`]'s stack buffers (2 KiB, L1-resident).
pub(super) const BLOCK: usize = 256;

/// Per plane: (Σg, Σg·(x−μ)) with `g = dy·act'(z)`, z recomputed exactly as
/// the forward did (so ReLU6's mask agrees with y).
///
/// Two loops per block: the element loop writes `g` and `g·(x−μ)` to stack
/// buffers (a plain map that vectorises, exp included), the second adds them
/// into f64 lanes. One fused loop would put the whole activation derivative
/// inside the lane accumulation, which LLVM leaves scalar (~7x slower for SiLU).
#[inline(always)]
pub(super) fn grad_sums_impl<const FMA: bool, const ACT: u8>(
    x: &[f32],
    dy: &[f32],
    hw: usize,
    p0: usize,
    ch: Chan,
    out: &mut [(f64, f64)],
) {
    let c = ch.a.len();
    let (mut gb, mut gdb) = ([0f32; BLOCK], [0f32; BLOCK]);
    for (i, ((xp, dp), o)) in x
        .chunks_exact(hw)
        .zip(dy.chunks_exact(hw))
        .zip(out)
        .enumerate()
    {
        let k = (p0 + i) % c;
        let (mh, ml, a, b) = (ch.mean_hi[k], ch.mean_lo[k], ch.a[k], ch.beta[k]);
        let (mut sg, mut sgd) = ([0f64; LANES], [0f64; LANES]);
        for (xc, dc) in xp.chunks(BLOCK).zip(dp.chunks(BLOCK)) {
            let (gs, gds) = (&mut gb[..xc.len()], &mut gdb[..xc.len()]);
            for (((g, gd), &v), &d) in gs.iter_mut().zip(gds.iter_mut()).zip(xc).zip(dc) {
                let dev = (v - mh) - ml;
                *g = act_backward::<FMA, ACT>(d, madd::<FMA>(dev, a, b), ch.slope);
                *gd = *g * dev;
            }
            add_lanes(&mut sg, gs);
            add_lanes(&mut sgd, gds);
        }
        *o = (sg.iter().sum(), sgd.iter().sum());
    }
}

/// `dx = a·g − (k0 + (x−μ)·k2)` with `(k0, k2) = k[channel]`: training has
/// `k0 = a·Σg/M`, `k2 = a·invstd²·Σg(x−μ)/M`; eval has `k0 = k2 = 0`.
#[inline(always)]
pub(super) fn grad_input_impl<const FMA: bool, const ACT: u8>(
    x: &[f32],
    dy: &[f32],
    dx: &mut [MaybeUninit<f32>],
    hw: usize,
    p0: usize,
    ch: Chan,
    k: &[(f32, f32)],
) {
    let c = ch.a.len();
    let planes = x
        .chunks_exact(hw)
        .zip(dy.chunks_exact(hw))
        .zip(dx.chunks_exact_mut(hw));
    for (i, ((xp, dp), op)) in planes.enumerate() {
        let j = (p0 + i) % c;
        let (mh, ml, a, b) = (ch.mean_hi[j], ch.mean_lo[j], ch.a[j], ch.beta[j]);
        let (k0, k2) = k[j];
        for ((o, &v), &d) in op.iter_mut().zip(xp).zip(dp) {
            let dev = (v - mh) - ml;
            let g = act_backward::<FMA, ACT>(d, madd::<FMA>(dev, a, b), ch.slope);
            o.write(madd::<FMA>(a, g, -madd::<FMA>(dev, k2, k0)));
        }
    }
}
