//! Image shards: one safetensors file per shard holding a single uint8
//! tensor `images` of shape [N, size, size, 3] (RGB, NHWC). PyTorch, numpy
//! (`safetensors.numpy.load_file`) and candle read it, and it can be
//! memory-mapped: the pixels of image `k` start at byte
//! `8 + header_len + k * size * size * 3`.
//!
//! The header is written by hand (keys in a fixed order, padded with spaces
//! to 8 bytes as the format allows) so equal pixels give equal file bytes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};

/// Writes `images` (each `size * size * 3` bytes) as one shard.
pub fn write_shard(path: &Path, size: u32, images: &[&[u8]]) -> Result<()> {
    let per_image = (size * size * 3) as usize;
    ensure!(
        images.iter().all(|i| i.len() == per_image),
        "every image must be {size}x{size}x3 bytes"
    );
    let total = per_image * images.len();
    let mut header = format!(
        "{{\"__metadata__\":{{\"format\":\"melanoflow-images\",\"layout\":\"NHWC\",\"channels\":\"RGB\"}},\
         \"images\":{{\"dtype\":\"U8\",\"shape\":[{},{size},{size},3],\"data_offsets\":[0,{total}]}}}}",
        images.len()
    );
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e| anyhow::Error::from(e).context(format!("writing {}", path.display()));
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    for img in images {
        w.write_all(img).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok(())
}

/// The side length of a shard's square images, from its header.
pub fn image_size(path: &Path) -> Result<u32> {
    let (_, header) = read_header(path)?;
    match header["images"]["shape"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect::<Vec<_>>())
    {
        Some(shape) if shape.len() == 4 && shape[1] == shape[2] && shape[3] == 3 => {
            Ok(shape[1] as u32)
        }
        other => bail!(
            "{}: expected a tensor `images` of shape [N, S, S, 3], found {other:?}",
            path.display()
        ),
    }
}

/// The header length and the parsed JSON header of a safetensors file.
fn read_header(path: &Path) -> Result<(u64, serde_json::Value)> {
    let file = File::open(path).with_context(|| format!("opening shard {}", path.display()))?;
    read_header_of(&file, path)
}

fn read_header_of(file: &File, path: &Path) -> Result<(u64, serde_json::Value)> {
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, 0)
        .with_context(|| format!("reading {}", path.display()))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > 1 << 20 {
        bail!(
            "{}: not a safetensors shard (header of {header_len} bytes)",
            path.display()
        );
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8)
        .with_context(|| format!("reading {}", path.display()))?;
    let header = serde_json::from_slice(&header)
        .with_context(|| format!("{}: safetensors header is not JSON", path.display()))?;
    Ok((header_len, header))
}

/// Random access to the images of one shard, without reading it whole.
pub struct ShardReader {
    file: File,
    data_start: u64,
    per_image: u64,
    count: u64,
}

impl ShardReader {
    pub fn open(path: &Path, size: u32) -> Result<ShardReader> {
        let file = File::open(path).with_context(|| format!("opening shard {}", path.display()))?;
        let (header_len, header) = read_header_of(&file, path)?;
        let shape: Vec<u64> = header["images"]["shape"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        let want = [size as u64, size as u64, 3];
        if shape.len() != 4 || shape[1..] != want || header["images"]["dtype"] != "U8" {
            bail!(
                "{}: expected a U8 tensor `images` of shape [N, {size}, {size}, 3], found {shape:?}",
                path.display()
            );
        }
        Ok(ShardReader {
            file,
            data_start: 8 + header_len,
            per_image: want.iter().product(),
            count: shape[0],
        })
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The pixels of image `k`.
    pub fn read(&self, k: u64) -> Result<Vec<u8>> {
        ensure!(
            k < self.count,
            "image {k} is beyond the shard's {} images",
            self.count
        );
        let mut buf = vec![0u8; self.per_image as usize];
        self.file
            .read_exact_at(&mut buf, self.data_start + k * self.per_image)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_back_and_header_is_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shard-00000.safetensors");
        let a = vec![1u8; 2 * 2 * 3];
        let b: Vec<u8> = (0..12).collect();
        write_shard(&p, 2, &[&a, &b]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header_len) % 8, 0);
        assert_eq!(
            &bytes[8 + header_len..],
            [a.clone(), b.clone()].concat().as_slice()
        );
        let r = ShardReader::open(&p, 2).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r.read(1).unwrap(), b);
        assert!(r.read(2).is_err());
        assert!(ShardReader::open(&p, 3).is_err(), "wrong size is refused");
    }
}
