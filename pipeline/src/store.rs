//! Blob storage: one narrow trait, implemented once over `object_store`, so the
//! local filesystem (default), memory (tests), S3 and Azure Blob Storage (by
//! URL) behave the same. Keys are `/`-separated strings; the layout of keys
//! belongs to the artifact layer (`artifacts.rs`), not to the store.
//!
//! Promises: a missing key is `Ok(None)` / `Ok(false)`, never an error; `put`
//! and `put_file` are atomic (a reader never sees half an object: the local
//! store writes a temporary file and renames it, object stores publish on
//! completion); `get_to_file` writes the destination only when the whole object
//! arrived.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, WriteMultipart,
};
use std::collections::HashMap;
use std::time::Duration;

use crate::config::RemoteConfig;

/// Files at least this large are uploaded in parts instead of read into memory.
const MULTIPART_THRESHOLD: u64 = 64 * 1024 * 1024;
const PART_SIZE: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {store}: {op} `{key}` failed")]
    Backend {
        store: String,
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("store {store}: {op} `{key}`: {path}")]
    Io {
        store: String,
        op: &'static str,
        key: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store URL `{url}` is not usable")]
    Url {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Where blobs live. Implemented once, by [`ObjectBlobStore`].
pub trait BlobStore: Send + Sync {
    /// A human-readable location, for messages.
    fn describe(&self) -> String;
    /// The local directory holding the store, when it is on this machine.
    fn local_root(&self) -> Option<&Path>;
    fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError>;
    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.size(key)?.is_some())
    }
    /// The object's size, `None` when absent.
    fn size(&self, key: &str) -> Result<Option<u64>, StoreError>;
    fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError>;
    /// Writes `bytes` unless `key` exists; `Ok(false)` when it did. Atomic
    /// where the backend supports create-only writes (local files, memory,
    /// S3 with conditional puts), else a check then a write.
    fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<bool, StoreError>;
    /// Uploads a file, streaming large ones.
    fn put_file(&self, key: &str, file: &Path) -> Result<(), StoreError>;
    /// Downloads to `dest` (atomically); `Ok(false)` when the key is missing.
    fn get_to_file(&self, key: &str, dest: &Path) -> Result<bool, StoreError>;
    /// Every key under `prefix`.
    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    fn delete(&self, key: &str) -> Result<(), StoreError>;
}

/// The one [`BlobStore`]: any `object_store` backend plus a key prefix, driven
/// from synchronous code through a private tokio runtime.
pub struct ObjectBlobStore {
    inner: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    describe: String,
    local_root: Option<PathBuf>,
    runtime: tokio::runtime::Runtime,
}

impl ObjectBlobStore {
    /// Opens a store from the pipeline file's `store.url` (or an external
    /// input folder): a plain path (relative to `base`), `file://`,
    /// `memory://`, `s3://bucket/prefix` or `az://container/prefix`
    /// (credentials from the environment). Any other scheme is an error
    /// naming these ([`SCHEMES`]).
    pub fn open(url: &str, base: &Path) -> Result<Self, StoreError> {
        let url_err = |e: Box<dyn std::error::Error + Send + Sync>| StoreError::Url {
            url: url.to_string(),
            source: e,
        };
        if url == "memory://" || url.starts_with("memory://") {
            return Ok(Self::with(
                Arc::new(InMemory::new()),
                ObjPath::default(),
                url.into(),
                None,
            ));
        }
        if let Some(rest) = url.strip_prefix("file://") {
            return Self::local(&base.join(rest));
        }
        if !url.contains("://") {
            return Self::local(&base.join(url));
        }
        cloud_scheme(url)?;
        let parsed = url::Url::parse(url).map_err(|e| url_err(Box::new(e)))?;
        let env = std::env::vars().map(|(k, v)| (k.to_ascii_lowercase(), v));
        let (store, prefix) =
            object_store::parse_url_opts(&parsed, env).map_err(|e| url_err(Box::new(e)))?;
        Ok(Self::with(Arc::from(store), prefix, url.into(), None))
    }

    /// Opens a remote store (`[store] remote`): like [`Self::open`], plus an
    /// `endpoint` (an S3-compatible server, an Azure endpoint or the Azurite
    /// emulator's `http://HOST:PORT/ACCOUNT`) and an S3 `region`. Credentials
    /// come from the environment (`AWS_ACCESS_KEY_ID`, ...;
    /// `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, ...).
    /// Requests give up after a few retries so an unreachable server is a
    /// prompt error, not minutes of back-off.
    pub fn open_remote(remote: &RemoteConfig, base: &Path) -> Result<Self, StoreError> {
        let url = remote.url.as_str();
        let url_err = |e: Box<dyn std::error::Error + Send + Sync>| StoreError::Url {
            url: url.to_string(),
            source: e,
        };
        if !url.contains("://") || url.starts_with("file://") || url.starts_with("memory://") {
            if remote.endpoint.is_some() || remote.region.is_some() {
                return Err(url_err(
                    "`endpoint` and `region` apply to s3:// and az:// remotes only".into(),
                ));
            }
            return Self::open(url, base);
        }
        let scheme = cloud_scheme(url)?;
        if remote.region.is_some() && scheme == Cloud::Azure {
            return Err(url_err("`region` applies to s3:// remotes only".into()));
        }
        let parsed = url::Url::parse(url).map_err(|e| url_err(Box::new(e)))?;
        let prefix = ObjPath::from_url_path(parsed.path()).map_err(|e| url_err(Box::new(e)))?;
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: Duration::from_secs(20),
        };
        let http = remote
            .endpoint
            .as_ref()
            .is_some_and(|e| e.starts_with("http://"));
        let options = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_allow_http(http);
        let store: Arc<dyn ObjectStore> = match scheme {
            Cloud::S3 => {
                let mut builder = AmazonS3Builder::from_env()
                    .with_url(url)
                    .with_retry(retry)
                    .with_client_options(options);
                if let Some(endpoint) = &remote.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(region) = &remote.region {
                    builder = builder.with_region(region);
                }
                Arc::new(builder.build().map_err(|e| url_err(Box::new(e)))?)
            }
            Cloud::Azure => {
                let mut builder = MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .with_retry(retry)
                    .with_client_options(options);
                if let Some(endpoint) = &remote.endpoint {
                    builder = builder.with_endpoint(endpoint.clone());
                }
                Arc::new(builder.build().map_err(|e| url_err(Box::new(e)))?)
            }
        };
        let describe = match &remote.endpoint {
            Some(e) => format!("{url} (at {e})"),
            None => url.to_string(),
        };
        Ok(Self::with(store, prefix, describe, None))
    }

    /// A store in a local directory (created if missing).
    pub fn local(root: &Path) -> Result<Self, StoreError> {
        let io = |e| StoreError::Io {
            store: root.display().to_string(),
            op: "create",
            key: String::new(),
            path: root.into(),
            source: e,
        };
        std::fs::create_dir_all(root).map_err(io)?;
        let root = root.canonicalize().map_err(io)?;
        let fs = LocalFileSystem::new_with_prefix(&root).map_err(|e| StoreError::Backend {
            store: root.display().to_string(),
            op: "open",
            key: String::new(),
            source: e,
        })?;
        Ok(Self::with(
            Arc::new(fs),
            ObjPath::default(),
            root.display().to_string(),
            Some(root),
        ))
    }

    /// An empty in-memory store (tests).
    pub fn memory() -> Self {
        Self::with(
            Arc::new(InMemory::new()),
            ObjPath::default(),
            "memory://".into(),
            None,
        )
    }

    fn with(
        inner: Arc<dyn ObjectStore>,
        prefix: ObjPath,
        describe: String,
        local_root: Option<PathBuf>,
    ) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        ObjectBlobStore {
            inner,
            prefix,
            describe,
            local_root,
            runtime,
        }
    }

    fn path(&self, key: &str) -> ObjPath {
        key.split('/')
            .fold(self.prefix.clone(), |p, part| p.join(part))
    }

    fn backend(&self, op: &'static str, key: &str, source: object_store::Error) -> StoreError {
        StoreError::Backend {
            store: self.describe.clone(),
            op,
            key: key.into(),
            source,
        }
    }

    fn io(&self, op: &'static str, key: &str, path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            store: self.describe.clone(),
            op,
            key: key.into(),
            path: path.into(),
            source,
        }
    }
}

/// What a store URL may be; each object-store scheme is tested against a
/// real server on loopback (s3s-fs, Azurite). `gs://` is not among them: no
/// GCS emulator that speaks the XML API `object_store` uses could be run in
/// the tests, so it is refused rather than shipped untested.
pub const SCHEMES: &str = "a folder (a path or file://), s3://BUCKET/PREFIX, az://CONTAINER/PREFIX (or memory:// in tests)";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cloud {
    S3,
    Azure,
}

/// The object store a `SCHEME://` URL names, or an error listing the
/// schemes that work.
fn cloud_scheme(url: &str) -> Result<Cloud, StoreError> {
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    match scheme.to_ascii_lowercase().as_str() {
        "s3" | "s3a" => Ok(Cloud::S3),
        "az" => Ok(Cloud::Azure),
        _ => Err(StoreError::Url {
            url: url.into(),
            source: format!("unsupported scheme `{scheme}://`; a store is {SCHEMES}").into(),
        }),
    }
}

/// An object under a store's prefix, as listed.
#[derive(Clone, Debug)]
pub struct ObjectInfo {
    /// Key relative to the store's prefix, `/`-separated.
    pub key: String,
    pub size: u64,
    /// What changes when the object is rewritten: its ETag, else its mtime.
    pub version: String,
}

impl ObjectBlobStore {
    /// Every object under the prefix, with size and version, sorted by key.
    pub fn list_objects(&self) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut out = self.list_under("")?;
        out.retain(|o| !o.key.split('/').any(|part| part.starts_with('.')));
        Ok(out)
    }

    /// Objects under `prefix` (relative to the store's), keys relative to the
    /// store's prefix, sorted.
    fn list_under(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let path = match prefix.trim_end_matches('/') {
            "" => self.prefix.clone(),
            p => self.path(p),
        };
        let metas = self
            .runtime
            .block_on(self.inner.list(Some(&path)).try_collect::<Vec<_>>())
            .map_err(|e| self.backend("list", prefix, e))?;
        let mut out: Vec<ObjectInfo> = metas
            .into_iter()
            .map(|m| ObjectInfo {
                key: self.relative_key(&m),
                size: m.size,
                version: m
                    .e_tag
                    .clone()
                    .unwrap_or_else(|| m.last_modified.to_rfc3339()),
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Fetches several objects with up to `concurrency` requests in flight;
    /// results in the order of `keys`, `None` for a missing key.
    pub fn get_many(
        &self,
        keys: &[&str],
        concurrency: usize,
    ) -> Result<Vec<Option<Bytes>>, StoreError> {
        self.runtime.block_on(async {
            futures::stream::iter(keys.iter().map(|key| async move {
                match self.inner.get(&self.path(key)).await {
                    Ok(got) => got
                        .bytes()
                        .await
                        .map(Some)
                        .map_err(|e| self.backend("get", key, e)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(self.backend("get", key, e)),
                }
            }))
            .buffered(concurrency.max(1))
            .try_collect()
            .await
        })
    }

    /// Uploads several objects with up to `concurrency` requests in flight.
    /// Each object is published whole or not at all.
    pub fn put_many(
        &self,
        items: Vec<(String, Bytes)>,
        concurrency: usize,
    ) -> Result<(), StoreError> {
        self.runtime.block_on(async {
            futures::stream::iter(items.into_iter().map(|(key, bytes)| async move {
                let path = self.path(&key);
                self.inner
                    .put(&path, PutPayload::from_bytes(bytes))
                    .await
                    .map(|_| ())
                    .map_err(|e| self.backend("put", &key, e))
            }))
            .buffer_unordered(concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
        })
    }

    /// Sizes of several keys (`None` when absent), with up to `concurrency`
    /// HEAD requests in flight; in the order of `keys`.
    pub fn size_many(
        &self,
        keys: &[String],
        concurrency: usize,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        self.runtime.block_on(async {
            futures::stream::iter(keys.iter().map(|key| self.head_size(key)))
                .buffered(concurrency.max(1))
                .try_collect()
                .await
        })
    }

    /// Every object under each of `prefixes` (one listing each, concurrently):
    /// key -> size. One request per 1,000 keys instead of one per key.
    pub fn list_sizes(
        &self,
        prefixes: &[String],
        concurrency: usize,
    ) -> Result<HashMap<String, u64>, StoreError> {
        let lists: Vec<Vec<object_store::ObjectMeta>> = self.runtime.block_on(async {
            futures::stream::iter(prefixes.iter().map(|p| async move {
                self.inner
                    .list(Some(&self.path(p)))
                    .try_collect::<Vec<_>>()
                    .await
                    .map_err(|e| self.backend("list", p, e))
            }))
            .buffer_unordered(concurrency.max(1))
            .try_collect()
            .await
        })?;
        Ok(lists
            .into_iter()
            .flatten()
            .map(|m| (self.relative_key(&m), m.size))
            .collect())
    }

    /// A listed object's key relative to the store's prefix.
    fn relative_key(&self, m: &object_store::ObjectMeta) -> String {
        m.location.as_ref()[self.prefix.as_ref().len()..]
            .trim_start_matches('/')
            .to_string()
    }

    async fn head_size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self.inner.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.backend("head", key, e)),
        }
    }
}

impl BlobStore for ObjectBlobStore {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn local_root(&self) -> Option<&Path> {
        self.local_root.as_deref()
    }

    fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let path = self.path(key);
        self.runtime
            .block_on(async {
                match self.inner.get(&path).await {
                    Ok(r) => r.bytes().await.map(Some),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .map_err(|e| self.backend("get", key, e))
    }

    fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.runtime.block_on(self.head_size(key))
    }

    fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = self.path(key);
        self.runtime
            .block_on(self.inner.put(&path, PutPayload::from_bytes(bytes)))
            .map(|_| ())
            .map_err(|e| self.backend("put", key, e))
    }

    fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<bool, StoreError> {
        let path = self.path(key);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self.runtime.block_on(self.inner.put_opts(
            &path,
            PutPayload::from_bytes(bytes.clone()),
            opts,
        )) {
            Ok(_) => Ok(true),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(false),
            Err(object_store::Error::NotImplemented { .. }) => {
                if self.exists(key)? {
                    return Ok(false);
                }
                self.put(key, bytes).map(|()| true)
            }
            Err(e) => Err(self.backend("put", key, e)),
        }
    }

    fn put_file(&self, key: &str, file: &Path) -> Result<(), StoreError> {
        let len = std::fs::metadata(file)
            .map_err(|e| self.io("put", key, file, e))?
            .len();
        if len < MULTIPART_THRESHOLD {
            let bytes = std::fs::read(file).map_err(|e| self.io("put", key, file, e))?;
            return self.put(key, Bytes::from(bytes));
        }
        let path = self.path(key);
        self.runtime.block_on(async {
            let upload = self
                .inner
                .put_multipart(&path)
                .await
                .map_err(|e| self.backend("put", key, e))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            let mut f = std::fs::File::open(file).map_err(|e| self.io("put", key, file, e))?;
            let mut buf = vec![0u8; PART_SIZE];
            loop {
                let n = f.read(&mut buf).map_err(|e| self.io("put", key, file, e))?;
                if n == 0 {
                    break;
                }
                writer
                    .wait_for_capacity(4)
                    .await
                    .map_err(|e| self.backend("put", key, e))?;
                writer.write(&buf[..n]);
            }
            writer
                .finish()
                .await
                .map(|_| ())
                .map_err(|e| self.backend("put", key, e))
        })
    }

    fn get_to_file(&self, key: &str, dest: &Path) -> Result<bool, StoreError> {
        use std::io::Write;
        let path = self.path(key);
        let dir = dest.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| self.io("get", key, dest, e))?;
        let tmp = dir.join(format!(
            ".{}.part.{}",
            dest.file_name().and_then(|n| n.to_str()).unwrap_or("blob"),
            std::process::id()
        ));
        let result = self.runtime.block_on(async {
            let got = match self.inner.get(&path).await {
                Ok(r) => r,
                Err(object_store::Error::NotFound { .. }) => return Ok(false),
                Err(e) => return Err(self.backend("get", key, e)),
            };
            let mut out = std::fs::File::create(&tmp).map_err(|e| self.io("get", key, &tmp, e))?;
            let mut stream = got.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.backend("get", key, e))?;
                out.write_all(&chunk)
                    .map_err(|e| self.io("get", key, &tmp, e))?;
            }
            out.sync_all().map_err(|e| self.io("get", key, &tmp, e))?;
            std::fs::rename(&tmp, dest).map_err(|e| self.io("get", key, dest, e))?;
            Ok(true)
        });
        if !matches!(result, Ok(true)) {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .list_under(prefix)?
            .into_iter()
            .map(|o| o.key)
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key);
        match self.runtime.block_on(self.inner.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.backend("delete", key, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(store: &dyn BlobStore, scratch: &Path) {
        assert_eq!(
            store.get("blobs/missing").unwrap(),
            None,
            "a miss is Ok(None)"
        );
        assert!(!store.exists("blobs/missing").unwrap());
        store
            .put("blobs/ab/cd", Bytes::from_static(b"hello"))
            .unwrap();
        assert!(store.exists("blobs/ab/cd").unwrap());
        assert_eq!(
            store.get("blobs/ab/cd").unwrap().unwrap(),
            Bytes::from_static(b"hello")
        );
        let src = scratch.join("src");
        std::fs::write(&src, b"file bytes").unwrap();
        store.put_file("runs/x.json", &src).unwrap();
        let dest = scratch.join("out/dest");
        assert!(store.get_to_file("runs/x.json", &dest).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"file bytes");
        assert!(
            !store
                .get_to_file("runs/none", &scratch.join("none"))
                .unwrap()
        );
        assert!(!scratch.join("none").exists(), "a miss writes nothing");
        assert_eq!(
            store.list("blobs").unwrap(),
            vec!["blobs/ab/cd".to_string()]
        );
        assert_eq!(
            store.list("runs/").unwrap(),
            vec!["runs/x.json".to_string()]
        );
        assert!(
            store.size("runs/x.json").unwrap() == Some(10)
                && store.size("runs/none").unwrap().is_none()
        );
        assert!(
            store
                .put_if_absent("runs/once", Bytes::from_static(b"first"))
                .unwrap()
        );
        assert!(
            !store
                .put_if_absent("runs/once", Bytes::from_static(b"second"))
                .unwrap()
        );
        assert_eq!(
            store.get("runs/once").unwrap().unwrap(),
            Bytes::from_static(b"first")
        );
        store.delete("blobs/ab/cd").unwrap();
        store.delete("blobs/ab/cd").unwrap();
        assert_eq!(store.get("blobs/ab/cd").unwrap(), None);
    }

    #[test]
    fn memory_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        exercise(&ObjectBlobStore::memory(), dir.path());
    }

    #[test]
    fn local_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectBlobStore::open("store", dir.path()).unwrap();
        assert_eq!(
            store.local_root().unwrap(),
            dir.path().join("store").canonicalize().unwrap()
        );
        exercise(&store, dir.path());
    }

    #[test]
    fn bad_url_is_a_clear_error() {
        let err = ObjectBlobStore::open("nosuch://bucket/x", Path::new("."))
            .err()
            .unwrap();
        assert!(err.to_string().contains("nosuch://bucket/x"), "{err}");
        // An untested scheme is refused, naming the ones that work.
        for url in ["gs://bucket/x", "http://host/x", "abfs://c/x"] {
            let err = ObjectBlobStore::open(url, Path::new(".")).err().unwrap();
            let remote = RemoteConfig {
                url: url.into(),
                endpoint: None,
                region: None,
                read_only: false,
            };
            let err_remote = ObjectBlobStore::open_remote(&remote, Path::new("."))
                .err()
                .unwrap();
            for e in [err, err_remote] {
                let chain = crate::error::chain(&e);
                assert!(
                    chain.contains(url)
                        && chain.contains("unsupported scheme")
                        && chain.contains("s3://")
                        && chain.contains("az://"),
                    "{chain}"
                );
            }
        }
    }

    #[test]
    fn azure_remotes_take_no_region() {
        let remote = RemoteConfig {
            url: "az://container/prefix".into(),
            endpoint: None,
            region: Some("eu-west-1".into()),
            read_only: false,
        };
        let err = ObjectBlobStore::open_remote(&remote, Path::new("."))
            .err()
            .unwrap();
        assert!(
            crate::error::chain(&err).contains("`region` applies to s3:// remotes only"),
            "{err}"
        );
        let local = RemoteConfig {
            url: "elsewhere".into(),
            endpoint: Some("http://x".into()),
            region: None,
            read_only: false,
        };
        assert!(
            crate::error::chain(
                &ObjectBlobStore::open_remote(&local, Path::new("."))
                    .err()
                    .unwrap()
            )
            .contains("s3:// and az://")
        );
    }
}
