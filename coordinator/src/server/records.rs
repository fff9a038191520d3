//! What the driver keeps of each round: the privacy ledger's count, the
//! metrics line, the run record and the checkpoint.

use std::collections::BTreeMap;
use std::time::Instant;

use greyfed_protocol::{EvalMetrics, ParticipantId, session::RoundSummary};
use tracing::{debug, info, warn};

use super::{Driver, fmt_metric, round_global};
use crate::{
    checkpoint::Checkpoint,
    error::{CoordinatorError, Result},
    events::CoordinatorEvent,
    metrics::RoundRecord,
    privacy::DpRound,
};

impl Driver {
    /// Counts round `round`, whose sum holds `contributors`' updates, in
    /// the DP ledger (record- or participant-level; `None` without DP) and
    /// returns its figures. With a participant-level budget it ends the
    /// session after this round when the next would exceed it.
    pub(super) fn account_privacy(
        &mut self,
        round: u32,
        contributors: &[ParticipantId],
    ) -> Result<Option<DpRound>> {
        if let Some(ledger) = &mut self.record_dp {
            let who: Vec<(String, u64)> = contributors
                .iter()
                .map(|&id| {
                    let identity = self
                        .session
                        .participant_identity(id)
                        .map_or_else(|| format!("participant {id}"), str::to_string);
                    let samples = self.session.participant_samples(id).map_or(1, |s| s.0);
                    (identity, samples)
                })
                .collect();
            let figures = ledger.round(&who)?;
            // run.json says what each participant's ε comes from.
            if let Some(dp) = &mut self.record.dp {
                dp.participants = ledger.entries().clone();
            }
            self.record.write(&self.out_dir)?;
            return Ok(Some(figures));
        }
        let survivors = contributors.len();
        let Some(ledger) = &mut self.dp else {
            return Ok(None);
        };
        let figures = ledger.round(&self.records, survivors)?;
        if let Err(line) = ledger.check_next()? {
            warn!(
                round,
                "DP budget reached, the session ends after this round: {line}"
            );
            self.session.stop_after(round);
        }
        Ok(Some(figures))
    }

    pub(super) async fn record_round(
        &mut self,
        now: Instant,
        s: &RoundSummary,
        central: Option<EvalMetrics>,
    ) -> Result<()> {
        let mut misbehaving = BTreeMap::new();
        for (id, what) in &s.misbehaved {
            let identity = self
                .session
                .participant_identity(*id)
                .map_or_else(|| format!("participant {id}"), str::to_string);
            warn!(
                round = s.round,
                id, identity, "participant broke the protocol: {what}"
            );
            misbehaving.insert(identity, what.clone());
        }
        let (up, down) = self.round_bytes.remove(&s.round).unwrap_or_default();
        let start = self.round_start.remove(&s.round).unwrap_or(now);
        // The round's share of the session's wall time: until the next round
        // started (alongside this one's evaluation), or until now for the
        // last round.
        let end = self
            .round_start
            .range(s.round + 1..)
            .next()
            .map_or(now, |(_, &t)| t.min(now));
        // Abandoned rounds before this one have no record to time.
        self.round_start.retain(|&r, _| r > s.round);
        // Counted when the round was aggregated.
        let dp = self.dp_rounds.remove(&s.round);
        let record = RoundRecord {
            round: s.round,
            accuracy: s.eval.as_ref().map(|e| e.accuracy),
            loss: s.eval.as_ref().map(|e| e.loss),
            evaluators: s.eval.as_ref().map_or(0, |e| e.evaluators),
            central_accuracy: central.as_ref().map(|m| m.accuracy()),
            central_loss: central.as_ref().map(|m| m.mean_loss()),
            train_loss: s.train_loss.is_finite().then_some(s.train_loss),
            train_cpu_secs: s.train_cpu_secs,
            participants: s.contributors.len(),
            survivors: s.contributors.len(),
            stage_secs: s
                .stage_secs
                .iter()
                .map(|(name, secs)| (name.to_string(), *secs))
                .collect(),
            cohort: s.cohort.len(),
            dropped: s.dropped.len(),
            test_samples: s.eval.as_ref().map_or(0, |e| e.samples),
            confusion: s.eval.as_ref().and_then(|e| e.confusion.clone()),
            misbehaving,
            aggregation: self.session.aggregation_kind().to_string(),
            bytes_up: up,
            bytes_down: down,
            secs: end.saturating_duration_since(start).as_secs_f64(),
            dp_noise_multiplier: dp.map(|d| d.noise_multiplier),
            dp_epsilon: dp.map(|d| d.epsilon),
            dp_epsilon_coordinator: dp.map(|d| d.epsilon_coordinator),
        };
        info!(
            round = record.round,
            accuracy = fmt_metric(record.accuracy),
            loss = fmt_metric(record.loss),
            participants = record.participants,
            secs = format!("{:.2}", record.secs),
            "round completed"
        );
        self.metrics.append(&record)?;
        self.emit(CoordinatorEvent::RoundCompleted(Box::new(record.clone())));
        self.records.push(record);
        self.update_record()?;
        // Taken now (the model and strategy state are this round's),
        // written once the outputs are drained.
        self.save_checkpoint().await?;
        self.unsaved = Some((
            s.round,
            Checkpoint {
                rounds_completed: self.session.rounds_completed(),
                rounds_planned: self.rounds_planned,
                settings: Some(self.record.clone()),
                global: round_global(&self.session)?.clone(),
                sealed: self.session.sealed().cloned(),
                strategy_state: self.strategy.state(),
                records: self.records.clone(),
            },
        ));
        Ok(())
    }

    /// Starts writing the checkpoint [`Self::record_round`] took, if any,
    /// on a blocking thread, once the previous one is written: each is
    /// synced to disk (7-15 ms here), which the driver does not wait for.
    /// Returns the previous write's error.
    pub(super) async fn save_checkpoint(&mut self) -> Result<()> {
        let Some((round, checkpoint)) = self.unsaved.take() else {
            return Ok(());
        };
        self.checkpoint_written().await?;
        let dir = self.checkpoint_dir.clone();
        self.checkpoint_write = Some(tokio::task::spawn_blocking(move || {
            checkpoint.save(&dir).map(|()| round)
        }));
        Ok(())
    }

    /// Waits for the checkpoint being written, if any; its error.
    pub(super) async fn checkpoint_written(&mut self) -> Result<()> {
        if let Some(write) = self.checkpoint_write.take() {
            let round = write.await.map_err(|e| {
                CoordinatorError::Checkpoint(format!("the checkpoint writer failed: {e}"))
            })??;
            debug!(round, "checkpoint written");
        }
        Ok(())
    }
}
