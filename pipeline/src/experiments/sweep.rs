//! `--sweep STAGE.KEY=V1,V2,...`: the cartesian grid of experiments, and
//! their names.
//!
//! Promises: values split on commas outside brackets, braces and quotes (so
//! `classical.seeds=[0,1],[2]` is two values); the grid is in the order the
//! sweeps are given, the last varying fastest; names are `NAME-1` ...
//! `NAME-k` in grid order (`NAME` alone for a single experiment), and without
//! `--name` a digest of the overrides, so the same overrides always get the
//! same name.

use crate::config::Override;
use crate::digest::Digest;
use crate::error::{Error, Result};

/// One `--sweep` argument: a parameter and its values.
#[derive(Clone, Debug, PartialEq)]
pub struct Sweep {
    pub stage: String,
    pub key: String,
    pub values: Vec<String>,
}

impl std::str::FromStr for Sweep {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let o: Override = s
            .parse()
            .map_err(|_| format!("`{s}`: expected STAGE.KEY=V1,V2,..."))?;
        let values = split_values(&o.value);
        if values.iter().any(|v| v.is_empty()) {
            return Err(format!("`{s}`: an empty value in the list"));
        }
        Ok(Sweep {
            stage: o.stage,
            key: o.key,
            values,
        })
    }
}

/// Splits on commas that are not inside `[]`, `{}` or quotes.
fn split_values(s: &str) -> Vec<String> {
    let (mut depth, mut quote, mut current, mut out) = (0i32, None, String::new(), Vec::new());
    for c in s.chars() {
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, ',') if depth == 0 => {
                out.push(std::mem::take(&mut current).trim().to_string());
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    out.push(current.trim().to_string());
    out
}

/// One experiment to run: its name and every override.
#[derive(Clone, Debug)]
pub struct Planned {
    pub name: String,
    pub overrides: Vec<Override>,
}

/// The experiments of `--set`s (shared by all) and `--sweep`s (the grid).
pub fn grid(name: Option<&str>, sets: &[Override], sweeps: &[Sweep]) -> Result<Vec<Planned>> {
    let mut rows: Vec<Vec<Override>> = vec![sets.to_vec()];
    for sweep in sweeps {
        if sets
            .iter()
            .any(|o| o.stage == sweep.stage && o.key == sweep.key)
        {
            return Err(Error::Experiment(format!(
                "`{}.{}` is both --set and --sweep",
                sweep.stage, sweep.key
            )));
        }
        rows = rows
            .into_iter()
            .flat_map(|row| {
                sweep.values.iter().map(move |v| {
                    let mut row = row.clone();
                    row.push(Override {
                        stage: sweep.stage.clone(),
                        key: sweep.key.clone(),
                        value: v.clone(),
                    });
                    row
                })
            })
            .collect();
    }
    let single = rows.len() == 1;
    rows.into_iter()
        .enumerate()
        .map(|(i, overrides)| {
            let name = match name {
                Some(n) if single => n.to_string(),
                Some(n) => format!("{n}-{}", i + 1),
                None => default_name(&overrides),
            };
            super::check_name(&name)?;
            Ok(Planned { name, overrides })
        })
        .collect()
}

/// `exp-` and 8 hex digits of the overrides (sorted), so that running the
/// same overrides again replaces the same experiment.
fn default_name(overrides: &[Override]) -> String {
    let mut text: Vec<String> = overrides.iter().map(|o| o.to_string()).collect();
    text.sort();
    let hex = Digest::of_bytes(text.join("\n").as_bytes()).to_hex();
    format!("exp-{}", &hex[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(p: &[Planned]) -> Vec<String> {
        p.iter()
            .map(|e| {
                let sets: Vec<String> = e.overrides.iter().map(|o| o.to_string()).collect();
                format!("{}: {}", e.name, sets.join(" "))
            })
            .collect()
    }

    #[test]
    fn values_split_outside_brackets_and_quotes() {
        let s: Sweep = "classical.seeds=[0,1],[2], 'a,b'".parse().unwrap();
        assert_eq!(s.values, ["[0,1]", "[2]", "'a,b'"]);
        assert!("classical.seeds=1,,2".parse::<Sweep>().is_err());
        assert!("seeds=1,2".parse::<Sweep>().is_err());
    }

    #[test]
    fn the_grid_is_cartesian_last_sweep_fastest() {
        let sets = vec!["ingest.seed=3".parse().unwrap()];
        let sweeps = vec![
            "gan.lambda_cycle=5,10".parse().unwrap(),
            "classical.lr=1e-3,3e-4".parse().unwrap(),
        ];
        let g = grid(Some("lr"), &sets, &sweeps).unwrap();
        assert_eq!(
            names(&g),
            [
                "lr-1: ingest.seed=3 gan.lambda_cycle=5 classical.lr=1e-3",
                "lr-2: ingest.seed=3 gan.lambda_cycle=5 classical.lr=3e-4",
                "lr-3: ingest.seed=3 gan.lambda_cycle=10 classical.lr=1e-3",
                "lr-4: ingest.seed=3 gan.lambda_cycle=10 classical.lr=3e-4",
            ]
        );
        let one = grid(Some("solo"), &sets, &[]).unwrap();
        assert_eq!(names(&one), ["solo: ingest.seed=3"]);
    }

    #[test]
    fn default_names_follow_the_overrides_in_any_order() {
        let a: Vec<Override> = vec!["a.x=1".parse().unwrap(), "b.y=2".parse().unwrap()];
        let b: Vec<Override> = vec![a[1].clone(), a[0].clone()];
        let (na, nb) = (
            &grid(None, &a, &[]).unwrap()[0].name,
            &grid(None, &b, &[]).unwrap()[0].name,
        );
        assert_eq!(na, nb);
        assert!(na.starts_with("exp-") && na.len() == 12, "{na}");
        let other = &grid(None, &a[..1], &[]).unwrap()[0].name;
        assert_ne!(na, other);
    }

    #[test]
    fn a_parameter_cannot_be_both_set_and_swept() {
        let sets = vec!["gan.ngf=4".parse().unwrap()];
        let sweeps = vec!["gan.ngf=4,8".parse().unwrap()];
        let e = grid(None, &sets, &sweeps).unwrap_err().to_string();
        assert!(e.contains("gan.ngf"), "{e}");
        assert!(grid(Some("bad/name"), &[], &[]).is_err());
        assert!(grid(Some("workspace"), &[], &[]).is_err());
    }
}
