//! Small filesystem helpers with the atomicity the engine promises: a file is
//! either its old bytes or its new bytes, never half of each.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through a temporary file in the same directory,
/// fsynced and renamed over the target.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile_in(dir, path)?;
    let result = (|| {
        tmp.1.write_all(bytes)?;
        tmp.1.sync_all()?;
        std::fs::rename(&tmp.0, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp.0);
    }
    result
}

fn tempfile_in(dir: &Path, target: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let stem = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file");
    for attempt in 0..100u32 {
        let p = dir.join(format!(".{stem}.tmp.{}.{attempt}", std::process::id()));
        match std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(format!(
        "could not create a temporary file in {}",
        dir.display()
    )))
}

/// Removes a directory tree if it exists.
pub fn remove_dir_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Replaces directory `target` by directory `new` with two renames, so that
/// readers see either the old or the new tree. `trash` must be on the same
/// filesystem; the old tree is deleted after the swap.
pub fn swap_dir(new: &Path, target: &Path, trash: &Path) -> std::io::Result<()> {
    remove_dir_if_exists(trash)?;
    for dir in [target.parent(), trash.parent()].into_iter().flatten() {
        std::fs::create_dir_all(dir)?;
    }
    let had_old = match std::fs::rename(target, trash) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    if let Err(e) = std::fs::rename(new, target) {
        if had_old {
            let _ = std::fs::rename(trash, target);
        }
        return Err(e);
    }
    remove_dir_if_exists(trash)
}
