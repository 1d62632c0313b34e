//! The schemas themselves, one constant per artifact.

use arrow_schema::{DataType, Field};

use crate::ArtifactSchema;

/// `ingest/metadata.parquet`: one row per kept image, with its split.
pub const METADATA: ArtifactSchema = ArtifactSchema {
    name: "metadata",
    version: 1,
    fields: || {
        vec![
            Field::new("image_name", DataType::Utf8, false),
            Field::new("patient_id", DataType::Utf8, false),
            Field::new("lesion_id", DataType::Utf8, true),
            Field::new("sex", DataType::Utf8, true),
            Field::new("age_approx", DataType::Int32, true),
            Field::new("anatom_site_general_challenge", DataType::Utf8, true),
            Field::new("diagnosis", DataType::Utf8, true),
            Field::new("benign_malignant", DataType::Utf8, false),
            Field::new("target", DataType::Int32, false),
            // The image file's name inside the image folder, its size and BLAKE3.
            Field::new("image_file", DataType::Utf8, false),
            Field::new("image_bytes", DataType::Int64, false),
            Field::new("image_digest", DataType::Utf8, false),
            // "train", "val" or "test"; a patient's images share one split.
            Field::new("split", DataType::Utf8, false),
        ]
    },
};

/// `ingest/duplicates_dropped.parquet`: images left out as duplicates.
pub const DUPLICATES_DROPPED: ArtifactSchema = ArtifactSchema {
    name: "duplicates_dropped",
    version: 1,
    fields: || {
        vec![
            Field::new("image_name", DataType::Utf8, false),
            Field::new("duplicate_of", DataType::Utf8, false),
            Field::new("patient_id", DataType::Utf8, false),
            Field::new("target", DataType::Int32, false),
        ]
    },
};
