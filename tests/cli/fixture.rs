//! A temporary project with a pipeline file, and helpers to run the binary in it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_melanoflow");

/// A small synthetic pipeline: fast enough to run many times per test.
pub const SMALL: &str = r#"
[store]
url = "store"

[stages.synth]
kind = "synth"
count = 300
malignant_fraction = 0.05
image_size = 32
patients = 30
seed = 1

[stages.ingest]
kind = "ingest"
inputs = ["synth"]
seed = 42
"#;

pub struct Project {
    pub dir: tempfile::TempDir,
    /// Environment variables every command gets (credentials, say).
    pub env: Vec<(String, String)>,
}

pub struct Run {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Run {
        Run {
            status: o.status,
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// The output line for a stage (`ran synth: ...`).
    pub fn line(&self, stage: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| {
                l.split_whitespace()
                    .any(|w| w.trim_end_matches(':') == stage)
                    && !l.contains("stage(s)")
            })
            .unwrap_or_else(|| panic!("no line for `{stage}` in:\n{}", self.stdout))
    }

    pub fn state(&self, stage: &str) -> String {
        let line = self.line(stage);
        let end = line.find(&format!(" {stage}")).expect("stage name in line");
        line[..end].trim().to_string()
    }
}

impl Project {
    pub fn new(pipeline: &str) -> Project {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/pipeline.toml"), pipeline).unwrap();
        Project {
            dir,
            env: Vec::new(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.current_dir(self.dir.path())
            .args(args)
            .env_remove("MELANOFLOW_LOG")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).output().expect("run melanoflow"))
    }

    /// Runs and asserts success.
    pub fn ok(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        assert!(
            r.status.success(),
            "melanoflow {args:?} failed\nstdout:\n{}\nstderr:\n{}",
            r.stdout,
            r.stderr
        );
        r
    }

    /// Runs and asserts failure.
    pub fn fails(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        assert!(
            !r.status.success(),
            "melanoflow {args:?} should have failed\nstdout:\n{}",
            r.stdout
        );
        r
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    }

    pub fn lock(&self) -> String {
        std::fs::read_to_string(self.path("data/pipeline.lock")).unwrap_or_default()
    }

    /// Sorted list of the store's run records.
    pub fn run_records(&self) -> Vec<String> {
        let dir = self.path("data/store/runs");
        let mut v: Vec<String> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => vec![],
        };
        v.sort();
        v
    }

    /// Waits (up to 60 s) until `rel` exists.
    pub fn wait_for(&self, rel: &str) {
        let p = self.path(rel);
        for _ in 0..600 {
            if p.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("{} never appeared", p.display());
    }
}

/// Sets a file's mtime to now without changing its bytes.
pub fn touch(path: &Path) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::now()).unwrap();
}

/// All regular files under a folder, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p)
            } else {
                out.push(p)
            }
        }
    }
    out.sort();
    out
}

pub fn realdata() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/realdata");
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: {} is absent (real ISIC files live in the workplace's shared folder)",
            p.display()
        );
        None
    }
}
