//! Same fingerprint, same bytes, on any thread count: `data/ci_small.toml`
//! from an empty store with `RAYON_NUM_THREADS` = 1, 2 and 7 writes the same
//! output digest for every stage (the kernels and stages split reductions by
//! the problem's shape, never by the number of threads).

use crate::fixture::*;

const CI_PIPELINE: &str = include_str!("../../data/ci_small.toml");

/// `stage -> output digest` from a lock file's text, in file order.
fn outputs(lock: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stage: Option<String> = None;
    for line in lock.lines() {
        let line = line.trim();
        if let Some(header) = line
            .strip_prefix("[stages.")
            .and_then(|l| l.strip_suffix(']'))
        {
            // `[stages.gan]` opens a stage; `[stages.gan.params]` a sub-table.
            stage = (!header.contains('.')).then(|| header.to_string());
        } else if let (Some(s), Some(v)) = (&stage, line.strip_prefix("output = ")) {
            out.push((s.clone(), v.trim_matches('"').to_string()));
        }
    }
    out
}

#[test]
fn ci_small_writes_the_same_bytes_at_1_2_and_7_threads() {
    let runs: Vec<(usize, Vec<(String, String)>)> = [1, 2, 7]
        .into_iter()
        .map(|threads| {
            let mut p = Project::new(CI_PIPELINE);
            p.env
                .push(("RAYON_NUM_THREADS".into(), threads.to_string()));
            p.ok(&["run", "-q"]);
            let lock = outputs(&p.lock());
            (threads, lock)
        })
        .collect();
    let (_, first) = &runs[0];
    let stages: Vec<&str> = CI_PIPELINE
        .lines()
        .filter_map(|l| l.trim().strip_prefix("[stages.")?.strip_suffix(']'))
        .collect();
    assert!(
        stages.len() >= 8,
        "ci_small has 8 stages or more, found {stages:?}"
    );
    for (threads, lock) in &runs {
        let names: Vec<&str> = lock.iter().map(|(s, _)| s.as_str()).collect();
        let mut want = stages.clone();
        want.sort();
        let mut got = names.clone();
        got.sort();
        assert_eq!(got, want, "{threads} threads: the lock lists every stage");
    }
    let mut differ = Vec::new();
    for (stage, digest) in first {
        for (threads, lock) in &runs[1..] {
            let other = &lock.iter().find(|(s, _)| s == stage).unwrap().1;
            if other != digest {
                differ.push(format!(
                    "{stage}: 1 thread {digest}, {threads} threads {other}"
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
