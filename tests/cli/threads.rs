//! Same fingerprint, same bytes, on any thread count: `data/ci_small.toml`
//! from an empty store with `RAYON_NUM_THREADS` = 1, 2 and 7 writes the same
//! output digest for every stage (the kernels and stages split reductions by
//! the problem's shape, never by the number of threads).

use std::collections::BTreeMap;

use crate::fixture::*;

const CI_PIPELINE: &str = include_str!("../../data/ci_small.toml");

/// `stage -> output digest` from a lock file's text.
fn outputs(lock: &str) -> BTreeMap<String, String> {
    let lock: toml::Table = toml::from_str(lock).expect("lock file parses");
    let stages = lock["stages"].as_table().expect("[stages]");
    stages
        .iter()
        .map(|(name, entry)| {
            let output = entry["output"].as_str().expect("output digest");
            (name.clone(), output.to_string())
        })
        .collect()
}

#[test]
fn ci_small_writes_the_same_bytes_at_1_2_and_7_threads() {
    let pipeline: toml::Table = toml::from_str(CI_PIPELINE).unwrap();
    let mut stages: Vec<&String> = pipeline["stages"].as_table().unwrap().keys().collect();
    stages.sort();
    let runs: Vec<(usize, BTreeMap<String, String>)> = [1, 2, 7]
        .into_iter()
        .map(|threads| {
            let mut p = Project::new(CI_PIPELINE);
            p.env
                .push(("RAYON_NUM_THREADS".into(), threads.to_string()));
            p.ok(&["run", "-q"]);
            (threads, outputs(&p.lock()))
        })
        .collect();
    for (threads, lock) in &runs {
        let got: Vec<&String> = lock.keys().collect();
        assert_eq!(got, stages, "{threads} threads: the lock lists every stage");
    }
    let (_, first) = &runs[0];
    let mut differ = Vec::new();
    for (stage, digest) in first {
        for (threads, lock) in &runs[1..] {
            if &lock[stage] != digest {
                differ.push(format!(
                    "{stage}: 1 thread {digest}, {threads} threads {}",
                    lock[stage]
                ));
            }
        }
    }
    assert!(
        differ.is_empty(),
        "outputs depend on the thread count:\n{}",
        differ.join("\n")
    );
}
