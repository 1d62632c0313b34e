//! End-to-end tests: the real `melanoflow` binary in a temporary project
//! folder, on small configurations (ripgrep's habit: one integration-test
//! binary, one fixture).

mod fixture;

mod classifier;
mod cyclegan;
mod engine;
mod experiments;
mod fidelity;
mod golden;
mod gpu_check;
mod import;
mod ingest;
mod preprocess;
mod realdata;
mod remote;
mod slurm;
mod threads;
