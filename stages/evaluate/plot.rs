//! PNG figures for `evaluate`: ROC curves of the augmentation arms and
//! training curves, drawn with a tiny software canvas (anti-aliased thick
//! polylines, rectangles, and an embedded 5x8 bitmap font for printable
//! ASCII) so the report needs no plotting library or system fonts.
//!
//! Promises:
//! - White background, labelled axes with grid, Okabe–Ito colour-blind-safe
//!   colours chosen by `color_index` (several series may share a colour),
//!   and a legend listing each distinct (colour, label) once: inside the
//!   free bottom-right corner of a ROC chart, below the plotting area of a
//!   training-curve chart (curves can go anywhere there, so the legend never
//!   covers them; the image grows by the legend's height).
//! - Series with an empty label are "secondary" (e.g. the other seeds of an
//!   arm): drawn thin and translucent under the labelled ones, and left out
//!   of the legend.
//! - Degenerate input (no series, one point, constant or non-finite values)
//!   draws without panicking; non-finite loss values break the line.
//! - Characters outside printable ASCII are drawn as '?'.

use std::path::Path;

use anyhow::{Context, Result};
use image::{ImageFormat, Rgb, RgbImage};

mod font;
use font::*;

/// One ROC curve: (false positive rate, true positive rate) points as
/// `metrics::roc_curve` returns them.
#[derive(Clone, Debug, PartialEq)]
pub struct RocSeries {
    /// Legend text; empty for a secondary series (thin, not in the legend).
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Index into the Okabe–Ito palette (wraps around).
    pub color_index: usize,
}

/// Draws the ROC curves of `curves` on one square 640x640 chart with the
/// chance diagonal, and writes it as a PNG.
pub fn roc_png(path: &Path, curves: &[RocSeries]) -> Result<()> {
    save(&render_roc(curves).0, path)
}

/// [`roc_png`]'s image as PNG bytes, for embedding.
pub fn roc_png_bytes(curves: &[RocSeries]) -> Result<Vec<u8>> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    render_roc(curves)
        .0
        .write_to(&mut bytes, ImageFormat::Png)?;
    Ok(bytes.into_inner())
}

/// Draws training curves (x = position in the vector, i.e. the step or
/// epoch index; y auto-scaled) titled `title`, one colour per series, and
/// writes a 720x480 PNG.
pub fn loss_curves_png(
    path: &Path,
    series: &[(String, Vec<f32>)],
    title: &str,
    x_label: &str,
) -> Result<()> {
    save(&render_loss_curves(series, title, x_label).0, path)
}

fn save(image: &RgbImage, path: &Path) -> Result<()> {
    image
        .save_with_format(path, ImageFormat::Png)
        .with_context(|| format!("writing {}", path.display()))
}

// Okabe & Ito (2008), reordered so the first colours contrast most on white;
// yellow comes last because it is faint on white.
const PALETTE: [[u8; 3]; 8] = [
    [0x00, 0x72, 0xB2], // blue
    [0xD5, 0x5E, 0x00], // vermillion
    [0x00, 0x9E, 0x73], // bluish green
    [0xCC, 0x79, 0xA7], // reddish purple
    [0xE6, 0x9F, 0x00], // orange
    [0x56, 0xB4, 0xE9], // sky blue
    [0x00, 0x00, 0x00], // black
    [0xF0, 0xE4, 0x42], // yellow
];
const INK: [u8; 3] = [0x1A, 0x1A, 0x1A];
const GRID: [u8; 3] = [0xE4, 0xE4, 0xE4];
const FRAME: [u8; 3] = [0x55, 0x55, 0x55];
const DIAGONAL: [u8; 3] = [0x99, 0x99, 0x99];
const WHITE: [u8; 3] = [0xFF, 0xFF, 0xFF];

fn series_color(index: usize) -> [u8; 3] {
    PALETTE[index % PALETTE.len()]
}

const PRIMARY_WIDTH: f64 = 2.5;
/// Series of at most this many points get a dot at each point.
const MARKED_POINTS: usize = 12;
const SECONDARY_WIDTH: f64 = 1.25;
const SECONDARY_OPACITY: f64 = 0.45;
/// Font pixels per glyph pixel for all text.
const TEXT_SCALE: i64 = 2;

/// A pixel rectangle, `right` and `bottom` exclusive.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Rect {
    left: i64,
    top: i64,
    right: i64,
    bottom: i64,
}

/// An RGB image with just the drawing operations the charts need.
struct Canvas {
    image: RgbImage,
}

impl Canvas {
    fn new(width: u32, height: u32) -> Canvas {
        Canvas {
            image: RgbImage::from_pixel(width, height, Rgb(WHITE)),
        }
    }

    /// A filled disc of `radius` pixels around (x, y), antialiased at its rim.
    fn dot(&mut self, x: f64, y: f64, radius: f64, color: [u8; 3]) {
        let reach = radius.ceil() as i64 + 1;
        let (cx, cy) = (x.round() as i64, y.round() as i64);
        for py in cy - reach..=cy + reach {
            for px in cx - reach..=cx + reach {
                let d = ((px as f64 - x).powi(2) + (py as f64 - y).powi(2)).sqrt();
                self.blend(px, py, color, (radius + 0.5 - d).clamp(0.0, 1.0));
            }
        }
    }

    fn blend(&mut self, x: i64, y: i64, color: [u8; 3], alpha: f64) {
        if x < 0
            || y < 0
            || x >= self.image.width() as i64
            || y >= self.image.height() as i64
            || alpha <= 0.0
        {
            return;
        }
        let pixel = self.image.get_pixel_mut(x as u32, y as u32);
        let alpha = alpha.min(1.0);
        for (channel, target) in pixel.0.iter_mut().zip(color) {
            *channel = (*channel as f64 * (1.0 - alpha) + target as f64 * alpha).round() as u8;
        }
    }

    fn fill(&mut self, rect: Rect, color: [u8; 3]) {
        for y in rect.top..rect.bottom {
            for x in rect.left..rect.right {
                self.blend(x, y, color, 1.0);
            }
        }
    }

    /// A one-pixel border just inside `rect`.
    fn outline(&mut self, r: Rect, color: [u8; 3]) {
        self.fill(
            Rect {
                bottom: r.top + 1,
                ..r
            },
            color,
        );
        self.fill(
            Rect {
                top: r.bottom - 1,
                ..r
            },
            color,
        );
        self.fill(
            Rect {
                right: r.left + 1,
                ..r
            },
            color,
        );
        self.fill(
            Rect {
                left: r.right - 1,
                ..r
            },
            color,
        );
    }

    /// An anti-aliased polyline `width` pixels wide with round joins and
    /// caps, in pixel coordinates (pixel (x, y) covers [x, x+1) x [y, y+1)).
    /// `dash` = (on, off) lengths along the line. Coverage is the maximum
    /// over segments, so joints are not darkened by double blending; one
    /// point draws a dot.
    fn polyline(
        &mut self,
        points: &[(f64, f64)],
        width: f64,
        color: [u8; 3],
        opacity: f64,
        dash: Option<(f64, f64)>,
    ) {
        let Some(&first) = points.first() else { return };
        let reach = width / 2.0 + 1.0;
        let (mut min_x, mut min_y, mut max_x, mut max_y) = (first.0, first.1, first.0, first.1);
        for &(x, y) in points {
            (min_x, min_y, max_x, max_y) = (min_x.min(x), min_y.min(y), max_x.max(x), max_y.max(y));
        }
        let clamp_x = |v: f64| (v.floor() as i64).clamp(0, self.image.width() as i64);
        let clamp_y = |v: f64| (v.floor() as i64).clamp(0, self.image.height() as i64);
        let area = Rect {
            left: clamp_x(min_x - reach),
            top: clamp_y(min_y - reach),
            right: clamp_x(max_x + reach + 1.0),
            bottom: clamp_y(max_y + reach + 1.0),
        };
        let stride = (area.right - area.left).max(0) as usize;
        let mut coverage = vec![0f32; stride * (area.bottom - area.top).max(0) as usize];
        let segments: Vec<((f64, f64), (f64, f64))> = if points.len() == 1 {
            vec![(first, first)]
        } else {
            points.windows(2).map(|w| (w[0], w[1])).collect()
        };
        let mut travelled = 0.0;
        for (a, b) in segments {
            let (dx, dy) = (b.0 - a.0, b.1 - a.1);
            let length_sq = dx * dx + dy * dy;
            let length = length_sq.sqrt();
            let x_range = clamp_x(a.0.min(b.0) - reach)..clamp_x(a.0.max(b.0) + reach + 1.0);
            for y in clamp_y(a.1.min(b.1) - reach)..clamp_y(a.1.max(b.1) + reach + 1.0) {
                for x in x_range.clone() {
                    let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
                    let t = if length_sq > 0.0 {
                        (((px - a.0) * dx + (py - a.1) * dy) / length_sq).clamp(0.0, 1.0)
                    } else {
                        0.0
                    };
                    if let Some((on, off)) = dash
                        && (travelled + t * length) % (on + off) > on
                    {
                        continue;
                    }
                    let distance =
                        ((px - a.0 - t * dx).powi(2) + (py - a.1 - t * dy).powi(2)).sqrt();
                    let cover = (width / 2.0 + 0.5 - distance).clamp(0.0, 1.0) as f32;
                    let slot =
                        &mut coverage[(y - area.top) as usize * stride + (x - area.left) as usize];
                    *slot = slot.max(cover);
                }
            }
            travelled += length;
        }
        for y in area.top..area.bottom {
            for x in area.left..area.right {
                let cover = coverage[(y - area.top) as usize * stride + (x - area.left) as usize];
                self.blend(x, y, color, cover as f64 * opacity);
            }
        }
    }

    /// Draws `text` in [`INK`] with its bounding box's point (`anchor.0` x
    /// width, `anchor.1` x height) at (x, y): (0, 0) is top-left, (0.5, 0.5)
    /// the centre, (1, 0) top-right. `vertical` text reads bottom to top.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, anchor: (f64, f64), vertical: bool) {
        let along = text_width(text, scale);
        let across = GLYPH_ROWS * scale;
        let (width, height) = if vertical {
            (across, along)
        } else {
            (along, across)
        };
        let left = x - (anchor.0 * width as f64).round() as i64;
        let top = y - (anchor.1 * height as f64).round() as i64;
        for (i, ch) in text.chars().enumerate() {
            for (column, bits) in glyph(ch).iter().enumerate() {
                for row in 0..GLYPH_ROWS {
                    if bits >> row & 1 == 0 {
                        continue;
                    }
                    // (u, v): position along and across the text direction.
                    let u = (i as i64 * GLYPH_ADVANCE + column as i64) * scale;
                    let v = row * scale;
                    let (cell_x, cell_y) = if vertical {
                        (left + v, top + height - u - scale)
                    } else {
                        (left + u, top + v)
                    };
                    self.fill(
                        Rect {
                            left: cell_x,
                            top: cell_y,
                            right: cell_x + scale,
                            bottom: cell_y + scale,
                        },
                        INK,
                    );
                }
            }
        }
    }
}

/// Width in pixels of `text` at `scale`, without the trailing gap.
fn text_width(text: &str, scale: i64) -> i64 {
    let n = text.chars().count() as i64;
    if n == 0 {
        0
    } else {
        (n * GLYPH_ADVANCE - 1) * scale
    }
}

/// One polyline to plot, in data coordinates; an empty label marks a
/// secondary line.
struct Line<'a> {
    label: &'a str,
    color_index: usize,
    points: Vec<(f64, f64)>,
}

/// A chart's plotting area and the data range it shows.
struct Frame {
    area: Rect,
    x_range: (f64, f64),
    y_range: (f64, f64),
}

impl Frame {
    fn to_pixel(&self, (x, y): (f64, f64)) -> (f64, f64) {
        let a = self.area;
        let fx = (x - self.x_range.0) / (self.x_range.1 - self.x_range.0);
        let fy = (y - self.y_range.0) / (self.y_range.1 - self.y_range.0);
        (
            a.left as f64 + fx * (a.right - a.left) as f64,
            a.bottom as f64 - fy * (a.bottom - a.top) as f64,
        )
    }

    /// Grid, frame, tick marks and labels, and the axis titles.
    fn draw_axes(
        &self,
        canvas: &mut Canvas,
        x_ticks: &[(f64, String)],
        y_ticks: &[(f64, String)],
        x_title: &str,
        y_title: &str,
    ) {
        let a = self.area;
        for (value, _) in x_ticks {
            let x = self.to_pixel((*value, self.y_range.0)).0.round() as i64;
            canvas.fill(
                Rect {
                    left: x,
                    top: a.top,
                    right: x + 1,
                    bottom: a.bottom,
                },
                GRID,
            );
        }
        for (value, _) in y_ticks {
            let y = self.to_pixel((self.x_range.0, *value)).1.round() as i64;
            canvas.fill(
                Rect {
                    left: a.left,
                    top: y,
                    right: a.right,
                    bottom: y + 1,
                },
                GRID,
            );
        }
        canvas.outline(
            Rect {
                left: a.left - 1,
                top: a.top - 1,
                right: a.right + 1,
                bottom: a.bottom + 1,
            },
            FRAME,
        );
        for (value, label) in x_ticks {
            let x = self.to_pixel((*value, self.y_range.0)).0.round() as i64;
            canvas.fill(
                Rect {
                    left: x,
                    top: a.bottom,
                    right: x + 1,
                    bottom: a.bottom + 6,
                },
                FRAME,
            );
            canvas.text(x, a.bottom + 10, label, TEXT_SCALE, (0.5, 0.0), false);
        }
        let mut widest_y_label = 0;
        for (value, label) in y_ticks {
            let y = self.to_pixel((self.x_range.0, *value)).1.round() as i64;
            canvas.fill(
                Rect {
                    left: a.left - 6,
                    top: y,
                    right: a.left,
                    bottom: y + 1,
                },
                FRAME,
            );
            canvas.text(a.left - 10, y, label, TEXT_SCALE, (1.0, 0.5), false);
            widest_y_label = widest_y_label.max(text_width(label, TEXT_SCALE));
        }
        let line_height = GLYPH_ROWS * TEXT_SCALE;
        canvas.text(
            (a.left + a.right) / 2,
            a.bottom + 10 + line_height + 12,
            x_title,
            TEXT_SCALE,
            (0.5, 0.0),
            false,
        );
        let y_title_x = a.left - 10 - widest_y_label - 12;
        canvas.text(
            y_title_x,
            (a.top + a.bottom) / 2,
            y_title,
            TEXT_SCALE,
            (1.0, 0.5),
            true,
        );
    }

    /// Plots secondary (unlabelled) series first so labelled ones stay on top.
    fn draw_series(&self, canvas: &mut Canvas, lines: &[Line]) {
        let (secondary, primary): (Vec<&Line>, Vec<&Line>) =
            lines.iter().partition(|line| line.label.is_empty());
        for line in secondary.into_iter().chain(primary) {
            let pixels: Vec<(f64, f64)> = line.points.iter().map(|&p| self.to_pixel(p)).collect();
            let (width, opacity) = if line.label.is_empty() {
                (SECONDARY_WIDTH, SECONDARY_OPACITY)
            } else {
                (PRIMARY_WIDTH, 1.0)
            };
            canvas.polyline(
                &pixels,
                width,
                series_color(line.color_index),
                opacity,
                None,
            );
            // A line needs two points: a run of one epoch (or a few) would be
            // invisible or hard to read, so short primary series get dots.
            if !line.label.is_empty() && line.points.len() <= MARKED_POINTS {
                for &(x, y) in &pixels {
                    canvas.dot(x, y, 2.0 * width, series_color(line.color_index));
                }
            }
        }
    }

    /// The legend's entries (each distinct (colour, label) once), font scale
    /// and size; None when nothing is labelled. Labels too long for the
    /// plotting area's width first drop to the small font, then get cut.
    fn legend_layout(&self, lines: &[Line]) -> Option<Legend> {
        let mut entries: Vec<(usize, String)> = Vec::new();
        for line in lines {
            let entry = (line.color_index % PALETTE.len(), line.label.to_string());
            if !line.label.is_empty() && !entries.contains(&entry) {
                entries.push(entry);
            }
        }
        if entries.is_empty() {
            return None;
        }
        let available =
            (self.area.right - self.area.left) - 2 * LEGEND_PAD - (SWATCH + 3 * LEGEND_PAD);
        let longest = entries
            .iter()
            .map(|(_, l)| text_width(l, TEXT_SCALE))
            .max()
            .unwrap_or(0);
        let scale = if longest <= available { TEXT_SCALE } else { 1 };
        let max_chars = ((available / scale + 1) / GLYPH_ADVANCE).max(4) as usize;
        for (_, label) in &mut entries {
            if label.chars().count() > max_chars {
                *label = label.chars().take(max_chars - 3).collect::<String>() + "...";
            }
        }
        let row_height = GLYPH_ROWS * scale + 8;
        let text_w = entries
            .iter()
            .map(|(_, l)| text_width(l, scale))
            .max()
            .unwrap_or(0);
        Some(Legend {
            width: LEGEND_PAD + SWATCH + LEGEND_PAD + text_w + LEGEND_PAD,
            height: LEGEND_PAD + row_height * entries.len() as i64 - 8 + LEGEND_PAD,
            entries,
            scale,
            row_height,
        })
    }
}

const LEGEND_PAD: i64 = 10;
const SWATCH: i64 = 28;

/// A laid-out legend box, not yet placed.
struct Legend {
    entries: Vec<(usize, String)>,
    scale: i64,
    row_height: i64,
    width: i64,
    height: i64,
}

impl Legend {
    /// Draws the box with its top-left corner at (left, top); returns it.
    fn draw(&self, canvas: &mut Canvas, left: i64, top: i64) -> Rect {
        let rect = Rect {
            left,
            top,
            right: left + self.width,
            bottom: top + self.height,
        };
        canvas.fill(rect, WHITE);
        canvas.outline(rect, FRAME);
        for (i, (color_index, label)) in self.entries.iter().enumerate() {
            let middle = (top + LEGEND_PAD + i as i64 * self.row_height) as f64
                + (GLYPH_ROWS * self.scale) as f64 / 2.0;
            let swatch = [
                ((left + LEGEND_PAD) as f64, middle),
                ((left + LEGEND_PAD + SWATCH) as f64, middle),
            ];
            canvas.polyline(
                &swatch,
                PRIMARY_WIDTH + 0.5,
                PALETTE[*color_index],
                1.0,
                None,
            );
            canvas.text(
                left + 2 * LEGEND_PAD + SWATCH,
                middle.round() as i64,
                label,
                self.scale,
                (0.0, 0.5),
                false,
            );
        }
        rect
    }
}

/// The ROC chart, and its legend's rectangle (for tests).
fn render_roc(curves: &[RocSeries]) -> (RgbImage, Option<Rect>) {
    let mut canvas = Canvas::new(640, 640);
    let frame = Frame {
        area: Rect {
            left: 96,
            top: 24,
            right: 612,
            bottom: 540,
        },
        x_range: (0.0, 1.0),
        y_range: (0.0, 1.0),
    };
    let ticks: Vec<(f64, String)> = (0..=5)
        .map(|i| (i as f64 / 5.0, format!("{:.1}", i as f64 / 5.0)))
        .collect();
    frame.draw_axes(
        &mut canvas,
        &ticks,
        &ticks,
        "False positive rate",
        "True positive rate",
    );
    let diagonal = [frame.to_pixel((0.0, 0.0)), frame.to_pixel((1.0, 1.0))];
    canvas.polyline(&diagonal, 1.5, DIAGONAL, 1.0, Some((8.0, 6.0)));
    let lines: Vec<Line> = curves
        .iter()
        .map(|c| Line {
            label: &c.label,
            color_index: c.color_index,
            points: c.points.clone(),
        })
        .collect();
    frame.draw_series(&mut canvas, &lines);
    // ROC curves bow to the top-left, so the bottom-right corner is free.
    let legend = frame.legend_layout(&lines).map(|l| {
        let (left, top) = (
            frame.area.right - LEGEND_PAD - l.width,
            frame.area.bottom - LEGEND_PAD - l.height,
        );
        l.draw(&mut canvas, left, top)
    });
    (canvas.image, legend)
}

/// The training-curve chart and its legend's rectangle (for tests). The chart is 720x480 plus the legend's height: the legend
/// sits below the axis title, outside the plotting area.
fn render_loss_curves(
    series: &[(String, Vec<f32>)],
    title: &str,
    x_label: &str,
) -> (RgbImage, Option<Rect>) {
    let finite = || {
        series
            .iter()
            .flat_map(|(_, v)| v.iter().map(|&y| y as f64))
            .filter(|y| y.is_finite())
    };
    let (mut low, mut high) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), y| {
        (l.min(y), h.max(y))
    });
    if low > high {
        (low, high) = (0.0, 1.0);
    } else if low == high {
        let pad = if low == 0.0 { 1.0 } else { low.abs() * 0.1 };
        (low, high) = (low - pad, high + pad);
    }
    let (y_ticks, y_range) = nice_ticks(low, high, 6, false);
    let longest = series.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    let (x_ticks, x_range) = nice_ticks(0.0, longest.saturating_sub(1).max(1) as f64, 8, true);
    let widest_y_label = y_ticks
        .iter()
        .map(|(_, l)| text_width(l, TEXT_SCALE))
        .max()
        .unwrap_or(0);
    let line_height = GLYPH_ROWS * TEXT_SCALE;
    let area = Rect {
        left: 24 + widest_y_label + 16,
        top: 24 + line_height + 16,
        right: 690,
        bottom: 480 - 2 * line_height - 34,
    };
    let frame = Frame {
        area,
        x_range,
        y_range,
    };
    // Each run of finite values is its own line, so a NaN shows as a gap.
    let mut pieces: Vec<Line> = Vec::new();
    for (color_index, (label, values)) in series.iter().enumerate() {
        let mut run: Vec<(f64, f64)> = Vec::new();
        for (x, &y) in values.iter().enumerate() {
            if y.is_finite() {
                run.push((x as f64, y as f64));
            } else if !run.is_empty() {
                pieces.push(Line {
                    label,
                    color_index,
                    points: std::mem::take(&mut run),
                });
            }
        }
        // An empty run still carries the label into the legend.
        pieces.push(Line {
            label,
            color_index,
            points: run,
        });
    }
    // Validation ROC-AUC rises to the top right and losses fall to the
    // bottom right: no corner is reliably free, so the legend goes below
    // the x-axis title (which ends 12 px above the 480 px mark).
    let legend = frame.legend_layout(&pieces);
    let legend_top = 480 - 4;
    let height = legend.as_ref().map_or(480, |l| legend_top + l.height + 12);
    let mut canvas = Canvas::new(720, height as u32);
    canvas.text(360, 20, title, TEXT_SCALE, (0.5, 0.0), false);
    frame.draw_axes(&mut canvas, &x_ticks, &y_ticks, x_label, "");
    frame.draw_series(&mut canvas, &pieces);
    let legend = legend.map(|l| l.draw(&mut canvas, frame.area.left, legend_top));
    (canvas.image, legend)
}

/// Ticks at 1, 2 or 5 x 10^k covering [low, high] with about `count`
/// intervals; returns the labelled ticks and the axis range (widened to the
/// outer ticks). `integer` keeps the step at least 1.
fn nice_ticks(
    low: f64,
    high: f64,
    count: usize,
    integer: bool,
) -> (Vec<(f64, String)>, (f64, f64)) {
    let raw = (high - low) / count as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let mut step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude);
    if integer {
        step = step.max(1.0);
    }
    let first = (low / step).floor() as i64;
    let last = (high / step).ceil() as i64;
    let biggest = (first as f64 * step).abs().max((last as f64 * step).abs());
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let ticks = (first..=last)
        .map(|i| {
            let value = i as f64 * step;
            let label = if biggest >= 1e6 || (step < 1e-4 && biggest > 0.0) {
                format!("{value:.1e}")
            } else {
                format!(
                    "{:.*}",
                    decimals,
                    if value.abs() < step * 1e-9 {
                        0.0
                    } else {
                        value
                    }
                )
            };
            (value, label)
        })
        .collect();
    (ticks, (first as f64 * step, last as f64 * step))
}

#[cfg(test)]
mod tests;
