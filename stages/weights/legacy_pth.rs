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

use anyhow::{Context, Result, anyhow, bail, ensure};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `0x1950a86a20f9469cfc6c`, as the little-endian two's-complement bytes `LONG1` carries.
const MAGIC_LE: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// The only legacy protocol version torch ever wrote.
const PROTOCOL_VERSION: i64 = 1001;

// ---------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------

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

/// Blocks per stage of EfficientNet-B0, and of EfficientNet-Lite0 (same depth coefficient).
pub const EFFICIENTNET_B0_REPEATS: [usize; 7] = [1, 2, 2, 3, 3, 4, 1];
/// MBConv expand ratio per stage of EfficientNet-B0 and -Lite0.
pub const EFFICIENTNET_B0_EXPAND_RATIOS: [usize; 7] = [1, 6, 6, 6, 6, 6, 6];

/// Maps an `efficientnet_pytorch` parameter name to torchvision's `efficientnet_b*` naming;
/// `None` for a name that is not a weight of that architecture.
///
/// `repeats[s]` is the number of blocks in stage `s + 1` and `expand_ratios[s]` their expand
/// ratio (both [`EFFICIENTNET_B0_REPEATS`]/[`EFFICIENTNET_B0_EXPAND_RATIOS`] for B0 and
/// Lite0); `has_se` is false for the Lite variants, which drop squeeze-and-excitation.
/// `efficientnet_pytorch` numbers blocks flat (`_blocks.N`); torchvision nests them as
/// `features.{stage}.{index in stage}.block.{k}`, where `k` counts only the sub-modules the
/// block has, in order: expand conv (expand ratio != 1), depthwise conv, SE (if any),
/// project conv. Stem is `features.0`, head `features.{stages + 1}`, the linear layer
/// `classifier.1` (after the dropout at `classifier.0`).
pub fn efficientnet_pytorch_to_torchvision(
    name: &str,
    repeats: &[usize],
    expand_ratios: &[usize],
    has_se: bool,
) -> Option<String> {
    const BN: [&str; 5] = [
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ];
    let is_bn = |p: &str| BN.contains(&p);
    let is_linear = |p: &str| p == "weight" || p == "bias";
    let head_stage = repeats.len() + 1;

    let (module, param) = name.split_once('.')?;
    match module {
        "_conv_stem" if param == "weight" => Some("features.0.0.weight".to_owned()),
        "_bn0" if is_bn(param) => Some(format!("features.0.1.{param}")),
        "_conv_head" if param == "weight" => Some(format!("features.{head_stage}.0.weight")),
        "_bn1" if is_bn(param) => Some(format!("features.{head_stage}.1.{param}")),
        "_fc" if is_linear(param) => Some(format!("classifier.1.{param}")),
        "_blocks" => {
            if expand_ratios.len() != repeats.len() {
                return None;
            }
            let (index, rest) = param.split_once('.')?;
            // Only canonical decimal indices: "01" or "+1" would be a different module name.
            if index.is_empty()
                || !index.bytes().all(|b| b.is_ascii_digit())
                || (index.len() > 1 && index.starts_with('0'))
            {
                return None;
            }
            let mut flat: usize = index.parse().ok()?;
            let mut stage = None;
            for (s, &n) in repeats.iter().enumerate() {
                if flat < n {
                    stage = Some((s, flat));
                    break;
                }
                flat -= n;
            }
            let (s, j) = stage?;
            let expands = expand_ratios[s] != 1;

            // torchvision's MBConv appends sub-modules only when present, so indices shift.
            let mut next = 0usize;
            let mut take = |present: bool| {
                present.then(|| {
                    next += 1;
                    next - 1
                })
            };
            let expand = take(expands);
            let depthwise = take(true)?;
            let se = take(has_se);
            let project = take(true)?;

            let (part, p) = rest.split_once('.')?;
            let sub = match part {
                "_expand_conv" if p == "weight" => format!("{}.0.weight", expand?),
                "_bn0" if is_bn(p) => format!("{}.1.{p}", expand?),
                "_depthwise_conv" if p == "weight" => format!("{depthwise}.0.weight"),
                "_bn1" if is_bn(p) => format!("{depthwise}.1.{p}"),
                "_se_reduce" if is_linear(p) => format!("{}.fc1.{p}", se?),
                "_se_expand" if is_linear(p) => format!("{}.fc2.{p}", se?),
                "_project_conv" if p == "weight" => format!("{project}.0.weight"),
                "_bn2" if is_bn(p) => format!("{project}.1.{p}"),
                _ => return None,
            };
            Some(format!("features.{}.{j}.block.{sub}", s + 1))
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// The legacy container
// ---------------------------------------------------------------------------------------

fn parse_legacy(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    if bytes.starts_with(b"PK\x03\x04") {
        bail!(
            "this is a zip-format .pth (torch >= 1.6 default), not the legacy format: load it \
             with candle_core::pickle::read_pth_tensor_info / read_all instead"
        );
    }
    let mut cur = Cursor { bytes, pos: 0 };

    // 1. Magic number. Parse errors here mean "not this format at all", so say that.
    let magic = Pickle::load(&mut cur, "magic-number").map_err(|e| {
        anyhow!("not a legacy PyTorch file: it does not start with the magic-number pickle ({e:#})")
    })?;
    match magic.get(magic.root) {
        Obj::BigInt(b) if b[..] == MAGIC_LE => {}
        other => bail!(
            "not a legacy PyTorch file: magic number is {}, expected 0x1950a86a20f9469cfc6c",
            magic.describe_obj(other)
        ),
    }

    // 2. Protocol version.
    let proto = Pickle::load(&mut cur, "protocol-version")?;
    match proto.get(proto.root) {
        Obj::Int(PROTOCOL_VERSION) => {}
        other => bail!(
            "legacy protocol version is {}, expected {PROTOCOL_VERSION}",
            proto.describe_obj(other)
        ),
    }

    // 3. Sys info. Only byte order matters: the data section is raw host-order elements.
    let sys = Pickle::load(&mut cur, "sys-info")?;
    if let Obj::Dict(items) = sys.get(sys.root) {
        for &(k, v) in items {
            if matches!(sys.get(k), Obj::Str(s) if s == "little_endian")
                && matches!(sys.get(v), Obj::Bool(false))
            {
                bail!(
                    "the file was written on a big-endian machine; only little-endian data is supported"
                );
            }
        }
    } else {
        bail!(
            "sys-info pickle is {}, expected a dict",
            sys.describe(sys.root)
        );
    }

    // 4. The object: a dict of name -> tensor.
    let obj = Pickle::load(&mut cur, "state-dict")?;
    let Obj::Dict(items) = obj.get(obj.root) else {
        bail!(
            "the saved object is {}, expected a dict of tensors (a state dict)",
            obj.describe(obj.root)
        );
    };
    let mut entries: Vec<(String, TensorRef)> = Vec::with_capacity(items.len());
    for &(k, v) in items {
        let Obj::Str(name) = obj.get(k) else {
            bail!("state dict has key {}, expected str keys", obj.describe(k));
        };
        let Obj::Tensor(t) = obj.get(v) else {
            bail!(
                "state dict entry {name:?} is {}, expected a tensor",
                obj.describe(v)
            );
        };
        entries.push((name.clone(), t.clone()));
    }

    // Storage element types come only from the object pickle; the data section is untyped.
    let mut kinds: HashMap<&str, (StorageKind, usize)> = HashMap::new();
    for (name, t) in &entries {
        let s = &t.storage;
        match kinds.insert(&s.key, (s.kind, s.numel)) {
            Some(prev) if prev != (s.kind, s.numel) => bail!(
                "storage {:?} is used as {:?} x {} by {name:?} but as {:?} x {} before",
                s.key,
                s.kind,
                s.numel,
                prev.0,
                prev.1
            ),
            _ => {}
        }
    }

    // 5. Storage keys, then each storage's data in that order.
    let keys_pickle = Pickle::load(&mut cur, "storage-keys")?;
    let Obj::List(key_ids) = keys_pickle.get(keys_pickle.root) else {
        bail!(
            "storage-keys pickle is {}, expected a list of str",
            keys_pickle.describe(keys_pickle.root)
        );
    };
    let mut data: HashMap<&str, &[u8]> = HashMap::with_capacity(key_ids.len());
    for &id in key_ids {
        let Obj::Str(key) = keys_pickle.get(id) else {
            bail!(
                "storage-keys list holds {}, expected str",
                keys_pickle.describe(id)
            );
        };
        let Some(&(kind, numel)) = kinds.get(key.as_str()) else {
            bail!(
                "storage {key:?} is listed in the data section but no tensor uses it, so its element size is unknown"
            );
        };
        let at = cur.pos;
        let count = u64::from_le_bytes(
            cur.take(8, || format!("the element count of storage {key:?}"))?
                .try_into()
                .unwrap(),
        );
        ensure!(
            count == numel as u64,
            "storage {key:?} at byte {at}: data section says {count} elements, the state dict says {numel}"
        );
        let len = numel
            .checked_mul(kind.elem_size())
            .ok_or_else(|| anyhow!("storage {key:?}: {numel} elements overflow usize"))?;
        let raw = cur.take(len, || {
            format!("the data of storage {key:?} ({numel} x {kind:?})")
        })?;
        if data.insert(key.as_str(), raw).is_some() {
            bail!("storage {key:?} appears twice in the data section");
        }
    }
    if cur.pos != bytes.len() {
        bail!(
            "{} trailing bytes after the last storage (at byte {}): not the layout this reader understands",
            bytes.len() - cur.pos,
            cur.pos
        );
    }

    entries
        .into_iter()
        .map(|(name, t)| {
            let Some(raw) = data.get(t.storage.key.as_str()) else {
                bail!(
                    "tensor {name:?}: storage key {:?} is missing from the data section",
                    t.storage.key
                );
            };
            let tensor = materialize(&t, raw).with_context(|| format!("tensor {name:?}"))?;
            Ok((name, tensor))
        })
        .collect()
}

/// Torch storage classes this reader knows, by their `torch.<Name>Storage` global.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StorageKind {
    Float,
    Double,
    Half,
    BFloat16,
    Long,
    Int,
    Short,
    Char,
    Byte,
    Bool,
}

impl StorageKind {
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::Float,
            "DoubleStorage" => Self::Double,
            "HalfStorage" => Self::Half,
            "BFloat16Storage" => Self::BFloat16,
            "LongStorage" => Self::Long,
            "IntStorage" => Self::Int,
            "ShortStorage" => Self::Short,
            "CharStorage" => Self::Char,
            "ByteStorage" => Self::Byte,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    /// Bytes per element in the data section (torch's element size, not the `type_sizes`
    /// of sys-info: a `long` there is 4 on Windows, yet LongStorage is always int64).
    fn elem_size(self) -> usize {
        match self {
            Self::Double | Self::Long => 8,
            Self::Float | Self::Int => 4,
            Self::Half | Self::BFloat16 | Self::Short => 2,
            Self::Char | Self::Byte | Self::Bool => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct StorageRef {
    kind: StorageKind,
    key: String,
    /// Elements in the whole (root) storage.
    numel: usize,
    /// Old torch could pickle a *view* of a storage: `(view_key, offset, size)` in elements.
    view: Option<(usize, usize)>,
}

#[derive(Debug, Clone, PartialEq)]
struct TensorRef {
    storage: StorageRef,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

/// Gathers a tensor's elements from its storage in row-major order and builds the tensor.
fn materialize(t: &TensorRef, raw: &[u8]) -> Result<Tensor> {
    let kind = t.storage.kind;
    let es = kind.elem_size();
    let (view_start, view_len) = t.storage.view.unwrap_or((0, t.storage.numel));
    ensure!(
        view_start
            .checked_add(view_len)
            .is_some_and(|end| end <= t.storage.numel),
        "storage view [{view_start}, +{view_len}) lies outside its storage of {} elements",
        t.storage.numel
    );
    ensure!(
        t.size.len() == t.stride.len(),
        "size {:?} and stride {:?} differ in rank",
        t.size,
        t.stride
    );
    let numel = t
        .size
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| anyhow!("size {:?} overflows usize", t.size))?;

    let mut out: Vec<u8> = Vec::with_capacity(numel * es);
    if numel > 0 {
        // Bounds: the furthest element must lie inside the (view of the) storage.
        let last = t
            .size
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |a, (&d, &s)| {
                (d - 1).checked_mul(s).and_then(|x| a.checked_add(x))
            });
        ensure!(
            last.is_some_and(|l| l < view_len),
            "storage_offset {} with size {:?} and stride {:?} reaches outside its storage of {view_len} elements",
            t.offset,
            t.size,
            t.stride
        );
        let base = view_start + t.offset;
        let row_major = t
            .size
            .iter()
            .zip(&t.stride)
            .rev()
            .try_fold(1usize, |expected, (&d, &s)| {
                (d == 1 || s == expected).then(|| expected * d)
            });
        if row_major.is_some() {
            out.extend_from_slice(&raw[base * es..(base + numel) * es]);
        } else {
            // Odometer over the multi-index; the last dimension runs fastest.
            let rank = t.size.len();
            let mut idx = vec![0usize; rank];
            let mut at = base;
            for _ in 0..numel {
                out.extend_from_slice(&raw[at * es..(at + 1) * es]);
                for d in (0..rank).rev() {
                    idx[d] += 1;
                    at += t.stride[d];
                    if idx[d] < t.size[d] {
                        break;
                    }
                    at -= t.stride[d] * t.size[d];
                    idx[d] = 0;
                }
            }
        }
    }

    let cpu = &Device::Cpu;
    let shape = t.size.as_slice();
    let tensor = match kind {
        // Kept dtypes: the gathered bytes are little-endian elements of exactly that type.
        StorageKind::Float
        | StorageKind::Half
        | StorageKind::BFloat16
        | StorageKind::Long
        | StorageKind::Int
        | StorageKind::Short
        | StorageKind::Byte
        | StorageKind::Bool => {
            let dtype = match kind {
                StorageKind::Float => DType::F32,
                StorageKind::Half => DType::F16,
                StorageKind::BFloat16 => DType::BF16,
                StorageKind::Long => DType::I64,
                StorageKind::Int => DType::I32,
                StorageKind::Short => DType::I16,
                _ => DType::U8,
            };
            if cfg!(target_endian = "big") {
                out.chunks_exact_mut(es).for_each(|c| c.reverse());
            }
            Tensor::from_raw_buffer(&out, dtype, shape, cpu)?
        }
        StorageKind::Double => {
            let v: Vec<f32> = out
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect();
            Tensor::from_vec(v, shape, cpu)?
        }
        StorageKind::Char => {
            let v: Vec<i16> = out.iter().map(|&b| b as i8 as i16).collect();
            Tensor::from_vec(v, shape, cpu)?
        }
    };
    Ok(tensor)
}

// ---------------------------------------------------------------------------------------
// A small pickle interpreter
// ---------------------------------------------------------------------------------------

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: impl FnOnce() -> String) -> Result<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.bytes.len() => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => bail!(
                "truncated file: {} needs {n} bytes at byte {}, but the file ends at byte {}",
                what(),
                self.pos,
                self.bytes.len()
            ),
        }
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1, || "an opcode argument".into())?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2, || "an opcode argument".into())?
                .try_into()
                .unwrap(),
        ))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, || "an opcode argument".into())?
                .try_into()
                .unwrap(),
        ))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.bytes[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            bail!(
                "truncated file: unterminated GLOBAL name at byte {}",
                self.pos
            );
        };
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| anyhow!("GLOBAL name is not UTF-8"))
    }
}

type Id = usize;

#[derive(Debug, Clone, PartialEq)]
enum Obj {
    None,
    Bool(bool),
    Int(i64),
    /// A `LONG1`/`LONG4` too wide for i64: little-endian two's complement, as pickled.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Global {
        module: String,
        name: String,
    },
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Storage(StorageRef),
    Tensor(TensorRef),
    /// The result of a call this reader does not interpret; only its callee is kept.
    Opaque(String),
}

/// One unpickled object graph: the arena and the root.
struct Pickle {
    arena: Vec<Obj>,
    root: Id,
}

impl Pickle {
    fn get(&self, id: Id) -> &Obj {
        &self.arena[id]
    }

    fn describe(&self, id: Id) -> String {
        self.describe_obj(self.get(id))
    }

    fn describe_obj(&self, o: &Obj) -> String {
        match o {
            Obj::None => "None".into(),
            Obj::Bool(b) => format!("bool {b}"),
            Obj::Int(i) => format!("int {i:#x}"),
            Obj::BigInt(b) => {
                let hex: String = b.iter().rev().map(|x| format!("{x:02x}")).collect();
                format!("int 0x{hex} (two's complement)")
            }
            Obj::Float(f) => format!("float {f}"),
            Obj::Str(s) => format!("str {s:?}"),
            Obj::Bytes(b) => format!("{} bytes", b.len()),
            Obj::Global { module, name } => format!("global {module}.{name}"),
            Obj::Tuple(v) => format!("a tuple of {}", v.len()),
            Obj::List(v) => format!("a list of {}", v.len()),
            Obj::Dict(v) => format!("a dict of {}", v.len()),
            Obj::Storage(s) => format!("a {:?} storage", s.kind),
            Obj::Tensor(_) => "a tensor".into(),
            Obj::Opaque(c) => format!("the result of calling {c}"),
        }
    }

    /// Runs one pickle from the cursor through its STOP.
    fn load(cur: &mut Cursor<'_>, what: &str) -> Result<Self> {
        let mut m = Machine {
            arena: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        };
        loop {
            let at = cur.pos;
            let op = cur.take(1, || format!("the {what} pickle"))?[0];
            match m.step(op, cur) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    return Err(e.context(format!(
                        "{what} pickle: opcode {} at byte {at}",
                        opcode_name(op)
                    )));
                }
            }
        }
        ensure!(
            m.stack.len() == 1 && m.marks.is_empty(),
            "{what} pickle: STOP with {} objects and {} marks on the stack, expected one object",
            m.stack.len(),
            m.marks.len()
        );
        let root = m.stack[0];
        Ok(Pickle {
            arena: m.arena,
            root,
        })
    }
}

fn opcode_name(op: u8) -> String {
    let name = match op {
        0x80 => "PROTO",
        0x95 => "FRAME",
        b'.' => "STOP",
        b'c' => "GLOBAL",
        0x93 => "STACK_GLOBAL",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        0x94 => "MEMOIZE",
        b'h' => "BINGET",
        b'j' => "LONG_BINGET",
        b'(' => "MARK",
        b'}' => "EMPTY_DICT",
        b']' => "EMPTY_LIST",
        b')' => "EMPTY_TUPLE",
        b'd' => "DICT",
        b'l' => "LIST",
        b't' => "TUPLE",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        b's' => "SETITEM",
        b'u' => "SETITEMS",
        b'a' => "APPEND",
        b'e' => "APPENDS",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'M' => "BININT2",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'X' => "BINUNICODE",
        0x8c => "SHORT_BINUNICODE",
        b'U' => "SHORT_BINSTRING",
        b'T' => "BINSTRING",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        b'N' => "NONE",
        b'R' => "REDUCE",
        0x81 => "NEWOBJ",
        b'b' => "BUILD",
        b'Q' => "BINPERSID",
        b'G' => "BINFLOAT",
        _ => "",
    };
    if name.is_empty() {
        format!("{op:#04x}")
    } else {
        format!("{name} ({op:#04x})")
    }
}

struct Machine {
    arena: Vec<Obj>,
    stack: Vec<Id>,
    /// Stack heights at each MARK (Python's "metastack").
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
}

impl Machine {
    fn alloc(&mut self, o: Obj) -> Id {
        self.arena.push(o);
        self.arena.len() - 1
    }
    fn push(&mut self, o: Obj) {
        let id = self.alloc(o);
        self.stack.push(id);
    }
    fn pop(&mut self) -> Result<Id> {
        if self.marks.last().is_some_and(|&h| h >= self.stack.len()) {
            bail!("pop across a MARK");
        }
        self.stack
            .pop()
            .ok_or_else(|| anyhow!("pop from an empty stack"))
    }
    fn top(&self) -> Result<Id> {
        self.stack
            .last()
            .copied()
            .ok_or_else(|| anyhow!("empty stack"))
    }
    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let h = self
            .marks
            .pop()
            .ok_or_else(|| anyhow!("no MARK to pop to"))?;
        Ok(self.stack.split_off(h))
    }
    fn memo_get(&self, k: u32) -> Result<Id> {
        self.memo
            .get(&k)
            .copied()
            .ok_or_else(|| anyhow!("memo key {k} was never stored"))
    }
    fn str_arg(&self, id: Id) -> Option<&str> {
        match &self.arena[id] {
            Obj::Str(s) => Some(s),
            _ => None,
        }
    }
    fn int_arg(&self, id: Id, what: &str) -> Result<usize> {
        match self.arena[id] {
            Obj::Int(i) if i >= 0 => Ok(i as usize),
            ref o => bail!("{what}: expected a non-negative int, found {o:?}"),
        }
    }
    fn ints_arg(&self, id: Id, what: &str) -> Result<Vec<usize>> {
        match &self.arena[id] {
            Obj::Tuple(v) | Obj::List(v) => v.iter().map(|&i| self.int_arg(i, what)).collect(),
            o => bail!("{what}: expected a tuple of ints, found {o:?}"),
        }
    }

    /// Executes one opcode; `Ok(true)` on STOP.
    fn step(&mut self, op: u8, cur: &mut Cursor<'_>) -> Result<bool> {
        match op {
            0x80 => {
                let v = cur.u8()?;
                ensure!(v <= 5, "pickle protocol {v} is newer than any known");
            }
            0x95 => {
                // Frames only group opcodes for buffered reading; the content is inline.
                cur.take(8, || "the FRAME length".into())?;
            }
            b'.' => return Ok(true),
            b'c' => {
                let module = cur.line()?.to_owned();
                let name = cur.line()?.to_owned();
                self.push(Obj::Global { module, name });
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (self.str_arg(module), self.str_arg(name)) {
                    (Some(m), Some(n)) => {
                        let o = Obj::Global {
                            module: m.to_owned(),
                            name: n.to_owned(),
                        };
                        self.push(o)
                    }
                    _ => bail!("STACK_GLOBAL needs two str"),
                }
            }
            b'q' => {
                let k = cur.u8()? as u32;
                self.memo.insert(k, self.top()?);
            }
            b'r' => {
                let k = cur.u32()?;
                self.memo.insert(k, self.top()?);
            }
            0x94 => {
                let k = self.memo.len() as u32;
                self.memo.insert(k, self.top()?);
            }
            b'h' => {
                let id = self.memo_get(cur.u8()? as u32)?;
                self.stack.push(id);
            }
            b'j' => {
                let id = self.memo_get(cur.u32()?)?;
                self.stack.push(id);
            }
            b'(' => self.marks.push(self.stack.len()),
            b'}' => self.push(Obj::Dict(Vec::new())),
            b']' => self.push(Obj::List(Vec::new())),
            b')' => self.push(Obj::Tuple(Vec::new())),
            b'd' => {
                let items = self.pop_mark()?;
                ensure!(items.len() % 2 == 0, "DICT with an odd number of items");
                let pairs = items.chunks_exact(2).map(|c| (c[0], c[1])).collect();
                self.push(Obj::Dict(pairs));
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.push(Obj::List(items));
            }
            b't' => {
                let items = self.pop_mark()?;
                self.push(Obj::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push(Obj::Tuple(items));
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.dict_extend(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                ensure!(items.len() % 2 == 0, "SETITEMS with an odd number of items");
                self.dict_extend(items)?;
            }
            b'a' => {
                let v = self.pop()?;
                self.list_extend(vec![v])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.list_extend(items)?;
            }
            b'J' => {
                let v = i32::from_le_bytes(cur.take(4, || "BININT".into())?.try_into().unwrap());
                self.push(Obj::Int(v as i64));
            }
            b'K' => {
                let v = cur.u8()?;
                self.push(Obj::Int(v as i64));
            }
            b'M' => {
                let v = cur.u16()?;
                self.push(Obj::Int(v as i64));
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    cur.u8()? as usize
                } else {
                    let n = i32::from_le_bytes(cur.take(4, || "LONG4".into())?.try_into().unwrap());
                    ensure!(n >= 0, "LONG4 with negative length");
                    n as usize
                };
                let b = cur.take(n, || "a LONG1/LONG4 payload".into())?;
                if n <= 8 {
                    // Sign-extend little-endian two's complement to i64.
                    let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        0xff
                    } else {
                        0
                    };
                    let mut full = [fill; 8];
                    full[..n].copy_from_slice(b);
                    self.push(Obj::Int(i64::from_le_bytes(full)));
                } else {
                    self.push(Obj::BigInt(b.to_vec()));
                }
            }
            b'X' | 0x8c => {
                let n = if op == b'X' {
                    cur.u32()? as usize
                } else {
                    cur.u8()? as usize
                };
                let b = cur.take(n, || "a str payload".into())?;
                let s = std::str::from_utf8(b).map_err(|_| anyhow!("str is not valid UTF-8"))?;
                self.push(Obj::Str(s.to_owned()));
            }
            b'U' | b'T' => {
                // Python 2 `str`: bytes. Torch's keys and names are ASCII, so keep valid UTF-8
                // as a str (what Python 3 unpickling with encoding="utf-8" gives).
                let n = if op == b'U' {
                    cur.u8()? as usize
                } else {
                    let n =
                        i32::from_le_bytes(cur.take(4, || "BINSTRING".into())?.try_into().unwrap());
                    ensure!(n >= 0, "BINSTRING with negative length");
                    n as usize
                };
                let b = cur.take(n, || "a byte-string payload".into())?;
                match std::str::from_utf8(b) {
                    Ok(s) => self.push(Obj::Str(s.to_owned())),
                    Err(_) => self.push(Obj::Bytes(b.to_vec())),
                }
            }
            0x88 => self.push(Obj::Bool(true)),
            0x89 => self.push(Obj::Bool(false)),
            b'N' => self.push(Obj::None),
            b'G' => {
                // Pickle floats are big-endian, unlike its ints.
                let v = f64::from_be_bytes(cur.take(8, || "BINFLOAT".into())?.try_into().unwrap());
                self.push(Obj::Float(v));
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let o = self.call(callable, args)?;
                self.push(o);
            }
            b'b' => {
                // BUILD sets an instance's state; for the OrderedDict of a state dict that is
                // `_metadata` (module versions), which tensors do not need. Drop it.
                self.pop()?;
                self.top()?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let s = self.persistent_load(pid)?;
                self.push(Obj::Storage(s));
            }
            _ => bail!("unsupported pickle opcode (not one torch's legacy writer emits)"),
        }
        Ok(false)
    }

    fn dict_extend(&mut self, items: Vec<Id>) -> Result<()> {
        let d = self.top()?;
        match &mut self.arena[d] {
            Obj::Dict(v) => {
                v.extend(items.chunks_exact(2).map(|c| (c[0], c[1])));
                Ok(())
            }
            o => bail!("setting items on {o:?}, expected a dict"),
        }
    }

    fn list_extend(&mut self, items: Vec<Id>) -> Result<()> {
        let l = self.top()?;
        match &mut self.arena[l] {
            Obj::List(v) => {
                v.extend(items);
                Ok(())
            }
            o => bail!("appending to {o:?}, expected a list"),
        }
    }

    /// REDUCE / NEWOBJ: interprets the few callables torch state dicts use, by name only.
    fn call(&self, callable: Id, args: Id) -> Result<Obj> {
        let Obj::Global { module, name } = &self.arena[callable] else {
            return Ok(Obj::Opaque(format!(
                "a non-global {:?}",
                self.arena[callable]
            )));
        };
        let args_v: &[Id] = match &self.arena[args] {
            Obj::Tuple(v) => v,
            o => bail!("{module}.{name}: arguments are {o:?}, expected a tuple"),
        };
        Ok(match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") if args_v.is_empty() => Obj::Dict(Vec::new()),
            // (storage, storage_offset, size, stride[, requires_grad, backward_hooks[, metadata]])
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
                ensure!(
                    args_v.len() >= 4,
                    "{name}: {} arguments, expected at least 4",
                    args_v.len()
                );
                let Obj::Storage(storage) = &self.arena[args_v[0]] else {
                    bail!(
                        "{name}: first argument is {:?}, expected a storage",
                        self.arena[args_v[0]]
                    );
                };
                Obj::Tensor(TensorRef {
                    storage: storage.clone(),
                    offset: self.int_arg(args_v[1], "storage_offset")?,
                    size: self.ints_arg(args_v[2], "size")?,
                    stride: self.ints_arg(args_v[3], "stride")?,
                })
            }
            // nn.Parameter(data, requires_grad, backward_hooks): the data is what we want.
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state")
                if matches!(
                    args_v.first().map(|&a| &self.arena[a]),
                    Some(Obj::Tensor(_))
                ) =>
            {
                self.arena[args_v[0]].clone()
            }
            _ => Obj::Opaque(format!("{module}.{name}")),
        })
    }

    /// `('storage', torch.<Kind>Storage, key, location, numel, view_metadata)`.
    fn persistent_load(&self, pid: Id) -> Result<StorageRef> {
        let Obj::Tuple(t) = &self.arena[pid] else {
            bail!(
                "persistent id is {:?}, expected a ('storage', ...) tuple",
                self.arena[pid]
            );
        };
        ensure!(
            t.len() == 6 && self.str_arg(t[0]) == Some("storage"),
            "persistent id {:?} is not a 6-tuple starting with 'storage'",
            t.iter().map(|&i| &self.arena[i]).collect::<Vec<_>>()
        );
        let kind = match &self.arena[t[1]] {
            Obj::Global { module, name } if module == "torch" => StorageKind::from_class(name)
                .ok_or_else(|| anyhow!("unsupported storage type torch.{name}"))?,
            o => bail!("storage type is {o:?}, expected a torch.<Type>Storage global"),
        };
        let key = self
            .str_arg(t[2])
            .ok_or_else(|| anyhow!("storage key is {:?}, expected a str", self.arena[t[2]]))?
            .to_owned();
        let numel = self.int_arg(t[4], "storage numel")?;
        let view = match &self.arena[t[5]] {
            Obj::None => None,
            Obj::Tuple(v) if v.len() == 3 => Some((
                self.int_arg(v[1], "view offset")?,
                self.int_arg(v[2], "view size")?,
            )),
            o => bail!("storage view metadata is {o:?}, expected None or (key, offset, size)"),
        };
        Ok(StorageRef {
            kind,
            key,
            numel,
            view,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// Emits pickle opcodes the way torch's legacy writer (pickle protocol 2) does.
    #[derive(Default)]
    struct P(Vec<u8>);

    impl P {
        fn op(&mut self, b: &[u8]) -> &mut Self {
            self.0.extend_from_slice(b);
            self
        }
        fn proto(&mut self) -> &mut Self {
            self.op(&[0x80, 2])
        }
        fn stop(&mut self) -> &mut Self {
            self.op(b".")
        }
        fn mark(&mut self) -> &mut Self {
            self.op(b"(")
        }
        fn int(&mut self, v: i64) -> &mut Self {
            match v {
                0..=0xff => self.op(&[b'K', v as u8]),
                0x100..=0xffff => self.op(b"M").op(&(v as u16).to_le_bytes()),
                _ => self.op(b"J").op(&(v as i32).to_le_bytes()),
            }
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.op(b"X")
                .op(&(s.len() as u32).to_le_bytes())
                .op(s.as_bytes())
        }
        fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.op(b"c")
                .op(module.as_bytes())
                .op(b"\n")
                .op(name.as_bytes())
                .op(b"\n")
        }
        fn put(&mut self, k: u8) -> &mut Self {
            self.op(&[b'q', k])
        }
        fn get(&mut self, k: u8) -> &mut Self {
            self.op(&[b'h', k])
        }
        fn long_put(&mut self, k: u32) -> &mut Self {
            self.op(b"r").op(&k.to_le_bytes())
        }
        fn long_get(&mut self, k: u32) -> &mut Self {
            self.op(b"j").op(&k.to_le_bytes())
        }
        fn ints(&mut self, v: &[i64]) -> &mut Self {
            match v.len() {
                0 => self.op(b")"),
                1 => {
                    self.int(v[0]);
                    self.op(&[0x85])
                }
                _ => {
                    self.mark();
                    v.iter().for_each(|&x| {
                        self.int(x);
                    });
                    self.op(b"t")
                }
            }
        }
    }

    struct Spec<'a> {
        name: &'a str,
        /// Memo slot of an already-emitted persistent-id tuple, or (class, key, numel).
        storage: Result<u8, (&'a str, &'a str, i64)>,
        storage_memo: u8,
        offset: i64,
        size: &'a [i64],
        stride: &'a [i64],
    }

    /// Pieces of a legacy file, so tests can break one.
    struct Parts {
        magic: Vec<u8>,
        proto: Vec<u8>,
        sys: Vec<u8>,
        obj: Vec<u8>,
        keys: Vec<u8>,
        data: Vec<u8>,
    }

    impl Parts {
        fn bytes(&self) -> Vec<u8> {
            [
                &self.magic[..],
                &self.proto,
                &self.sys,
                &self.obj,
                &self.keys,
                &self.data,
            ]
            .concat()
        }
    }

    fn magic_pickle(le: &[u8]) -> Vec<u8> {
        let mut p = P::default();
        p.proto().op(&[0x8a, le.len() as u8]).op(le).stop();
        p.0
    }

    fn storage_data(numel: u64, payload: &[u8]) -> Vec<u8> {
        [&numel.to_le_bytes()[..], payload].concat()
    }

    /// A state dict as torch 1.x writes it: `a` 2x3 f32; `b` 3x2 transposed view at offset 1
    /// of storage "k1", `c` all of "k1" (shared storage); `n` an int64 scalar beyond i32
    /// (a `num_batches_tracked`); `d` float64, narrowed to f32. Storage keys are listed in
    /// sorted order, unlike the tensor order, as torch does.
    fn legacy_parts() -> Parts {
        let a: [f32; 6] = [0.5, -1.0, 2.25, 3.0, 1e-3, -7.5];
        let k1: Vec<f32> = (0..7).map(|i| i as f32).collect();
        let n: i64 = 123_456_789_012;
        let d: [f64; 2] = [0.1, -2.5];

        let mut sys = P::default();
        sys.proto().op(b"}").put(0).mark();
        sys.str("protocol_version").put(1).int(1001);
        sys.str("little_endian").put(2).op(&[0x88]);
        sys.str("type_sizes").put(3).op(b"}").put(4).mark();
        sys.str("short")
            .int(2)
            .str("int")
            .int(4)
            .str("long")
            .int(4)
            .op(b"u");
        sys.op(b"u").stop();

        let specs = [
            Spec {
                name: "a",
                storage: Err(("FloatStorage", "k0", 6)),
                storage_memo: 20,
                offset: 0,
                size: &[2, 3],
                stride: &[3, 1],
            },
            Spec {
                name: "b",
                storage: Err(("FloatStorage", "k1", 7)),
                storage_memo: 21,
                offset: 1,
                size: &[3, 2],
                stride: &[1, 3],
            },
            Spec {
                name: "c",
                storage: Ok(21),
                storage_memo: 22,
                offset: 0,
                size: &[7],
                stride: &[1],
            },
            Spec {
                name: "n",
                storage: Err(("LongStorage", "k2", 1)),
                storage_memo: 23,
                offset: 0,
                size: &[],
                stride: &[],
            },
            Spec {
                name: "d",
                storage: Err(("DoubleStorage", "k3", 2)),
                storage_memo: 24,
                offset: 0,
                size: &[2],
                stride: &[1],
            },
        ];
        let mut obj = P::default();
        obj.proto()
            .global("collections", "OrderedDict")
            .put(0)
            .op(b")R")
            .put(1)
            .mark();
        for (i, s) in specs.iter().enumerate() {
            obj.str(s.name);
            // The callable is pickled once, then fetched from the memo.
            if i == 0 {
                obj.global("torch._utils", "_rebuild_tensor_v2").put(2);
            } else {
                obj.get(2);
            }
            obj.mark();
            match s.storage {
                Ok(memo) => obj.get(memo),
                Err((class, key, numel)) => {
                    obj.mark()
                        .str("storage")
                        .global("torch", class)
                        .str(key)
                        .str("cpu");
                    obj.int(numel).op(b"N").op(b"t").put(s.storage_memo)
                }
            };
            obj.op(b"Q").int(s.offset).ints(s.size).ints(s.stride);
            // requires_grad=False, backward_hooks=OrderedDict()
            obj.op(&[0x89]).get(0).op(b")R").op(b"t").op(b"R");
        }
        obj.op(b"u");
        // OrderedDict state: {'_metadata': OrderedDict([('', {'version': 1})])}, via BUILD.
        obj.op(b"}")
            .long_put(300)
            .str("_metadata")
            .long_get(0)
            .op(b")R")
            .mark();
        obj.str("")
            .op(b"}")
            .str("version")
            .int(1)
            .op(b"s")
            .op(b"u")
            .op(b"s")
            .op(b"b")
            .stop();

        let mut keys = P::default();
        keys.proto().op(b"]").put(0).mark();
        for k in ["k0", "k1", "k2", "k3"] {
            keys.str(k);
        }
        keys.op(b"e").stop();

        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let data = [
            storage_data(6, &f32s(&a)),
            storage_data(7, &f32s(&k1)),
            storage_data(1, &n.to_le_bytes()),
            storage_data(
                2,
                &d.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
            ),
        ]
        .concat();

        let mut proto = P::default();
        proto.proto().int(1001).stop();
        Parts {
            magic: magic_pickle(&MAGIC_LE),
            proto: proto.0,
            sys: sys.0,
            obj: obj.0,
            keys: keys.0,
            data,
        }
    }

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn err_of(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "broken.pth", bytes);
        let e = read_legacy_pth(&p).expect_err("reading should fail");
        let s = format!("{e:#}");
        assert!(
            s.contains("broken.pth"),
            "error does not name the file: {s}"
        );
        s
    }

    #[test]
    fn reads_handmade_legacy_file_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "small.pth", &legacy_parts().bytes());
        let t = read_legacy_pth(&p).unwrap();
        let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "n", "d"]);

        assert_eq!(t[0].1.dtype(), DType::F32);
        assert_eq!(
            t[0].1.to_vec2::<f32>().unwrap(),
            [[0.5, -1.0, 2.25], [3.0, 1e-3, -7.5]]
        );
        // b[i][j] = k1[1 + i + 3j]
        assert_eq!(
            t[1].1.to_vec2::<f32>().unwrap(),
            [[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]]
        );
        assert_eq!(
            t[2].1.to_vec1::<f32>().unwrap(),
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
        assert_eq!(t[3].1.dtype(), DType::I64);
        assert_eq!(t[3].1.dims(), &[] as &[usize]);
        assert_eq!(t[3].1.to_scalar::<i64>().unwrap(), 123_456_789_012);
        assert_eq!(t[4].1.dtype(), DType::F32);
        assert_eq!(t[4].1.to_vec1::<f32>().unwrap(), [0.1f64 as f32, -2.5]);
        assert!(
            t.iter()
                .all(|(_, x)| x.is_contiguous() && x.device().is_cpu())
        );
    }

    #[test]
    fn truncated_files_fail_clearly() {
        let full = legacy_parts().bytes();
        // Inside the last storage's data.
        let e = err_of(&full[..full.len() - 3]);
        assert!(e.contains("truncated") && e.contains("\"k3\""), "{e}");
        // Inside the state-dict pickle.
        let parts = legacy_parts();
        let cut = parts.magic.len() + parts.proto.len() + parts.sys.len() + parts.obj.len() / 2;
        let e = err_of(&full[..cut]);
        assert!(
            e.contains("truncated") && e.contains("state-dict pickle"),
            "{e}"
        );
        // Inside an element count.
        let cut = full.len() - parts.data.len() + 4;
        let e = err_of(&full[..cut]);
        assert!(
            e.contains("truncated") && e.contains("element count"),
            "{e}"
        );
    }

    #[test]
    fn wrong_containers_are_named() {
        let e = err_of(b"PK\x03\x04rest of a zip");
        assert!(
            e.contains("zip-format") && e.contains("read_pth_tensor_info"),
            "{e}"
        );

        let mut parts = legacy_parts();
        let mut wrong = MAGIC_LE;
        wrong[0] ^= 1;
        parts.magic = magic_pickle(&wrong);
        let e = err_of(&parts.bytes());
        assert!(
            e.contains("magic number") && e.contains("0x1950a86a20f9469cfc6c"),
            "{e}"
        );

        let e = err_of(b"hello, world");
        assert!(e.contains("not a legacy PyTorch file"), "{e}");

        // Drop "k3" from the key list (and its data): the tensor "d" has no storage.
        let mut parts = legacy_parts();
        let mut keys = P::default();
        keys.proto()
            .op(b"]")
            .mark()
            .str("k0")
            .str("k1")
            .str("k2")
            .op(b"e")
            .stop();
        parts.keys = keys.0;
        let k3 = 8 + 2 * 8;
        parts.data.truncate(parts.data.len() - k3);
        let e = err_of(&parts.bytes());
        assert!(e.contains("storage key \"k3\" is missing"), "{e}");

        // Extra bytes after the last storage mean we misread the layout.
        let mut parts = legacy_parts();
        parts.data.extend_from_slice(&[0; 5]);
        let e = err_of(&parts.bytes());
        assert!(e.contains("5 trailing bytes"), "{e}");
    }

    #[test]
    fn out_of_bounds_strides_are_refused() {
        let mut parts = legacy_parts();
        let mut obj = P::default();
        obj.proto()
            .global("collections", "OrderedDict")
            .put(0)
            .op(b")R")
            .mark();
        obj.str("w")
            .global("torch._utils", "_rebuild_tensor_v2")
            .mark();
        obj.mark()
            .str("storage")
            .global("torch", "FloatStorage")
            .str("k0")
            .str("cpu")
            .int(6);
        obj.op(b"N")
            .op(b"t")
            .op(b"Q")
            .int(1)
            .ints(&[2, 3])
            .ints(&[3, 1]);
        obj.op(&[0x89])
            .get(0)
            .op(b")R")
            .op(b"t")
            .op(b"R")
            .op(b"u")
            .stop();
        parts.obj = obj.0;
        let mut keys = P::default();
        keys.proto().op(b"]").mark().str("k0").op(b"e").stop();
        parts.keys = keys.0;
        parts.data.truncate(8 + 6 * 4);
        let e = err_of(&parts.bytes());
        assert!(
            e.contains("tensor \"w\"") && e.contains("outside its storage"),
            "{e}"
        );
    }

    fn b0(name: &str) -> Option<String> {
        efficientnet_pytorch_to_torchvision(
            name,
            &EFFICIENTNET_B0_REPEATS,
            &EFFICIENTNET_B0_EXPAND_RATIOS,
            true,
        )
    }
    fn lite0(name: &str) -> Option<String> {
        efficientnet_pytorch_to_torchvision(
            name,
            &EFFICIENTNET_B0_REPEATS,
            &EFFICIENTNET_B0_EXPAND_RATIOS,
            false,
        )
    }

    #[test]
    fn b0_names_match_torchvision() {
        let cases = [
            // Known torchvision efficientnet_b0 state-dict names.
            (
                "_blocks.0._depthwise_conv.weight",
                "features.1.0.block.0.0.weight",
            ),
            (
                "_blocks.0._se_reduce.weight",
                "features.1.0.block.1.fc1.weight",
            ),
            (
                "_blocks.0._project_conv.weight",
                "features.1.0.block.2.0.weight",
            ),
            (
                "_blocks.1._expand_conv.weight",
                "features.2.0.block.0.0.weight",
            ),
            (
                "_blocks.15._project_conv.weight",
                "features.7.0.block.3.0.weight",
            ),
            // Every rule.
            ("_conv_stem.weight", "features.0.0.weight"),
            ("_bn0.weight", "features.0.1.weight"),
            ("_bn0.bias", "features.0.1.bias"),
            ("_bn0.running_mean", "features.0.1.running_mean"),
            ("_bn0.running_var", "features.0.1.running_var"),
            (
                "_bn0.num_batches_tracked",
                "features.0.1.num_batches_tracked",
            ),
            ("_conv_head.weight", "features.8.0.weight"),
            ("_bn1.running_var", "features.8.1.running_var"),
            ("_fc.weight", "classifier.1.weight"),
            ("_fc.bias", "classifier.1.bias"),
            (
                "_blocks.0._bn1.running_mean",
                "features.1.0.block.0.1.running_mean",
            ),
            ("_blocks.0._se_reduce.bias", "features.1.0.block.1.fc1.bias"),
            (
                "_blocks.0._se_expand.weight",
                "features.1.0.block.1.fc2.weight",
            ),
            ("_blocks.0._se_expand.bias", "features.1.0.block.1.fc2.bias"),
            ("_blocks.0._bn2.weight", "features.1.0.block.2.1.weight"),
            ("_blocks.1._bn0.bias", "features.2.0.block.0.1.bias"),
            (
                "_blocks.2._depthwise_conv.weight",
                "features.2.1.block.1.0.weight",
            ),
            (
                "_blocks.2._bn1.num_batches_tracked",
                "features.2.1.block.1.1.num_batches_tracked",
            ),
            (
                "_blocks.4._se_reduce.weight",
                "features.3.1.block.2.fc1.weight",
            ),
            ("_blocks.7._se_expand.bias", "features.4.2.block.2.fc2.bias"),
            (
                "_blocks.10._project_conv.weight",
                "features.5.2.block.3.0.weight",
            ),
            (
                "_blocks.14._bn2.running_var",
                "features.6.3.block.3.1.running_var",
            ),
        ];
        for (from, to) in cases {
            assert_eq!(b0(from).as_deref(), Some(to), "{from}");
        }
    }

    #[test]
    fn lite0_names_skip_the_se_index() {
        let cases = [
            (
                "_blocks.0._depthwise_conv.weight",
                "features.1.0.block.0.0.weight",
            ),
            ("_blocks.0._bn1.bias", "features.1.0.block.0.1.bias"),
            (
                "_blocks.0._project_conv.weight",
                "features.1.0.block.1.0.weight",
            ),
            (
                "_blocks.0._bn2.running_mean",
                "features.1.0.block.1.1.running_mean",
            ),
            (
                "_blocks.1._expand_conv.weight",
                "features.2.0.block.0.0.weight",
            ),
            (
                "_blocks.1._bn0.num_batches_tracked",
                "features.2.0.block.0.1.num_batches_tracked",
            ),
            (
                "_blocks.1._depthwise_conv.weight",
                "features.2.0.block.1.0.weight",
            ),
            (
                "_blocks.1._bn1.running_var",
                "features.2.0.block.1.1.running_var",
            ),
            (
                "_blocks.1._project_conv.weight",
                "features.2.0.block.2.0.weight",
            ),
            ("_blocks.1._bn2.weight", "features.2.0.block.2.1.weight"),
            (
                "_blocks.15._project_conv.weight",
                "features.7.0.block.2.0.weight",
            ),
            ("_conv_stem.weight", "features.0.0.weight"),
            ("_conv_head.weight", "features.8.0.weight"),
            ("_fc.bias", "classifier.1.bias"),
        ];
        for (from, to) in cases {
            assert_eq!(lite0(from).as_deref(), Some(to), "{from}");
        }
    }

    #[test]
    fn unknown_names_do_not_map() {
        for n in [
            "_blocks.16._project_conv.weight", // past the last block
            "_blocks.0._expand_conv.weight",   // stage 1 does not expand
            "_blocks.0._bn0.weight",
            "_blocks.01._bn1.weight",
            "_blocks.+1._bn1.weight",
            "_blocks.1._bn1.momentum",
            "_conv_stem.bias",
            "_fc.running_mean",
            "_blocks",
            "fc.weight",
            "",
        ] {
            assert_eq!(b0(n), None, "{n}");
        }
        assert_eq!(lite0("_blocks.0._se_reduce.weight"), None);
        assert_eq!(
            efficientnet_pytorch_to_torchvision("_blocks.0._bn1.weight", &[1, 2], &[1], true),
            None
        );
    }

    /// All names efficientnet_pytorch gives B0 and Lite0 map, and to distinct names.
    #[test]
    fn whole_models_map_injectively() {
        for has_se in [true, false] {
            let mut names = vec![
                "_conv_stem.weight".to_owned(),
                "_conv_head.weight".into(),
                "_fc.weight".into(),
                "_fc.bias".into(),
            ];
            let bn = [
                "weight",
                "bias",
                "running_mean",
                "running_var",
                "num_batches_tracked",
            ];
            for m in ["_bn0", "_bn1"] {
                names.extend(bn.iter().map(|p| format!("{m}.{p}")));
            }
            let mut i = 0;
            for (s, &r) in EFFICIENTNET_B0_REPEATS.iter().enumerate() {
                for _ in 0..r {
                    let mut parts = vec![
                        "_depthwise_conv.weight".to_owned(),
                        "_project_conv.weight".into(),
                    ];
                    let mut bns = vec!["_bn1", "_bn2"];
                    if EFFICIENTNET_B0_EXPAND_RATIOS[s] != 1 {
                        parts.push("_expand_conv.weight".into());
                        bns.push("_bn0");
                    }
                    if has_se {
                        for m in ["_se_reduce", "_se_expand"] {
                            parts.push(format!("{m}.weight"));
                            parts.push(format!("{m}.bias"));
                        }
                    }
                    for b in bns {
                        parts.extend(bn.iter().map(|p| format!("{b}.{p}")));
                    }
                    names.extend(parts.iter().map(|p| format!("_blocks.{i}.{p}")));
                    i += 1;
                }
            }
            // B0 has 360 entries (torchvision's efficientnet_b0 state dict); Lite0 drops SE's 64.
            assert_eq!(names.len(), if has_se { 360 } else { 296 });
            let mapped: std::collections::HashSet<String> = names
                .iter()
                .map(|n| {
                    efficientnet_pytorch_to_torchvision(
                        n,
                        &EFFICIENTNET_B0_REPEATS,
                        &EFFICIENTNET_B0_EXPAND_RATIOS,
                        has_se,
                    )
                    .unwrap_or_else(|| panic!("{n} does not map"))
                })
                .collect();
            assert_eq!(mapped.len(), names.len());
        }
    }

    #[test]
    fn convert_writes_renamed_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let src = write(&dir, "small.pth", &legacy_parts().bytes());
        let dst = dir.path().join("out/small.safetensors");
        let report = convert(&src, &dst, |n| Some(format!("m.{n}"))).unwrap();
        assert_eq!(report.tensors, 5);
        assert_eq!(report.parameters, 6 + 6 + 7 + 1 + 2);
        assert_eq!(report.bytes, std::fs::metadata(&dst).unwrap().len());
        assert!(!dir.path().join("out/small.safetensors.tmp").exists());
        let back = candle_core::safetensors::load(&dst, &Device::Cpu).unwrap();
        assert_eq!(back.len(), 5);
        assert_eq!(
            back["m.b"].to_vec2::<f32>().unwrap(),
            [[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]]
        );
        assert_eq!(back["m.n"].to_scalar::<i64>().unwrap(), 123_456_789_012);

        let e = convert(&src, &dir.path().join("x.safetensors"), |n| {
            (n != "c").then(|| n.to_owned())
        })
        .expect_err("unmapped name");
        assert!(format!("{e:#}").contains("\"c\""), "{e:#}");
        let e = convert(&src, &dir.path().join("x.safetensors"), |_| {
            Some("same".into())
        })
        .expect_err("collision");
        assert!(format!("{e:#}").contains("both map to \"same\""), "{e:#}");
        assert!(!dir.path().join("x.safetensors").exists());
    }

    /// The real ImageNet EfficientNet-Lite0 file: `LITE0_PTH=/path/efficientnet-lite0-57934424.pth`
    /// (see scripts/fetch_lite0_weights.sh). Skipped when unset. Reference values come from a
    /// stdlib-only Python `pickle.Unpickler` reading the same file.
    #[test]
    fn real_lite0_file() {
        let Some(path) = std::env::var_os("LITE0_PTH") else {
            eprintln!("LITE0_PTH not set; skipping the real-file check");
            return;
        };
        let t = read_legacy_pth(Path::new(&path)).unwrap();
        assert_eq!(t.len(), 296);
        let by_name: HashMap<&str, &Tensor> = t.iter().map(|(n, x)| (n.as_str(), x)).collect();
        assert_eq!(by_name["_conv_stem.weight"].dims(), [32, 3, 3, 3]);
        assert_eq!(by_name["_fc.weight"].dims(), [1000, 1280]);
        assert_eq!(
            by_name["_blocks.3._depthwise_conv.weight"].dims(),
            [144, 1, 5, 5]
        );
        assert_eq!(
            by_name["_blocks.15._project_conv.weight"].dims(),
            [320, 1152, 1, 1]
        );
        let first = |n: &str| -> Vec<f64> {
            by_name[n].flatten_all().unwrap().to_vec1::<f32>().unwrap()[..4]
                .iter()
                .map(|&x| x as f64)
                .collect()
        };
        // Both are stored non-contiguous (strides [1,32,288,96] and [1,1000]).
        assert_eq!(
            first("_conv_stem.weight"),
            [
                -1.1103360652923584,
                -1.3087704181671143,
                -0.010156914591789246,
                0.9208119511604309
            ]
        );
        assert_eq!(
            first("_fc.weight"),
            [
                -0.04561043530702591,
                -0.09470871090888977,
                -0.05684146657586098,
                0.06823880970478058
            ]
        );
        assert_eq!(
            first("_blocks.3._depthwise_conv.weight"),
            [
                0.013516142964363098,
                0.34861379861831665,
                0.4067394733428955,
                0.10342703759670258
            ]
        );
        assert_eq!(
            by_name["_bn0.num_batches_tracked"]
                .to_scalar::<i64>()
                .unwrap(),
            0
        );
        let total: usize = t.iter().map(|(_, x)| x.elem_count()).sum();
        assert_eq!(total, 4_694_073);

        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("efficientnet_lite0.safetensors");
        let report = convert(Path::new(&path), &dst, lite0).unwrap();
        assert_eq!((report.tensors, report.parameters), (296, 4_694_073));
        let back = candle_core::safetensors::load(&dst, &Device::Cpu).unwrap();
        assert_eq!(back["features.0.0.weight"].dims(), [32, 3, 3, 3]);
        assert_eq!(back["classifier.1.weight"].dims(), [1000, 1280]);
        assert_eq!(
            back["features.7.0.block.2.0.weight"].dims(),
            [320, 1152, 1, 1]
        );
        eprintln!("real Lite0: {report:?}");
    }
}
