//! Stage fingerprints: the one hash that decides whether a stage runs.
//!
//! fingerprint = BLAKE3 over, in this order, each part length-prefixed:
//!   1. the domain tag `melanoflow/fingerprint` and [`CACHE_VERSION`],
//!   2. the stage kind, its code identity (`Stage::CODE`: a digest of the
//!      sources and locked crate versions that compute its bytes, derived at
//!      build time) and its explicit override (`Stage::VERSION`, normally 0),
//!   3. the canonical JSON of its parameters (every key, defaults filled in,
//!      keys sorted, no whitespace),
//!   4. for each upstream input in declared order: its stage name and the
//!      digest of its output manifest,
//!   5. the digest of the manifest of its external input files (or nothing).
//!
//! The stage's own name is deliberately absent: two stages of one kind with
//! the same inputs and parameters share a result.
//!
//! If you change what goes into a fingerprint, or how any part is encoded
//! (including the manifest text format), bump `CACHE_VERSION`.

use crate::digest::{Digest, DigestBuilder};

/// Version of the fingerprint rule and store layout; see the module docs.
/// 2: code identities joined the fingerprint.
pub const CACHE_VERSION: u32 = 2;

pub struct FingerprintInputs<'a> {
    pub kind: &'a str,
    pub code: &'a str,
    pub code_version: u32,
    pub params: &'a serde_json::Value,
    pub upstream: &'a [(String, Digest)],
    pub external: Option<Digest>,
}

pub fn fingerprint(i: &FingerprintInputs) -> Digest {
    let mut b = DigestBuilder::new("melanoflow/fingerprint");
    b.part(&CACHE_VERSION.to_le_bytes());
    b.str(i.kind)
        .str(i.code)
        .part(&i.code_version.to_le_bytes());
    b.str(&canonical_json(i.params));
    b.part(&(i.upstream.len() as u64).to_le_bytes());
    for (name, digest) in i.upstream {
        b.str(name).part(&digest.0);
    }
    match i.external {
        Some(d) => b.part(b"external").part(&d.0),
        None => b.part(b"no-external"),
    };
    b.finish()
}

/// JSON with object keys sorted at every level and no whitespace, so equal
/// values always give equal text whatever order the keys were written in.
pub fn canonical_json(v: &serde_json::Value) -> String {
    fn write(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).expect("string"));
                    out.push(':');
                    write(&map[*k], out);
                }
                out.push('}');
            }
            serde_json::Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

/// The keys whose values differ between two parameter sets, with both values,
/// as `key (old -> new)` strings, sorted by key.
pub fn changed_params(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let old_map = old.as_object().unwrap_or(&empty);
    let new_map = new.as_object().unwrap_or(&empty);
    let mut keys: Vec<&String> = old_map.keys().chain(new_map.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => "unset".to_string(),
        Some(v) => canonical_json(v),
    };
    keys.into_iter()
        .filter(|k| {
            let (a, b) = (old_map.get(*k), new_map.get(*k));
            let null = serde_json::Value::Null;
            a.unwrap_or(&null) != b.unwrap_or(&null)
        })
        .map(|k| {
            format!(
                "`{k}` ({} -> {})",
                show(old_map.get(k)),
                show(new_map.get(k))
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> (serde_json::Value, Vec<(String, Digest)>, Option<Digest>) {
        (
            json!({"seed": 42, "fractions": {"val": 0.15, "test": 0.15}, "name": "x"}),
            vec![("synth".to_string(), Digest::of_bytes(b"synth output"))],
            Some(Digest::of_bytes(b"external manifest")),
        )
    }

    const CODE: &str = "5b1f0c3e";

    fn fp(
        kind: &str,
        version: u32,
        p: &serde_json::Value,
        up: &[(String, Digest)],
        ext: Option<Digest>,
    ) -> Digest {
        fp_with_code(kind, CODE, version, p, up, ext)
    }

    fn fp_with_code(
        kind: &str,
        code: &str,
        version: u32,
        p: &serde_json::Value,
        up: &[(String, Digest)],
        ext: Option<Digest>,
    ) -> Digest {
        fingerprint(&FingerprintInputs {
            kind,
            code,
            code_version: version,
            params: p,
            upstream: up,
            external: ext,
        })
    }

    #[test]
    fn pinned_digest() {
        // Pinned on purpose: if this changes, every user's cache is invalidated.
        // Bump CACHE_VERSION and update the pin together.
        let (p, up, ext) = base();
        assert_eq!(
            fp("ingest", 1, &p, &up, ext).to_hex(),
            "3b39ce752816e392fb24635ec697f08724b88b8560bd33a5e8197236192f6345"
        );
    }

    #[test]
    fn key_order_does_not_matter() {
        let (_, up, ext) = base();
        let a: serde_json::Value =
            serde_json::from_str(r#"{"seed":42,"fractions":{"val":0.15,"test":0.15},"name":"x"}"#)
                .unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"name":"x","fractions":{"test":0.15,"val":0.15},"seed":42}"#)
                .unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(fp("ingest", 1, &a, &up, ext), fp("ingest", 1, &b, &up, ext));
    }

    #[test]
    fn differs_when_kind_changes() {
        let (p, up, ext) = base();
        assert_ne!(fp("ingest", 1, &p, &up, ext), fp("synth", 1, &p, &up, ext));
    }

    #[test]
    fn differs_when_code_identity_changes() {
        let (p, up, ext) = base();
        assert_ne!(
            fp("ingest", 1, &p, &up, ext),
            fp_with_code("ingest", "5b1f0c3f", 1, &p, &up, ext)
        );
    }

    #[test]
    fn differs_when_code_version_changes() {
        let (p, up, ext) = base();
        assert_ne!(fp("ingest", 1, &p, &up, ext), fp("ingest", 2, &p, &up, ext));
    }

    #[test]
    fn differs_when_a_parameter_changes() {
        let (p, up, ext) = base();
        let mut q = p.clone();
        q["fractions"]["val"] = json!(0.2);
        assert_ne!(fp("ingest", 1, &p, &up, ext), fp("ingest", 1, &q, &up, ext));
        let mut r = p.clone();
        r["seed"] = json!("42");
        assert_ne!(
            fp("ingest", 1, &p, &up, ext),
            fp("ingest", 1, &r, &up, ext),
            "type is part of the value"
        );
    }

    #[test]
    fn differs_when_an_upstream_output_changes() {
        let (p, up, ext) = base();
        let other = vec![("synth".to_string(), Digest::of_bytes(b"other output"))];
        assert_ne!(
            fp("ingest", 1, &p, &up, ext),
            fp("ingest", 1, &p, &other, ext)
        );
        let renamed = vec![("source".to_string(), up[0].1)];
        assert_ne!(
            fp("ingest", 1, &p, &up, ext),
            fp("ingest", 1, &p, &renamed, ext)
        );
    }

    #[test]
    fn differs_when_external_inputs_change() {
        let (p, up, ext) = base();
        assert_ne!(
            fp("ingest", 1, &p, &up, ext),
            fp("ingest", 1, &p, &up, Some(Digest::of_bytes(b"x")))
        );
        assert_ne!(
            fp("ingest", 1, &p, &up, ext),
            fp("ingest", 1, &p, &up, None)
        );
    }

    #[test]
    fn changed_params_names_keys_and_values() {
        let old = json!({"seed": 42, "a": 1, "gone": true});
        let new = json!({"seed": 7, "a": 1, "new": "x"});
        assert_eq!(
            changed_params(&old, &new),
            vec![
                "`gone` (true -> unset)",
                "`new` (unset -> \"x\")",
                "`seed` (42 -> 7)"
            ]
        );
    }
}
