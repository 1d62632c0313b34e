//! A folder of image shards with an `index.parquet` (schema `image_index/1`),
//! as `preprocess` and `generate` write them: the index rows in memory, the
//! pixels read one image at a time from the shards on demand (never the whole
//! dataset in memory).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use polars::prelude::{ParquetReader, SerReader};

use crate::preprocess::shards::ShardReader;

/// One row of the index.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageRecord {
    pub image_name: String,
    pub patient_id: String,
    pub split: String,
    pub malignant: bool,
    pub shard: String,
    pub offset: u64,
}

pub struct ImageSet {
    pub dir: PathBuf,
    /// Pixels per side.
    pub size: u32,
    pub records: Vec<ImageRecord>,
    readers: HashMap<String, ShardReader>,
}

impl ImageSet {
    /// Opens `dir/index.parquet` and every shard it names.
    pub fn open(dir: &Path) -> Result<ImageSet> {
        let index = dir.join("index.parquet");
        melanoflow_schemas::check_parquet(&index, &melanoflow_schemas::IMAGE_INDEX)?;
        let df = ParquetReader::new(
            std::fs::File::open(&index).with_context(|| format!("opening {}", index.display()))?,
        )
        .finish()
        .with_context(|| format!("reading {}", index.display()))?;
        let col = |n: &str| {
            df.column(n)
                .with_context(|| format!("{}: column `{n}`", index.display()))
        };
        let (name, shard, patient, split) = (
            col("image_name")?.str()?,
            col("shard")?.str()?,
            col("patient_id")?.str()?,
            col("split")?.str()?,
        );
        let offset = col("offset")?.i64()?;
        let target = col("target")?.i32()?;
        let mut records = Vec::with_capacity(df.height());
        let mut readers: HashMap<String, ShardReader> = HashMap::new();
        let mut size = None;
        for i in 0..df.height() {
            let (Some(n), Some(s), Some(p), Some(sp), Some(o), Some(t)) = (
                name.get(i),
                shard.get(i),
                patient.get(i),
                split.get(i),
                offset.get(i),
                target.get(i),
            ) else {
                bail!("{}: row {i} has a null", index.display());
            };
            if !readers.contains_key(s) {
                let path = dir.join(s);
                let side = *size.get_or_insert(crate::preprocess::shards::image_size(&path)?);
                readers.insert(s.to_string(), ShardReader::open(&path, side)?);
            }
            if o < 0 || o as u64 >= readers[s].len() {
                bail!(
                    "{}: row {i} (`{n}`) points at image {o} of `{s}`, which holds {}",
                    index.display(),
                    readers[s].len()
                );
            }
            records.push(ImageRecord {
                image_name: n.to_string(),
                patient_id: p.to_string(),
                split: sp.to_string(),
                malignant: t == 1,
                shard: s.to_string(),
                offset: o as u64,
            });
        }
        Ok(ImageSet {
            dir: dir.to_path_buf(),
            size: size.unwrap_or(0),
            records,
            readers,
        })
    }

    /// An index without shards behind it (for tests of selection logic).
    pub fn from_records(records: Vec<ImageRecord>, size: u32) -> ImageSet {
        ImageSet {
            dir: PathBuf::new(),
            size,
            records,
            readers: HashMap::new(),
        }
    }

    /// Pixels of one image, HWC RGB, `size * size * 3` bytes.
    pub fn pixels(&self, r: &ImageRecord) -> Result<Vec<u8>> {
        self.readers
            .get(&r.shard)
            .with_context(|| format!("`{}` is not a shard of {}", r.shard, self.dir.display()))?
            .read(r.offset)
            .with_context(|| {
                format!(
                    "reading `{}` from {}",
                    r.image_name,
                    self.dir.join(&r.shard).display()
                )
            })
    }

    /// Records of one split (`train`, `val`, `test`).
    pub fn split<'a>(&'a self, split: &'a str) -> impl Iterator<Item = &'a ImageRecord> + 'a {
        self.records.iter().filter(move |r| r.split == split)
    }
}
