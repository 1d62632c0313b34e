//! Stage `preprocess`: every image of `metadata.parquet` decoded, resized
//! (shorter side to `size`, centre crop), optionally colour-normalised, and
//! packed into uint8 safetensors shards with an `index.parquet` (schema
//! `image_index/1`). Later stages read pixels only through this artifact.
//!
//! Promises:
//! - Memory is bounded by one shard (`shard_mb`), not by the dataset: shards
//!   are filled and written one after the other.
//! - Cached per image: a pixel result is reused from this stage's previous
//!   output when the source file's digest and the pixel parameters
//!   (`size`, colour constancy, code version) are the same, so changing 10
//!   source images decodes 10. The summary says how many were decoded and
//!   how many reused.
//! - Every source file is checked against the digest `ingest` recorded.
//! - Sources are a local folder or an object-store prefix; remote files are
//!   fetched concurrently in batches of 64, never all at once.
//! - Bad images (empty, not an image, corrupt or truncated, too small):
//!   `on_bad_image = "fail"` stops the run naming every one and why;
//!   `"skip"` leaves them out and lists them in `bad_images.parquet` and the
//!   summary.

pub mod image_ops;
pub mod shards;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use arrow_array::{ArrayRef, Int32Array, Int64Array, StringArray};
use fast_image_resize::Resizer;
use melanoflow_pipeline::store::{BlobStore, ObjectBlobStore};
use melanoflow_pipeline::{BoxError, Digest, Source, Stage, StageContext, StageReport};
use polars::prelude::{ParquetReader, SerReader};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use image_ops::{BadImage, ResizeFilter};

pub struct Preprocess;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadImage {
    Fail,
    Skip,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessParams {
    /// Output width and height in pixels.
    #[serde(default = "defaults::size")]
    pub size: u32,
    /// Resampling filter: "bicubic" (Catmull-Rom, as Pillow), "lanczos3", "bilinear".
    #[serde(default = "defaults::resize_filter")]
    pub resize_filter: ResizeFilter,
    /// Decode large JPEGs at a reduced DCT scale (1/4, 1/8) when the result
    /// is still at least `size` on its shorter side (as Pillow's `draft`).
    #[serde(default = "defaults::dct_downscale")]
    pub dct_downscale: bool,
    /// Shades-of-Gray colour constancy.
    #[serde(default)]
    pub color_constancy: bool,
    /// The Minkowski norm of Shades-of-Gray (6 in the ISIC solutions).
    #[serde(default = "defaults::power")]
    pub color_constancy_power: f64,
    #[serde(default = "defaults::on_bad_image")]
    pub on_bad_image: OnBadImage,
    /// Target shard size in MiB: bounds memory and file size.
    #[serde(default = "defaults::shard_mb")]
    pub shard_mb: u32,
}

mod defaults {
    pub fn size() -> u32 {
        64
    }
    pub fn resize_filter() -> super::ResizeFilter {
        super::ResizeFilter::Bicubic
    }
    pub fn dct_downscale() -> bool {
        true
    }
    pub fn power() -> f64 {
        6.0
    }
    pub fn on_bad_image() -> super::OnBadImage {
        super::OnBadImage::Fail
    }
    pub fn shard_mb() -> u32 {
        256
    }
}

impl Stage for Preprocess {
    type Params = PreprocessParams;
    const KIND: &'static str = "preprocess";
    const CODE: &'static str = crate::code_identity::PREPROCESS;
    const ABOUT: &'static str = "decode, resize + centre-crop, colour-normalise -> uint8 safetensors shards + index.parquet";

    fn check(&self, p: &PreprocessParams, inputs: &[String]) -> Result<(), String> {
        if inputs.len() != 1 {
            return Err("takes exactly one upstream: an `ingest` stage".into());
        }
        if !(8..=2048).contains(&p.size) {
            return Err(format!("`size` must be within 8..=2048, not {}", p.size));
        }
        if p.color_constancy_power < 1.0 {
            return Err(format!(
                "`color_constancy_power` must be at least 1, not {}",
                p.color_constancy_power
            ));
        }
        if p.shard_mb == 0 {
            return Err("`shard_mb` must be at least 1".into());
        }
        Ok(())
    }

    fn run(&self, p: &PreprocessParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
        let (rows, images) = inputs(ctx)?;
        let whole = process(p, ctx, &rows, &images, 0, 1)?;
        Ok(finish(
            p,
            ctx,
            &rows,
            &images,
            vec![(ctx.out_dir.clone(), whole)],
        )?)
    }

    /// Contiguous runs of shard-sized chunks per part.
    const SPLITS: bool = true;

    fn run_part(
        &self,
        p: &PreprocessParams,
        ctx: &StageContext,
        part: usize,
        parts: usize,
    ) -> Result<StageReport, BoxError> {
        let (rows, images) = inputs(ctx)?;
        let result = process(p, ctx, &rows, &images, part, parts)?;
        std::fs::write(ctx.out_dir.join(PART_FILE), serde_json::to_vec(&result)?)?;
        let images_done: usize = result.chunks.iter().map(|c| c.rows.len()).sum();
        Ok(StageReport::new(format!(
            "part {part} of {parts}: {} chunk(s), {images_done} images: decoded {}, reused {}",
            result.chunks.len(),
            result.decoded,
            result.reused
        )))
    }

    fn assemble(
        &self,
        p: &PreprocessParams,
        ctx: &StageContext,
        parts: &[PathBuf],
    ) -> Result<StageReport, BoxError> {
        let (rows, images) = inputs(ctx)?;
        let mut results = Vec::with_capacity(parts.len());
        for dir in parts {
            let path = dir.join(PART_FILE);
            let text =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let result: PartResult = serde_json::from_slice(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            results.push((dir.clone(), result));
        }
        Ok(finish(p, ctx, &rows, &images, results)?)
    }
}

/// The rows of `metadata.parquet` this stage needs.
struct Rows {
    image_name: Vec<String>,
    image_file: Vec<String>,
    image_digest: Vec<String>,
    target: Vec<i32>,
    patient_id: Vec<String>,
    split: Vec<String>,
}

fn read_metadata(path: &Path) -> Result<Rows> {
    melanoflow_schemas::check_parquet(path, &melanoflow_schemas::METADATA)?;
    let file = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let df = ParquetReader::new(file)
        .finish()
        .with_context(|| format!("reading {}", path.display()))?;
    let text = |name: &str| -> Result<Vec<String>> {
        Ok(df
            .column(name)?
            .str()?
            .iter()
            .map(|v| v.unwrap_or_default().to_string())
            .collect())
    };
    Ok(Rows {
        image_name: text("image_name")?,
        image_file: text("image_file")?,
        image_digest: text("image_digest")?,
        target: df
            .column("target")?
            .i32()?
            .iter()
            .map(|v| v.unwrap_or(0))
            .collect(),
        patient_id: text("patient_id")?,
        split: text("split")?,
    })
}

/// Identifies the pixel output for a source file: equal keys, equal pixels.
fn pixel_params_digest(p: &PreprocessParams) -> Digest {
    let json = serde_json::json!({
        // Reused pixels must come from this very code: a change to how they
        // are computed re-decodes every image, not just the stage's folder.
        "code": crate::code_identity::PREPROCESS,
        "size": p.size,
        "resize_filter": p.resize_filter,
        "dct_downscale": p.dct_downscale,
        "color_constancy": p.color_constancy,
        "color_constancy_power": if p.color_constancy { p.color_constancy_power } else { 0.0 },
    });
    Digest::of_bytes(melanoflow_pipeline::fingerprint::canonical_json(&json).as_bytes())
}

/// Where earlier results for the same pixel parameters can be read back.
struct Reuse {
    dir: PathBuf,
    by_source: HashMap<String, (String, u64)>,
    readers: HashMap<String, shards::ShardReader>,
}

impl Reuse {
    fn load(previous: Option<&Path>, pixel_digest: &Digest, size: u32) -> Result<Option<Reuse>> {
        let Some(dir) = previous else { return Ok(None) };
        let Ok(summary) = std::fs::read_to_string(dir.join("preprocess.json")) else {
            return Ok(None);
        };
        let summary: serde_json::Value = serde_json::from_str(&summary)?;
        if summary["pixel_params_digest"].as_str() != Some(pixel_digest.to_hex().as_str()) {
            return Ok(None);
        }
        let index = dir.join("index.parquet");
        melanoflow_schemas::check_parquet(&index, &melanoflow_schemas::IMAGE_INDEX)?;
        let df = ParquetReader::new(std::fs::File::open(&index)?).finish()?;
        let digests = df.column("source_digest")?.str()?;
        let shard = df.column("shard")?.str()?;
        let offset = df.column("offset")?.i64()?;
        let mut by_source = HashMap::with_capacity(df.height());
        let mut readers = HashMap::new();
        for ((d, s), o) in digests.iter().zip(shard.iter()).zip(offset.iter()) {
            if let (Some(d), Some(s), Some(o)) = (d, s, o) {
                if !readers.contains_key(s) {
                    readers.insert(
                        s.to_string(),
                        shards::ShardReader::open(&dir.join(s), size)?,
                    );
                }
                by_source.insert(d.to_string(), (s.to_string(), o as u64));
            }
        }
        Ok(Some(Reuse {
            dir: dir.to_path_buf(),
            by_source,
            readers,
        }))
    }

    fn get(&self, source_digest: &str) -> Option<Result<Vec<u8>>> {
        let (shard, offset) = self.by_source.get(source_digest)?;
        let reader = self.readers.get(shard)?;
        Some(
            reader.read(*offset).with_context(|| {
                format!("reading {} from {}", offset, self.dir.join(shard).display())
            }),
        )
    }
}

/// Where the source images are: a local folder (read inside the parallel
/// decode loop) or an object-store prefix (fetched concurrently in small
/// batches ahead of decoding, so memory holds one batch of files, not all).
enum ImageSource {
    Local(PathBuf),
    Remote(ObjectBlobStore),
}

/// Files fetched ahead from a remote source, at most this many at once.
const REMOTE_BATCH: usize = 64;

impl ImageSource {
    fn open(images: &str, base_dir: &Path) -> Result<ImageSource> {
        Ok(match Source::from_param(images, base_dir) {
            Source::Local(p) => ImageSource::Local(p),
            Source::Remote(url) => ImageSource::Remote(ObjectBlobStore::open(&url, base_dir)?),
        })
    }

    fn describe(&self, file: &str) -> String {
        match self {
            ImageSource::Local(root) => root.join(file).display().to_string(),
            ImageSource::Remote(store) => {
                format!("{}/{file}", store.describe().trim_end_matches('/'))
            }
        }
    }

    /// Fetches `files` ahead of decoding (remote sources only).
    fn prefetch(&self, files: &[&str]) -> Result<HashMap<String, Vec<u8>>> {
        match self {
            ImageSource::Local(_) => Ok(HashMap::new()),
            ImageSource::Remote(store) => {
                let bodies = store.get_many(files, 16)?;
                // A missing object is left out; `read` then reports it by name.
                Ok(files
                    .iter()
                    .zip(bodies)
                    .filter_map(|(f, b)| Some((f.to_string(), b?.to_vec())))
                    .collect())
            }
        }
    }

    fn read(&self, file: &str, prefetched: &Mutex<HashMap<String, Vec<u8>>>) -> Result<Vec<u8>> {
        match self {
            ImageSource::Local(root) => {
                let path = root.join(file);
                std::fs::read(&path).with_context(|| format!("reading image {}", path.display()))
            }
            ImageSource::Remote(_) => {
                let taken = prefetched.lock().expect("not poisoned").remove(file);
                taken.ok_or_else(|| {
                    anyhow!(
                        "{} is missing: it was listed, then deleted before it could be read",
                        self.describe(file)
                    )
                })
            }
        }
    }
}

enum Outcome {
    Pixels { bytes: Vec<u8>, reused: bool },
    Bad(BadImage),
}

fn prepare(
    p: &PreprocessParams,
    source: &ImageSource,
    bytes: Vec<u8>,
    file: &str,
    digest: &str,
    resizer: &mut Resizer,
) -> Result<Outcome> {
    let actual = Digest::of_bytes(&bytes).to_hex();
    if actual != digest {
        bail!(
            "{} changed since `ingest` recorded it (BLAKE3 {actual}, expected {digest}); run the pipeline again",
            source.describe(file)
        );
    }
    let decoded = if p.dct_downscale {
        image_ops::decode_rgb8_at_least(&bytes, p.size)
    } else {
        image_ops::decode_rgb8(&bytes).map(|img| {
            let dims = img.dimensions();
            (img, dims)
        })
    };
    let (decoded, (w, h)) = match decoded {
        Ok(x) => x,
        Err(bad) => return Ok(Outcome::Bad(bad)),
    };
    if w.min(h) < p.size {
        return Ok(Outcome::Bad(BadImage::TooSmall {
            width: w,
            height: h,
            size: p.size,
        }));
    }
    let mut img = match image_ops::resize_center_crop(&decoded, p.size, p.resize_filter, resizer) {
        Ok(img) => img,
        Err(bad) => return Ok(Outcome::Bad(bad)),
    };
    if p.color_constancy {
        image_ops::shades_of_gray(&mut img, p.color_constancy_power);
    }
    Ok(Outcome::Pixels {
        bytes: img.into_raw(),
        reused: false,
    })
}

/// The upstream's rows and where their image files are.
fn inputs(ctx: &StageContext) -> Result<(Rows, ImageSource)> {
    let ingest = ctx
        .upstream_of_kind("ingest")
        .ok_or_else(|| anyhow!("the upstream must be an `ingest` stage"))?;
    let rows = read_metadata(&ingest.dir.join("metadata.parquet"))?;
    let source: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ingest.dir.join("source.json"))
            .context("reading the ingest stage's source.json")?,
    )?;
    let images = ImageSource::open(
        source["images"]
            .as_str()
            .ok_or_else(|| anyhow!("source.json has no `images`"))?,
        &ctx.base_dir,
    )?;
    Ok((rows, images))
}

/// What processing some chunks of the rows wrote (as `chunk-NNNNN.safetensors`
/// beside it): a part of the stage when it runs split across workers.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PartResult {
    chunks: Vec<ChunkResult>,
    /// (row, why) for every bad image.
    bad: Vec<(usize, String)>,
    decoded: usize,
    reused: usize,
}

/// One chunk of `shard_mb`: (row, offset in the chunk's file) per image kept.
#[derive(Debug, Serialize, Deserialize)]
struct ChunkResult {
    chunk: usize,
    rows: Vec<(usize, u64)>,
}

const PART_FILE: &str = "part.json";

fn chunk_file(chunk: usize) -> String {
    format!("chunk-{chunk:05}.safetensors")
}

/// Rows per chunk: one shard file of about `shard_mb`.
fn chunk_len(p: &PreprocessParams) -> usize {
    let per_image = (p.size as u64) * (p.size as u64) * 3;
    ((p.shard_mb as u64 * 1024 * 1024) / per_image).max(1) as usize
}

/// Decodes the chunks of part `part` of `parts` (contiguous runs of chunks),
/// writing each chunk's pixels under `ctx.out_dir`.
fn process(
    p: &PreprocessParams,
    ctx: &StageContext,
    rows: &Rows,
    images: &ImageSource,
    part: usize,
    parts: usize,
) -> Result<PartResult> {
    let pixel_digest = pixel_params_digest(p);
    let reuse = Reuse::load(ctx.previous.as_deref(), &pixel_digest, p.size)?;
    let all: Vec<usize> = (0..rows.image_name.len()).collect();
    let chunks: Vec<&[usize]> = all.chunks(chunk_len(p)).collect();
    let mine = (part * chunks.len() / parts)..((part + 1) * chunks.len() / parts);
    let bar = ctx.progress.bar(
        chunks[mine.clone()].iter().map(|c| c.len() as u64).sum(),
        "preprocessing images",
    );
    let mut result = PartResult::default();
    for (c, chunk) in chunks.iter().enumerate().filter(|(c, _)| mine.contains(c)) {
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(chunk.len());
        let batch_len = if matches!(images, ImageSource::Remote(_)) {
            REMOTE_BATCH
        } else {
            chunk.len()
        };
        for batch in chunk.chunks(batch_len) {
            // Reuse first; fetch (remote) only what must be decoded.
            let hits: Vec<Option<Result<Vec<u8>>>> = batch
                .iter()
                .map(|&i| reuse.as_ref().and_then(|r| r.get(&rows.image_digest[i])))
                .collect();
            let to_fetch: Vec<&str> = batch
                .iter()
                .zip(&hits)
                .filter(|(_, h)| h.is_none())
                .map(|(&i, _)| rows.image_file[i].as_str())
                .collect();
            let prefetched = Mutex::new(images.prefetch(&to_fetch)?);
            let done: Vec<Outcome> = batch
                .par_iter()
                .zip(hits)
                .map_init(Resizer::new, |resizer, (&i, hit)| {
                    let out = match hit {
                        Some(pixels) => pixels.map(|bytes| Outcome::Pixels {
                            bytes,
                            reused: true,
                        }),
                        None => {
                            let file = &rows.image_file[i];
                            images.read(file, &prefetched).and_then(|bytes| {
                                prepare(p, images, bytes, file, &rows.image_digest[i], resizer)
                            })
                        }
                    };
                    bar.inc(1);
                    out
                })
                .collect::<Result<_>>()?;
            outcomes.extend(done);
        }
        let mut pixels: Vec<&[u8]> = Vec::with_capacity(chunk.len());
        let mut kept = Vec::with_capacity(chunk.len());
        for (&i, outcome) in chunk.iter().zip(&outcomes) {
            match outcome {
                Outcome::Pixels {
                    bytes,
                    reused: was_reused,
                } => {
                    kept.push((i, pixels.len() as u64));
                    pixels.push(bytes);
                    if *was_reused {
                        result.reused += 1
                    } else {
                        result.decoded += 1
                    }
                }
                Outcome::Bad(why) => result.bad.push((i, why.to_string())),
            }
        }
        if !pixels.is_empty() {
            shards::write_shard(&ctx.out_dir.join(chunk_file(c)), p.size, &pixels)?;
        }
        result.chunks.push(ChunkResult {
            chunk: c,
            rows: kept,
        });
    }
    bar.finish_and_clear();
    Ok(result)
}

/// Joins parts (each a folder holding its chunk files, with its result, in
/// part order) into the artifact under `ctx.out_dir`: chunk files become
/// `shard-NNNNN.safetensors` numbered over the non-empty ones, then the index,
/// the bad-image list and the summary. A whole run is one part, so a split run
/// writes the same bytes.
fn finish(
    p: &PreprocessParams,
    ctx: &StageContext,
    rows: &Rows,
    images: &ImageSource,
    parts: Vec<(PathBuf, PartResult)>,
) -> Result<StageReport> {
    let (mut decoded, mut reused) = (0usize, 0usize);
    let mut bad: Vec<(usize, String)> = Vec::new();
    let mut index: Vec<(usize, String, u64)> = Vec::with_capacity(rows.image_name.len());
    let mut shard_names = Vec::new();
    for (dir, part) in parts {
        decoded += part.decoded;
        reused += part.reused;
        bad.extend(part.bad);
        for chunk in part.chunks.into_iter().filter(|c| !c.rows.is_empty()) {
            let shard_name = format!("shard-{:05}.safetensors", shard_names.len());
            let (from, to) = (
                dir.join(chunk_file(chunk.chunk)),
                ctx.out_dir.join(&shard_name),
            );
            std::fs::rename(&from, &to)
                .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
            index.extend(
                chunk
                    .rows
                    .into_iter()
                    .map(|(i, offset)| (i, shard_name.clone(), offset)),
            );
            shard_names.push(shard_name);
        }
    }
    let pixel_digest = pixel_params_digest(p);

    let describe_bad = |(i, why): &(usize, String)| {
        format!(
            "{} ({}): {why}",
            images.describe(&rows.image_file[*i]),
            rows.image_name[*i]
        )
    };
    if !bad.is_empty() && p.on_bad_image == OnBadImage::Fail {
        let list: Vec<String> = bad.iter().map(describe_bad).collect();
        bail!(
            "{} bad image(s) (set `on_bad_image = \"skip\"` to leave them out):\n    {}",
            bad.len(),
            list.join("\n    ")
        );
    }
    for b in &bad {
        tracing::warn!("skipped {}", describe_bad(b));
    }

    let pick = |v: &Vec<String>| -> ArrayRef {
        Arc::new(
            index
                .iter()
                .map(|(i, _, _)| Some(v[*i].as_str()))
                .collect::<StringArray>(),
        )
    };
    let columns: Vec<ArrayRef> = vec![
        pick(&rows.image_name),
        Arc::new(
            index
                .iter()
                .map(|(_, s, _)| Some(s.as_str()))
                .collect::<StringArray>(),
        ),
        Arc::new(
            index
                .iter()
                .map(|(_, _, o)| Some(*o as i64))
                .collect::<Int64Array>(),
        ),
        Arc::new(
            index
                .iter()
                .map(|(i, _, _)| Some(rows.target[*i]))
                .collect::<Int32Array>(),
        ),
        pick(&rows.patient_id),
        pick(&rows.split),
        pick(&rows.image_digest),
    ];
    melanoflow_schemas::write_parquet(
        &ctx.out_dir.join("index.parquet"),
        &melanoflow_schemas::IMAGE_INDEX,
        columns,
    )?;
    let bad_columns: Vec<ArrayRef> = vec![
        Arc::new(
            bad.iter()
                .map(|(i, _)| Some(rows.image_name[*i].as_str()))
                .collect::<StringArray>(),
        ),
        Arc::new(
            bad.iter()
                .map(|(i, _)| Some(rows.image_file[*i].as_str()))
                .collect::<StringArray>(),
        ),
        Arc::new(
            bad.iter()
                .map(|(_, why)| Some(why.to_string()))
                .collect::<StringArray>(),
        ),
    ];
    melanoflow_schemas::write_parquet(
        &ctx.out_dir.join("bad_images.parquet"),
        &melanoflow_schemas::BAD_IMAGES,
        bad_columns,
    )?;

    // Counts of decoded vs reused describe this run, not the artifact: they
    // stay out of the output so the bytes depend only on the pixels.
    let summary = serde_json::json!({
        "images": index.len(),
        "skipped_bad_images": bad.len(),
        "size": p.size,
        "dtype": "uint8",
        "layout": "NHWC",
        "channels": "RGB",
        "color_constancy": p.color_constancy,
        "shards": shard_names,
        "pixel_params_digest": pixel_digest.to_hex(),
    });
    std::fs::write(
        ctx.out_dir.join("preprocess.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;

    let mut line = format!(
        "{} images in {} shard(s) at {} px: decoded {decoded}, reused {reused}",
        index.len(),
        shard_names.len(),
        p.size
    );
    if !bad.is_empty() {
        let names: Vec<&str> = bad
            .iter()
            .take(5)
            .map(|(i, _)| rows.image_name[*i].as_str())
            .collect();
        line.push_str(&format!(
            ", skipped {} bad ({}{})",
            bad.len(),
            names.join(", "),
            if bad.len() > 5 { ", ..." } else { "" }
        ));
    }
    Ok(StageReport::new(line))
}
