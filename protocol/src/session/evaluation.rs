//! A round's evaluation: its model goes to every participant with a test
//! split and their metrics come back through a second secure sum, while the
//! next round trains (see the module docs of [`super`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use super::{
    CoordinatorSession, Peer, Phase, RoundState, RoundSummary, SessionEvent,
    begin_with_weight_bound, weight_within_claims,
};
use crate::{
    aggregate::AggregateResult,
    error::ProtocolError,
    message::{EvalMetrics, EvalSummary, GlobalModel, Message, ParticipantId, SumKind},
    model_delta::ModelDelta,
    weights::ModelWeights,
};

/// A round's evaluation that rides in the next round's training sum (the
/// paired input, see [`Aggregator::set_paired`](crate::aggregate::Aggregator::set_paired)).
#[derive(Debug)]
pub(super) struct FoldedEvaluation {
    /// The round and its record (no deadline: the training sum's holds).
    pub(super) evaluation: Evaluation,
    /// The model the evaluated one replaced (the base of deltas), until
    /// the TrainRequests or a separate evaluation use it.
    pub(super) previous: Option<(Arc<ModelWeights>, [u8; 32])>,
}

/// A round whose model is being evaluated (while the next round trains).
#[derive(Debug)]
pub(super) struct Evaluation {
    pub(super) round: u32,
    /// The round's training record, completed with the evaluation.
    pub(super) record: RoundState,
    pub(super) started: Instant,
    /// Who was asked to evaluate.
    pub(super) evaluators: BTreeSet<ParticipantId>,
    /// The (clamped) claimed test samples of the evaluators.
    pub(super) test_claims: BTreeMap<ParticipantId, u64>,
    pub(super) deadline: Option<Instant>,
}

impl CoordinatorSession {
    /// Checks that an Evaluation from `from` for `msg_round` is expected:
    /// the evaluation in flight is that round's, and `from` was asked.
    /// Uploads for an evaluation that already finished (spare unmasking
    /// shares) are [`ProtocolError::Late`].
    pub(super) fn expect_evaluation(
        &self,
        from: ParticipantId,
        msg_round: u32,
    ) -> Result<(), ProtocolError> {
        if msg_round != 0 && msg_round <= self.last_evaluated {
            return Err(ProtocolError::Late("Evaluation"));
        }
        let Some(evaluation) = &self.evaluation else {
            return Err(ProtocolError::UnexpectedMessage {
                expected: self.phase_expects(),
                got: "Evaluation",
            });
        };
        if msg_round != evaluation.round {
            return Err(ProtocolError::WrongRound {
                current: evaluation.round,
                got: msg_round,
            });
        }
        if !evaluation.evaluators.contains(&from) {
            return Err(ProtocolError::UnknownParticipant(from));
        }
        Ok(())
    }

    /// Sends round `round`'s model to every participant with a test split
    /// (as a delta from `previous`, the model it replaced, to those that
    /// hold that one) and begins the evaluation sum over them; returns the
    /// evaluators and their test claims, or `None` (reported) when nobody
    /// can evaluate.
    #[allow(clippy::type_complexity)]
    pub(super) fn begin_evaluation(
        &mut self,
        now: Instant,
        round: u32,
        previous: Option<(Arc<ModelWeights>, [u8; 32])>,
    ) -> Option<(BTreeSet<ParticipantId>, BTreeMap<ParticipantId, u64>)> {
        let evaluators = self.evaluators();
        if evaluators.is_empty() {
            return None;
        }
        let max_weight = evaluators
            .iter()
            .map(|id| self.peers[id].test_samples)
            .max()
            .unwrap_or(1);
        let digest = self.round_global_digest();
        self.evaluator.set_model_digest(digest);
        let sum_len = self.eval_sum_len();
        match begin_with_weight_bound(
            &mut *self.evaluator,
            now,
            round,
            &evaluators,
            sum_len,
            max_weight,
        ) {
            Ok(bound) => self.note_weight_bound(round, SumKind::Evaluation, max_weight, bound),
            Err(e) => {
                self.events.push_back(SessionEvent::EvaluationFailed {
                    round,
                    reason: e.to_string(),
                });
                return None;
            }
        }
        let test_claims = self.test_claims(&evaluators);
        // An EvaluateRequest carries its model (never a reference to it).
        for (id, global) in self.models_for(&evaluators, previous.as_ref(), false) {
            self.outbox.push_back((
                id,
                Message::EvaluateRequest {
                    round,
                    global,
                    sealed: self.sealed.clone(),
                },
            ));
        }
        Some((evaluators.into_iter().collect(), test_claims))
    }

    /// The (clamped) claimed test samples of `ids`.
    pub(super) fn test_claims(&self, ids: &[ParticipantId]) -> BTreeMap<ParticipantId, u64> {
        ids.iter()
            .filter_map(|id| self.peers.get(id).map(|p| (*id, p.test_samples)))
            .collect()
    }

    /// The current global model as each of `ids` gets it, each then marked
    /// as holding it: a reference for whoever holds it already (when
    /// `refer`), a delta from
    /// `previous` (the model it replaced) for whoever takes deltas and holds
    /// that one, the weights for everyone else. One copy of the delta, or
    /// of the weights, is shared by every message; should encoding fail
    /// (layouts are fixed for a session), the weights go instead.
    pub(super) fn models_for(
        &mut self,
        ids: &[ParticipantId],
        previous: Option<&(Arc<ModelWeights>, [u8; 32])>,
        refer: bool,
    ) -> Vec<(ParticipantId, GlobalModel)> {
        let digest = self.round_global_digest();
        let holds_previous = |peer: Option<&Peer>| match (previous, peer) {
            (Some((_, d)), Some(peer)) => peer.takes_deltas && peer.holds == Some(*d),
            _ => false,
        };
        let delta = previous
            .filter(|_| ids.iter().any(|id| holds_previous(self.peers.get(id))))
            .and_then(|(base, base_digest)| {
                ModelDelta::encode(base, *base_digest, self.round_global(), digest).ok()
            })
            .map(Arc::new);
        let mut models = Vec::with_capacity(ids.len());
        for &id in ids {
            let peer = self.peers.get(&id);
            let global = match &delta {
                _ if refer && peer.is_some_and(|p| p.holds == Some(digest)) => {
                    GlobalModel::Held { digest }
                }
                Some(d) if holds_previous(peer) => GlobalModel::Delta(d.clone()),
                _ => GlobalModel::Weights(self.shared_global()),
            };
            if let Some(peer) = self.peers.get_mut(&id) {
                peer.holds = Some(digest);
            }
            models.push((id, global));
        }
        models
    }

    /// Who evaluates round `next - 1`'s model inside round `next`'s sum, or
    /// `None` where that cannot be: folding is off, the aggregator cannot
    /// pair inputs, selection is random per round (Poisson), `next` is past
    /// the last round, or round `next`'s cohort is not exactly the
    /// participants with a test split.
    pub(super) fn fold_evaluators(&self, next: u32) -> Option<Vec<ParticipantId>> {
        if !self.config.fold_evaluation
            || !self.pairs_inputs
            || self.config.selection.poisson
            || next > self.config.rounds
        {
            return None;
        }
        let evaluators = self.evaluators();
        (!evaluators.is_empty() && self.select(next) == evaluators).then_some(evaluators)
    }

    /// Who evaluates a round's model: everyone connected with a test
    /// split, in the cohort or not (participants admitted during the round
    /// included), ascending.
    fn evaluators(&self) -> Vec<ParticipantId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.test_samples > 0)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Values of an evaluation's sum input for the session's model
    /// (accuracy, loss and the confusion counts, see [`EvalMetrics::sum_len`]).
    pub(super) fn eval_sum_len(&self) -> usize {
        EvalMetrics::sum_len(self.model().map_or(0, |m| m.num_classes() as usize))
    }

    /// Gives the folded evaluation, if any, a sum of its own after all (the
    /// next round could not carry it).
    pub(super) fn unfold(&mut self, now: Instant) {
        if let Some(f) = self.folded.take() {
            let e = f.evaluation;
            self.begin_separate_evaluation(now, e.round, e.record, f.previous);
        }
    }

    /// Sends round `round`'s model for evaluation in a sum of its own (see
    /// [`Self::begin_evaluation`]); `record` completes when that sum does,
    /// at once when nobody can evaluate.
    pub(super) fn begin_separate_evaluation(
        &mut self,
        now: Instant,
        round: u32,
        record: RoundState,
        previous: Option<(Arc<ModelWeights>, [u8; 32])>,
    ) {
        match self.begin_evaluation(now, round, previous) {
            Some((evaluators, test_claims)) => {
                self.evaluation = Some(Evaluation {
                    round,
                    record,
                    started: now,
                    evaluators,
                    test_claims,
                    deadline: Some(now + self.config.evaluation_timeout),
                });
                // The evaluator's first messages go out after the
                // EvaluateRequests, the next round's TrainRequests after both.
                self.drain_evaluator(now);
            }
            None => self.complete_round(round, record, None, None),
        }
    }

    /// Completes the round whose evaluation rode in the training sum that
    /// just ended, with the evaluation from `outcome` (the sum's result, or
    /// why it failed). Nothing to do without a folded evaluation.
    pub(super) fn complete_folded(&mut self, outcome: Result<&AggregateResult, String>) {
        let Some(f) = self.folded.take() else {
            return;
        };
        let e = f.evaluation;
        let eval = outcome.and_then(|result| {
            let (mean, total) = result
                .paired
                .as_ref()
                .ok_or_else(|| "the sum carried no evaluation".to_string())?;
            weight_within_claims(*total, &result.contributors, &e.test_claims)
                .and_then(|()| {
                    EvalSummary::from_mean(mean, total.round() as u64, result.contributors.len())
                })
                .map_err(|err| err.to_string())
        });
        let eval = match eval {
            Ok(summary) => Some(summary),
            Err(reason) => {
                self.events.push_back(SessionEvent::EvaluationFailed {
                    round: e.round,
                    reason,
                });
                None
            }
        };
        self.complete_round(e.round, e.record, eval, None);
    }

    /// Passes on what the evaluation sum produced: its messages, and, once
    /// it is done (or failed), the round's completion.
    pub(super) fn drain_evaluator(&mut self, now: Instant) {
        let Some(evaluation) = &self.evaluation else {
            return;
        };
        let round = evaluation.round;
        while let Some(t) = self.evaluator.poll_transmit() {
            self.outbox.push_back(t);
        }
        let mut misbehaved = Vec::new();
        let eval = match self.evaluator.poll_result() {
            None => return,
            Some(Ok(result)) => {
                misbehaved.clone_from(&result.misbehaved);
                weight_within_claims(
                    result.total_weight,
                    &result.contributors,
                    &evaluation.test_claims,
                )
                .and_then(|()| {
                    EvalSummary::from_mean(
                        &result.mean_update,
                        result.total_weight.round() as u64,
                        result.contributors.len(),
                    )
                })
            }
            Some(Err(e)) => Err(e),
        };
        let eval = eval
            .map_err(|e| {
                self.events.push_back(SessionEvent::EvaluationFailed {
                    round,
                    reason: e.to_string(),
                });
            })
            .ok();
        let evaluation = self.evaluation.take().expect("checked above");
        let mut record = evaluation.record;
        record.misbehaved.extend(misbehaved);
        let secs = now.saturating_duration_since(evaluation.started);
        self.complete_round(round, record, eval, Some(secs.as_secs_f64()));
        // What waited for this evaluation goes on.
        if let Some(result) = self.held.take() {
            self.events.push_back(SessionEvent::Aggregated(result));
        }
        if let Phase::Evaluating { .. } = self.phase {
            self.finish();
        }
    }

    /// Reports `round` completed with its evaluation `eval` (which took
    /// `evaluate_secs`, when one was begun).
    pub(super) fn complete_round(
        &mut self,
        round: u32,
        r: RoundState,
        eval: Option<EvalSummary>,
        evaluate_secs: Option<f64>,
    ) {
        let mut stage_secs = r.stage_secs;
        if let Some(secs) = evaluate_secs {
            stage_secs.push(("evaluate", secs));
        }
        self.last_evaluated = round;
        self.rounds_completed += 1;
        self.events
            .push_back(SessionEvent::RoundCompleted(RoundSummary {
                round,
                cohort: r.cohort,
                contributors: r.contributors,
                dropped: r.dropped,
                train_loss: if r.train_loss_weight > 0.0 {
                    r.train_loss_sum / r.train_loss_weight
                } else {
                    f64::NAN
                },
                train_cpu_secs: (!r.train_cpu_secs.is_empty())
                    .then(|| r.train_cpu_secs.values().sum()),
                eval,
                stage_secs,
                misbehaved: r.misbehaved,
            }));
    }
}
