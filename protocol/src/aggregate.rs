//! Pluggable aggregation: the coordinator session hands every participant's
//! [`AggregationPayload`] to an [`Aggregator`] and waits for its
//! [`AggregateResult`]. Plain summing ([`PlainAggregator`]) is the first
//! implementation; secure aggregation replaces it without touching the
//! session or the transport, since an aggregator may also emit its own
//! messages ([`Aggregator::poll_transmit`]) for multi-stage protocols.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use crate::{
    error::ProtocolError,
    message::{AggregationKind, AggregationPayload, Message, ParticipantId},
    secagg::seal::{SealedLayers, SealedSum},
};

/// What an aggregator learns at the end of a round: the weighted mean of the
/// contributors' updates, and no individual update.
#[derive(Clone, Debug, PartialEq)]
pub struct AggregateResult {
    /// Round number.
    pub round: u32,
    /// `sum(w_i * x_i) / sum(w_i)` over the contributors, flattened in tensor order.
    pub mean_update: Vec<f32>,
    /// `sum(w_i)`: total aggregation weight (samples) of the contributors.
    pub total_weight: f64,
    /// Participants whose updates are in the sum, ascending.
    pub contributors: Vec<ParticipantId>,
    /// Seconds each stage of a multi-stage scheme took, in order, measured
    /// from the round's start or the previous stage's close (empty for
    /// single-stage schemes).
    pub stage_secs: Vec<(&'static str, f64)>,
    /// Participants caught breaking the protocol in this round although it
    /// completed (e.g. a Shamir share inconsistent with its owner's
    /// commitment, outvoted by spare shares), with what they did.
    pub misbehaved: Vec<(ParticipantId, String)>,
    /// The sealed layers' raw sum, when the round seals them (see
    /// [`crate::secagg::seal`]); [`Self::mean_update`] is 0 there.
    pub sealed: Option<SealedSum>,
    /// The second input's weighted mean and total weight, over the same
    /// contributors, when the round summed one ([`Aggregator::set_paired`]).
    pub paired: Option<(Vec<f32>, f64)>,
}

/// A second input for the next round's sum: `len` values in `[-1, 1]`,
/// weighted by integers up to `max_weight`, summed over exactly the
/// contributors of the first (see
/// [`PairedSetup`](crate::secagg::message::PairedSetup)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairedInput {
    /// Values per participant.
    pub len: usize,
    /// Largest weight any cohort member will use.
    pub max_weight: u64,
}

/// How far the current stage of an aggregation has come: for progress
/// displays (see [`Aggregator::progress`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageProgress {
    /// The stage's name as in [`AggregateResult::stage_secs`]
    /// (`advertise`, `share`, `masked`, `unmask`), or `upload` for
    /// single-stage schemes.
    pub stage: &'static str,
    /// Uploads of this stage received so far.
    pub answered: usize,
    /// Uploads this stage can still get: those received plus those it still
    /// waits for (participants that dropped out no longer count).
    pub expected: usize,
}

/// The coordinator side of one aggregation scheme, driven by the session.
///
/// Call order per round: [`begin_round`](Aggregator::begin_round), then any
/// mix of [`handle_payload`](Aggregator::handle_payload),
/// [`handle_dropout`](Aggregator::handle_dropout) and
/// [`handle_timeout`](Aggregator::handle_timeout), after each draining
/// [`poll_transmit`](Aggregator::poll_transmit) until `None`, then
/// [`poll_result`](Aggregator::poll_result), then re-arming the timer from
/// [`poll_timeout`](Aggregator::poll_timeout), until `poll_result` returns
/// `Some`. Time is always passed in: multi-stage schemes start a stage's
/// deadline when the previous stage closes.
pub trait Aggregator: Send {
    /// The scheme, announced to participants in the session info.
    fn aggregation(&self) -> AggregationKind;

    /// Short name recorded in metrics: `plain`, `secagg` or `secagg+`.
    fn kind(&self) -> &'static str {
        self.aggregation().name()
    }

    /// The largest aggregation weight any member of the next cohort will use
    /// (its sample count). Schemes that encode weights in a bounded ring size
    /// their encoding from it; the default ignores it.
    fn set_max_weight(&mut self, max_weight: u64) {
        let _ = max_weight;
    }

    /// The [`digest`](crate::weights::ModelWeights::digest) of the model the
    /// next round trains or evaluates; secure aggregation binds the round to
    /// it. Plain aggregation ignores it.
    fn set_model_digest(&mut self, digest: [u8; 32]) {
        let _ = digest;
    }

    /// Seals `layers` of the next rounds' updates (or stops sealing with
    /// `None`): their sums stay padded and come back as
    /// [`AggregateResult::sealed`]. The default refuses to seal: only a
    /// sum in a ring can carry one-time pads.
    ///
    /// # Errors
    /// A scheme that cannot seal.
    fn set_sealed_layers(&mut self, layers: Option<SealedLayers>) -> Result<(), ProtocolError> {
        match layers {
            None => Ok(()),
            Some(_) => Err(ProtocolError::InvalidConfig(format!(
                "sealed layers need secure aggregation, not {} aggregation",
                self.kind()
            ))),
        }
    }

    /// Pairs a second input with the next round's updates (or stops with
    /// `None`): every contributor then gives both, and the result carries
    /// the second one's mean in [`AggregateResult::paired`]. Returns whether
    /// the scheme can; the default cannot, and ignores the request.
    fn set_paired(&mut self, paired: Option<PairedInput>) -> bool {
        let _ = paired;
        false
    }

    /// Starts a round over `cohort` for updates of `num_params` values.
    fn begin_round(
        &mut self,
        now: Instant,
        round: u32,
        cohort: &[ParticipantId],
        num_params: usize,
    ) -> Result<(), ProtocolError>;

    /// Accepts one payload. Errors reject the payload without disturbing the
    /// round (the session decides whether to drop the sender).
    fn handle_payload(
        &mut self,
        now: Instant,
        from: ParticipantId,
        payload: AggregationPayload,
    ) -> Result<(), ProtocolError>;

    /// `who` will not contribute any more this round (disconnected or late).
    fn handle_dropout(&mut self, now: Instant, who: ParticipantId);

    /// Messages the aggregator wants sent (multi-stage schemes only).
    fn poll_transmit(&mut self) -> Option<(ParticipantId, Message)> {
        None
    }

    /// The aggregator's own next deadline (multi-stage schemes only); the
    /// session calls [`handle_timeout`](Aggregator::handle_timeout) once it
    /// has passed.
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    /// Advances on the clock: whoever a stage whose deadline has passed still
    /// waits for is treated as dropped for that stage.
    fn handle_timeout(&mut self, now: Instant) {
        let _ = now;
    }

    /// The stage in progress and how many have answered it; `None` between
    /// rounds or once the round's result is ready.
    fn progress(&self) -> Option<StageProgress> {
        None
    }

    /// The round's result once every cohort member has contributed or dropped
    /// out; an error when the round cannot produce one (e.g. nobody left).
    fn poll_result(&mut self) -> Option<Result<AggregateResult, ProtocolError>>;

    /// A fresh aggregator of the same scheme for the round's evaluation sum
    /// (two values per participant, weighted by test samples), so that the
    /// metrics get the same protection as the updates.
    ///
    /// # Errors
    /// Settings that cannot be carried over.
    fn for_evaluation(&self) -> Result<Box<dyn Aggregator>, ProtocolError>;
}

/// Unprotected weighted summing, for comparison and tests: the coordinator
/// sees every update. Sums in `f64`.
#[derive(Debug, Default)]
pub struct PlainAggregator {
    timeout: Option<std::time::Duration>,
    deadline: Option<Instant>,
    round: u32,
    num_params: usize,
    waiting: BTreeSet<ParticipantId>,
    contributors: BTreeMap<ParticipantId, ()>,
    sum: Vec<f64>,
    total_weight: f64,
    done: bool,
}

impl PlainAggregator {
    /// A new aggregator without a deadline of its own (the session's round
    /// deadline still applies); configure per round with `begin_round`.
    pub fn new() -> Self {
        Self::default()
    }

    /// An aggregator that treats participants who have not contributed
    /// `timeout` after the round began as dropped.
    pub fn with_timeout(timeout: std::time::Duration) -> Self {
        Self {
            timeout: Some(timeout),
            ..Self::default()
        }
    }
}

impl Aggregator for PlainAggregator {
    fn aggregation(&self) -> AggregationKind {
        AggregationKind::Plain
    }

    fn begin_round(
        &mut self,
        now: Instant,
        round: u32,
        cohort: &[ParticipantId],
        num_params: usize,
    ) -> Result<(), ProtocolError> {
        self.deadline = self.timeout.map(|t| now + t);
        self.round = round;
        self.num_params = num_params;
        self.waiting = cohort.iter().copied().collect();
        self.contributors.clear();
        self.sum.clear();
        self.sum.resize(num_params, 0.0);
        self.total_weight = 0.0;
        self.done = false;
        Ok(())
    }

    fn handle_payload(
        &mut self,
        _now: Instant,
        from: ParticipantId,
        payload: AggregationPayload,
    ) -> Result<(), ProtocolError> {
        if self.contributors.contains_key(&from) {
            return Err(ProtocolError::DuplicateContribution(from));
        }
        if !self.waiting.contains(&from) {
            return Err(ProtocolError::UnknownParticipant(from));
        }
        let (update, weight) = match payload {
            AggregationPayload::Plain { update, weight } => (update, weight),
            other => {
                return Err(ProtocolError::UnexpectedMessage {
                    expected: "plain payload",
                    got: other.kind(),
                });
            }
        };
        if update.len() != self.num_params {
            return Err(ProtocolError::InvalidContribution(format!(
                "update has {} values, the model has {}",
                update.len(),
                self.num_params
            )));
        }
        if !(weight.is_finite() && weight > 0.0) {
            return Err(ProtocolError::InvalidContribution(format!(
                "weight {weight} must be finite and positive"
            )));
        }
        if update.iter().any(|v| !v.is_finite()) {
            return Err(ProtocolError::InvalidContribution(
                "update contains NaN or infinity".into(),
            ));
        }
        for (s, &u) in self.sum.iter_mut().zip(&update) {
            *s += weight * u as f64;
        }
        self.total_weight += weight;
        self.waiting.remove(&from);
        self.contributors.insert(from, ());
        Ok(())
    }

    fn handle_dropout(&mut self, _now: Instant, who: ParticipantId) {
        self.waiting.remove(&who);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        if self.done || self.waiting.is_empty() {
            None
        } else {
            self.deadline
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| now >= d) {
            self.waiting.clear();
        }
    }

    fn progress(&self) -> Option<StageProgress> {
        (!self.done && !self.waiting.is_empty()).then(|| StageProgress {
            stage: "upload",
            answered: self.contributors.len(),
            expected: self.contributors.len() + self.waiting.len(),
        })
    }

    fn poll_result(&mut self) -> Option<Result<AggregateResult, ProtocolError>> {
        if self.done || !self.waiting.is_empty() {
            return None;
        }
        self.done = true;
        if self.contributors.is_empty() {
            return Some(Err(ProtocolError::InvalidContribution(
                "no participant contributed to the round".into(),
            )));
        }
        let inv = 1.0 / self.total_weight;
        Some(Ok(AggregateResult {
            round: self.round,
            mean_update: self.sum.iter().map(|s| (s * inv) as f32).collect(),
            total_weight: self.total_weight,
            contributors: self.contributors.keys().copied().collect(),
            stage_secs: Vec::new(),
            misbehaved: Vec::new(),
            sealed: None,
            paired: None,
        }))
    }

    fn for_evaluation(&self) -> Result<Box<dyn Aggregator>, ProtocolError> {
        Ok(Box::new(Self {
            timeout: self.timeout,
            ..Self::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Instant {
        Instant::now()
    }

    fn plain(update: Vec<f32>, weight: f64) -> AggregationPayload {
        AggregationPayload::Plain { update, weight }
    }

    #[test]
    fn weighted_mean_of_contributors() {
        let mut agg = PlainAggregator::new();
        agg.begin_round(now(), 1, &[0, 1, 2], 2).unwrap();
        agg.handle_payload(now(), 0, plain(vec![1.0, 0.0], 1.0))
            .unwrap();
        assert!(agg.poll_result().is_none());
        agg.handle_payload(now(), 2, plain(vec![4.0, 3.0], 3.0))
            .unwrap();
        agg.handle_dropout(now(), 1);
        let r = agg.poll_result().unwrap().unwrap();
        assert_eq!(r.mean_update, vec![13.0 / 4.0, 9.0 / 4.0]);
        assert_eq!(r.total_weight, 4.0);
        assert_eq!(r.contributors, vec![0, 2]);
        assert!(agg.poll_result().is_none(), "result is handed out once");
    }

    #[test]
    fn bad_payloads_rejected_without_disturbing_the_round() {
        let mut agg = PlainAggregator::new();
        agg.begin_round(now(), 1, &[0, 1], 2).unwrap();
        assert!(agg.handle_payload(now(), 0, plain(vec![1.0], 1.0)).is_err());
        assert!(
            agg.handle_payload(now(), 0, plain(vec![1.0, f32::NAN], 1.0))
                .is_err()
        );
        assert!(
            agg.handle_payload(now(), 0, plain(vec![1.0, 1.0], -1.0))
                .is_err()
        );
        assert!(
            agg.handle_payload(now(), 0, plain(vec![1.0, 1.0], f64::NAN))
                .is_err()
        );
        assert_eq!(
            agg.handle_payload(now(), 7, plain(vec![1.0, 1.0], 1.0)),
            Err(ProtocolError::UnknownParticipant(7))
        );
        agg.handle_payload(now(), 0, plain(vec![2.0, 2.0], 1.0))
            .unwrap();
        assert_eq!(
            agg.handle_payload(now(), 0, plain(vec![2.0, 2.0], 1.0)),
            Err(ProtocolError::DuplicateContribution(0))
        );
        agg.handle_payload(now(), 1, plain(vec![0.0, 0.0], 1.0))
            .unwrap();
        let r = agg.poll_result().unwrap().unwrap();
        assert_eq!(r.mean_update, vec![1.0, 1.0]);
    }

    #[test]
    fn everyone_dropped_is_an_error() {
        let mut agg = PlainAggregator::new();
        agg.begin_round(now(), 1, &[0, 1], 2).unwrap();
        agg.handle_dropout(now(), 0);
        agg.handle_dropout(now(), 1);
        assert!(agg.poll_result().unwrap().is_err());
    }
}
