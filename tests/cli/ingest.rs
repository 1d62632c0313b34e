//! Stage `ingest` on external files: bad inputs are refused with file, line,
//! column and value, and nothing is committed; touching inputs re-runs
//! nothing; changing one names the file.

use crate::fixture::*;

const EXTERNAL: &str = r#"
[stages.ingest]
kind = "ingest"
metadata = "src/train.csv"
images = "src/jpeg"
duplicates = "src/dups.csv"
val_fraction = 0.2
test_fraction = 0.2
"#;

const HEADER: &str = "image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target";

/// 40 rows over 10 patients, 4 malignant; every image present.
fn good_rows() -> Vec<String> {
    (0..40)
        .map(|i| {
            let t = (i % 10 == 3) as u8;
            let bm = if t == 1 { "malignant" } else { "benign" };
            let age = if i == 5 {
                String::new()
            } else {
                format!("{}.0", 30 + (i % 8) * 5)
            };
            format!(
                "ISIC_{i:07},IP_{:07},female,{age},torso,unknown,{bm},{t}",
                i % 10
            )
        })
        .collect()
}

fn project_with(rows: &[String]) -> Project {
    let p = Project::new(EXTERNAL);
    write_inputs(&p, rows);
    p
}

fn write_inputs(p: &Project, rows: &[String]) {
    p.write(
        "data/src/train.csv",
        format!("{HEADER}\n{}\n", rows.join("\n")),
    );
    for i in 0..40 {
        p.write(
            &format!("data/src/jpeg/ISIC_{i:07}.jpg"),
            format!("jpeg bytes {i}"),
        );
    }
    p.write(
        "data/src/dups.csv",
        "image_name_1,image_name_2\nISIC_0000010,ISIC_0000020\nISIC_0000001,ISIC_9999999\n",
    );
}

#[test]
fn ingests_external_files_and_drops_duplicates() {
    let p = project_with(&good_rows());
    let r = p.ok(&["run"]);
    assert!(
        r.line("ingest")
            .contains("40 rows, 1 duplicates dropped, 39 images of 10 patients"),
        "{}",
        r.stdout
    );
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.path("data/out/ingest/ingest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["duplicates_dropped"], 1);
    assert_eq!(summary["duplicate_pairs_not_in_metadata"], 1);
    assert_eq!(summary["malignant"], 4);
    let total: u64 = ["train", "val", "test"]
        .iter()
        .map(|s| summary["splits"][s]["images"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 39);
}

#[test]
fn touching_inputs_reruns_nothing_and_changing_one_names_it() {
    let p = project_with(&good_rows());
    p.ok(&["run"]);
    for f in files_under(&p.path("data/src")) {
        touch(&f);
    }
    let r = p.ok(&["run"]);
    assert_eq!(r.state("ingest"), "cached", "{}", r.stdout);
    p.write("data/src/jpeg/ISIC_0000007.jpg", "new bytes");
    let r = p.ok(&["run"]);
    assert_eq!(r.state("ingest"), "ran");
    assert!(
        r.line("ingest")
            .contains("input files changed `images/ISIC_0000007.jpg`"),
        "{}",
        r.stdout
    );
    let r = p.ok(&["status"]);
    assert_eq!(r.state("ingest"), "cached");
}

/// Runs ingest on bad rows after a good run: the error must contain every
/// `needle`, and the earlier output and lock file must be untouched.
fn refused(rows: Vec<String>, needles: &[&str]) {
    let p = project_with(&good_rows());
    p.ok(&["run"]);
    let lock = p.lock();
    let before = std::fs::read(p.path("data/out/ingest/metadata.parquet")).unwrap();
    write_inputs(&p, &rows);
    let r = p.fails(&["run"]);
    assert_eq!(r.status.code(), Some(1));
    for n in needles {
        assert!(r.stderr.contains(n), "missing `{n}` in:\n{}", r.stderr);
    }
    assert!(
        r.stderr.contains("train.csv"),
        "names the file: {}",
        r.stderr
    );
    assert_eq!(p.lock(), lock, "lock file untouched");
    assert_eq!(
        std::fs::read(p.path("data/out/ingest/metadata.parquet")).unwrap(),
        before,
        "earlier artifact intact"
    );
    assert!(
        !p.path("data/out/.staging/ingest").exists(),
        "nothing half-written left behind"
    );
}

#[test]
fn missing_column_is_refused() {
    let rows: Vec<String> = good_rows();
    let p = Project::new(EXTERNAL);
    write_inputs(&p, &rows);
    let text = std::fs::read_to_string(p.path("data/src/train.csv"))
        .unwrap()
        .replace(",target\n", ",label\n");
    p.write("data/src/train.csv", text);
    let r = p.fails(&["run"]);
    assert!(
        r.stderr.contains("missing column(s) `target`"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("found `image_name`"), "{}", r.stderr);
}

#[test]
fn non_integer_age_is_refused() {
    let mut rows = good_rows();
    rows[2] = rows[2].replace(",40.0,", ",4x5,");
    refused(
        rows,
        &["line 4, column `age_approx`: `4x5` is not a whole number of years"],
    );
}

#[test]
fn target_not_binary_is_refused() {
    let mut rows = good_rows();
    rows[0] = rows[0].replace(",benign,0", ",benign,2");
    refused(rows, &["line 2, column `target`: `2` is not 0 or 1"]);
}

#[test]
fn target_contradicting_benign_malignant_is_refused() {
    let mut rows = good_rows();
    rows[1] = rows[1].replace(",benign,0", ",benign,1");
    refused(
        rows,
        &["line 3, column `target`: 1 contradicts benign_malignant `benign`"],
    );
}

#[test]
fn repeated_image_name_is_refused() {
    let mut rows = good_rows();
    rows[9] = rows[9].replace("ISIC_0000009", "ISIC_0000004");
    refused(
        rows,
        &["line 11, column `image_name`: `ISIC_0000004` repeats line 6"],
    );
}

#[test]
fn path_like_image_name_is_refused() {
    let mut rows = good_rows();
    rows[3] = rows[3].replace("ISIC_0000003", "../../etc/passwd");
    refused(
        rows,
        &["line 5, column `image_name`: `../../etc/passwd` is not a plain file name"],
    );
}

#[test]
fn missing_images_are_counted_and_listed() {
    let mut rows = good_rows();
    for i in 0..7 {
        rows.push(format!(
            "ISIC_9{i:06},IP_0000001,male,50,torso,unknown,benign,0"
        ));
    }
    refused(
        rows,
        &[
            "7 of 47 images listed in",
            "are missing from",
            "ISIC_9000000 (line 42)",
            ", ...",
        ],
    );
}

#[test]
fn several_problems_are_reported_together() {
    let mut rows = good_rows();
    rows[0] = rows[0].replace(",benign,0", ",benign,x");
    rows[1] = rows[1].replace(",35.0,", ",old,");
    refused(
        rows,
        &[
            "2 problem(s):",
            "line 2, column `target`",
            "line 3, column `age_approx`: `old`",
        ],
    );
}
