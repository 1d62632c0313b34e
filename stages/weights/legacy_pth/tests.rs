use super::container::*;
use super::*;
use candle_core::{DType, Device};

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
/// (scripts/fetch_lite0_weights.sh prints the path; `make test` fetches it, sets the variable
/// and `MELANOFLOW_REQUIRE_LITE0=1`, so there this cannot skip). Skipped with a message when
/// unset elsewhere. Reference values come from a stdlib-only Python `pickle.Unpickler`
/// reading the same file.
#[test]
fn real_lite0_file() {
    let Some(path) = std::env::var_os("LITE0_PTH").filter(|p| !p.is_empty()) else {
        assert!(
            std::env::var("MELANOFLOW_REQUIRE_LITE0").as_deref() != Ok("1"),
            "LITE0_PTH is not set: `make test` sets it from scripts/fetch_lite0_weights.sh"
        );
        eprintln!("SKIPPED: LITE0_PTH not set (scripts/fetch_lite0_weights.sh prints the path)");
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
