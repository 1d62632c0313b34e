//! Reads PyTorch's *legacy* (non-zip) `.pth` serialisation without torch, and converts
//! a state dict to safetensors under a renaming.
//!
//! The legacy format is what `torch.save(..., _use_new_zipfile_serialization=False)` writes
//! (and what every torch before 1.6 wrote). It is five things back to back in one file:
//!
//! 1. a pickle of the magic number `0x1950a86a20f9469cfc6c` (a 10-byte `LONG1`);
//! 2. a pickle of the protocol version, `1001`;
//! 3. a pickle of a sys-info dict (`little_endian`, `type_sizes`, ...);
//! 4. a pickle of the object: for a state dict an `OrderedDict` of name to
//!    `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`, where the
//!    storage is a persistent id `('storage', torch.FloatStorage, key, location, numel,
//!    view_metadata)`;
//! 5. a pickle of the list of storage keys, then for each key in that order an 8-byte
//!    little-endian element count and the storage's raw little-endian elements.
//!
//! What [`read_legacy_pth`] promises:
//! - tensors come back in the order of the file's dict, on the CPU, contiguous, with
//!   `storage_offset`, `size` and `stride` honoured (several tensors may share one storage,
//!   and real checkpoints do store transposed/channels-last strides: the ImageNet Lite0
//!   file has every conv weight and `_fc.weight` non-contiguous);
//! - dtypes: Float→F32, Half→F16, BFloat16→BF16, Long→I64, Int→I32, Short→I16, Byte→U8,
//!   Bool→U8 (0/1) are kept as they are. Two are converted, losslessly or as documented:
//!   **Double is narrowed to F32** (the models here are F32; candle's conv kernels have no
//!   mixed-dtype path) and **Char (i8) is widened to I16** (candle has no I8). Any other
//!   storage type (complex, quantized, ...) is an error naming it;
//! - every error names the file and what was expected there: a zip-format `.pth`, a wrong
//!   magic number, an unexpected pickle opcode (with its byte offset), a storage key
//!   missing from the data section, a tensor reaching outside its storage, truncated data,
//!   trailing bytes after the last storage.
//!
//! Why a pickle interpreter of our own rather than `candle_core::pickle::Stack`: that `Stack`
//! targets the `data.pkl` inside zip checkpoints and does not fit here. Its `LONG1` decoder
//! shifts an `i64` by up to 72 bits, so the 10-byte magic number (the first thing in every
//! legacy file) overflows it (a panic in debug builds, garbage in release); it has no
//! `SHORT_BINSTRING`/`BINSTRING` (Python-2 era files), maps `DICT` to `EMPTY_DICT`, and its
//! memo stores deep clones, so a container mutated after `BINPUT` is stale when fetched
//! again. It also reports no byte offsets. The interpreter below is about as small: objects
//! live in an arena and the stack and memo hold indices, so sharing behaves like Python's.
//! It implements the opcodes torch's legacy writer emits at its default protocol 2, plus the
//! four protocol-4 framing/memo opcodes (`FRAME`, `SHORT_BINUNICODE`, `MEMOIZE`,
//! `STACK_GLOBAL`) that a `pickle_protocol=4` save adds; anything else is refused by name.
//! Nothing is ever *executed*: `GLOBAL`s are only compared against the few callables torch
//! uses (`OrderedDict`, `_rebuild_tensor(_v2)`, `_rebuild_parameter`); other calls become
//! opaque values that are an error only where a tensor was expected.
//!
//! [`efficientnet_pytorch_to_torchvision`] renames `efficientnet_pytorch` (lukemelas) weights
//! to torchvision's `efficientnet_b*` module tree, and [`convert`] ties both together, writing
//! the safetensors file atomically.
//!
//! Files: `container` (the five parts, storages, strides and dtypes), `pickle` (the
//! interpreter), `rename` (efficientnet_pytorch -> torchvision names); this file ties them
//! together ([`read_legacy_pth`], [`convert`]).

mod container;
mod pickle;
mod rename;

use container::parse_legacy;
pub use rename::{
    EFFICIENTNET_B0_EXPAND_RATIOS, EFFICIENTNET_B0_REPEATS, efficientnet_pytorch_to_torchvision,
};

use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Reads every tensor of a legacy (non-zip) PyTorch file holding a dict of tensors (a state
/// dict), in file order, as contiguous CPU tensors. See the module header for dtypes.
pub fn read_legacy_pth(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse_legacy(&bytes).with_context(|| format!("legacy PyTorch file {}", path.display()))
}

/// What [`convert`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvertReport {
    /// Tensors written.
    pub tensors: usize,
    /// Elements over all tensors, buffers (BatchNorm running stats, `num_batches_tracked`)
    /// included, since a state dict does not say which is which.
    pub parameters: u64,
    /// Size of the written safetensors file, header included.
    pub bytes: u64,
}

/// Reads `src` (legacy `.pth`), renames every tensor with `map` and writes `dst` as
/// safetensors. A name `map` returns `None` for is an error naming it (a silently dropped
/// weight would surface much later as a model that loads but does not work), and so is two
/// names mapping to one. The file is written to `dst` + `.tmp` and renamed into place, so
/// `dst` is either the complete old file or the complete new one.
pub fn convert(
    src: &Path,
    dst: &Path,
    map: impl Fn(&str) -> Option<String>,
) -> Result<ConvertReport> {
    let tensors = read_legacy_pth(src)?;
    let mut out: HashMap<String, Tensor> = HashMap::with_capacity(tensors.len());
    let mut source_of: HashMap<String, String> = HashMap::with_capacity(tensors.len());
    let mut parameters = 0u64;
    for (name, tensor) in tensors {
        let Some(target) = map(&name) else {
            bail!(
                "{}: tensor {name:?} has no name in the target model (unknown weight, or the \
                 wrong variant/architecture was chosen)",
                src.display()
            );
        };
        if let Some(previous) = source_of.insert(target.clone(), name.clone()) {
            bail!(
                "{}: tensors {previous:?} and {name:?} both map to {target:?}",
                src.display()
            );
        }
        parameters += tensor.elem_count() as u64;
        out.insert(target, tensor);
    }

    if let Some(parent) = dst.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating directory {}", parent.display()))?;
    }
    let tmp = {
        let mut s = dst.as_os_str().to_owned();
        s.push(".tmp");
        PathBuf::from(s)
    };
    let written = (|| -> Result<()> {
        candle_core::safetensors::save(&out, &tmp)
            .with_context(|| format!("writing safetensors {}", tmp.display()))?;
        // Flush to disk before the rename, so a crash cannot leave a renamed but empty file.
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, dst)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let bytes = std::fs::metadata(dst)
        .with_context(|| format!("reading size of {}", dst.display()))?
        .len();
    Ok(ConvertReport {
        tensors: out.len(),
        parameters,
        bytes,
    })
}

#[cfg(test)]
mod tests;
