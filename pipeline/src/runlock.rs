//! One run at a time per store: an OS advisory lock on a file, held for the
//! life of the process and released by the kernel when it exits or is killed,
//! so a crash never leaves a stale lock behind.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub struct RunLock {
    _file: File,
    pub path: PathBuf,
}

impl RunLock {
    /// Takes the lock at `path`. When another process holds it: with `wait`,
    /// says so on stderr and blocks until it is free; without, returns
    /// [`Error::Busy`] naming the holder's pid.
    pub fn acquire(path: &Path, wait: bool) -> Result<RunLock> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let pid = holder.trim().to_string();
                if !wait {
                    return Err(Error::Busy {
                        path: path.into(),
                        pid,
                    });
                }
                eprintln!(
                    "waiting for another melanoflow run (pid {pid}) to finish with {}",
                    path.display()
                );
                file.lock().map_err(|e| Error::io(path, e))?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(path, e)),
        }
        // Record our pid for whoever waits next; the lock, not the text, is what counts.
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{}", std::process::id());
        let _ = file.flush();
        Ok(RunLock {
            _file: file,
            path: path.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.lock");
        let _held = RunLock::acquire(&p, false).unwrap();
        // A second open file description on the same file conflicts, as a second process would.
        match RunLock::acquire(&p, false) {
            Err(Error::Busy { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("expected Busy, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.lock");
        drop(RunLock::acquire(&p, false).unwrap());
        RunLock::acquire(&p, false).unwrap();
    }
}
