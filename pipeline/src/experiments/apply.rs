//! `exp apply NAME`: makes an experiment the workspace state without running
//! anything: its overrides are written into the pipeline file (comments and
//! layout kept), its lock file becomes the workspace's, and the output
//! folders are restored from the store.
//!
//! Promises: everything is checked before anything is written (every output
//! the experiment's lock file names is in the store, the edited pipeline file
//! parses and plans as up to date), so a refusal leaves the workspace as it
//! was; an override of one `foreach` item (`STAGE@ITEM.KEY`) cannot be written
//! into the file and is refused, naming it.

use std::path::Path;

use super::ExperimentRecord;
use crate::config::{self, Override};
use crate::context::Progress;
use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::runner::{Engine, RunOptions, State};

/// What `apply` did.
#[derive(Debug)]
pub struct Applied {
    /// The overrides written into the pipeline file.
    pub written: Vec<String>,
    /// Output folders written from the store.
    pub restored: Vec<String>,
}

/// The pipeline file's text with `overrides` written into its stage tables.
pub fn edit_pipeline_text(file: &Path, text: &str, overrides: &[Override]) -> Result<String> {
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| {
        Error::Experiment(format!(
            "{}: cannot edit the pipeline file: {e}",
            file.display()
        ))
    })?;
    for o in overrides {
        if o.stage.contains('@') {
            return Err(Error::Experiment(format!(
                "--set {o} overrides one item of a `foreach` stage, which the pipeline file \
                 cannot say; run with the override instead of applying it"
            )));
        }
        let table = doc
            .get_mut("stages")
            .and_then(|s| s.get_mut(&o.stage))
            .and_then(|t| t.as_table_like_mut())
            .ok_or_else(|| {
                Error::Experiment(format!(
                    "{}: no table `[stages.{}]` to write --set {o} into",
                    file.display(),
                    o.stage
                ))
            })?;
        // As `--set` reads it: TOML when it parses, else a bare string.
        let value: toml_edit::Value = o
            .value
            .parse()
            .unwrap_or_else(|_| toml_edit::Value::from(o.value.as_str()));
        match table.get_mut(&o.key) {
            Some(item) => {
                let decor = item.as_value().map(|v| v.decor().clone());
                *item = toml_edit::Item::Value(value);
                if let (Some(decor), Some(v)) = (decor, item.as_value_mut()) {
                    *v.decor_mut() = decor;
                }
            }
            None => {
                table.insert(&o.key, toml_edit::Item::Value(value));
            }
        }
    }
    Ok(doc.to_string())
}

/// Applies experiment `name` of the pipeline file `file`.
pub fn apply(
    file: &Path,
    registry: &Registry,
    record: &ExperimentRecord,
    progress: Progress,
) -> Result<Applied> {
    let overrides = record.overrides()?;
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let edited = edit_pipeline_text(file, &text, &overrides)?;
    let pipeline = config::parse(file, &edited, registry, &[])?;
    let lock_path = pipeline.lock_path();
    // The experiment's lock file goes in first (the engine plans against the
    // lock file it opens with); any refusal below puts the old one back.
    let previous_lock = std::fs::read(&lock_path).ok();
    record
        .lock
        .save(&lock_path)
        .map_err(|e| Error::io(&lock_path, e))?;
    let checked = Engine::open(pipeline, registry, progress)
        .and_then(|mut engine| check_applicable(&mut engine, record).map(|()| engine));
    let mut engine = match checked {
        Ok(engine) => engine,
        Err(e) => {
            let put_back = match previous_lock {
                Some(bytes) => crate::fsutil::write_atomic(&lock_path, &bytes),
                None => std::fs::remove_file(&lock_path),
            };
            put_back.map_err(|e| Error::io(&lock_path, e))?;
            return Err(e);
        }
    };
    crate::fsutil::write_atomic(file, edited.as_bytes()).map_err(|e| Error::io(file, e))?;
    let restored = engine.checkout(&[])?;
    Ok(Applied {
        written: record.overrides.clone(),
        restored,
    })
}

/// Every output of the experiment is stored, and the edited pipeline plans
/// as up to date against its lock file.
fn check_applicable(engine: &mut Engine, record: &ExperimentRecord) -> Result<()> {
    for (stage, entry) in &record.lock.stages {
        if engine.artifacts().get_manifest(&entry.output)?.is_none() {
            return Err(Error::Experiment(format!(
                "experiment `{}`: the output of stage `{stage}` ({}) is not in the store \
                 (was it collected by `gc --workspace-only`?); run the experiment again",
                record.name,
                entry.output.short()
            )));
        }
    }
    let stale: Vec<String> = engine
        .plan(&RunOptions::default())?
        .iter()
        .filter(|o| o.state == State::WouldRun)
        .map(|o| format!("{} ({})", o.stage, o.reasons.join("; ")))
        .collect();
    if stale.is_empty() {
        return Ok(());
    }
    Err(Error::Experiment(format!(
        "experiment `{}` does not match {} with its overrides written in: {} would run; \
         nothing was changed",
        record.name,
        engine.pipeline.file.display(),
        stale.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_are_written_into_their_tables_keeping_comments() {
        let text =
            "# top\n[stages.gan]\nkind = \"k\"\nngf = 4 # small\n\n[stages.arm]\nkind = \"k\"\n";
        let o: Vec<Override> = vec![
            "gan.ngf=8".parse().unwrap(),
            "arm.augmentation=classical".parse().unwrap(),
            "arm.seeds=[0, 1]".parse().unwrap(),
        ];
        let out = edit_pipeline_text(Path::new("p.toml"), text, &o).unwrap();
        assert!(out.starts_with("# top\n"), "{out}");
        assert!(out.contains("ngf = 8 # small\n"), "{out}");
        assert!(out.contains("augmentation = \"classical\""), "{out}");
        assert!(out.contains("seeds = [0, 1]"), "{out}");
    }

    #[test]
    fn one_item_overrides_and_unknown_stages_are_refused_by_name() {
        let text = "[stages.arm]\nkind = \"k\"\n";
        let one: Vec<Override> = vec!["arm@2.lr=0.1".parse().unwrap()];
        let e = edit_pipeline_text(Path::new("p.toml"), text, &one)
            .unwrap_err()
            .to_string();
        assert!(e.contains("arm@2.lr=0.1"), "{e}");
        let none: Vec<Override> = vec!["gan.ngf=8".parse().unwrap()];
        let e = edit_pipeline_text(Path::new("p.toml"), text, &none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[stages.gan]"), "{e}");
    }
}
