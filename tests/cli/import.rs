//! Stage kind `import`: a folder or file of existing data taken in as a stage
//! output, re-run only when its bytes change.

use crate::fixture::{Project, files_under, touch};

const PIPELINE: &str = r#"
[store]
url = "store"

[stages.raw]
kind = "import"
path = "raw"

[stages.weights]
kind = "import"
path = "weights.bin"
"#;

/// 1 MiB of seeded bytes that do not compress.
fn noise(seed: u8) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed as u64;
    (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn project() -> Project {
    let p = Project::new(PIPELINE);
    p.write("data/raw/a.txt", "first file\n");
    p.write("data/raw/sub/b.bin", noise(1));
    p.write("data/raw/sub/deeper/c.bin", noise(2));
    p.write("data/weights.bin", noise(3));
    p
}

fn read(p: &Project, rel: &str) -> Vec<u8> {
    std::fs::read(p.path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn a_folder_and_a_file_are_taken_in_and_rerun_only_when_their_bytes_change() {
    let p = project();
    let first = p.ok(&["run"]);
    assert!(
        first.line("raw").contains("3 file(s), 2.0 MiB"),
        "{}",
        first.stdout
    );
    assert!(
        first.line("weights").contains("1 file(s), 1.0 MiB"),
        "{}",
        first.stdout
    );
    for (src, out) in [
        ("data/raw/a.txt", "data/out/raw/a.txt"),
        ("data/raw/sub/b.bin", "data/out/raw/sub/b.bin"),
        ("data/raw/sub/deeper/c.bin", "data/out/raw/sub/deeper/c.bin"),
        ("data/weights.bin", "data/out/weights/weights.bin"),
    ] {
        assert_eq!(read(&p, src), read(&p, out), "{out}");
    }
    // The output is the data and nothing else.
    assert_eq!(files_under(&p.path("data/out/raw")).len(), 3);
    assert_eq!(files_under(&p.path("data/out/weights")).len(), 1);

    // A new modification time alone changes nothing.
    touch(&p.path("data/raw/sub/b.bin"));
    let again = p.ok(&["run"]);
    assert_eq!(
        (again.state("raw"), again.state("weights")),
        ("cached".into(), "cached".into())
    );

    // New bytes in one file re-run that import only, with the new bytes.
    p.write("data/raw/sub/b.bin", noise(4));
    let changed = p.ok(&["run"]);
    assert_eq!(changed.state("raw"), "ran", "{}", changed.stdout);
    assert_eq!(changed.state("weights"), "cached", "{}", changed.stdout);
    assert_eq!(read(&p, "data/out/raw/sub/b.bin"), noise(4));

    // A removed file leaves the output too.
    std::fs::remove_file(p.path("data/raw/a.txt")).unwrap();
    p.ok(&["run"]);
    assert!(!p.path("data/out/raw/a.txt").exists());
    assert_eq!(files_under(&p.path("data/out/raw")).len(), 2);
}

#[test]
fn a_missing_source_is_an_error_naming_the_stage_and_the_path() {
    let p = Project::new(PIPELINE);
    p.write("data/raw/a.txt", "x");
    let failed = p.fails(&["run"]);
    assert!(
        failed.stderr.contains("weights") && failed.stderr.contains("weights.bin"),
        "{}",
        failed.stderr
    );
    let bad = Project::new("[stages.raw]\nkind = \"import\"\npth = \"raw\"\n");
    let failed = bad.fails(&["run"]);
    assert!(failed.stderr.contains("pth"), "{}", failed.stderr);
}
