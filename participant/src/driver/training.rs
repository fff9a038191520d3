//! Local training on a thread of its own while the session loop keeps
//! answering the coordinator, and what comes back from it: the trained
//! weights and, when the round's TrainRequest asked for it, the evaluation
//! of the model it started from, taken on the network built for training.

use std::sync::Arc;
use std::time::Instant;

use greyfed_protocol::{
    ModelSpec, ModelWeights, ProtocolError, TrainingConfig,
    message::{DpSgdSpec, EvalMetrics},
    participant::ParticipantSession,
};
use rand::rngs::StdRng;
use tracing::{debug, warn};

use super::{
    EVAL_BATCH, LocalData, PROGRESS_INTERVAL, ParticipantConfig, ParticipantProgress,
    ProgressSender, emit,
};
use crate::{
    background::{Background, spawn_training},
    cpu_time::CpuClock,
    error::{ParticipantError, Result},
    train::{TrainOptions, TrainOutcome, TrainingEvent, evaluate_network, train_local_observed},
};

/// Local training running on a thread of its own while the loop keeps
/// answering the coordinator (secure-aggregation key exchange overlaps it).
pub(super) struct Training {
    pub(super) round: u32,
    pub(super) started: Instant,
    /// DP-SGD settings and the batch sampling rate of this round's training.
    pub(super) dp_sgd: Option<(DpSgdSpec, f64)>,
    /// The update's sealed coordinates, which carry the trained values.
    pub(super) sealed_range: Option<std::ops::Range<usize>>,
    /// The round whose evaluation of the same model rides in this round's
    /// sum, if the TrainRequest asked for one.
    pub(super) evaluates: Option<u32>,
    pub(super) task: Background<Result<Trained>>,
}

/// What the training thread hands back.
pub(super) struct Trained {
    pub(super) outcome: TrainOutcome,
    /// The model trained from.
    pub(super) global: ModelWeights,
    /// The training's CPU seconds (without the evaluation's).
    pub(super) cpu_secs: Option<f64>,
    /// The evaluation of `global` on the network built for training, when
    /// one was asked for.
    pub(super) evaluation: Option<Result<EvalMetrics>>,
}

/// One round's local training, ready to start.
pub(super) struct TrainingJob {
    pub(super) round: u32,
    pub(super) spec: ModelSpec,
    /// The model to train from (unmasked, sealed layers opened).
    pub(super) global: ModelWeights,
    pub(super) data: Arc<LocalData>,
    pub(super) config: TrainingConfig,
    pub(super) seed: u64,
    /// Tensors left as they are (see [`TrainOptions::frozen`]).
    pub(super) frozen: std::ops::Range<usize>,
    /// The round whose evaluation `global` is, if asked for.
    pub(super) evaluates: Option<u32>,
    pub(super) progress: Option<ProgressSender>,
}

impl TrainingJob {
    /// Starts the training on a thread of its own (see
    /// [`spawn_training`]). When an evaluation is asked for, the thread
    /// evaluates `global` on the network it has built for training, before
    /// the first step, and keeps that CPU time out of the training's.
    pub(super) fn spawn(self) -> Result<Background<Result<Trained>>> {
        spawn_training("greyfed-train", move || self.run())
            .map_err(|e| ParticipantError::Model(format!("cannot start local training: {e}")))
    }

    fn run(self) -> Result<Trained> {
        let TrainingJob {
            round,
            spec,
            global,
            data,
            config,
            seed,
            frozen,
            evaluates,
            progress,
        } = self;
        let options = TrainOptions {
            proximal_mu: config.proximal_mu,
            dp_sgd: config.dp_sgd,
            frozen,
        };
        let mut last_sent: Option<Instant> = None;
        // The evaluation asked for, and its CPU seconds.
        let mut evaluation = None;
        let mut observe = |event: TrainingEvent<'_>| match event {
            TrainingEvent::Built(net) => {
                if evaluates.is_some() {
                    let cpu = CpuClock::start();
                    let metrics = evaluate_network(net, &spec, &data.test, EVAL_BATCH);
                    evaluation = Some((metrics, cpu.elapsed_secs()));
                }
            }
            TrainingEvent::Step(p) => {
                let Some(tx) = &progress else { return };
                let epoch_done = (p.step * u64::from(p.epochs)).is_multiple_of(p.steps.max(1));
                if epoch_done || last_sent.is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL) {
                    last_sent = Some(Instant::now());
                    let _ = tx.send(ParticipantProgress::Training { round, progress: p });
                }
            }
        };
        let cpu = CpuClock::start();
        let outcome = train_local_observed(
            &spec,
            &global,
            data.train.as_ref(),
            &config,
            seed,
            &options,
            &mut observe,
        )?;
        // The evaluation's CPU time is not training's.
        let evaluation_cpu = evaluation
            .as_ref()
            .and_then(|(_, secs)| *secs)
            .unwrap_or(0.0);
        Ok(Trained {
            outcome,
            global,
            cpu_secs: cpu.elapsed_secs().map(|t| (t - evaluation_cpu).max(0.0)),
            evaluation: evaluation.map(|(metrics, _)| metrics),
        })
    }
}

/// Keeps `global`, the model of `round`, as the latest one evaluated, unless
/// a later round's is kept already.
pub(super) fn keep(latest: &mut Option<(u32, ModelWeights)>, round: u32, global: ModelWeights) {
    if latest.as_ref().is_none_or(|(r, _)| *r <= round) {
        *latest = Some((round, global));
    }
}

/// Hands `metrics`, the evaluation of `round`'s model, to the session. An
/// evaluation that was to ride in an update sum we left (training failed)
/// is only late: the coordinator counts us out of both.
pub(super) fn submit_metrics(
    config: &ParticipantConfig,
    session: &mut ParticipantSession,
    round: u32,
    metrics: EvalMetrics,
    rng: &mut StdRng,
) -> Result<()> {
    debug!(round, "evaluated");
    match session.submit_evaluation(round, metrics, rng) {
        Ok(()) => emit(config, ParticipantProgress::Evaluated { round }),
        Err(e @ ProtocolError::Late(_)) => warn!(round, "evaluation not used: {e}"),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
