//! Geometric augmentation and tensor conversion for classifier inputs.
//!
//! One sampler does everything: it maps each output pixel back to the source
//! image through an affine transform (rotation about the centre, zoom, shift,
//! mirror) and interpolates bilinearly, reflecting at the borders, as
//! dermoscopy images have no canonical orientation. The identity transform
//! with a different output size is a plain bilinear resize, so evaluation
//! uses the same code with no randomness.

use rand::Rng;

/// One draw of the geometric transform.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Affine {
    /// Radians, counter-clockwise.
    pub angle: f32,
    /// > 1 zooms in (a random crop, resized back up).
    pub zoom: f32,
    /// Shift of the sampled window's centre, in fractions of the source size.
    pub shift: (f32, f32),
    pub mirror: bool,
}

impl Affine {
    pub const IDENTITY: Affine = Affine {
        angle: 0.0,
        zoom: 1.0,
        shift: (0.0, 0.0),
        mirror: false,
    };

    /// Only a random mirror and quarter turn: exact pixel permutations.
    pub fn random_flip(rng: &mut impl Rng) -> Affine {
        Affine {
            angle: rng.random_range(0..4u8) as f32 * std::f32::consts::FRAC_PI_2,
            mirror: rng.random(),
            ..Self::IDENTITY
        }
    }

    /// Classical augmentation: any rotation, a crop of 77-100% of the side
    /// (zoom 1-1.3), a shift of up to 10%, a random mirror.
    pub fn random_classical(rng: &mut impl Rng) -> Affine {
        Affine {
            angle: rng.random_range(0.0..std::f32::consts::TAU),
            zoom: rng.random_range(1.0..1.3),
            shift: (rng.random_range(-0.1..0.1), rng.random_range(-0.1..0.1)),
            mirror: rng.random(),
        }
    }
}

/// Resamples an HWC RGB image of side `src` to side `out` through `t`.
pub fn warp(px: &[u8], src: usize, out: usize, t: Affine) -> Vec<u8> {
    debug_assert_eq!(px.len(), src * src * 3);
    if t == Affine::IDENTITY && src == out {
        return px.to_vec();
    }
    let (sin, cos) = t.angle.sin_cos();
    let c_out = (out as f32 - 1.0) / 2.0;
    let c_src = (src as f32 - 1.0) / 2.0;
    // Source pixels per output pixel, before zoom.
    let scale = src as f32 / out as f32 / t.zoom;
    let (sx0, sy0) = (
        c_src + t.shift.0 * src as f32,
        c_src + t.shift.1 * src as f32,
    );
    let mut dst = vec![0u8; out * out * 3];
    for y in 0..out {
        for x in 0..out {
            let mut u = (x as f32 - c_out) * scale;
            let v = (y as f32 - c_out) * scale;
            if t.mirror {
                u = -u;
            }
            let (sx, sy) = (sx0 + cos * u - sin * v, sy0 + sin * u + cos * v);
            let o = (y * out + x) * 3;
            sample_bilinear(px, src, sx, sy, &mut dst[o..o + 3]);
        }
    }
    dst
}

/// Reflects a coordinate into [0, n - 1] (edge pixel not repeated).
fn reflect(mut p: f32, n: usize) -> f32 {
    let max = (n - 1) as f32;
    if max == 0.0 {
        return 0.0;
    }
    let period = 2.0 * max;
    p = p.rem_euclid(period);
    if p > max { period - p } else { p }
}

fn sample_bilinear(px: &[u8], n: usize, x: f32, y: f32, out: &mut [u8]) {
    let (x, y) = (reflect(x, n), reflect(y, n));
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(n - 1), (y0 + 1).min(n - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    for c in 0..3 {
        let p = |xx: usize, yy: usize| px[(yy * n + xx) * 3 + c] as f32;
        let top = p(x0, y0) * (1.0 - fx) + p(x1, y0) * fx;
        let bottom = p(x0, y1) * (1.0 - fx) + p(x1, y1) * fx;
        out[c] = (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8;
    }
}

/// ImageNet channel statistics (the pretrained weights expect them).
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Appends an HWC RGB image to `chw` as normalised CHW floats.
pub fn push_normalised_chw(px: &[u8], side: usize, chw: &mut Vec<f32>) {
    for c in 0..3 {
        let (m, s) = (MEAN[c], STD[c]);
        chw.extend((0..side * side).map(|i| (px[i * 3 + c] as f32 / 255.0 - m) / s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn image(n: usize) -> Vec<u8> {
        (0..n * n * 3).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn identity_is_a_copy_and_quarter_turns_permute_pixels() {
        let px = image(5);
        assert_eq!(warp(&px, 5, 5, Affine::IDENTITY), px);
        let turned = warp(
            &px,
            5,
            5,
            Affine {
                angle: std::f32::consts::FRAC_PI_2,
                ..Affine::IDENTITY
            },
        );
        let mut a = px.clone();
        let mut b = turned.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b, "a quarter turn moves pixels without blending them");
        assert_ne!(turned, px);
        let four = (0..4).fold(px.clone(), |img, _| {
            warp(
                &img,
                5,
                5,
                Affine {
                    angle: std::f32::consts::FRAC_PI_2,
                    ..Affine::IDENTITY
                },
            )
        });
        assert_eq!(four, px);
        let mirrored = warp(
            &warp(
                &px,
                5,
                5,
                Affine {
                    mirror: true,
                    ..Affine::IDENTITY
                },
            ),
            5,
            5,
            Affine {
                mirror: true,
                ..Affine::IDENTITY
            },
        );
        assert_eq!(mirrored, px);
    }

    #[test]
    fn resize_of_a_constant_image_is_constant_and_reflection_stays_in_range() {
        let px = vec![77u8; 8 * 8 * 3];
        assert!(warp(&px, 8, 5, Affine::IDENTITY).iter().all(|&v| v == 77));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..20 {
            let t = Affine::random_classical(&mut rng);
            assert!(warp(&px, 8, 8, t).iter().all(|&v| v == 77), "{t:?}");
        }
        for p in [-3.5f32, -0.2, 0.0, 4.0, 7.9, 12.0, 100.0] {
            let r = reflect(p, 8);
            assert!((0.0..=7.0).contains(&r), "{p} -> {r}");
        }
    }

    #[test]
    fn normalisation_uses_imagenet_statistics() {
        let px = vec![255u8, 0, 124];
        let mut v = Vec::new();
        push_normalised_chw(&px, 1, &mut v);
        assert!((v[0] - (1.0 - 0.485) / 0.229).abs() < 1e-6);
        assert!((v[1] - (-0.456 / 0.224)).abs() < 1e-6);
        assert!((v[2] - (124.0 / 255.0 - 0.406) / 0.225).abs() < 1e-6);
    }
}
