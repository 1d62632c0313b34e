//! Dots, globules and hairs: drawn at random per lesion and stamped onto the
//! image as anti-aliased coverage.

use super::*;

pub(super) fn random_dots(abcd: &Abcd, lesion: &Lesion, rng: &mut impl Rng) -> Vec<Dot> {
    // Dots and globules: more of them with a higher score, crowded into one sector of the
    // periphery when the lesion is asymmetric.
    let count = if rng.random::<f32>() < 0.15 + 0.8 * abcd.dots {
        (abcd.dots * abcd.dots * 30.0 * rng.random::<f32>()).round() as usize
    } else {
        0
    };
    let sector_centre = rng.random_range(-PI..PI);
    let spread = TAU * (1.0 - 0.75 * abcd.asymmetry);
    (0..count)
        .map(|_| {
            let theta = wrap_angle(sector_centre + (rng.random::<f32>() - 0.5) * spread);
            let q = rng.random_range(0.55..1.15) * lesion.boundary(theta);
            let centre = lesion.frame([q * theta.cos(), q * theta.sin()]);
            let shade = rng.random_range(0.05..0.3);
            let colour = if rng.random::<f32>() < 0.25 {
                [shade * 0.8, shade * 0.9, shade * 1.3] // blue-grey dot
            } else {
                [shade * 1.3, shade * 0.9, shade * 0.7] // brown-black dot
            };
            Dot {
                centre,
                radius: lesion.radius * rng.random_range(0.025..0.08),
                colour,
                opacity: rng.random_range(0.6..0.95),
            }
        })
        .collect()
}

pub(super) fn random_hair(patient: &Patient, rng: &mut impl Rng) -> Hair {
    let start = [rng.random_range(-0.2..1.2), rng.random_range(-0.2..1.2)];
    let angle = patient.hair_angle + 0.4 * normal(rng);
    let length = rng.random_range(0.25..1.0);
    let end = [
        start[0] + length * angle.cos(),
        start[1] + length * angle.sin(),
    ];
    let bend = 0.2 * length * normal(rng);
    let control = [
        0.5 * (start[0] + end[0]) - bend * angle.sin(),
        0.5 * (start[1] + end[1]) + bend * angle.cos(),
    ];
    Hair {
        points: [start, control, end],
        half_width: rng.random_range(0.0015..0.004),
        opacity: rng.random_range(0.6..0.95),
    }
}

/// Stamps one hair into the coverage buffer as a chain of line segments.
pub(super) fn stamp_hair(cov: &mut [f32], n: usize, hair: &Hair) {
    const SEGMENTS: usize = 24;
    let scale = n as f32;
    let hw = hair.half_width * scale;
    let [p0, p1, p2] = hair.points;
    let at = |t: f32| -> [f32; 2] {
        let s = 1.0 - t;
        std::array::from_fn(|k| (s * s * p0[k] + 2.0 * s * t * p1[k] + t * t * p2[k]) * scale)
    };
    let mut a = at(0.0);
    for i in 1..=SEGMENTS {
        let b = at(i as f32 / SEGMENTS as f32);
        let ab = [b[0] - a[0], b[1] - a[1]];
        let len2 = (ab[0] * ab[0] + ab[1] * ab[1]).max(1e-12);
        for_pixels_near(n, a, b, hw + 1.0, |idx, p| {
            let t = (((p[0] - a[0]) * ab[0] + (p[1] - a[1]) * ab[1]) / len2).clamp(0.0, 1.0);
            let d = ((p[0] - a[0] - t * ab[0]).powi(2) + (p[1] - a[1] - t * ab[1]).powi(2)).sqrt();
            let alpha = coverage(d, hw) * hair.opacity;
            cov[idx] = cov[idx].max(alpha);
        });
        a = b;
    }
}

/// Calls `f(index, pixel_centre)` for every pixel within `pad` of the box spanned by `a`, `b`
/// (pixel coordinates), clipped to the `n` x `n` frame.
pub(super) fn for_pixels_near(
    n: usize,
    a: [f32; 2],
    b: [f32; 2],
    pad: f32,
    mut f: impl FnMut(usize, [f32; 2]),
) {
    let lo = |v: f32| (v - pad).floor().max(0.0) as usize;
    let hi = |v: f32| ((v + pad).ceil().max(0.0) as usize).min(n);
    let (x0, x1) = (lo(a[0].min(b[0])), hi(a[0].max(b[0])));
    let (y0, y1) = (lo(a[1].min(b[1])), hi(a[1].max(b[1])));
    for y in y0..y1 {
        for x in x0..x1 {
            f(y * n + x, [x as f32 + 0.5, y as f32 + 0.5]);
        }
    }
}

/// Approximate area coverage of a pixel at distance `d` from the axis of a stroke or the
/// centre of a disc with half-width `hw` (all in pixels); thin strokes fade instead of aliasing.
pub(super) fn coverage(d: f32, hw: f32) -> f32 {
    (hw.max(0.5) + 0.5 - d).clamp(0.0, 1.0) * (2.0 * hw).min(1.0)
}
