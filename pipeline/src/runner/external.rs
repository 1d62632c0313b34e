//! External inputs: the files and folders a stage's parameters name (local
//! paths or remote prefixes), resolved and hashed for its fingerprint.
//!
//! Promises: local files are hashed through the file hash cache, so an
//! unchanged input is not read again; a declared input that does not exist
//! (or a remote prefix with nothing under it) is `Error::MissingInput`, naming
//! the stage, the input and where it was looked for.

use std::sync::OnceLock;

use indicatif::ProgressBar;

use super::Engine;
use crate::context::ExternalFiles;
use crate::error::{Error, Result};
use crate::manifest::{Entry, Manifest};
use crate::registry::Source;
use crate::remote;
use crate::store::ObjectBlobStore;

/// The external inputs of a stage, resolved and hashed.
pub(super) struct Externals {
    pub(super) files: Vec<ExternalFiles>,
    pub(super) combined: Option<Manifest>,
}

impl Engine<'_> {
    /// Resolves and hashes the stage's declared external inputs.
    pub(super) fn resolve_external(&mut self, i: usize) -> Result<Externals> {
        let decl = &self.pipeline.stages[i];
        let kind = self.registry.get(&decl.kind).expect("validated kind");
        let declared = kind.external_inputs(&decl.params, &self.pipeline.base_dir);
        if declared.is_empty() {
            return Ok(Externals {
                files: vec![],
                combined: None,
            });
        }
        let stage = decl.name.clone();
        let mut files = Vec::new();
        let mut combined = Vec::new();
        let bar: OnceLock<ProgressBar> = OnceLock::new();
        let progress = self.progress.clone();
        for input in declared {
            let on_hashed = |n: u64| {
                bar.get_or_init(|| progress.counter("hashing input files"))
                    .inc(n)
            };
            let missing = || Error::MissingInput {
                stage: stage.clone(),
                name: input.name.clone(),
                location: input.source.to_string(),
            };
            let (manifest, is_dir) = match &input.source {
                Source::Local(path) => {
                    let meta = std::fs::metadata(path).map_err(|_| missing())?;
                    if meta.is_dir() {
                        (
                            self.cache
                                .manifest_of_dir(path, &on_hashed)
                                .map_err(|e| Error::io(path, e))?,
                            true,
                        )
                    } else {
                        let (size, digest) =
                            self.cache.digest(path).map_err(|e| Error::io(path, e))?;
                        (
                            Manifest::new(vec![Entry {
                                path: input.name.clone(),
                                size,
                                digest,
                            }]),
                            false,
                        )
                    }
                }
                Source::Remote(url) => {
                    let remote = ObjectBlobStore::open(url, &self.pipeline.base_dir)?;
                    let m = remote::manifest_of_prefix(&remote, &mut self.cache, &on_hashed)?;
                    if m.is_empty() {
                        return Err(missing());
                    }
                    (m, true)
                }
            };
            for e in manifest.entries() {
                let path = if is_dir {
                    format!("{}/{}", input.name, e.path)
                } else {
                    e.path.clone()
                };
                combined.push(Entry { path, ..e.clone() });
            }
            files.push(ExternalFiles {
                name: input.name,
                source: input.source,
                is_dir,
                manifest,
            });
        }
        if let Some(b) = bar.get() {
            b.finish_and_clear();
        }
        Ok(Externals {
            files,
            combined: Some(Manifest::new(combined)),
        })
    }
}
