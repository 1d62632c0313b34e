//! Ingest of the real ISIC 2020 training metadata (33,126 rows) with its
//! duplicates list. The JPEGs are not in the workplace, so the test writes one
//! small stand-in file per row (the stage checks existence and hashes bytes;
//! it never decodes them). Skips with a message when the folder is absent.

use std::collections::HashMap;

use crate::fixture::*;

fn ingest_real(csv: &str) -> Option<(Project, serde_json::Value)> {
    let real = realdata()?;
    let p = Project::new(&format!(
        r#"
[stages.ingest]
kind = "ingest"
metadata = "{csv}"
images = "images"
duplicates = "{dups}"
"#,
        csv = real.join("isic2020").join(csv).display(),
        dups = real
            .join("isic2020/ISIC_2020_Training_Duplicates.csv")
            .display(),
    ));
    let text = std::fs::read_to_string(real.join("isic2020").join(csv)).unwrap();
    std::fs::create_dir_all(p.path("data/images")).unwrap();
    for line in text.lines().skip(1) {
        let name = line.split(',').next().unwrap();
        std::fs::write(p.path(&format!("data/images/{name}.jpg")), name).unwrap();
    }
    let r = p.ok(&["run"]);
    assert_eq!(r.state("ingest"), "ran");
    let summary = serde_json::from_str(
        &std::fs::read_to_string(p.path("data/out/ingest/ingest.json")).unwrap(),
    )
    .unwrap();
    Some((p, summary))
}

#[test]
fn real_isic2020_metadata_counts_and_patient_split() {
    let Some((p, s)) = ingest_real("ISIC_2020_Training_GroundTruth.csv") else {
        return;
    };
    assert_eq!(s["rows_read"], 33126);
    let dropped = s["duplicates_dropped"].as_u64().unwrap();
    assert_eq!(dropped, 425, "every one of the 425 pairs drops one image");
    assert_eq!(s["duplicate_pairs_not_in_metadata"], 0);
    assert_eq!(s["images"].as_u64().unwrap(), 33126 - dropped);
    assert_eq!(s["patients"], 2056);
    let malignant = s["malignant"].as_u64().unwrap();
    assert!((575..=584).contains(&malignant), "{malignant}");
    let overall = s["malignant_rate"].as_f64().unwrap();
    for split in ["train", "val", "test"] {
        let rate = s["splits"][split]["malignant_rate"].as_f64().unwrap();
        assert!(
            (rate - overall).abs() <= 0.01,
            "{split}: {rate} vs {overall}"
        );
    }
    let images: u64 = ["train", "val", "test"]
        .iter()
        .map(|k| s["splits"][k]["images"].as_u64().unwrap())
        .sum();
    assert_eq!(images, 33126 - dropped);
    let patients: u64 = ["train", "val", "test"]
        .iter()
        .map(|k| s["splits"][k]["patients"].as_u64().unwrap())
        .sum();
    assert_eq!(patients, 2056, "no patient is in two splits");

    // Read the Parquet itself (as a user would with polars) and check the same.
    use polars::prelude::*;
    let df = ParquetReader::new(
        std::fs::File::open(p.path("data/out/ingest/metadata.parquet")).unwrap(),
    )
    .finish()
    .unwrap();
    assert_eq!(df.height() as u64, 33126 - dropped);
    let pid = df.column("patient_id").unwrap().str().unwrap();
    let split = df.column("split").unwrap().str().unwrap();
    let mut of_patient: HashMap<&str, &str> = HashMap::new();
    for (p, s) in pid.no_null_iter().zip(split.no_null_iter()) {
        assert_eq!(
            *of_patient.entry(p).or_insert(s),
            s,
            "patient {p} in two splits"
        );
    }
    melanoflow_schemas::check_parquet(
        &p.path("data/out/ingest/metadata.parquet"),
        &melanoflow_schemas::METADATA,
    )
    .unwrap();
    let blank_ages = df.column("age_approx").unwrap().null_count();
    assert!(
        blank_ages > 0 && blank_ages <= 68,
        "blank ages stay null: {blank_ages}"
    );
}

#[test]
fn real_isic2020_v2_with_lesion_id() {
    let Some((p, s)) = ingest_real("ISIC_2020_Training_GroundTruth_v2.csv") else {
        return;
    };
    assert_eq!(s["rows_read"], 33126);
    use polars::prelude::*;
    let df = ParquetReader::new(
        std::fs::File::open(p.path("data/out/ingest/metadata.parquet")).unwrap(),
    )
    .finish()
    .unwrap();
    assert_eq!(
        df.column("lesion_id").unwrap().null_count(),
        0,
        "v2 lesion ids are kept"
    );
}
