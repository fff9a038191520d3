//! Starting rounds and collecting their sums: the cohort, the training
//! sum's weight bound, the TrainRequests (with a folded evaluation, see
//! the parent module) and what the aggregator's result turns into.

use std::time::Instant;

use rand::{RngExt, SeedableRng, rngs::StdRng, seq::SliceRandom};

use super::{
    CoordinatorSession, Phase, RoundState, SessionEvent, begin_with_weight_bound, derive_seed,
    training_seed, weight_within_claims,
};
use crate::{
    aggregate::PairedInput,
    message::{Message, ParticipantId, SumKind},
};

impl CoordinatorSession {
    pub(super) fn start_round(&mut self, now: Instant, round: u32) {
        if round > self.config.rounds {
            self.deadline = None;
            // No round to carry a folded evaluation: it gets a sum of its own.
            self.unfold(now);
            match &self.evaluation {
                // The last evaluation finishes the session.
                Some(e) => self.phase = Phase::Evaluating { round: e.round },
                None => self.finish(),
            }
            return;
        }
        let connected = self.peers.len();
        if connected < self.config.min_participants {
            self.abort(format!(
                "only {connected} participants left, at least {} needed",
                self.config.min_participants
            ));
            return;
        }
        let cohort = self.select(round);
        let floor = self
            .config
            .min_participants
            .max(self.config.selection.minimum)
            .max(1);
        if self.config.selection.poisson && cohort.len() < floor {
            // A Poisson draw may fall short: that round trains nobody (the
            // accountant still counts it), and the session goes on.
            self.events.push_back(SessionEvent::RoundAbandoned {
                round,
                reason: format!(
                    "Poisson selection drew {} participants, fewer than the {floor} a round needs",
                    cohort.len()
                ),
            });
            self.start_round(now, round + 1);
            return;
        }
        let max_weight = cohort
            .iter()
            .map(|id| self.peers[id].train_samples)
            .max()
            .unwrap_or(1);
        let digest = self.round_global_digest();
        self.aggregator.set_model_digest(digest);
        let num_params = self.round_global().num_parameters();
        if let Some(layers) = self.config.training.sealed_layers
            && let Err(e) = layers.range(num_params)
        {
            self.abort(e.to_string());
            return;
        }
        if self
            .folded
            .as_ref()
            .is_some_and(|f| !f.evaluation.evaluators.iter().eq(cohort.iter()))
        {
            self.unfold(now);
        }
        let paired = self.folded.as_ref().map(|f| PairedInput {
            len: self.eval_sum_len(),
            max_weight: f
                .evaluation
                .test_claims
                .values()
                .max()
                .copied()
                .unwrap_or(1),
        });
        self.aggregator.set_paired(paired);
        let begin = |s: &mut Self| {
            begin_with_weight_bound(
                &mut *s.aggregator,
                now,
                round,
                &cohort,
                num_params,
                max_weight,
            )
        };
        let mut begun = begin(self);
        if begun.is_err() && self.folded.is_some() {
            // The pairing may be what the aggregator refused: the
            // evaluation gets a sum of its own, and the round begins without.
            self.aggregator.set_paired(None);
            self.unfold(now);
            begun = begin(self);
        }
        let bound = match begun {
            Ok(bound) => bound,
            Err(e) => {
                self.abort(format!("aggregator refused round {round}: {e}"));
                return;
            }
        };
        self.phase = Phase::Training { round };
        self.round = RoundState {
            cohort: cohort.clone(),
            train_claims: cohort
                .iter()
                .filter_map(|id| self.peers.get(id).map(|p| (*id, p.train_samples)))
                .collect(),
            ..RoundState::default()
        };
        let evaluates = self.folded.as_ref().map(|f| f.evaluation.round);
        let previous = self.folded.as_mut().and_then(|f| f.previous.take());
        for (id, global) in self.models_for(&cohort, previous.as_ref(), true) {
            self.outbox.push_back((
                id,
                Message::TrainRequest {
                    round,
                    global,
                    seed: match self.peers.get(&id) {
                        Some(peer) => training_seed(self.config.seed, round, &peer.identity),
                        None => derive_seed(self.config.seed, round, id),
                    },
                    sealed: self.sealed.clone(),
                    evaluates,
                },
            ));
        }
        self.deadline = Some(now + self.config.round_timeout);
        self.events
            .push_back(SessionEvent::RoundStarted { round, cohort });
        self.note_weight_bound(round, SumKind::Update, max_weight, bound);
        // The aggregator's first messages (e.g. the secure-aggregation setup)
        // go out after the TrainRequests, which open the round on each side.
        self.drain_aggregator(now, round);
    }

    /// Reports a weight bound that [`begin_with_weight_bound`] had to lower
    /// below the largest claim.
    pub(super) fn note_weight_bound(&mut self, round: u32, sum: SumKind, claimed: u64, bound: u64) {
        if bound < claimed {
            self.events.push_back(SessionEvent::WeightBoundLowered {
                round,
                sum,
                claimed,
                bound,
            });
        }
    }

    /// The cohort of `round`: a uniformly random subset of the connected
    /// participants of the size [`Selection::cohort_size`] gives, or a
    /// Poisson sample ([`Selection::poisson`]), ascending.
    /// Drawn from the session seed and the round, so a resumed session
    /// selects as the interrupted one would have with the same participants.
    pub(super) fn select(&self, round: u32) -> Vec<ParticipantId> {
        let mut ids: Vec<ParticipantId> = self.peers.keys().copied().collect();
        let selection = self.config.selection;
        if selection.poisson && selection.fraction < 1.0 {
            let mut rng =
                StdRng::seed_from_u64(derive_seed(self.config.seed, round, ParticipantId::MAX));
            ids.retain(|_| rng.random_bool(selection.fraction));
            return ids;
        }
        let size = self
            .config
            .selection
            .cohort_size(ids.len(), self.config.min_participants);
        if size < ids.len() {
            let mut rng =
                StdRng::seed_from_u64(derive_seed(self.config.seed, round, ParticipantId::MAX));
            ids.shuffle(&mut rng);
            ids.truncate(size);
            ids.sort_unstable();
        }
        ids
    }

    pub(super) fn drain_aggregator(&mut self, now: Instant, round: u32) {
        while let Some(t) = self.aggregator.poll_transmit() {
            self.outbox.push_back(t);
        }
        match self.aggregator.poll_result() {
            None => {}
            Some(Ok(result))
                if let Err(e) = weight_within_claims(
                    result.total_weight,
                    &result.contributors,
                    &self.round.train_claims,
                ) =>
            {
                self.complete_folded(Err(e.to_string()));
                self.events.push_back(SessionEvent::RoundAbandoned {
                    round,
                    reason: e.to_string(),
                });
                self.start_round(now, round + 1);
            }
            Some(Ok(result)) => {
                self.complete_folded(Ok(&result));
                self.round.contributors = result.contributors.clone();
                self.round.stage_secs = result.stage_secs.clone();
                self.round
                    .misbehaved
                    .extend(result.misbehaved.iter().cloned());
                self.round.dropped = self
                    .round
                    .cohort
                    .iter()
                    .filter(|id| !result.contributors.contains(id))
                    .copied()
                    .collect();
                self.phase = Phase::AwaitingModel { round };
                self.deadline = None;
                self.pending_sealed = result.sealed.clone();
                if self.evaluation.is_some() {
                    // Round order: the evaluation in flight completes first.
                    self.held = Some(result);
                } else {
                    self.events.push_back(SessionEvent::Aggregated(result));
                }
            }
            Some(Err(e)) => {
                self.complete_folded(Err(e.to_string()));
                self.events.push_back(SessionEvent::RoundAbandoned {
                    round,
                    reason: e.to_string(),
                });
                self.start_round(now, round + 1);
            }
        }
    }
}
