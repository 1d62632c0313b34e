//! The remote store against real servers on loopback, started and stopped by
//! the test: S3 (s3s-fs, which checks request signatures) and Azure Blob
//! Storage (Azurite, checking shared-key signatures). On both: push, pull into
//! a fresh clone that then runs with every stage cached, a run restoring from
//! the remote, a read-only remote, and a server that is down. On S3 also: a
//! corrupted blob on the server, and a push that stops partway followed by a
//! clean retry (both edit the server's files, which only s3s-fs keeps as
//! plain files).
//!
//! `make test` installs s3s-fs and Azurite and sets `MELANOFLOW_REQUIRE_S3=1`
//! and `MELANOFLOW_REQUIRE_AZURE=1`, so there these tests cannot skip; a bare
//! `cargo test` without the servers skips them with a message.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fixture::{Project, SMALL, files_under};

/// The S3 bucket, and the Azure container.
const BUCKET: &str = "melanoflow-test";
const ACCESS_KEY: &str = "melanoflow-test-key";
const SECRET_KEY: &str = "melanoflow-test-secret";
/// Azurite's well-known development account and its published key.
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    S3,
    Azure,
}

/// A test server (s3s-fs or Azurite) on a free loopback port, killed on drop.
struct Server {
    backend: Backend,
    child: Option<Child>,
    root: tempfile::TempDir,
    port: u16,
}

impl Server {
    fn start(backend: Backend) -> Option<Server> {
        let root = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = match backend {
            Backend::S3 => {
                std::fs::create_dir_all(root.path().join(BUCKET)).unwrap();
                let mut c = Command::new(s3s_fs_binary()?);
                c.args([
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--access-key",
                    ACCESS_KEY,
                    "--secret-key",
                    SECRET_KEY,
                ])
                .arg(root.path());
                c
            }
            Backend::Azure => {
                let mut c = Command::new(azurite_binary()?);
                c.args([
                    "--blobHost",
                    "127.0.0.1",
                    "--blobPort",
                    &port.to_string(),
                    "--location",
                ])
                .arg(root.path())
                .args([
                    "--skipApiVersionCheck",
                    "--loose",
                    "--disableTelemetry",
                    "--silent",
                ]);
                c
            }
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        let server = Server {
            backend,
            child: Some(child),
            root,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{backend:?} server did not listen on port {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if backend == Backend::Azure {
            server.azurite(&["create", BUCKET]);
        }
        Some(server)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The `[store]` table of a project using this server under `prefix`.
    fn store_table(&self, prefix: &str) -> String {
        match self.backend {
            Backend::S3 => format!(
                "[store]\nurl = \"store\"\nremote = \"s3://{BUCKET}/{prefix}\"\nendpoint = \"http://127.0.0.1:{}\"\nregion = \"us-east-1\"\n",
                self.port
            ),
            Backend::Azure => format!(
                "[store]\nurl = \"store\"\nremote = \"az://{BUCKET}/{prefix}\"\nendpoint = \"http://127.0.0.1:{}/{AZURITE_ACCOUNT}\"\n",
                self.port
            ),
        }
    }

    /// Credentials, from the environment as on a real machine.
    fn credentials(&self) -> Vec<(String, String)> {
        let pairs = match self.backend {
            Backend::S3 => [
                ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
                ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ],
            Backend::Azure => [
                ("AZURE_STORAGE_ACCOUNT_NAME", AZURITE_ACCOUNT),
                ("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY),
            ],
        };
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The object's file in the server's folder (s3s-fs keeps plain files).
    fn object(&self, prefix: &str, key: &str) -> PathBuf {
        assert_eq!(
            self.backend,
            Backend::S3,
            "only s3s-fs stores objects as plain files"
        );
        self.root.path().join(BUCKET).join(prefix).join(key)
    }

    /// Objects stored under `prefix/sub`.
    fn count(&self, prefix: &str, sub: &str) -> usize {
        match self.backend {
            Backend::S3 => {
                let dir = self.object(prefix, sub);
                if dir.is_dir() {
                    files_under(&dir).len()
                } else {
                    0
                }
            }
            Backend::Azure => {
                let under = format!("{prefix}/{sub}");
                self.azurite(&["list", BUCKET, under.trim_end_matches('/')])
                    .trim()
                    .parse()
                    .unwrap()
            }
        }
    }

    /// Runs the Azurite helper (`create CONTAINER`, `list CONTAINER PREFIX`).
    fn azurite(&self, args: &[&str]) -> String {
        let out = Command::new("node")
            .arg("-e")
            .arg(AZURITE_HELPER)
            .arg(self.port.to_string())
            .args(args)
            .output()
            .expect("node runs Azurite");
        assert!(
            out.status.success(),
            "azurite helper {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Container requests the engine never makes (create one, count blobs under
/// a prefix), signed with the shared key as Azure wants; Node is there
/// whenever Azurite is.
const AZURITE_HELPER: &str = r#"
const http = require('http'), crypto = require('crypto');
const [port, cmd, container, prefix] = process.argv.slice(1);
const account = 'devstoreaccount1';
const key = Buffer.from('Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==', 'base64');
const query = cmd === 'create' ? { restype: 'container' } : { comp: 'list', prefix: prefix || '', restype: 'container' };
const method = cmd === 'create' ? 'PUT' : 'GET';
const headers = { 'x-ms-date': new Date().toUTCString(), 'x-ms-version': '2021-08-06' };
const path = `/${account}/${container}`;
const canonical = Object.keys(headers).sort().map(h => `${h}:${headers[h]}\n`).join('')
  + `/${account}${path}` + Object.keys(query).sort().map(k => `\n${k}:${query[k]}`).join('');
const toSign = [method, '', '', '', '', '', '', '', '', '', '', ''].join('\n') + '\n' + canonical;
headers.Authorization = `SharedKey ${account}:` + crypto.createHmac('sha256', key).update(toSign, 'utf8').digest('base64');
if (method === 'PUT') headers['Content-Length'] = '0';
const qs = Object.keys(query).map(k => `${k}=${encodeURIComponent(query[k])}`).join('&');
http.request({ host: '127.0.0.1', port, method, path: `${path}?${qs}`, headers }, res => {
  let body = '';
  res.on('data', d => body += d);
  res.on('end', () => {
    if (res.statusCode >= 300) { console.error(`${method} ${path}: ${res.statusCode} ${body}`); process.exit(1); }
    if (cmd === 'list') console.log((body.match(/<Blob>/g) || []).length);
  });
}).on('error', e => { console.error(e.message); process.exit(1); }).end();
"#;

/// The first of `candidates` that is a file; else `None` with a message, or
/// a failure when `require` (set by `make test`) is "1".
fn find_tool(
    what: &str,
    candidates: Vec<Option<PathBuf>>,
    require: &str,
    how: &str,
) -> Option<PathBuf> {
    let found = candidates.into_iter().flatten().find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var(require).as_deref() != Ok("1"),
            "{what} not found: {how}"
        );
        eprintln!("SKIPPED: these tests need {what}: {how}");
    }
    found
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn s3s_fs_binary() -> Option<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_default();
    let candidates = vec![
        std::env::var("S3S_FS").ok().map(PathBuf::from),
        on_path("s3s-fs"),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/s3s-fs")),
        Some(Path::new(&home).join(".cargo/bin/s3s-fs")),
    ];
    let how = "cargo install s3s-fs --version 0.14.1 --locked --features binary --root .tools (`make test` does this); looked in S3S_FS, PATH, .tools/bin, ~/.cargo/bin";
    find_tool("s3s-fs", candidates, "MELANOFLOW_REQUIRE_S3", how)
}

fn azurite_binary() -> Option<PathBuf> {
    let candidates = vec![
        std::env::var("AZURITE_BLOB").ok().map(PathBuf::from),
        on_path("azurite-blob"),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/node_modules/.bin/azurite-blob")),
    ];
    let how = "npm install --prefix .tools azurite@3.35.0 (Node 20; `make test` does this); looked in AZURITE_BLOB, PATH, .tools/node_modules/.bin";
    find_tool(
        "Azurite (azurite-blob)",
        candidates,
        "MELANOFLOW_REQUIRE_AZURE",
        how,
    )
}

/// A project with the small pipeline, using the server's `prefix`.
fn project(server: &Server, prefix: &str) -> Project {
    let body = SMALL.replace("[store]\nurl = \"store\"\n", &server.store_table(prefix));
    assert_ne!(body, SMALL, "the fixture's [store] table changed shape");
    let mut p = Project::new(&body);
    p.env = server.credentials();
    p
}

/// A fresh clone of `p`: its pipeline and lock files only (and its credentials).
fn clone_of(p: &Project) -> Project {
    let mut c = Project::new(&std::fs::read_to_string(p.path("data/pipeline.toml")).unwrap());
    c.env = p.env.clone();
    c.write("data/pipeline.lock", p.lock());
    c
}

/// Relative path -> bytes of every file under `dir`.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    files_under(dir)
        .into_iter()
        .map(|f| {
            (
                f.strip_prefix(dir).unwrap().to_path_buf(),
                std::fs::read(&f).unwrap(),
            )
        })
        .collect()
}

/// One of synth's JPEGs: its store key, digest and bytes.
fn a_synth_blob(p: &Project) -> (String, String, Vec<u8>) {
    let jpeg = files_under(&p.path("data/out/synth"))
        .into_iter()
        .find(|f| f.extension().is_some_and(|e| e == "jpg"))
        .unwrap();
    let bytes = std::fs::read(&jpeg).unwrap();
    let hex = melanoflow_pipeline::Digest::of_bytes(&bytes).to_hex();
    (format!("blobs/{}/{}", &hex[..2], &hex[2..]), hex, bytes)
}

/// (files sent, files already there, objects) from a push or pull summary:
/// `pushed 5002 files (0 already there) as 3 objects for ...`.
fn counts(r: &crate::fixture::Run) -> (usize, usize, usize) {
    let words: Vec<&str> = r.stdout.split_whitespace().collect();
    let number = |w: &str| {
        w.trim_start_matches('(')
            .parse::<usize>()
            .unwrap_or_else(|_| panic!("no count in: {}", r.stdout))
    };
    (number(words[1]), number(words[3]), number(words[7]))
}

#[test]
fn s3_push_then_pull_into_a_fresh_clone_runs_every_stage_cached() {
    if let Some(server) = Server::start(Backend::S3) {
        push_then_pull(&server);
    }
}

#[test]
fn azure_push_then_pull_into_a_fresh_clone_runs_every_stage_cached() {
    if let Some(server) = Server::start(Backend::Azure) {
        push_then_pull(&server);
    }
}

fn push_then_pull(server: &Server) {
    let origin = project(server, "push-pull");
    // A read-only remote is never written, even by a run that computes.
    origin.ok(&["run", "--remote-read-only"]);
    assert_eq!(
        server.count("push-pull", ""),
        0,
        "a read-only run wrote to the remote"
    );
    let refused = origin.fails(&["push", "--remote-read-only"]);
    assert!(refused.stderr.contains("read-only"), "{}", refused.stderr);

    let pushed = origin.ok(&["push"]);
    let (files, present, objects) = counts(&pushed);
    assert!(
        files > 300 && present == 0,
        "synth's 300 images and more: {}",
        pushed.stdout
    );
    assert!(
        objects < 10,
        "small files travel in packs, not one object each: {}",
        pushed.stdout
    );
    assert!(server.count("push-pull", "packs") >= 1 && server.count("push-pull", "runs") == 2);
    let again = origin.ok(&["push"]);
    assert_eq!(
        counts(&again),
        (0, files, 2),
        "a second push sends only the run records: {}",
        again.stdout
    );

    let clone = clone_of(&origin);
    let pulled = clone.ok(&["pull"]);
    assert!(
        pulled.stdout.contains("checked out 2 output folder(s)"),
        "{}",
        pulled.stdout
    );
    let run = clone.ok(&["run"]);
    assert_eq!(
        (run.state("synth"), run.state("ingest")),
        ("cached".into(), "cached".into()),
        "{}",
        run.stdout
    );
    assert_eq!(
        snapshot(&clone.path("data/out/synth")),
        snapshot(&origin.path("data/out/synth"))
    );
    assert_eq!(
        snapshot(&clone.path("data/out/ingest")),
        snapshot(&origin.path("data/out/ingest"))
    );
    assert_eq!(clone.lock(), origin.lock());

    // Without `pull`, a run finds the results on the remote by itself.
    let lazy = clone_of(&origin);
    let run = lazy.ok(&["run"]);
    assert!(run.stdout.contains("2 restored"), "{}", run.stdout);
    assert_eq!(
        snapshot(&lazy.path("data/out/ingest")),
        snapshot(&origin.path("data/out/ingest"))
    );
}

/// `import` makes a folder of existing files a stage output, so `push` sends
/// it and `pull` brings it into a clone that never had the folder. Its two
/// 17 MiB files take the streamed path (several at once, pulled straight
/// into the store's folder); a corrupt one is named, never stored, and
/// leaves no partial file behind.
#[test]
fn an_imported_folder_travels_with_push_and_pull() {
    let Some(server) = Server::start(Backend::S3) else {
        return;
    };
    let body = format!(
        "{}\n[stages.raw]\nkind = \"import\"\npath = \"raw\"\n",
        server.store_table("import")
    );
    let mut origin = Project::new(&body);
    origin.env = server.credentials();
    let big = |seed: u32| -> Vec<u8> {
        (0..17u32 << 20)
            .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    };
    origin.write("data/raw/big1.bin", big(1));
    origin.write("data/raw/big2.bin", big(2));
    origin.write("data/raw/notes/small.txt", "a small file\n");
    // (A read-only run, so that `push` is what uploads.)
    origin.ok(&["run", "--remote-read-only"]);
    let pushed = origin.ok(&["push"]);
    let (files, present, _) = counts(&pushed);
    assert!(files >= 3 && present == 0, "{}", pushed.stdout);

    let clone = clone_of(&origin);
    assert!(!clone.path("data/raw").exists());
    let pulled = clone.ok(&["pull"]);
    assert!(
        pulled.stdout.contains("checked out 1 output folder(s)"),
        "{}",
        pulled.stdout
    );
    assert_eq!(
        snapshot(&clone.path("data/out/raw")),
        snapshot(&origin.path("data/out/raw"))
    );
    assert_eq!(
        std::fs::read(clone.path("data/out/raw/big2.bin")).unwrap(),
        big(2)
    );

    // One byte of a large blob flipped on the server.
    let blob = files_under(&server.object("import", "blobs"))
        .into_iter()
        .find(|f| std::fs::metadata(f).unwrap().len() == 17 << 20)
        .expect("the large files travel as blobs of their own");
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[5 << 20] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let fresh = clone_of(&origin);
    let failed = fresh.fails(&["pull"]);
    assert!(failed.stderr.contains("corrupt"), "{}", failed.stderr);
    assert!(!fresh.path("data/out/raw").exists());
    let leftovers: Vec<_> = files_under(&fresh.path("data/store"))
        .into_iter()
        .filter(|f| {
            std::fs::metadata(f).unwrap().len() >= 17 << 20
                || f.to_string_lossy().contains(".pull.")
        })
        .collect();
    assert!(
        leftovers.len() <= 1,
        "at most the intact large blob is stored, no partial file: {leftovers:?}"
    );
}

#[test]
fn a_corrupted_blob_is_named_never_materialised_and_repaired() {
    let Some(server) = Server::start(Backend::S3) else {
        return;
    };
    let origin = project(&server, "corrupt");
    origin.ok(&["run"]);
    let (key, hex, jpeg) = a_synth_blob(&origin);
    let len = jpeg.len();
    // Damage that image's bytes inside the pack that carries it.
    let pack = files_under(&server.object("corrupt", "packs"))
        .into_iter()
        .find(|f| {
            std::fs::read(f)
                .unwrap()
                .windows(len)
                .any(|w| w == jpeg.as_slice())
        })
        .expect("the image travels in a pack");
    let mut bytes = std::fs::read(&pack).unwrap();
    let at = bytes
        .windows(len)
        .position(|w| w == jpeg.as_slice())
        .unwrap()
        + len / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&pack, bytes).unwrap();

    let clone = clone_of(&origin);
    let failed = clone.fails(&["pull"]);
    assert!(
        failed.stderr.contains(&hex) && failed.stderr.contains("corrupt"),
        "{}",
        failed.stderr
    );
    assert!(
        !clone.path("data/out/synth").exists(),
        "nothing is materialised from a corrupt remote"
    );
    assert!(
        !clone.path(&format!("data/store/{key}")).exists(),
        "the corrupt blob is not stored locally"
    );
    assert!(
        !pack.exists(),
        "the corrupt pack is removed from the (writable) remote"
    );

    // The origin has a good copy: push repairs the remote, pull then succeeds.
    let repaired = origin.ok(&["push"]);
    assert!(
        counts(&repaired).0 > 0,
        "the pack is sent again: {}",
        repaired.stdout
    );
    clone.ok(&["pull"]);
    assert_eq!(
        snapshot(&clone.path("data/out/synth")),
        snapshot(&origin.path("data/out/synth"))
    );

    // A corrupt local copy is replaced by the next pull.
    let local = clone.path(&format!("data/store/{key}"));
    std::fs::write(&local, vec![0x5a; len]).unwrap();
    std::fs::remove_dir_all(clone.path("data/out/synth")).unwrap();
    clone.ok(&["pull"]);
    assert_eq!(
        melanoflow_pipeline::Digest::of_bytes(&std::fs::read(&local).unwrap()).to_hex(),
        hex
    );
    assert_eq!(
        snapshot(&clone.path("data/out/synth")),
        snapshot(&origin.path("data/out/synth"))
    );
}

#[test]
fn s3_server_that_is_down_is_a_clear_error_and_local_results_are_untouched() {
    if let Some(server) = Server::start(Backend::S3) {
        server_down(server);
    }
}

#[test]
fn azure_server_that_is_down_is_a_clear_error_and_local_results_are_untouched() {
    if let Some(server) = Server::start(Backend::Azure) {
        server_down(server);
    }
}

fn server_down(mut server: Server) {
    let origin = project(&server, "down");
    origin.ok(&["run", "--remote-read-only"]);
    server.stop();
    let stored = || {
        [
            snapshot(&origin.path("data/store/blobs")),
            snapshot(&origin.path("data/store/runs")),
        ]
        .concat()
    };
    let store_before = stored();
    let lock_before = origin.lock();

    let push = origin.fails(&["push"]);
    let endpoint = format!("127.0.0.1:{}", server.port);
    assert!(
        push.stderr.contains(&endpoint) && push.stderr.contains("Connection refused"),
        "{}",
        push.stderr
    );
    let pull = clone_of(&origin).fails(&["pull"]);
    assert!(pull.stderr.contains(&endpoint), "{}", pull.stderr);
    // A forced re-run computes, then cannot upload: it fails and commits nothing.
    let forced = origin.fails(&["run", "--force", "ingest"]);
    assert!(forced.stderr.contains(&endpoint), "{}", forced.stderr);

    assert_eq!(origin.lock(), lock_before);
    let store_after = stored();
    assert!(
        store_before.iter().all(|f| store_after.contains(f)),
        "a stored blob or record was lost or changed"
    );
    let run = origin.ok(&["run"]);
    assert!(
        run.stdout.contains("2 cached"),
        "up-to-date stages need no remote: {}",
        run.stdout
    );
}

#[test]
fn a_push_that_stops_partway_is_finished_by_a_clean_retry() {
    let Some(server) = Server::start(Backend::S3) else {
        return;
    };
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
    assert!(
        server.count("partway", "packs") >= 1,
        "the packs went up before the stop"
    );
    assert_eq!(
        server.count("partway", "runs"),
        0,
        "run records go last: none may be visible after a stopped push"
    );
    for pack in files_under(&server.object("partway", "packs")) {
        assert!(std::fs::metadata(&pack).unwrap().len() > 0);
    }
    // A clone cannot use a half-pushed result, and says so.
    let early = clone_of(&origin).fails(&["pull"]);
    assert!(
        early
            .stderr
            .contains("push it from the machine that ran it"),
        "{}",
        early.stderr
    );

    std::fs::remove_file(&blocker).unwrap();
    let retry = origin.ok(&["push"]);
    let (files, present, _) = counts(&retry);
    assert!(
        files == 2 && present > 300,
        "the retry sends only the two manifests (and the records): {}",
        retry.stdout
    );
    let clone = clone_of(&origin);
    clone.ok(&["pull"]);
    assert!(clone.ok(&["run"]).stdout.contains("2 cached"));
}
