//! melanoflow's engine: declarative, content-hashed stages.
//!
//! A pipeline file declares stages (kind, upstream inputs, parameters). The
//! engine validates it ([`config`]), orders it ([`dag`]), fingerprints each
//! stage from its kind, code version, parameters, upstream output digests and
//! external file digests ([`fingerprint`]), and runs only the stages whose
//! fingerprint has no result yet ([`runner`]). Outputs are content-addressed
//! blobs in a store behind one trait over `object_store` ([`store`],
//! [`artifacts`]); the lock file records what each stage last produced
//! ([`lockfile`]). No ML dependencies live here.

// The engine's errors carry their context inline (file, line, key, store
// location), so they are larger than clippy's 128-byte threshold. They are
// the cold path of every call that returns them; boxing each variant would
// cost an allocation and a layer of indirection for no measurable gain.
#![allow(clippy::result_large_err)]

pub mod artifacts;
pub mod cli;
pub mod config;
pub mod context;
pub mod dag;
pub mod digest;
pub mod error;
pub mod experiments;
pub mod filecache;
pub mod fingerprint;
pub mod fsutil;
pub mod golden;
pub mod lockfile;
pub mod maintenance;
pub mod manifest;
pub mod packs;
pub mod registry;
pub mod remote;
pub mod runlock;
pub mod runner;
pub mod share;
pub mod slurm;
pub mod store;
pub mod sync;

pub use context::{ExternalFiles, Progress, StageContext, StageReport, Upstream};
pub use digest::Digest;
pub use error::{Error, Result};
pub use registry::{BoxError, ExternalInput, Registry, Resources, Source, Stage};
