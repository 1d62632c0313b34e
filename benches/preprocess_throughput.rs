//! Throughput of `preprocess`'s pixel work (decode + bicubic resize + centre
//! crop to `size`; also with Lanczos3) on a folder of JPEGs, using every core (rayon), next to the
//! decode-only ceiling. `benches/preprocess.sh` runs it beside Pillow.
//!
//!   preprocess_throughput DIR [SIZE=256] [REPEATS=3]
//!   preprocess_throughput --generate DIR COUNT WIDTH HEIGHT
//!
//! Prints one JSON line per measurement: {"work": ..., "images": n, "seconds": s, "images_per_s": r}.
//! Files are read inside the timed loop (from the page cache after a warm-up
//! pass), as the stage reads them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use fast_image_resize::Resizer;
use melanoflow::preprocess::image_ops::{
    ResizeFilter, decode_rgb8, decode_rgb8_at_least, resize_center_crop,
};
use rand::SeedableRng;
use rayon::prelude::*;

fn jpegs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("readable folder")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg"))
        })
        .collect();
    v.sort();
    v
}

fn measure(
    work: &str,
    files: &[PathBuf],
    repeats: usize,
    f: &(dyn Fn(&Path, &mut Resizer) + Sync),
) {
    // Warm-up: page cache and allocator.
    files.par_iter().for_each_init(Resizer::new, |r, p| f(p, r));
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let t = Instant::now();
        files.par_iter().for_each_init(Resizer::new, |r, p| f(p, r));
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{{\"work\":\"{work}\",\"images\":{},\"threads\":{},\"seconds\":{best:.4},\"images_per_s\":{:.1}}}",
        files.len(),
        rayon::current_num_threads(),
        files.len() as f64 / best
    );
}

fn generate(dir: &Path, count: usize, width: u32, height: u32) {
    std::fs::create_dir_all(dir).unwrap();
    (0..count).into_par_iter().for_each(|i| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        rng.set_stream(i as u64);
        let patient = melanoflow::synth::render::Patient::random(&mut rng);
        let square = melanoflow::synth::render::render_lesion(
            &patient,
            melanoflow::synth::render::severity_mean(
                i % 10 == 0,
                melanoflow::synth::render::DEFAULT_SEVERITY_SHIFT,
            ),
            width.max(height),
            &mut rng,
        );
        let img =
            image::imageops::crop_imm(&square, 0, (width.max(height) - height) / 2, width, height)
                .to_image();
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
            .encode_image(&img)
            .unwrap();
        std::fs::write(dir.join(format!("SYN_{i:07}.jpg")), bytes).unwrap();
    });
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--generate") {
        let n = |i: usize| args[i].parse::<u32>().expect("a number");
        generate(Path::new(&args[1]), n(2) as usize, n(3), n(4));
        return;
    }
    let dir = PathBuf::from(
        args.first()
            .expect("usage: preprocess_throughput DIR [SIZE] [REPEATS]"),
    );
    let size: u32 = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(256);
    let repeats: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(3);
    let files = jpegs(&dir);
    measure("decode_only", &files, repeats, &|p, _| {
        let bytes = std::fs::read(p).unwrap();
        std::hint::black_box(decode_rgb8(&bytes).unwrap());
    });
    // The ceiling of the stage's own path: the same reduced (DCT-scaled)
    // decode it uses, without the resize.
    measure("dct_scaled_decode_only", &files, repeats, &|p, _| {
        let bytes = std::fs::read(p).unwrap();
        std::hint::black_box(decode_rgb8_at_least(&bytes, size).unwrap());
    });
    measure("dct_scaled_resize_crop", &files, repeats, &|p, r| {
        let bytes = std::fs::read(p).unwrap();
        let (img, _) = decode_rgb8_at_least(&bytes, size).unwrap();
        std::hint::black_box(resize_center_crop(&img, size, ResizeFilter::Bicubic, r).unwrap());
    });
    for (name, filter) in [
        ("decode_resize_crop", ResizeFilter::Bicubic),
        ("decode_resize_crop_lanczos3", ResizeFilter::Lanczos3),
    ] {
        measure(name, &files, repeats, &|p, r| {
            let bytes = std::fs::read(p).unwrap();
            let img = decode_rgb8(&bytes).unwrap();
            std::hint::black_box(resize_center_crop(&img, size, filter, r).unwrap());
        });
    }
}
