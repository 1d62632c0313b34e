//! The remote store against a real S3 server on loopback (s3s-fs, which checks
//! request signatures), started and stopped by the test: push, pull into a
//! fresh clone that then runs with every stage cached, a read-only remote, a
//! corrupted blob on the server, a server that is down, and a push that stops
//! partway followed by a clean retry.
//!
//! `make test` installs s3s-fs and sets `MELANOFLOW_REQUIRE_S3=1`, so there
//! these tests cannot skip; a bare `cargo test` without the server skips them
//! with a message.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fixture::{Project, SMALL, files_under};

const BUCKET: &str = "melanoflow-test";
const ACCESS_KEY: &str = "melanoflow-test-key";
const SECRET_KEY: &str = "melanoflow-test-secret";

/// An s3s-fs server on a free loopback port, killed on drop.
struct S3Server {
    child: Option<Child>,
    root: tempfile::TempDir,
    port: u16,
}

impl S3Server {
    fn start() -> Option<S3Server> {
        let bin = s3s_fs_binary()?;
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join(BUCKET)).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not listen on port {port} within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(S3Server { child: Some(child), root, port })
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The `[store]` table of a project using this server under `prefix`.
    fn store_table(&self, prefix: &str) -> String {
        format!(
            "[store]\nurl = \"store\"\nremote = \"s3://{BUCKET}/{prefix}\"\nendpoint = \"http://127.0.0.1:{}\"\nregion = \"us-east-1\"\n",
            self.port
        )
    }

    /// The object's file in the server's folder.
    fn object(&self, prefix: &str, key: &str) -> PathBuf {
        self.root.path().join(BUCKET).join(prefix).join(key)
    }

    /// Objects stored under `prefix/sub`.
    fn count(&self, prefix: &str, sub: &str) -> usize {
        let dir = self.object(prefix, sub);
        if dir.is_dir() { files_under(&dir).len() } else { 0 }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn s3s_fs_binary() -> Option<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_default();
    let candidates = [
        std::env::var("S3S_FS").ok().map(PathBuf::from),
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("s3s-fs")).find(|p| p.is_file())),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/s3s-fs")),
        Some(Path::new(&home).join(".cargo/bin/s3s-fs")),
    ];
    let found = candidates.into_iter().flatten().find(|p| p.is_file());
    if found.is_none() {
        let how = "cargo install s3s-fs --version 0.14.1 --locked --features binary --root .tools (`make test` does this)";
        assert!(std::env::var("MELANOFLOW_REQUIRE_S3").as_deref() != Ok("1"), "s3s-fs not found (S3S_FS, PATH, .tools/bin, ~/.cargo/bin): {how}");
        eprintln!("SKIPPED: the S3 tests need s3s-fs: {how}");
    }
    found
}

/// A project with the small pipeline, using the server's `prefix`.
fn project(server: &S3Server, prefix: &str) -> Project {
    let body = SMALL.replace("[store]\nurl = \"store\"\n", &server.store_table(prefix));
    assert_ne!(body, SMALL, "the fixture's [store] table changed shape");
    with_credentials(Project::new(&body))
}

/// Credentials come from the environment, as on a real machine.
fn with_credentials(mut p: Project) -> Project {
    p.env = vec![("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()), ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into())];
    p
}

/// A fresh clone of `p`: its pipeline and lock files only.
fn clone_of(p: &Project) -> Project {
    let c = with_credentials(Project::new(&std::fs::read_to_string(p.path("data/pipeline.toml")).unwrap()));
    c.write("data/pipeline.lock", p.lock());
    c
}

/// Relative path -> bytes of every file under `dir`.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    files_under(dir).into_iter().map(|f| (f.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&f).unwrap())).collect()
}

/// One of synth's JPEGs: its store key, digest and bytes.
fn a_synth_blob(p: &Project) -> (String, String, Vec<u8>) {
    let jpeg = files_under(&p.path("data/out/synth")).into_iter().find(|f| f.extension().is_some_and(|e| e == "jpg")).unwrap();
    let bytes = std::fs::read(&jpeg).unwrap();
    let hex = melanoflow_pipeline::Digest::of_bytes(&bytes).to_hex();
    (format!("blobs/{}/{}", &hex[..2], &hex[2..]), hex, bytes)
}

/// (files sent, files already there, objects) from a push or pull summary:
/// `pushed 5002 files (0 already there) as 3 objects for ...`.
fn counts(r: &crate::fixture::Run) -> (usize, usize, usize) {
    let words: Vec<&str> = r.stdout.split_whitespace().collect();
    let number = |w: &str| w.trim_start_matches('(').parse::<usize>().unwrap_or_else(|_| panic!("no count in: {}", r.stdout));
    (number(words[1]), number(words[3]), number(words[7]))
}

#[test]
fn push_then_pull_into_a_fresh_clone_runs_every_stage_cached() {
    let Some(server) = S3Server::start() else { return };
    let origin = project(&server, "push-pull");
    // A read-only remote is never written, even by a run that computes.
    origin.ok(&["run", "--remote-read-only"]);
    assert_eq!(server.count("push-pull", ""), 0, "a read-only run wrote to the remote");
    let refused = origin.fails(&["push", "--remote-read-only"]);
    assert!(refused.stderr.contains("read-only"), "{}", refused.stderr);

    let pushed = origin.ok(&["push"]);
    let (files, present, objects) = counts(&pushed);
    assert!(files > 300 && present == 0, "synth's 300 images and more: {}", pushed.stdout);
    assert!(objects < 10, "small files travel in packs, not one object each: {}", pushed.stdout);
    assert!(server.count("push-pull", "packs") >= 1 && server.count("push-pull", "runs") == 2);
    let again = origin.ok(&["push"]);
    assert_eq!(counts(&again), (0, files, 2), "a second push sends only the run records: {}", again.stdout);

    let clone = clone_of(&origin);
    let pulled = clone.ok(&["pull"]);
    assert!(pulled.stdout.contains("checked out 2 output folder(s)"), "{}", pulled.stdout);
    let run = clone.ok(&["run"]);
    assert_eq!((run.state("synth"), run.state("ingest")), ("cached".into(), "cached".into()), "{}", run.stdout);
    assert_eq!(snapshot(&clone.path("data/out/synth")), snapshot(&origin.path("data/out/synth")));
    assert_eq!(snapshot(&clone.path("data/out/ingest")), snapshot(&origin.path("data/out/ingest")));
    assert_eq!(clone.lock(), origin.lock());

    // Without `pull`, a run finds the results on the remote by itself.
    let lazy = clone_of(&origin);
    let run = lazy.ok(&["run"]);
    assert!(run.stdout.contains("2 restored"), "{}", run.stdout);
    assert_eq!(snapshot(&lazy.path("data/out/ingest")), snapshot(&origin.path("data/out/ingest")));
}

#[test]
fn a_corrupted_blob_is_named_never_materialised_and_repaired() {
    let Some(server) = S3Server::start() else { return };
    let origin = project(&server, "corrupt");
    origin.ok(&["run"]);
    let (key, hex, jpeg) = a_synth_blob(&origin);
    let len = jpeg.len();
    // Damage that image's bytes inside the pack that carries it.
    let pack = files_under(&server.object("corrupt", "packs"))
        .into_iter()
        .find(|f| std::fs::read(f).unwrap().windows(len).any(|w| w == jpeg.as_slice()))
        .expect("the image travels in a pack");
    let mut bytes = std::fs::read(&pack).unwrap();
    let at = bytes.windows(len).position(|w| w == jpeg.as_slice()).unwrap() + len / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&pack, bytes).unwrap();

    let clone = clone_of(&origin);
    let failed = clone.fails(&["pull"]);
    assert!(failed.stderr.contains(&hex) && failed.stderr.contains("corrupt"), "{}", failed.stderr);
    assert!(!clone.path("data/out/synth").exists(), "nothing is materialised from a corrupt remote");
    assert!(!clone.path(&format!("data/store/{key}")).exists(), "the corrupt blob is not stored locally");
    assert!(!pack.exists(), "the corrupt pack is removed from the (writable) remote");

    // The origin has a good copy: push repairs the remote, pull then succeeds.
    let repaired = origin.ok(&["push"]);
    assert!(counts(&repaired).0 > 0, "the pack is sent again: {}", repaired.stdout);
    clone.ok(&["pull"]);
    assert_eq!(snapshot(&clone.path("data/out/synth")), snapshot(&origin.path("data/out/synth")));

    // A corrupt local copy is replaced by the next pull.
    let local = clone.path(&format!("data/store/{key}"));
    std::fs::write(&local, vec![0x5a; len]).unwrap();
    std::fs::remove_dir_all(clone.path("data/out/synth")).unwrap();
    clone.ok(&["pull"]);
    assert_eq!(melanoflow_pipeline::Digest::of_bytes(&std::fs::read(&local).unwrap()).to_hex(), hex);
    assert_eq!(snapshot(&clone.path("data/out/synth")), snapshot(&origin.path("data/out/synth")));
}

#[test]
fn a_server_that_is_down_is_a_clear_error_and_local_results_are_untouched() {
    let Some(mut server) = S3Server::start() else { return };
    let origin = project(&server, "down");
    origin.ok(&["run", "--remote-read-only"]);
    server.stop();
    let stored = || [snapshot(&origin.path("data/store/blobs")), snapshot(&origin.path("data/store/runs"))].concat();
    let store_before = stored();
    let lock_before = origin.lock();

    let push = origin.fails(&["push"]);
    let endpoint = format!("127.0.0.1:{}", server.port);
    assert!(push.stderr.contains(&endpoint) && push.stderr.contains("Connection refused"), "{}", push.stderr);
    let pull = clone_of(&origin).fails(&["pull"]);
    assert!(pull.stderr.contains(&endpoint), "{}", pull.stderr);
    // A forced re-run computes, then cannot upload: it fails and commits nothing.
    let forced = origin.fails(&["run", "--force", "ingest"]);
    assert!(forced.stderr.contains(&endpoint), "{}", forced.stderr);

    assert_eq!(origin.lock(), lock_before);
    let store_after = stored();
    assert!(store_before.iter().all(|f| store_after.contains(f)), "a stored blob or record was lost or changed");
    let run = origin.ok(&["run"]);
    assert!(run.stdout.contains("2 cached"), "up-to-date stages need no remote: {}", run.stdout);
}

#[test]
fn a_push_that_stops_partway_is_finished_by_a_clean_retry() {
    let Some(server) = S3Server::start() else { return };
    let origin = project(&server, "partway");
    origin.ok(&["run", "--remote-read-only"]);
    // The server refuses every loose object (a file where the `blobs/` folder
    // would go): the packs go up, then the push stops at the manifests,
    // before any run record.
    let blocker = server.object("partway", "blobs");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"in the way").unwrap();
    let stopped = origin.fails(&["push"]);
    assert!(stopped.stderr.contains("blobs/"), "{}", stopped.stderr);
    assert!(server.count("partway", "packs") >= 1, "the packs went up before the stop");
    assert_eq!(server.count("partway", "runs"), 0, "run records go last: none may be visible after a stopped push");
    for pack in files_under(&server.object("partway", "packs")) {
        assert!(std::fs::metadata(&pack).unwrap().len() > 0);
    }
    // A clone cannot use a half-pushed result, and says so.
    let early = clone_of(&origin).fails(&["pull"]);
    assert!(early.stderr.contains("push it from the machine that ran it"), "{}", early.stderr);

    std::fs::remove_file(&blocker).unwrap();
    let retry = origin.ok(&["push"]);
    let (files, present, _) = counts(&retry);
    assert!(files == 2 && present > 300, "the retry sends only the two manifests (and the records): {}", retry.stdout);
    let clone = clone_of(&origin);
    clone.ok(&["pull"]);
    assert!(clone.ok(&["run"]).stdout.contains("2 cached"));
}
