//! The Arrow schema, with a version, of every Parquet artifact melanoflow
//! writes, and the two doors those files go through: [`write_parquet`] (the
//! batch must match the schema exactly, nullability included) and
//! [`check_parquet`] (a file must carry the expected schema name and version
//! and the expected columns before any stage reads it).
//!
//! Files are plain Parquet (Snappy) that pandas, polars and DuckDB read. The
//! schema name and version travel in the file's key-value metadata under
//! `melanoflow.schema` (e.g. `metadata/1`). Changing a schema means bumping
//! its version and the code version of the stage that writes it.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};

pub mod tables;

pub use tables::*;

/// Key-value metadata key holding `NAME/VERSION`.
pub const SCHEMA_KEY: &str = "melanoflow.schema";

/// A named, versioned Arrow schema.
pub struct ArtifactSchema {
    pub name: &'static str,
    pub version: u32,
    pub fields: fn() -> Vec<Field>,
}

impl ArtifactSchema {
    pub fn tag(&self) -> String {
        format!("{}/{}", self.name, self.version)
    }

    pub fn arrow(&self) -> SchemaRef {
        Arc::new(Schema::new((self.fields)()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("{file}: {message}")]
    Mismatch { file: String, message: String },
    #[error("{file}")]
    Parquet {
        file: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("{file}")]
    Arrow {
        file: String,
        #[source]
        source: arrow_schema::ArrowError,
    },
    #[error("{file}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

/// Writes `columns` (in schema order) as one Parquet file with the schema's
/// tag in its metadata. The row group size is fixed so output bytes depend
/// only on the data.
pub fn write_parquet(
    path: &Path,
    schema: &ArtifactSchema,
    columns: Vec<ArrayRef>,
) -> Result<(), SchemaError> {
    let file_name = path.display().to_string();
    let batch =
        RecordBatch::try_new(schema.arrow(), columns).map_err(|source| SchemaError::Arrow {
            file: file_name.clone(),
            source,
        })?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(1 << 20))
        .set_created_by(format!("melanoflow (schema {})", schema.tag()))
        .set_key_value_metadata(Some(vec![KeyValue::new(
            SCHEMA_KEY.to_string(),
            schema.tag(),
        )]))
        .build();
    let file = File::create(path).map_err(|source| SchemaError::Io {
        file: file_name.clone(),
        source,
    })?;
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props)).map_err(|source| {
        SchemaError::Parquet {
            file: file_name.clone(),
            source,
        }
    })?;
    writer
        .write(&batch)
        .map_err(|source| SchemaError::Parquet {
            file: file_name.clone(),
            source,
        })?;
    writer.close().map_err(|source| SchemaError::Parquet {
        file: file_name,
        source,
    })?;
    Ok(())
}

/// Checks a Parquet file's footer against `schema`: the schema tag, and every
/// expected column present with its type and nullability. Returns the row count.
pub fn check_parquet(path: &Path, schema: &ArtifactSchema) -> Result<u64, SchemaError> {
    let file_name = path.display().to_string();
    let mismatch = |message: String| SchemaError::Mismatch {
        file: file_name.clone(),
        message,
    };
    let file = File::open(path).map_err(|source| SchemaError::Io {
        file: file_name.clone(),
        source,
    })?;
    let reader = SerializedFileReader::new(file).map_err(|source| SchemaError::Parquet {
        file: file_name.clone(),
        source,
    })?;
    let meta = reader.metadata().file_metadata();
    let tag = meta
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == SCHEMA_KEY))
        .and_then(|k| k.value.clone());
    match tag {
        Some(t) if t == schema.tag() => {}
        Some(t) => {
            return Err(mismatch(format!(
                "holds schema `{t}`, this build reads `{}`; re-run the stage that wrote it",
                schema.tag()
            )));
        }
        None => {
            return Err(mismatch(format!(
                "has no `{SCHEMA_KEY}` tag; expected a `{}` file written by melanoflow",
                schema.tag()
            )));
        }
    }
    let found =
        parquet::arrow::parquet_to_arrow_schema(meta.schema_descr(), meta.key_value_metadata())
            .map_err(|source| SchemaError::Parquet {
                file: file_name.clone(),
                source,
            })?;
    for expected in (schema.fields)() {
        let Ok(actual) = found.field_with_name(expected.name()) else {
            return Err(mismatch(format!(
                "missing column `{}` ({})",
                expected.name(),
                expected.data_type()
            )));
        };
        if !same_type(actual.data_type(), expected.data_type()) {
            return Err(mismatch(format!(
                "column `{}` is {}, expected {}",
                expected.name(),
                actual.data_type(),
                expected.data_type()
            )));
        }
        if actual.is_nullable() && !expected.is_nullable() {
            return Err(mismatch(format!(
                "column `{}` is nullable, expected required",
                expected.name()
            )));
        }
    }
    Ok(meta.num_rows() as u64)
}

fn same_type(a: &DataType, b: &DataType) -> bool {
    use DataType::*;
    let norm = |t: &DataType| match t {
        Utf8 | LargeUtf8 | Utf8View => Utf8,
        other => other.clone(),
    };
    norm(a) == norm(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int32Array, StringArray};

    fn tiny() -> ArtifactSchema {
        ArtifactSchema {
            name: "tiny",
            version: 1,
            fields: || {
                vec![
                    Field::new("name", DataType::Utf8, false),
                    Field::new("n", DataType::Int32, true),
                ]
            },
        }
    }

    fn columns() -> Vec<ArrayRef> {
        vec![
            Arc::new(StringArray::from(vec!["a", "b"])),
            Arc::new(Int32Array::from(vec![Some(1), None])),
        ]
    }

    #[test]
    fn write_then_check_and_bytes_are_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.parquet"), dir.path().join("b.parquet"));
        write_parquet(&a, &tiny(), columns()).unwrap();
        write_parquet(&b, &tiny(), columns()).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(check_parquet(&a, &tiny()).unwrap(), 2);
    }

    #[test]
    fn nulls_in_a_required_column_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![Some("a"), None])),
            Arc::new(Int32Array::from(vec![1, 2])),
        ];
        let e = write_parquet(&dir.path().join("x.parquet"), &tiny(), cols)
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.parquet"), "{e}");
    }

    #[test]
    fn version_and_columns_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.parquet");
        write_parquet(&p, &tiny(), columns()).unwrap();
        let v2 = ArtifactSchema {
            version: 2,
            ..tiny()
        };
        let e = check_parquet(&p, &v2).unwrap_err().to_string();
        assert!(e.contains("tiny/1") && e.contains("tiny/2"), "{e}");
        let more = ArtifactSchema {
            fields: || {
                vec![
                    Field::new("name", DataType::Utf8, false),
                    Field::new("extra", DataType::Int64, false),
                ]
            },
            ..tiny()
        };
        let e = check_parquet(&p, &more).unwrap_err().to_string();
        assert!(e.contains("missing column `extra`"), "{e}");
    }
}
