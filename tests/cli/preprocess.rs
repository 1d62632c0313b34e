//! Stage `preprocess` through the binary: pixels match an independent decode
//! and resize, the per-image cache decodes only what changed, and every kind
//! of bad image is handled under both policies.

use image::{Rgb, RgbImage};
use melanoflow::preprocess::shards::ShardReader;

use crate::fixture::*;

const HEADER: &str = "image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target";

fn pipeline(size: u32, extra: &str) -> String {
    format!(
        r#"
[stages.ingest]
kind = "ingest"
metadata = "src/train.csv"
images = "src/jpeg"

[stages.preprocess]
kind = "preprocess"
inputs = ["ingest"]
size = {size}
{extra}
"#
    )
}

fn picture(seed: u32, w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let v = (x * 7 + y * 13 + seed * 31) % 256;
        Rgb([v as u8, ((x * 255) / w) as u8, ((y * 255 + seed) / h) as u8])
    })
}

fn jpeg(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 92)
        .encode_image(img)
        .unwrap();
    out
}

/// A project with `n` JPEGs of 96x72 over n/2 patients.
fn project(n: usize, size: u32, extra: &str) -> Project {
    let p = Project::new(&pipeline(size, extra));
    let mut csv = format!("{HEADER}\n");
    for i in 0..n {
        let t = (i % 5 == 0) as u8;
        csv.push_str(&format!(
            "ISIC_{i:07},IP_{:03},male,50,torso,unknown,{},{t}\n",
            i / 2,
            if t == 1 { "malignant" } else { "benign" }
        ));
        p.write(
            &format!("data/src/jpeg/ISIC_{i:07}.jpg"),
            jpeg(&picture(i as u32, 96, 72)),
        );
    }
    p.write("data/src/train.csv", csv);
    p
}

/// The reference: the image crate's own decode, the centred square, and the
/// image crate's bicubic (Catmull-Rom) resize, the stage's default filter.
fn reference(bytes: &[u8], size: u32) -> RgbImage {
    let img = image::load_from_memory(bytes).unwrap().into_rgb8();
    let (w, h) = img.dimensions();
    let side = w.min(h);
    let square =
        image::imageops::crop_imm(&img, (w - side) / 2, (h - side) / 2, side, side).to_image();
    image::imageops::resize(&square, size, size, image::imageops::FilterType::CatmullRom)
}

/// (mean, max) absolute difference of two same-sized images.
fn diff(a: &[u8], b: &[u8]) -> (f64, u8) {
    assert_eq!(a.len(), b.len());
    let d: Vec<u8> = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).collect();
    (
        d.iter().map(|&v| v as f64).sum::<f64>() / d.len() as f64,
        *d.iter().max().unwrap(),
    )
}

/// Reads the index and returns, per image name, its pixels from the shards.
fn pixels(p: &Project, stage: &str, size: u32) -> Vec<(String, Vec<u8>)> {
    use polars::prelude::*;
    let dir = p.path(&format!("data/out/{stage}"));
    let df = ParquetReader::new(std::fs::File::open(dir.join("index.parquet")).unwrap())
        .finish()
        .unwrap();
    let names = df.column("image_name").unwrap().str().unwrap().clone();
    let shards = df.column("shard").unwrap().str().unwrap().clone();
    let offsets = df.column("offset").unwrap().i64().unwrap().clone();
    (0..df.height())
        .map(|i| {
            let r = ShardReader::open(&dir.join(shards.get(i).unwrap()), size).unwrap();
            (
                names.get(i).unwrap().to_string(),
                r.read(offsets.get(i).unwrap() as u64).unwrap(),
            )
        })
        .collect()
}

#[test]
fn shard_pixels_match_an_independent_decode_and_resize() {
    let p = project(6, 48, "");
    p.ok(&["run"]);
    for (name, px) in pixels(&p, "preprocess", 48) {
        let bytes = std::fs::read(p.path(&format!("data/src/jpeg/{name}.jpg"))).unwrap();
        let (mean, max) = diff(&px, reference(&bytes, 48).as_raw());
        assert!(mean < 0.5 && max < 16, "{name}: mean {mean:.2}, max {max}");
    }
}

#[test]
fn real_isic_jpegs_match_an_independent_decode_and_resize() {
    let Some(real) = realdata() else { return };
    let dir = real.join("isic_archive_uda1");
    let labels = std::fs::read_to_string(dir.join("labels.csv")).unwrap();
    // Ten real images (there is no patient id in this collection: one patient each).
    let p = Project::new(
        &pipeline(256, "dct_downscale = false")
            .replace("src/jpeg", &dir.join("images").display().to_string()),
    );
    let mut csv = format!("{HEADER}\n");
    for line in labels.lines().skip(1).step_by(10) {
        let f: Vec<&str> = line.split(',').collect();
        csv.push_str(&format!(
            "{},{},{},{},,{},{},{}\n",
            f[0], f[0], f[6], f[5], f[3], f[2], f[1]
        ));
    }
    p.write("data/src/train.csv", csv);
    let r = p.ok(&["run"]);
    assert!(
        r.line("preprocess")
            .contains("10 images in 1 shard(s) at 256 px: decoded 10, reused 0"),
        "{}",
        r.stdout
    );
    for (name, px) in pixels(&p, "preprocess", 256) {
        let bytes = std::fs::read(dir.join(format!("images/{name}.jpg"))).unwrap();
        let (mean, max) = diff(&px, reference(&bytes, 256).as_raw());
        // Two bicubic implementations (fixed-point SIMD vs float) on the
        // same square: measured mean 0.15, max 7 on these photographs.
        assert!(mean < 0.5 && max < 16, "{name}: mean {mean:.2}, max {max}");
    }
    // The default decodes the largest photographs at 1/4 or 1/8 DCT scale:
    // still close to the full decode.
    let r = p.ok(&["run", "--set", "preprocess.dct_downscale=true"]);
    assert!(r.line("preprocess").contains("decoded 10"), "{}", r.stdout);
    for (name, px) in pixels(&p, "preprocess", 256) {
        let bytes = std::fs::read(dir.join(format!("images/{name}.jpg"))).unwrap();
        let (mean, _) = diff(&px, reference(&bytes, 256).as_raw());
        assert!(mean < 2.0, "{name}: mean {mean:.2} with DCT downscaling");
    }
}

#[test]
fn changing_one_source_image_decodes_exactly_one() {
    let p = project(20, 32, "");
    let r = p.ok(&["run"]);
    assert!(
        r.line("preprocess")
            .contains("20 images in 1 shard(s) at 32 px: decoded 20, reused 0"),
        "{}",
        r.stdout
    );
    let before = pixels(&p, "preprocess", 32);
    p.write(
        "data/src/jpeg/ISIC_0000007.jpg",
        jpeg(&picture(999, 96, 72)),
    );
    let r = p.ok(&["run"]);
    assert!(
        r.line("preprocess").contains("decoded 1, reused 19"),
        "{}",
        r.stdout
    );
    let after = pixels(&p, "preprocess", 32);
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        assert_eq!(a == b, name != "ISIC_0000007", "{name}");
    }
    // A new size means new pixels for every image.
    let r = p.ok(&["run", "--set", "preprocess.size=24"]);
    assert!(
        r.line("preprocess").contains("decoded 20, reused 0"),
        "{}",
        r.stdout
    );
}

#[test]
fn many_shards_when_shards_are_small() {
    // 20 images of 300x300x3 = 270 KB: a 1 MiB shard holds 3.
    let p = Project::new(&pipeline(64, "shard_mb = 1"));
    let mut csv = format!("{HEADER}\n");
    for i in 0..20 {
        csv.push_str(&format!(
            "ISIC_{i:07},IP_{i:03},male,50,torso,unknown,benign,0\n"
        ));
        p.write(
            &format!("data/src/jpeg/ISIC_{i:07}.jpg"),
            jpeg(&picture(i, 600, 400)),
        );
    }
    p.write("data/src/train.csv", csv);
    let r = p.ok(&["run", "--set", "preprocess.size=300"]);
    assert!(
        r.line("preprocess")
            .contains("20 images in 7 shard(s) at 300 px"),
        "{}",
        r.stdout
    );
    assert_eq!(pixels(&p, "preprocess", 300).len(), 20);
}

/// Replaces image 3 of a 10-image project with `bytes` and runs under both policies.
fn bad_image(bytes: &[u8], reason: &str) {
    let p = project(10, 32, "");
    p.write("data/src/jpeg/ISIC_0000003.jpg", bytes);
    let r = p.fails(&["run"]);
    assert!(r.stderr.contains("1 bad image(s)"), "{}", r.stderr);
    assert!(
        r.stderr.contains("ISIC_0000003.jpg (ISIC_0000003)"),
        "names the file: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains(reason),
        "says why ({reason}): {}",
        r.stderr
    );
    assert!(!p.path("data/out/preprocess").exists(), "nothing committed");
    assert!(!p.lock().contains("[stages.preprocess]"));

    let r = p.ok(&["run", "--set", "preprocess.on_bad_image=\"skip\""]);
    assert!(
        r.line("preprocess")
            .contains("9 images in 1 shard(s) at 32 px"),
        "{}",
        r.stdout
    );
    assert!(
        r.line("preprocess")
            .contains("skipped 1 bad (ISIC_0000003)"),
        "{}",
        r.stdout
    );
    use polars::prelude::*;
    let df = ParquetReader::new(
        std::fs::File::open(p.path("data/out/preprocess/bad_images.parquet")).unwrap(),
    )
    .finish()
    .unwrap();
    assert_eq!(df.height(), 1);
    assert!(
        df.column("reason")
            .unwrap()
            .str()
            .unwrap()
            .get(0)
            .unwrap()
            .contains(reason)
    );
    assert!(
        pixels(&p, "preprocess", 32)
            .iter()
            .all(|(n, _)| n != "ISIC_0000003")
    );
}

#[test]
fn zero_byte_file() {
    bad_image(b"", "empty file");
}

#[test]
fn file_that_is_not_an_image() {
    bad_image(b"<html>Access denied</html>", "not a JPEG or PNG image");
}

#[test]
fn truncated_jpeg() {
    let full = jpeg(&picture(3, 96, 72));
    bad_image(&full[..full.len() * 2 / 3], "corrupt or truncated");
}

#[test]
fn corrupt_jpeg() {
    let mut b = jpeg(&picture(3, 96, 72));
    let n = b.len();
    for x in &mut b[n / 3..n / 3 + 200] {
        *x = 0xFF;
    }
    bad_image(&b, "corrupt or truncated");
}

#[test]
fn image_too_small_for_size() {
    bad_image(&jpeg(&picture(3, 40, 20)), "too small: 40x20");
}

#[test]
fn images_from_an_object_store_url() {
    // The same images behind a `file://` object-store URL: listed and fetched
    // through object_store, as an `s3://` prefix would be.
    let local = project(12, 32, "");
    local.ok(&["run"]);
    let url = format!("file://{}", local.path("data/src/jpeg").display());
    let p = Project::new(&pipeline(32, "").replace("\"src/jpeg\"", &format!("\"{url}\"")));
    p.write(
        "data/src/train.csv",
        std::fs::read(local.path("data/src/train.csv")).unwrap(),
    );
    let r = p.ok(&["run"]);
    assert!(
        r.line("preprocess")
            .contains("12 images in 1 shard(s) at 32 px: decoded 12"),
        "{}",
        r.stdout
    );
    assert_eq!(
        pixels(&p, "preprocess", 32),
        pixels(&local, "preprocess", 32),
        "same pixels as from the folder"
    );
    let source: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.path("data/out/ingest/source.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(source["images"], url.as_str());
    assert_eq!(
        p.ok(&["run"]).state("ingest"),
        "cached",
        "a no-op costs a listing"
    );
    std::thread::sleep(std::time::Duration::from_millis(10));
    local.write("data/src/jpeg/ISIC_0000004.jpg", jpeg(&picture(77, 96, 72)));
    let r = p.ok(&["run"]);
    assert!(
        r.line("ingest")
            .contains("input files changed `images/ISIC_0000004.jpg`"),
        "{}",
        r.stdout
    );
    assert!(
        r.line("preprocess").contains("decoded 1, reused 11"),
        "{}",
        r.stdout
    );
}

/// The worker protocol a cluster job array uses: the stage run as three
/// parts (`run-stage --parts 3 --part I`), then assembled (`--assemble 3`),
/// writes the same artifact as a whole local run.
#[test]
fn a_stage_run_in_parts_and_assembled_equals_the_whole_run() {
    // 72 px images at 64 px: 85 per 1 MiB shard, so 200 images make 3 chunks;
    // one bad image, skipped, lands in the middle part.
    let extra = "shard_mb = 1\non_bad_image = \"skip\"\n";
    let whole = project(200, 64, extra);
    whole.write("data/src/jpeg/ISIC_0000100.jpg", b"not a jpeg");
    whole.ok(&["run"]);

    let split = project(200, 64, extra);
    split.write("data/src/jpeg/ISIC_0000100.jpg", b"not a jpeg");
    let early = split.fails(&["run-stage", "preprocess", "--parts", "3", "--part", "0"]);
    assert!(
        early
            .stderr
            .contains("upstream `ingest` has no committed result"),
        "{}",
        early.stderr
    );
    split.ok(&["run", "ingest"]);
    let missing = split.fails(&["run-stage", "preprocess", "--assemble", "3"]);
    assert!(
        missing.stderr.contains("part 0 of 3 is not committed"),
        "{}",
        missing.stderr
    );
    for part in ["0", "1", "2"] {
        let r = split.ok(&["run-stage", "preprocess", "--parts", "3", "--part", part]);
        assert!(r.stdout.starts_with("committed preprocess"), "{}", r.stdout);
    }
    split.ok(&["run-stage", "preprocess", "--assemble", "3"]);
    let again = split.ok(&["run-stage", "preprocess"]);
    assert!(
        again.stdout.starts_with("already committed preprocess"),
        "{}",
        again.stdout
    );
    let r = split.ok(&["run"]);
    assert_eq!(r.state("preprocess"), "restored", "{}", r.stdout);
    assert_eq!(
        split.lock(),
        whole.lock(),
        "assembled parts must be the whole run's bytes"
    );
    let shards = files_under(&split.path("data/out/preprocess"))
        .iter()
        .filter(|f| f.to_string_lossy().contains("shard-"))
        .count();
    assert_eq!(shards, 3);
    // Part records are transient: gc drops them, and what the lock needs stays.
    let gc = split.ok(&["gc"]);
    assert!(
        gc.stdout.contains("(and 3 part records of split stages)"),
        "{}",
        gc.stdout
    );
    assert!(
        !split.path("data/store/parts").exists()
            || files_under(&split.path("data/store/parts")).is_empty()
    );
    assert!(split.ok(&["run"]).stdout.contains("2 cached"));
}

/// A cluster worker reuses per-image results like a local run: after one
/// source image changes, the job-array part holding it decodes that image
/// alone, the other parts decode nothing, and the assembled artifact is the
/// one a local run writes.
#[test]
fn a_worker_part_decodes_only_the_changed_image() {
    // 200 images at 64 px, 85 per 1 MiB shard: chunks of 85, 85 and 30, one per part.
    let extra = "shard_mb = 1\n";
    let changed = jpeg(&picture(999, 96, 72));
    let local = project(200, 64, extra);
    local.ok(&["run"]);
    local.write("data/src/jpeg/ISIC_0000010.jpg", &changed);
    let r = local.ok(&["run"]);
    assert!(
        r.line("preprocess").contains("decoded 1, reused 199"),
        "{}",
        r.stdout
    );

    let p = project(200, 64, extra);
    p.ok(&["run"]);
    p.write("data/src/jpeg/ISIC_0000010.jpg", &changed);
    p.ok(&["run", "ingest"]);
    let expected = [
        "85 images: decoded 1, reused 84",
        "85 images: decoded 0, reused 85",
        "30 images: decoded 0, reused 30",
    ];
    for (part, counts) in expected.iter().enumerate() {
        let r = p.ok(&[
            "run-stage",
            "preprocess",
            "--parts",
            "3",
            "--part",
            &part.to_string(),
        ]);
        assert!(
            r.stdout.starts_with("committed preprocess") && r.stdout.contains(counts),
            "part {part}: {}",
            r.stdout
        );
    }
    let assembled = p.ok(&["run-stage", "preprocess", "--assemble", "3"]);
    assert!(
        assembled
            .stdout
            .contains("200 images in 3 shard(s) at 64 px: decoded 1, reused 199"),
        "{}",
        assembled.stdout
    );
    let r = p.ok(&["run"]);
    assert_eq!(r.state("preprocess"), "restored", "{}", r.stdout);
    assert_eq!(p.lock(), local.lock());
}
