//! The sample grid (the paper's Figure 1): a row of benign inputs, a row of
//! their malignant translations G_A(x), a row of reconstructions G_B(G_A(x)).
//! Small images are scaled up (nearest) so the PNG is readable.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Tensor};
use image::{Rgb, RgbImage};

/// Writes rows of [N, 3, S, S] tensors in [-1, 1] as one PNG.
pub fn write_grid(path: &Path, rows: &[&Tensor]) -> Result<()> {
    let (n, _, s, _) = rows[0].dims4()?;
    let scale = (128 / s).max(1);
    let cell = s * scale;
    let gap = 2;
    let mut img = RgbImage::from_pixel(
        (n * (cell + gap) + gap) as u32,
        (rows.len() * (cell + gap) + gap) as u32,
        Rgb([255, 255, 255]),
    );
    for (r, t) in rows.iter().enumerate() {
        let t = ((t.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?;
        let v: Vec<Vec<Vec<Vec<f32>>>> = (0..n)
            .map(|i| t.get(i)?.to_vec3::<f32>())
            .collect::<candle_core::Result<_>>()?;
        for (c, chw) in v.iter().enumerate() {
            for y in 0..cell {
                for x in 0..cell {
                    let (sy, sx) = (y / scale, x / scale);
                    let px = Rgb([0, 1, 2].map(|k| chw[k][sy][sx].round() as u8));
                    img.put_pixel(
                        (gap + c * (cell + gap) + x) as u32,
                        (gap + r * (cell + gap) + y) as u32,
                        px,
                    );
                }
            }
        }
    }
    img.save(path)?;
    Ok(())
}
