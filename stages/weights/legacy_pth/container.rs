//! The legacy container: magic number, protocol, sys info, the pickled state dict, then
//! the storages' raw bytes; tensors cut out of them with offset, size and stride.

use anyhow::{Context, Result, anyhow, bail, ensure};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

use super::pickle::*;

/// `0x1950a86a20f9469cfc6c`, as the little-endian two's-complement bytes `LONG1` carries.
pub(super) const MAGIC_LE: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// The only legacy protocol version torch ever wrote.
pub(super) const PROTOCOL_VERSION: i64 = 1001;

pub(super) fn parse_legacy(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
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
pub(super) enum StorageKind {
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
    pub(super) fn from_class(name: &str) -> Option<Self> {
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
    pub(super) fn elem_size(self) -> usize {
        match self {
            Self::Double | Self::Long => 8,
            Self::Float | Self::Int => 4,
            Self::Half | Self::BFloat16 | Self::Short => 2,
            Self::Char | Self::Byte | Self::Bool => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct StorageRef {
    pub(super) kind: StorageKind,
    pub(super) key: String,
    /// Elements in the whole (root) storage.
    pub(super) numel: usize,
    /// Old torch could pickle a *view* of a storage: `(view_key, offset, size)` in elements.
    pub(super) view: Option<(usize, usize)>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct TensorRef {
    pub(super) storage: StorageRef,
    pub(super) offset: usize,
    pub(super) size: Vec<usize>,
    pub(super) stride: Vec<usize>,
}

/// Gathers a tensor's elements from its storage in row-major order and builds the tensor.
pub(super) fn materialize(t: &TensorRef, raw: &[u8]) -> Result<Tensor> {
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
