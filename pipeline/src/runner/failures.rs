//! What failed in one `run`, and what that blocks: without `--keep-going`
//! the first error stops new stages; with it, each failure takes its
//! dependants (direct or not) out of the queue as skipped, and the final
//! error lists every failed and skipped stage.

use std::collections::BTreeMap;
use std::time::Instant;

use super::{StageOutcome, State};
use crate::config::StageDecl;
use crate::error::{Error, Result, Skipped, StageFailure};

/// What failed in one scheduling pass.
#[derive(Default)]
pub(super) struct Failures {
    keep_going: bool,
    /// Without keep-going: the first error; nothing new starts after it.
    first: Option<Error>,
    /// With keep-going: every failed stage, and every stage skipped because
    /// of one.
    failed: Vec<StageFailure>,
    skipped: Vec<Skipped>,
    /// Failed or skipped stage -> the failed stage that blocks it.
    blocked: BTreeMap<String, String>,
}

impl Failures {
    pub(super) fn new(keep_going: bool) -> Self {
        Failures {
            keep_going,
            ..Default::default()
        }
    }

    /// Whether nothing new may start.
    pub(super) fn stop(&self) -> bool {
        self.first.is_some()
    }

    /// Stage `i` failed: says so, then either stops new stages or (keep-going)
    /// takes its dependants, direct or not, out of `waiting` as skipped.
    pub(super) fn add(
        &mut self,
        stages: &[StageDecl],
        i: usize,
        error: Error,
        started: Instant,
        waiting: &mut Vec<usize>,
        done: &mut dyn FnMut(StageOutcome),
    ) {
        let outcome = |decl: &StageDecl, state, why: String, seconds| StageOutcome {
            stage: decl.name.clone(),
            kind: decl.kind.clone(),
            state,
            reasons: vec![why],
            fingerprint: None,
            output: None,
            summary: None,
            seconds,
        };
        let failure = StageFailure {
            stage: stages[i].name.clone(),
            error,
        };
        done(outcome(
            &stages[i],
            State::Failed,
            failure.why(),
            started.elapsed().as_secs_f64(),
        ));
        if !self.keep_going {
            self.first.get_or_insert(failure.error);
            return;
        }
        self.blocked
            .insert(failure.stage.clone(), failure.stage.clone());
        self.failed.push(failure);
        // Stages are in topological order: one pass finds every dependant.
        waiting.retain(|&w| {
            let Some(root) = stages[w]
                .inputs
                .iter()
                .find_map(|n| self.blocked.get(n).cloned())
            else {
                return true;
            };
            done(outcome(
                &stages[w],
                State::Skipped,
                format!("upstream `{root}` failed"),
                0.0,
            ));
            self.blocked.insert(stages[w].name.clone(), root.clone());
            self.skipped.push(Skipped {
                stage: stages[w].name.clone(),
                upstream: root,
            });
            false
        });
    }

    pub(super) fn into_result(self) -> Result<()> {
        match self.first {
            Some(e) => Err(e),
            None if self.failed.is_empty() => Ok(()),
            None => Err(Error::StagesFailed {
                failed: self.failed,
                skipped: self.skipped,
            }),
        }
    }
}
