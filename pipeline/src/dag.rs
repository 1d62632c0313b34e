//! The stage graph: validation (every upstream exists, no cycle), a stable
//! topological order, selection of a target set with its ancestors, and
//! drawings for `melanoflow dag` (text, Graphviz dot, Mermaid).

use std::collections::BTreeSet;

use crate::config::StageDecl;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DagError {
    #[error("stages.{stage}.inputs: no stage named `{missing}`")]
    MissingUpstream { stage: String, missing: String },
    #[error("stages.{stage}.inputs: a stage cannot read its own output")]
    SelfLoop { stage: String },
    #[error("stages form a cycle: {}", cycle.join(" -> "))]
    Cycle { stage: String, cycle: Vec<String> },
}

impl DagError {
    /// The stage the error is reported at.
    pub fn stage(&self) -> &str {
        match self {
            DagError::MissingUpstream { stage, .. }
            | DagError::SelfLoop { stage }
            | DagError::Cycle { stage, .. } => stage,
        }
    }
}

/// Indices of `stages` in an order where every stage follows its inputs;
/// among ready stages, the earlier declaration goes first (Kahn's algorithm),
/// so the order is stable under unrelated edits.
pub fn topo_order(stages: &[StageDecl]) -> Result<Vec<usize>, DagError> {
    let index = |name: &str| stages.iter().position(|s| s.name == name);
    let mut deps: Vec<Vec<usize>> = Vec::with_capacity(stages.len());
    for s in stages {
        let mut d = Vec::new();
        for input in &s.inputs {
            if *input == s.name {
                return Err(DagError::SelfLoop {
                    stage: s.name.clone(),
                });
            }
            let i = index(input).ok_or_else(|| DagError::MissingUpstream {
                stage: s.name.clone(),
                missing: input.clone(),
            })?;
            d.push(i);
        }
        deps.push(d);
    }
    let mut done = vec![false; stages.len()];
    let mut order = Vec::with_capacity(stages.len());
    while order.len() < stages.len() {
        let next = (0..stages.len()).find(|&i| !done[i] && deps[i].iter().all(|&d| done[d]));
        match next {
            Some(i) => {
                done[i] = true;
                order.push(i);
            }
            None => {
                let start = (0..stages.len())
                    .find(|&i| !done[i])
                    .expect("some stage is left");
                return Err(DagError::Cycle {
                    stage: stages[start].name.clone(),
                    cycle: find_cycle(start, &deps, &done, stages),
                });
            }
        }
    }
    Ok(order)
}

fn find_cycle(
    start: usize,
    deps: &[Vec<usize>],
    done: &[bool],
    stages: &[StageDecl],
) -> Vec<String> {
    // Follow undone dependencies until a stage repeats: that loop is a cycle.
    let mut path = vec![start];
    loop {
        let cur = *path.last().expect("non-empty");
        let next = deps[cur]
            .iter()
            .copied()
            .find(|&d| !done[d])
            .expect("a blocked stage has an undone input");
        if let Some(pos) = path.iter().position(|&p| p == next) {
            let mut names: Vec<String> = path[pos..]
                .iter()
                .rev()
                .map(|&i| stages[i].name.clone())
                .collect();
            names.push(names[0].clone());
            return names;
        }
        path.push(next);
    }
}

/// The named targets and everything they depend on, as names; all stages when
/// `targets` is empty. Unknown names are returned as the error.
pub fn select<'a>(
    stages: &'a [StageDecl],
    targets: &[String],
) -> Result<BTreeSet<&'a str>, String> {
    if targets.is_empty() {
        return Ok(stages.iter().map(|s| s.name.as_str()).collect());
    }
    let mut keep = BTreeSet::new();
    let mut todo: Vec<&str> = Vec::new();
    for t in targets {
        let s = stages
            .iter()
            .find(|s| s.name == *t)
            .ok_or_else(|| t.clone())?;
        todo.push(&s.name);
    }
    while let Some(name) = todo.pop() {
        if keep.insert(name) {
            let s = stages
                .iter()
                .find(|s| s.name == name)
                .expect("validated upstream");
            todo.extend(s.inputs.iter().map(|i| {
                stages
                    .iter()
                    .find(|s| s.name == *i)
                    .expect("validated")
                    .name
                    .as_str()
            }));
        }
    }
    Ok(keep)
}

/// Plain text: one line per stage in run order, with its kind and inputs.
pub fn render_text(stages: &[StageDecl]) -> String {
    let width = stages.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for s in stages {
        let inputs = if s.inputs.is_empty() {
            String::from("(source)")
        } else {
            format!("<- {}", s.inputs.join(", "))
        };
        out.push_str(&format!("{:width$}  [{}]  {}\n", s.name, s.kind, inputs));
    }
    out
}

pub fn render_dot(stages: &[StageDecl]) -> String {
    let mut out =
        String::from("digraph pipeline {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n");
    for s in stages {
        out.push_str(&format!(
            "  \"{}\" [label=\"{}\\n({})\"];\n",
            s.name, s.name, s.kind
        ));
    }
    for s in stages {
        for i in &s.inputs {
            out.push_str(&format!("  \"{i}\" -> \"{}\";\n", s.name));
        }
    }
    out.push_str("}\n");
    out
}

pub fn render_mermaid(stages: &[StageDecl]) -> String {
    // Mermaid ids are letters, digits and `_`: `-` and foreach's `@` are
    // spelled out so that `a-b`, `a_b` and `a@b` stay three nodes.
    let id = |name: &str| name.replace('-', "_dash_").replace('@', "_at_");
    let mut out = String::from("flowchart LR\n");
    for s in stages {
        out.push_str(&format!(
            "  {}[\"{}<br/>({})\"]\n",
            id(&s.name),
            s.name,
            s.kind
        ));
    }
    for s in stages {
        for i in &s.inputs {
            out.push_str(&format!("  {} --> {}\n", id(i), id(&s.name)));
        }
    }
    out
}
