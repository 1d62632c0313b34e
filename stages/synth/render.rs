//! Procedural renderer of synthetic dermoscopy images of pigmented skin lesions.
//!
//! Each image shows a patch of skin in the patient's tone (low-frequency shading, patches of
//! redness, dermoscope illumination fall-off and sensor grain), a pigmented lesion with a soft,
//! irregular border, optional peripheral dots/globules, optional hairs, and on many images the
//! dark circular vignette of the dermoscope's field of view.
//!
//! Class differences follow the ABCD rule of dermoscopy (Asymmetry, Border irregularity,
//! Colour variety, Diameter) and are deliberately *overlapping* distributions: every lesion
//! draws a latent "severity" `s ~ N(0, 1)` (benign) or `N(shift, 1)`
//! (malignant), and each ABCD feature is an independent noisy function of `s` alone. The
//! image therefore depends on the class only through `s`, which bounds the ROC-AUC of any
//! classifier by that of `s` itself, `Φ(shift / √2)` (0.91 at shift 1.9, 0.95 at 2.3): the task
//! is learnable but never trivially separable. Everything else (skin tone, hair, vignette,
//! zoom, lighting) is drawn independently of the class, so it carries no label information.
//!
//! Promises:
//! * Deterministic: the output is a pure function of `(patient, severity_mean, size)` and the rng
//!   state. All random parameters are drawn up front from the rng in a fixed order; per-pixel
//!   noise comes from an integer hash seeded from the rng (no threads, clocks or hash maps).
//!   Bytes are reproducible on a given platform; libm's `exp`/`atan2` may differ in the last
//!   bit between platforms.
//! * Resolution independent: geometry is defined in frame-relative coordinates, so the same
//!   rng state gives the same picture at 64, 128 or 256 px (up to sampling).
//! * Cheap: a few hundred nanoseconds of f32 arithmetic per pixel and no per-pixel allocation.

use image::{Rgb, RgbImage};
use rand::Rng;
use std::f32::consts::{PI, TAU};

mod numeric;
use numeric::*;

mod marks;
use marks::*;

/// Mean latent severity of malignant lesions, in units of its standard deviation (benign
/// lesions have mean 0), unless the `synth` stage's `severity_shift` says otherwise. Caps the
/// Bayes ROC-AUC at `Φ(1.9 / √2)` ≈ 0.91. An f64 like every stage parameter, so that the
/// lock file records `1.9`, not its f32 widening.
pub const DEFAULT_SEVERITY_SHIFT: f64 = 1.9;

/// How strongly each ABCD feature follows the latent severity (the rest is independent
/// per-feature noise, so e.g. a malignant lesion can be small but very asymmetric).
const SEVERITY_LOADING: f32 = 0.7;

/// Fitzpatrick-like skin ramp as seen under a dermoscope (types I to VI), sRGB in [0, 1].
const SKIN_RAMP: [[f32; 3]; 6] = [
    [0.95, 0.78, 0.74],
    [0.91, 0.71, 0.63],
    [0.83, 0.61, 0.49],
    [0.69, 0.47, 0.34],
    [0.49, 0.33, 0.23],
    [0.31, 0.21, 0.16],
];

/// Share of each skin type; ISIC is dominated by fair skin.
const SKIN_TYPE_WEIGHTS: [f32; 6] = [0.28, 0.40, 0.18, 0.08, 0.04, 0.02];

/// Melanin absorption per unit density in R, G, B: absorbs blue most, so thin pigment looks
/// tan and dense pigment dark brown to black.
const MELANIN_ABSORPTION: [f32; 3] = [0.75, 1.0, 1.15];

/// Angular resolution of the lesion's radial profile tables.
const PROFILE_BINS: usize = 256;

/// Per-patient appearance shared by all of a patient's images (skin tone, hair density, ...).
#[derive(Clone, Debug)]
pub struct Patient {
    /// Skin darkness in [0, 1]: 0 is Fitzpatrick I, 1 is Fitzpatrick VI.
    pub tone: f32,
    /// Base skin colour (sRGB, [0, 1]) derived from `tone` with a small individual hue shift.
    pub skin: [f32; 3],
    /// Tendency to show red patches (erythema, vessels) in [0, 1].
    pub erythema: f32,
    /// Expected number of hair strands per image (0 for hairless sites).
    pub hair_density: f32,
    /// Hair colour (sRGB, [0, 1]).
    pub hair_colour: [f32; 3],
    /// Dominant hair direction in radians.
    pub hair_angle: f32,
    /// Probability that an image shows the dermoscope's dark circular vignette (depends on the
    /// device used for this patient).
    pub vignette_prob: f32,
    /// Camera white balance of this patient's images (per-channel gain).
    pub white_balance: [f32; 3],
}

impl Patient {
    /// Draws a patient's appearance: varied skin tones (Fitzpatrick I-VI-like range, mostly
    /// light as in ISIC), hair density, etc.
    pub fn random(rng: &mut impl Rng) -> Patient {
        let skin_type = pick_weighted(&SKIN_TYPE_WEIGHTS, rng.random::<f32>());
        let tone = (skin_type as f32 + rng.random::<f32>()) / SKIN_RAMP.len() as f32;
        let base = skin_colour(tone);
        // Individual variation: a little more red/yellow, a little lighter or darker.
        let brightness = 1.0 + 0.04 * normal(rng);
        let warmth = 0.025 * normal(rng);
        let skin = [
            (base[0] * brightness + warmth).clamp(0.05, 1.0),
            (base[1] * brightness).clamp(0.05, 1.0),
            (base[2] * brightness - warmth).clamp(0.05, 1.0),
        ];

        // About half the images in ISIC have no visible hair; a minority are very hairy.
        let u = rng.random::<f32>();
        let hair_density = if u < 0.5 {
            0.0
        } else if u < 0.85 {
            rng.random_range(0.5..4.0)
        } else {
            rng.random_range(4.0..22.0)
        };
        let hair_shade = if rng.random::<f32>() < 0.85 {
            rng.random_range(0.04..0.18)
        } else {
            // Blond or grey hair: lighter and lower contrast.
            rng.random_range(0.35..0.6)
        };
        let hair_colour = [hair_shade * 1.15, hair_shade, hair_shade * 0.9];

        let vignette_prob = [0.15, 0.6, 0.9][pick_weighted(&[0.3, 0.4, 0.3], rng.random())];
        let white_balance = [
            1.0 + 0.035 * normal(rng),
            1.0 + 0.02 * normal(rng),
            1.0 + 0.045 * normal(rng),
        ];

        Patient {
            tone,
            skin,
            erythema: rng.random::<f32>().powi(2),
            hair_density,
            hair_colour,
            hair_angle: rng.random_range(0.0..PI),
            vignette_prob,
            white_balance,
        }
    }
}

/// The mean latent severity of a lesion's class: 0 for benign, `shift` for malignant.
pub fn severity_mean(malignant: bool, shift: f64) -> f32 {
    if malignant { shift as f32 } else { 0.0 }
}

/// Renders one `size` x `size` dermoscopy-like image of a lesion on this patient's skin.
/// `severity_mean` (see [`severity_mean`]) selects the class-conditional distribution of the
/// lesion's features.
pub fn render_lesion(
    patient: &Patient,
    severity_mean: f32,
    size: u32,
    rng: &mut impl Rng,
) -> RgbImage {
    assert!(size > 0, "image size must be positive");
    Scene::random(patient, severity_mean, size, rng).draw()
}

// ---------------------------------------------------------------------------------------------
// Scene parameters: everything random is drawn here, in a fixed order.
// ---------------------------------------------------------------------------------------------

/// ABCD feature scores in [0, 1] (plus dots), each a noisy function of the latent severity.
struct Abcd {
    asymmetry: f32,
    border: f32,
    colour: f32,
    diameter: f32,
    dots: f32,
}

impl Abcd {
    fn random(severity_mean: f32, rng: &mut impl Rng) -> Abcd {
        let severity = normal(rng) + severity_mean;
        let mut feature = || {
            let noise = (1.0 - SEVERITY_LOADING * SEVERITY_LOADING).sqrt();
            let z = SEVERITY_LOADING * severity + noise * normal(rng);
            // Centred so that typical benign lesions score ~0.25 and melanomas ~0.6.
            sigmoid(1.3 * (z - 0.9))
        };
        Abcd {
            asymmetry: feature(),
            border: feature(),
            colour: feature(),
            diameter: feature(),
            dots: feature(),
        }
    }
}

/// Extra colour components of a lesion (beyond its base brown).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tint {
    /// Denser melanin: a second, darker brown.
    DarkBrown,
    /// Thinner melanin: tan.
    LightBrown,
    /// Very dense melanin.
    Black,
    /// Deep melanin / blue-white veil.
    BlueGrey,
    /// Vascular, pink-red areas.
    Red,
    /// Scar-like regression areas with grey peppering.
    White,
}

/// A patch of one extra colour inside the lesion, shaped by a noise field.
struct Region {
    tint: Tint,
    noise: Noise,
    /// Noise frequency in cycles per lesion radius.
    freq: f32,
    /// Noise level above which the region is fully present.
    threshold: f32,
    /// Pushes the region towards one side of the lesion (asymmetric colour distribution).
    bias: [f32; 2],
}

/// A dot or globule (stamped on top of the lesion).
struct Dot {
    centre: [f32; 2],
    radius: f32,
    colour: [f32; 3],
    opacity: f32,
}

/// A hair strand: a quadratic Bezier curve in frame coordinates.
struct Hair {
    points: [[f32; 2]; 3],
    half_width: f32,
    opacity: f32,
}

struct Vignette {
    centre: [f32; 2],
    radius: f32,
    softness: f32,
    level: f32,
}

struct Lesion {
    centre: [f32; 2],
    radius: f32,
    /// Rotation of the lesion's local frame (cos, sin).
    rotation: [f32; 2],
    /// Stretch of the local y axis (>= 1), making the lesion oval.
    elongation: f32,
    /// Border radius by angle, in units of `radius` (harmonic perturbations).
    profile: [f32; PROFILE_BINS],
    /// Width of the soft edge by angle, in units of `radius`.
    edge: [f32; PROFILE_BINS],
    border_noise: Noise,
    border_amp: f32,
    border_freq: f32,
    /// Melanin density of the base pigment.
    density: f32,
    /// Extra darkening towards the pigment centre.
    centre_dark: f32,
    /// Pigment centre relative to the lesion centre, in units of `radius`, local frame.
    pigment_offset: [f32; 2],
    texture: Noise,
    texture_amp: f32,
    texture_freq: f32,
    /// Pigment network: amplitude, noise cells per lesion radius, and its noise field.
    network_amp: f32,
    network_freq: f32,
    network_noise: Noise,
    regions: Vec<Region>,
    pepper_seed: u32,
    /// Local radius (units of `radius`) beyond which the lesion is invisible; since local y is
    /// stretched, `radius * outer` also bounds its extent in frame units.
    outer: f32,
}

struct Scene {
    size: u32,
    skin: [f32; 3],
    shade: Noise,
    shade_amp: f32,
    redness: Noise,
    redness_amp: f32,
    /// Skin furrows: noise field, cycles per frame and depth (0 when they would alias).
    furrows: Noise,
    furrow_freq: f32,
    furrow_amp: f32,
    /// Unit directions (normals) of the two families of furrows.
    furrow_dirs: [[f32; 2]; 2],
    light_centre: [f32; 2],
    light_falloff: f32,
    light_gradient: [f32; 2],
    lesion: Lesion,
    dots: Vec<Dot>,
    hairs: Vec<Hair>,
    hair_colour: [f32; 3],
    vignette: Option<Vignette>,
    /// White balance times exposure.
    gain: [f32; 3],
    grain_seed: u32,
    grain_amp: f32,
}

impl Scene {
    fn random(patient: &Patient, severity_mean: f32, size: u32, rng: &mut impl Rng) -> Scene {
        let abcd = Abcd::random(severity_mean, rng);
        let lesion = Lesion::random(&abcd, size, rng);
        let dots = random_dots(&abcd, &lesion, rng);

        let hair_count = poisson(patient.hair_density, rng);
        let hairs = (0..hair_count).map(|_| random_hair(patient, rng)).collect();

        let vignette = (rng.random::<f32>() < patient.vignette_prob).then(|| Vignette {
            centre: [0.5 + 0.02 * normal(rng), 0.5 + 0.02 * normal(rng)],
            radius: rng.random_range(0.5..0.72),
            softness: rng.random_range(0.01..0.05),
            level: rng.random_range(0.02..0.1),
        });

        let furrow_freq = rng.random_range(10.0..18.0);
        let furrow_amp =
            rng.random_range(0.0..0.045) * smoothstep(4.0, 8.0, size as f32 / furrow_freq);
        let furrow_angle = rng.random_range(0.0..PI);
        let furrow_cross = furrow_angle + rng.random_range(0.9..1.4);
        let exposure = (0.07 * normal(rng)).exp();
        let gain = std::array::from_fn(|c| {
            patient.white_balance[c] * exposure * (1.0 + 0.015 * normal(rng))
        });

        Scene {
            size,
            skin: patient.skin,
            shade: Noise::new(rng),
            shade_amp: rng.random_range(0.04..0.12),
            redness: Noise::new(rng),
            redness_amp: 0.05 + 0.35 * patient.erythema * rng.random::<f32>(),
            furrows: Noise::new(rng),
            furrow_freq,
            furrow_amp,
            furrow_dirs: [
                [furrow_angle.cos(), furrow_angle.sin()],
                [furrow_cross.cos(), furrow_cross.sin()],
            ],
            light_centre: [0.5 + 0.12 * normal(rng), 0.5 + 0.12 * normal(rng)],
            light_falloff: rng.random_range(0.0..0.35),
            light_gradient: [0.06 * normal(rng), 0.06 * normal(rng)],
            lesion,
            dots,
            hairs,
            hair_colour: patient.hair_colour,
            vignette,
            gain,
            grain_seed: rng.random(),
            grain_amp: rng.random_range(0.006..0.02),
        }
    }

    fn draw(&self) -> RgbImage {
        let n = self.size as usize;
        let px = 1.0 / self.size as f32;
        let mut colour = vec![[0.0f32; 3]; n * n];

        // Pass 1: skin and lesion. The skin's fields are smooth, so they are evaluated on a
        // coarse grid and interpolated; the lesion is evaluated per pixel inside its box.
        let skin_grid = SkinGrid::new(self);
        let l = &self.lesion;
        let reach = l.radius * l.outer;
        for (y, row) in colour.chunks_exact_mut(n).enumerate() {
            let v = (y as f32 + 0.5) * px;
            for (x, out) in row.iter_mut().enumerate() {
                let u = (x as f32 + 0.5) * px;
                let [r, g, b, warp, visibility] = skin_grid.at(u, v);
                let mut skin = [r, g, b];
                if self.furrow_amp > 0.0 && visibility > 0.0 {
                    let k = 1.0 - self.furrow_amp * self.furrow_line(u, v, warp, visibility);
                    skin = skin.map(|c| c * k);
                }
                let in_reach = (u - l.centre[0]).abs() < reach && (v - l.centre[1]).abs() < reach;
                *out = if in_reach {
                    l.shade(skin, u, v, x, y)
                } else {
                    skin
                };
            }
        }

        // Pass 2: dots and globules over the lesion.
        for dot in &self.dots {
            let r_px = dot.radius * self.size as f32;
            let c = [
                dot.centre[0] * self.size as f32,
                dot.centre[1] * self.size as f32,
            ];
            for_pixels_near(n, c, c, r_px + 1.0, |i, p| {
                let d = ((p[0] - c[0]).powi(2) + (p[1] - c[1]).powi(2)).sqrt();
                // Soft-edged: globules are blurred by the overlying tissue.
                let a = (1.0 - smoothstep(0.4 * r_px, r_px + 0.5, d))
                    * (2.0 * r_px).min(1.0)
                    * dot.opacity;
                colour[i] = lerp(colour[i], dot.colour, a);
            });
        }

        // Pass 3: hair coverage (max-combined so that overlapping segments do not darken).
        let mut hair = vec![0.0f32; if self.hairs.is_empty() { 0 } else { n * n }];
        for h in &self.hairs {
            stamp_hair(&mut hair, n, h);
        }

        // Pass 4: hair, vignette, camera response, grain; quantise.
        let mut img = RgbImage::new(self.size, self.size);
        for (i, (c, pixel)) in colour.iter().zip(img.pixels_mut()).enumerate() {
            let (x, y) = (i % n, i / n);
            let (u, v) = ((x as f32 + 0.5) * px, (y as f32 + 0.5) * px);
            let mut c = *c;
            if let Some(&a) = hair.get(i) {
                c = lerp(c, self.hair_colour, a);
            }
            if let Some(vig) = &self.vignette {
                let d = ((u - vig.centre[0]).powi(2) + (v - vig.centre[1]).powi(2)).sqrt();
                let a = smoothstep(vig.radius - vig.softness, vig.radius + vig.softness, d);
                if a > 0.0 {
                    let dark = vig.level
                        * (0.8 + 0.4 * hash(x as i32, y as i32, self.grain_seed ^ 0x5bd1));
                    c = lerp(c, [dark; 3], a);
                }
            }
            let grain = (hash(x as i32, y as i32, self.grain_seed) - 0.5) * 2.0 * self.grain_amp;
            *pixel = Rgb(std::array::from_fn(|k| to_u8(c[k] * self.gain[k] + grain)));
        }
        img
    }

    /// Skin furrows at frame position (u, v) in [0, 1]: two families of thin, slightly wavy
    /// parallel lines crossing at an angle, giving the rhomboid pattern of skin surface lines.
    /// `warp` and `visibility` are smooth fields taken from the skin grid.
    fn furrow_line(&self, u: f32, v: f32, warp: f32, visibility: f32) -> f32 {
        let mut line = 0.0f32;
        for [c, s] in self.furrow_dirs {
            let t = (u * c + v * s) * self.furrow_freq + warp;
            let f = t - floor(t);
            // Distance to the nearest line, in cycles; lines are about 0.1 cycle wide.
            let d = f.min(1.0 - f);
            line = line.max((1.0 - d / 0.08).max(0.0).powi(2));
        }
        line * visibility
    }

    /// Skin colour at frame position (u, v), including shading, redness and illumination.
    fn skin_at(&self, u: f32, v: f32) -> [f32; 3] {
        let shade = 1.0 + self.shade_amp * 2.0 * (self.shade.fbm(u * 3.0, v * 3.0, 3) - 0.5);
        let red = self.redness_amp * smoothstep(0.45, 0.75, self.redness.fbm(u * 4.0, v * 4.0, 2));
        let (dx, dy) = (u - self.light_centre[0], v - self.light_centre[1]);
        let light = (1.0 - self.light_falloff * (dx * dx + dy * dy) * 2.0
            + self.light_gradient[0] * (u - 0.5)
            + self.light_gradient[1] * (v - 0.5))
            .max(0.2);
        let k = shade * light;
        // Redness: keep red, absorb green and blue (haemoglobin).
        [
            self.skin[0] * k,
            self.skin[1] * k * (1.0 - 0.6 * red),
            self.skin[2] * k * (1.0 - 0.45 * red),
        ]
    }
}

/// Skin colour and the furrows' warp and visibility fields, sampled on a coarse regular grid
/// over the frame and bilinearly interpolated.
struct SkinGrid {
    cells: usize,
    values: Vec<[f32; 5]>,
}

impl SkinGrid {
    /// Grid cells per side; the skin's finest noise octave spans about 2.5 cells.
    const CELLS: usize = 32;

    fn new(scene: &Scene) -> SkinGrid {
        let cells = Self::CELLS.min(scene.size as usize);
        let step = 1.0 / cells as f32;
        let mut values = Vec::with_capacity((cells + 1) * (cells + 1));
        for j in 0..=cells {
            for i in 0..=cells {
                let (u, v) = (i as f32 * step, j as f32 * step);
                let [r, g, b] = scene.skin_at(u, v);
                let warp = 1.5 * (scene.furrows.value(u * 3.0, v * 3.0) - 0.5);
                // Lines come and go: gel, pressure and focus hide them in places.
                let visibility = smoothstep(
                    0.35,
                    0.65,
                    scene.furrows.value(u * 5.0 + 31.0, v * 5.0 + 7.0),
                );
                values.push([r, g, b, warp, visibility]);
            }
        }
        SkinGrid { cells, values }
    }

    fn at(&self, u: f32, v: f32) -> [f32; 5] {
        let (gx, gy) = (u * self.cells as f32, v * self.cells as f32);
        let (i, j) = (
            (gx as usize).min(self.cells - 1),
            (gy as usize).min(self.cells - 1),
        );
        let (tx, ty) = (gx - i as f32, gy - j as f32);
        let row = self.cells + 1;
        let top = lerp(self.values[j * row + i], self.values[j * row + i + 1], tx);
        let bottom = lerp(
            self.values[(j + 1) * row + i],
            self.values[(j + 1) * row + i + 1],
            tx,
        );
        lerp(top, bottom, ty)
    }
}

impl Lesion {
    fn random(abcd: &Abcd, size: u32, rng: &mut impl Rng) -> Lesion {
        // D: diameter as a fraction of the frame; the zoom of the dermoscope image also varies.
        let zoom = (0.2 * normal(rng)).exp();
        let radius = (0.5 * (0.2 + 0.5 * abcd.diameter) * zoom).clamp(0.05, 0.45);
        let centre = [
            (0.5 + 0.07 * normal(rng)).clamp(0.3, 0.7),
            (0.5 + 0.07 * normal(rng)).clamp(0.3, 0.7),
        ];
        let angle = rng.random_range(0.0..TAU);
        let elongation = 1.0 + 0.35 * rng.random::<f32>().powi(2);

        // A: low harmonics (k = 1..3) with random phases break mirror symmetry.
        // B: higher harmonics (k = 4..16) scallop the border; a 2-D noise wobble (below) adds
        // organic lobes and notches, which harmonics alone would turn into star points.
        let mut harmonics = Vec::with_capacity(24);
        for k in 1..=3 {
            let amp =
                (0.01 + 0.28 * abcd.asymmetry) * rng.random_range(0.4..1.0) / (k as f32).sqrt();
            harmonics.push((k as f32, amp, rng.random_range(0.0..TAU)));
        }
        for k in 4..=16 {
            let amp = (0.003 + 0.06 * abcd.border)
                * rng.random_range(0.2..1.0)
                * (4.0 / k as f32).powf(1.3);
            harmonics.push((k as f32, amp, rng.random_range(0.0..TAU)));
        }
        let edge_width = rng.random_range(0.12..0.4) * (1.0 - 0.4 * abcd.border);
        let edge_var = 0.7 * abcd.border * rng.random::<f32>();
        let edge_phase = rng.random_range(0.0..TAU);
        let mut profile = [0.0; PROFILE_BINS];
        let mut edge = [0.0; PROFILE_BINS];
        for (i, (p, e)) in profile.iter_mut().zip(edge.iter_mut()).enumerate() {
            let theta = i as f32 / PROFILE_BINS as f32 * TAU - PI;
            let r: f32 = harmonics
                .iter()
                .map(|&(k, a, phi)| a * (k * theta + phi).cos())
                .sum();
            *p = (1.0 + r).max(0.35);
            // Irregular lesions fade out softly on some sides and stop abruptly on others.
            *e = edge_width * (1.0 + edge_var * (2.0 * theta + edge_phase).sin()).max(0.1);
        }
        let border_amp = 0.03 + 0.35 * abcd.border;
        // No pigment beyond this local radius: the largest boundary (profile plus wobble)
        // times the outer part of the widest soft edge.
        let max_profile = profile.iter().copied().fold(0.0, f32::max);
        let max_edge = edge.iter().copied().fold(0.0, f32::max);
        let outer = (max_profile + border_amp) * (1.0 + 0.25 * max_edge);

        // C: colour variety. Each extra colour is atypical (black, blue-grey, red, white) with
        // probability given by the colour score, otherwise another shade of brown.
        let extra = ((abcd.colour * 4.0 + rng.random::<f32>()).floor() as usize).min(4);
        let mut regions: Vec<Region> = Vec::with_capacity(extra);
        for _ in 0..extra {
            let tint = if rng.random::<f32>() < abcd.colour {
                [Tint::Black, Tint::BlueGrey, Tint::Red, Tint::White]
                    [pick_weighted(&[0.35, 0.3, 0.2, 0.15], rng.random())]
            } else if rng.random::<f32>() < 0.6 {
                Tint::DarkBrown
            } else {
                Tint::LightBrown
            };
            if regions.iter().any(|r| r.tint == tint) {
                continue;
            }
            let cover = rng.random_range(0.08..0.4);
            let dir = rng.random_range(0.0..TAU);
            let bias = 0.5 * abcd.asymmetry * rng.random::<f32>();
            regions.push(Region {
                tint,
                noise: Noise::new(rng),
                freq: rng.random_range(1.2..2.5),
                // Three-octave value noise has a spread of about 0.14 around 0.5; this maps
                // the wanted coverage to a threshold (a linear fit of the normal quantile).
                threshold: 0.5 + 0.14 * (1.6 - 3.4 * cover),
                bias: [bias * dir.cos(), bias * dir.sin()],
            });
        }

        let off_dir = rng.random_range(0.0..TAU);
        let off = 0.45 * abcd.asymmetry * rng.random::<f32>();
        let cells = rng.random_range(4.0..7.0);
        // The network is only drawn when its cells are large enough not to alias.
        let cell_px = radius * size as f32 / cells;
        let network_amp = if rng.random::<f32>() < 0.6 {
            rng.random_range(0.08..0.25)
        } else {
            0.0
        };

        Lesion {
            centre,
            radius,
            rotation: [angle.cos(), angle.sin()],
            elongation,
            profile,
            edge,
            border_noise: Noise::new(rng),
            border_amp,
            border_freq: rng.random_range(1.5..3.0),
            density: rng.random_range(0.35..1.2) + 0.35 * abcd.colour,
            centre_dark: rng.random_range(0.1..0.9),
            pigment_offset: [off * off_dir.cos(), off * off_dir.sin()],
            texture: Noise::new(rng),
            texture_amp: 0.06 + 0.5 * abcd.colour,
            texture_freq: rng.random_range(2.0..4.5),
            network_amp: network_amp * smoothstep(3.0, 6.0, cell_px),
            network_freq: cells,
            network_noise: Noise::new(rng),
            regions,
            pepper_seed: rng.random(),
            outer,
        }
    }

    /// Frame coordinates -> lesion-local coordinates in units of `radius`.
    fn local(&self, u: f32, v: f32) -> [f32; 2] {
        let (dx, dy) = (u - self.centre[0], v - self.centre[1]);
        let [c, s] = self.rotation;
        [
            (dx * c + dy * s) / self.radius,
            (dy * c - dx * s) * self.elongation / self.radius,
        ]
    }

    /// Lesion-local coordinates -> frame coordinates.
    fn frame(&self, p: [f32; 2]) -> [f32; 2] {
        let (lx, ly) = (p[0] * self.radius, p[1] * self.radius / self.elongation);
        let [c, s] = self.rotation;
        [
            self.centre[0] + lx * c - ly * s,
            self.centre[1] + lx * s + ly * c,
        ]
    }

    /// Lesion boundary radius (local units) at angle `theta` in [-pi, pi].
    fn boundary(&self, theta: f32) -> f32 {
        lookup(&self.profile, theta)
    }

    /// Composites the lesion over `skin` at frame position (u, v), pixel (x, y).
    fn shade(&self, skin: [f32; 3], u: f32, v: f32, x: usize, y: usize) -> [f32; 3] {
        let [lx, ly] = self.local(u, v);
        let r2 = lx * lx + ly * ly;
        if r2 >= self.outer * self.outer {
            return skin;
        }
        let r = r2.sqrt();
        let theta = ly.atan2(lx);
        let wobble = self.border_amp
            * 2.0
            * (self
                .border_noise
                .fbm(lx * self.border_freq, ly * self.border_freq, 3)
                - 0.5);
        let boundary = (self.boundary(theta) + wobble).max(0.25);
        let q = r / boundary;
        let edge = lookup(&self.edge, theta);
        let mask = 1.0 - smoothstep(1.0 - edge, 1.0 + 0.25 * edge, q);
        if mask <= 0.0 {
            return skin;
        }

        // Base melanin: darker towards the (possibly off-centre) pigment centre.
        let (px, py) = (lx - self.pigment_offset[0], ly - self.pigment_offset[1]);
        let pq = (px * px + py * py).sqrt() / boundary;
        let mut density = self.density * (1.0 + self.centre_dark * (1.0 - pq).max(0.0));
        let tex = self
            .texture
            .fbm(lx * self.texture_freq, ly * self.texture_freq, 4);
        density *= 1.0 + self.texture_amp * 2.0 * (tex - 0.5);
        if self.network_amp > 0.0 {
            // Pigment network: ridged noise gives a mesh of meandering darker lines around
            // irregular lighter holes; it fades towards the rim as in real nevi.
            let n = self
                .network_noise
                .value(lx * self.network_freq, ly * self.network_freq);
            let ridge = 1.0 - (2.0 * n - 1.0).abs();
            let lines = ridge * ridge * ridge;
            density *= 1.0 + self.network_amp * (2.0 * lines - 0.6) * (1.0 - q * q).max(0.0);
        }

        // Colour blends applied after the melanin: at most one per blending tint (regions
        // have distinct tints), so three slots suffice.
        let mut blends: [([f32; 3], f32); 3] = [([0.0; 3], 0.0); 3];
        let mut n_blends = 0;
        for region in &self.regions {
            let n = region.noise.fbm(lx * region.freq, ly * region.freq, 3);
            let w = smoothstep(
                region.threshold - 0.1,
                region.threshold + 0.1,
                n + region.bias[0] * lx + region.bias[1] * ly,
            );
            if w <= 0.0 {
                continue;
            }
            match region.tint {
                Tint::DarkBrown => density += 0.9 * w,
                Tint::Black => density += 2.6 * w,
                Tint::LightBrown => density *= 1.0 - 0.55 * w,
                Tint::BlueGrey | Tint::Red | Tint::White => {
                    let lum = luminance(skin);
                    let (target, strength) = match region.tint {
                        // Deep melanin seen through the dermis: slate blue-grey.
                        Tint::BlueGrey => {
                            ([0.38, 0.42, 0.5].map(|c: f32| c * (0.5 + 0.5 * lum)), 0.65)
                        }
                        // Vascular areas: less pigment, pink-red.
                        Tint::Red => {
                            density *= 1.0 - 0.4 * w;
                            ([0.84, 0.45, 0.48].map(|c: f32| c * (0.6 + 0.4 * lum)), 0.5)
                        }
                        // Regression: pigment lost to a whitish scar with grey peppering.
                        _ => {
                            density *= 1.0 - 0.7 * w;
                            let pepper = if hash(x as i32, y as i32, self.pepper_seed) > 0.975 {
                                0.7
                            } else {
                                1.0
                            };
                            (skin.map(|c| (0.5 * c + 0.45) * pepper), 0.5)
                        }
                    };
                    blends[n_blends] = (target, strength * w);
                    n_blends += 1;
                }
            }
        }

        let d = density.max(0.0) * mask;
        let mut c: [f32; 3] = std::array::from_fn(|k| skin[k] * (-d * MELANIN_ABSORPTION[k]).exp());
        for &(target, w) in &blends[..n_blends] {
            c = lerp(c, target, w * mask);
        }
        c
    }
}

#[cfg(test)]
mod tests;
