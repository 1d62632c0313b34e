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

/// `preprocess/index.parquet`: where each prepared image lives.
/// Image `i` of a shard is `images[offset]` of the safetensors file named by
/// `shard` (a uint8 tensor of shape [N, size, size, 3], RGB, NHWC).
pub const IMAGE_INDEX: ArtifactSchema = ArtifactSchema {
    name: "image_index",
    version: 1,
    fields: || {
        vec![
            Field::new("image_name", DataType::Utf8, false),
            Field::new("shard", DataType::Utf8, false),
            Field::new("offset", DataType::Int64, false),
            Field::new("target", DataType::Int32, false),
            Field::new("patient_id", DataType::Utf8, false),
            Field::new("split", DataType::Utf8, false),
            // BLAKE3 of the source image file the pixels came from.
            Field::new("source_digest", DataType::Utf8, false),
        ]
    },
};

/// `preprocess/bad_images.parquet`: images left out (`on_bad_image = "skip"`).
pub const BAD_IMAGES: ArtifactSchema = ArtifactSchema {
    name: "bad_images",
    version: 1,
    fields: || {
        vec![
            Field::new("image_name", DataType::Utf8, false),
            Field::new("image_file", DataType::Utf8, false),
            Field::new("reason", DataType::Utf8, false),
        ]
    },
};

/// `train_cyclegan/losses.parquet`: one row per training step.
pub const CYCLEGAN_LOSSES: ArtifactSchema = ArtifactSchema {
    name: "cyclegan_losses",
    version: 1,
    fields: || {
        let f = |name: &'static str| Field::new(name, DataType::Float32, false);
        vec![
            Field::new("step", DataType::Int64, false),
            Field::new("epoch", DataType::Int64, false),
            Field::new("lr", DataType::Float64, false),
            // Generator side: total, adversarial (A->B judged by D_A, B->A by D_B), cycle, identity.
            f("loss_g"),
            f("loss_g_a"),
            f("loss_g_b"),
            f("loss_cycle_a"),
            f("loss_cycle_b"),
            f("loss_idt_a"),
            f("loss_idt_b"),
            // Discriminators.
            f("loss_d_a"),
            f("loss_d_b"),
        ]
    },
};

/// `generate/provenance.parquet`: where each synthetic malignant image came from.
pub const SYNTHETIC_PROVENANCE: ArtifactSchema = ArtifactSchema {
    name: "synthetic_provenance",
    version: 1,
    fields: || {
        vec![
            Field::new("image_name", DataType::Utf8, false),
            // The benign training image the generator translated.
            Field::new("source_image", DataType::Utf8, false),
            Field::new("source_patient_id", DataType::Utf8, false),
            // BLAKE3 of the generator's safetensors file.
            Field::new("generator_digest", DataType::Utf8, false),
        ]
    },
};

/// `train_classifier/predictions.parquet`: the selected checkpoint's
/// probability of malignancy for every validation and test image, per seed.
pub const PREDICTIONS: ArtifactSchema = ArtifactSchema {
    name: "predictions",
    version: 1,
    fields: || {
        vec![
            Field::new("seed", DataType::Int64, false),
            Field::new("image_name", DataType::Utf8, false),
            Field::new("patient_id", DataType::Utf8, false),
            Field::new("split", DataType::Utf8, false),
            Field::new("target", DataType::Int32, false),
            Field::new("score", DataType::Float64, false),
        ]
    },
};

/// `train_classifier/history.parquet`: one row per seed and epoch.
pub const CLASSIFIER_HISTORY: ArtifactSchema = ArtifactSchema {
    name: "classifier_history",
    version: 1,
    fields: || {
        vec![
            Field::new("seed", DataType::Int64, false),
            Field::new("epoch", DataType::Int64, false),
            Field::new("lr", DataType::Float64, false),
            Field::new("train_loss", DataType::Float64, false),
            Field::new("val_loss", DataType::Float64, false),
            Field::new("val_auc", DataType::Float64, false),
        ]
    },
};

/// `evaluate/test_scores.parquet`: every arm's test score per seed and image
/// (out-of-fold where the arm is a `foreach` of folds), what `diff` pairs
/// across experiments and revisions.
pub const TEST_SCORES: ArtifactSchema = ArtifactSchema {
    name: "test_scores",
    version: 1,
    fields: || {
        vec![
            Field::new("arm", DataType::Utf8, false),
            Field::new("seed", DataType::Int64, false),
            Field::new("image_name", DataType::Utf8, false),
            Field::new("target", DataType::Int32, false),
            Field::new("score", DataType::Float64, false),
        ]
    },
};
