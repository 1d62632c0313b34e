//! Stage `import`: a file or folder of existing data (raw photos, a dataset
//! dump, pretrained weights) taken into the pipeline as a stage output, as
//! DVC's `dvc add` does: the engine stores it content-addressed, `push` and
//! `pull` move it with every other output, and the stages after it read it
//! from the store, so a clone that pulls has the data without the original
//! folder.
//!
//! Parameter `path`: a file or folder, relative to the pipeline file, or a
//! URL (`s3://bucket/prefix`, `az://container/prefix`, `file:///abs/dir`). It is an
//! external input, so its bytes are in the stage's fingerprint: editing,
//! adding or removing a file re-runs the stage, and nothing else does.
//!
//! Output: the files themselves, at their paths under the folder (a single
//! file under its own name), and nothing else, so the output's digest is the
//! data's.
//!
//! Promises: every file is checked against the digest the engine hashed for
//! the fingerprint; one changed or deleted between the two fails the stage,
//! naming it (and the engine then keeps nothing). Local files are copied on
//! rayon's threads (`std::fs::copy`: the kernel's `copy_file_range`, a
//! reflink where the file system has them); remote objects are fetched 16 at
//! a time, 64 in memory at most.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use melanoflow_pipeline::context::join_rel;
use melanoflow_pipeline::manifest::Entry;
use melanoflow_pipeline::share::human_bytes;
use melanoflow_pipeline::store::{BlobStore, ObjectBlobStore};
use melanoflow_pipeline::{
    BoxError, Digest, ExternalFiles, ExternalInput, Source, Stage, StageContext, StageReport,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub struct Import;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportParams {
    /// The file or folder to take in: a path relative to the pipeline file,
    /// or a URL.
    pub path: String,
}

impl Stage for Import {
    type Params = ImportParams;
    const KIND: &'static str = "import";
    const CODE: &'static str = crate::code_identity::IMPORT;
    const ABOUT: &'static str = "a file or folder of existing data (a path, or s3://, az://, file://) taken in as a stage output";

    fn external_inputs(&self, p: &ImportParams, base_dir: &Path) -> Vec<ExternalInput> {
        vec![ExternalInput::new("path", &p.path, base_dir)]
    }

    fn run(&self, _p: &ImportParams, ctx: &StageContext) -> Result<StageReport, BoxError> {
        Ok(run(ctx)?)
    }
}

/// Objects fetched from a remote source per batch, and at once.
const REMOTE_BATCH: usize = 64;
const REMOTE_CONCURRENCY: usize = 16;

fn run(ctx: &StageContext) -> Result<StageReport> {
    let input = ctx
        .external("path")
        .ok_or_else(|| anyhow!("the engine resolved no `path` input"))?;
    let entries = input.manifest.entries();
    let bytes = input.manifest.total_bytes();
    let bar = ctx.progress.bytes_bar("importing");
    bar.set_length(bytes);
    match &input.source {
        Source::Local(root) => entries.par_iter().try_for_each(|e| -> Result<()> {
            let (src, dst) = local_paths(input, root, e, &ctx.out_dir)?;
            make_parent(&dst)?;
            std::fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
            let read =
                Digest::of_file(&dst).with_context(|| format!("reading {}", dst.display()))?;
            check(e, read, &src.display().to_string())?;
            bar.inc(e.size);
            Ok(())
        })?,
        Source::Remote(url) => {
            let store = ObjectBlobStore::open(url, &ctx.base_dir)?;
            let describe = |key: &str| format!("{}/{key}", store.describe().trim_end_matches('/'));
            for batch in entries.chunks(REMOTE_BATCH) {
                let keys: Vec<&str> = batch.iter().map(|e| e.path.as_str()).collect();
                let bodies = store.get_many(&keys, REMOTE_CONCURRENCY)?;
                for (e, body) in batch.iter().zip(bodies) {
                    let body = body.ok_or_else(|| {
                        anyhow!(
                            "{} was listed, then deleted before it could be read",
                            describe(&e.path)
                        )
                    })?;
                    check(e, Digest::of_bytes(&body), &describe(&e.path))?;
                    let dst = join_rel(&ctx.out_dir, &e.path);
                    make_parent(&dst)?;
                    std::fs::write(&dst, &body)
                        .with_context(|| format!("writing {}", dst.display()))?;
                    bar.inc(e.size);
                }
            }
        }
    }
    bar.finish_and_clear();
    Ok(StageReport::new(format!(
        "{} file(s), {} from {}",
        entries.len(),
        human_bytes(bytes),
        input.source
    )))
}

/// Where a manifest entry is read from and written to. A single file's
/// entry is named after the parameter; it keeps the file's own name.
fn local_paths(
    input: &ExternalFiles,
    root: &Path,
    e: &Entry,
    out_dir: &Path,
) -> Result<(PathBuf, PathBuf)> {
    if input.is_dir {
        return Ok((join_rel(root, &e.path), join_rel(out_dir, &e.path)));
    }
    let name = root
        .file_name()
        .ok_or_else(|| anyhow!("{}: a file path without a file name", root.display()))?;
    Ok((root.to_path_buf(), out_dir.join(name)))
}

fn make_parent(path: &Path) -> Result<()> {
    let parent = path.parent().expect("a file under the output folder");
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))
}

/// Fails when the bytes read are not those the fingerprint was taken of.
fn check(e: &Entry, read: Digest, what: &str) -> Result<()> {
    if read != e.digest {
        bail!(
            "{what} changed while it was being imported (BLAKE3 {} when hashed for the fingerprint, {} now): run again to import the new version",
            e.digest.short(),
            read.short()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_other_than_those_hashed_are_an_error_naming_the_file() {
        let e = Entry {
            path: "sub/b.bin".into(),
            size: 3,
            digest: Digest::of_bytes(b"old"),
        };
        assert!(check(&e, Digest::of_bytes(b"old"), "raw/sub/b.bin").is_ok());
        let err = check(&e, Digest::of_bytes(b"new"), "raw/sub/b.bin").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("raw/sub/b.bin changed while it was being imported"),
            "{msg}"
        );
        assert!(msg.contains(&Digest::of_bytes(b"old").short()), "{msg}");
    }
}
