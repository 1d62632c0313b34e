//! Small numeric helpers of the renderer: hash-based value noise, samplers
//! (normal, Poisson, weighted pick), colour and interpolation.

use super::*;

// ---------------------------------------------------------------------------------------------
// Small numeric helpers.
// ---------------------------------------------------------------------------------------------

/// Hash-based 2-D value noise; a field is identified by its seed, so it costs no memory.
#[derive(Clone, Copy, Debug)]
pub(super) struct Noise {
    pub(super) seed: u32,
}

impl Noise {
    pub(super) fn new(rng: &mut impl Rng) -> Noise {
        Noise { seed: rng.random() }
    }

    /// Smoothly interpolated lattice noise in [0, 1] with unit cell size.
    pub(super) fn value(&self, x: f32, y: f32) -> f32 {
        let (fx, fy) = (floor(x), floor(y));
        let (ix, iy) = (fx as i32, fy as i32);
        let (tx, ty) = (x - fx, y - fy);
        let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
        let a = hash(ix, iy, self.seed);
        let b = hash(ix + 1, iy, self.seed);
        let c = hash(ix, iy + 1, self.seed);
        let d = hash(ix + 1, iy + 1, self.seed);
        let top = a + (b - a) * sx;
        let bottom = c + (d - c) * sx;
        top + (bottom - top) * sy
    }

    /// Fractal sum of `octaves` octaves, normalised to [0, 1].
    pub(super) fn fbm(&self, x: f32, y: f32, octaves: u32) -> f32 {
        let (mut sum, mut norm, mut amp, mut freq) = (0.0, 0.0, 1.0, 1.0);
        for o in 0..octaves {
            let octave = Noise {
                seed: self.seed.wrapping_add(o.wrapping_mul(0x68E3_1DA4)),
            };
            sum += amp * octave.value(x * freq, y * freq);
            norm += amp;
            amp *= 0.5;
            freq *= 2.0;
        }
        sum / norm
    }
}

/// Integer hash of a lattice point to [0, 1).
pub(super) fn hash(x: i32, y: i32, seed: u32) -> f32 {
    let mut h = seed ^ (x as u32).wrapping_mul(0x9E37_79B1) ^ (y as u32).wrapping_mul(0x85EB_CA77);
    h ^= h >> 15;
    h = h.wrapping_mul(0x2C1B_3C6D);
    h ^= h >> 12;
    h = h.wrapping_mul(0x297A_2D39);
    h ^= h >> 15;
    (h >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Standard normal via Box-Muller; the second variate is discarded so that every call
/// consumes exactly two uniforms.
pub(super) fn normal(rng: &mut impl Rng) -> f32 {
    let u1 = 1.0 - rng.random::<f32>(); // (0, 1], safe for ln
    let u2 = rng.random::<f32>();
    (-2.0 * u1.ln()).sqrt() * (TAU * u2).cos()
}

/// Poisson draw by Knuth's method (fine for the small means used here).
pub(super) fn poisson(mean: f32, rng: &mut impl Rng) -> usize {
    if mean <= 0.0 {
        return 0;
    }
    let limit = (-f64::from(mean)).exp();
    let mut product = 1.0f64;
    let mut k = 0;
    loop {
        product *= rng.random::<f64>();
        if product <= limit {
            return k;
        }
        k += 1;
    }
}

/// Index drawn from unnormalised `weights` given a uniform `u` in [0, 1).
pub(super) fn pick_weighted(weights: &[f32], u: f32) -> usize {
    let total: f32 = weights.iter().sum();
    let mut acc = 0.0;
    for (i, w) in weights.iter().enumerate() {
        acc += w / total;
        if u < acc {
            return i;
        }
    }
    weights.len() - 1
}

pub(super) fn skin_colour(tone: f32) -> [f32; 3] {
    let t = tone.clamp(0.0, 1.0) * (SKIN_RAMP.len() - 1) as f32;
    let i = (t.floor() as usize).min(SKIN_RAMP.len() - 2);
    lerp(SKIN_RAMP[i], SKIN_RAMP[i + 1], t - i as f32)
}

/// Linearly interpolated lookup of a periodic table indexed by angle in [-pi, pi].
pub(super) fn lookup(table: &[f32; PROFILE_BINS], theta: f32) -> f32 {
    let t = (theta + PI) / TAU * PROFILE_BINS as f32;
    let i = floor(t);
    let f = t - i;
    let i = (i as usize) % PROFILE_BINS;
    table[i] + (table[(i + 1) % PROFILE_BINS] - table[i]) * f
}

/// `f32::floor` without the libm call that baseline x86-64 needs (no SSE4.1 `roundss`);
/// exact for the magnitudes used here (|x| < 2^23).
pub(super) fn floor(x: f32) -> f32 {
    let t = x as i32 as f32;
    if t > x { t - 1.0 } else { t }
}

pub(super) fn wrap_angle(theta: f32) -> f32 {
    (theta + PI).rem_euclid(TAU) - PI
}

pub(super) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub(super) fn smoothstep(e0: f32, e1: f32, x: f32) -> f32 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

pub(super) fn lerp<const N: usize>(a: [f32; N], b: [f32; N], t: f32) -> [f32; N] {
    std::array::from_fn(|k| a[k] + (b[k] - a[k]) * t)
}

pub(super) fn luminance(c: [f32; 3]) -> f32 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
}

pub(super) fn to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8
}
