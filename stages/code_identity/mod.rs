//! Each stage module's code identity: a digest of the sources that compute
//! its bytes and of the locked crate versions they use, derived at build time
//! (`stages/build.rs`, rules in the header of `scan.rs`). A stage kind hands its
//! module's constant to the engine as `Stage::CODE`, which puts it in the
//! fingerprint: change what a stage computes and it re-runs, with no version
//! number to remember. Comments, formatting and tests do not count.

include!(concat!(env!("OUT_DIR"), "/code_identity.rs"));

#[cfg(test)]
mod scan;
#[cfg(test)]
mod tests;
