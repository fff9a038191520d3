//! The coordinator's I/O shell: a quinn endpoint whose connections feed the
//! sans-IO [`CoordinatorSession`], and a driver loop that sends what the
//! session emits, applies the strategy, records metrics and writes the model.
//!
//! Tasks: one accept loop and a few tasks per connection (the private
//! `connection` module) that send `Inbound` events to the driver and take
//! `Outbound` frames from it. The driver is the only owner of the session,
//! so no locks guard protocol state.
//!
//! Authentication happens before any of that: the TLS handshake refuses a
//! peer without an admitted client certificate ([`crate::auth`]), and the
//! identity the session records for a connection is the one in its verified
//! certificate ([`CoordinatorSession::handle_connect`]), never a name the
//! peer sends.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use greyfed_protocol::{
    AggregationKind, EvalMetrics, Message, ModelWeights, ParticipantId, ProtocolError,
    aggregate::PlainAggregator,
    frame::encode_frame,
    model_delta::ModelDeltas,
    model_file::ModelFile,
    secagg::{coordinator::SecAggCoordinator, x509::CertificateVerifier},
    session::{CoordinatorSession, InitialModel, SessionConfig, SessionEvent, SessionProgress},
};
use tokio::sync::mpsc;
use tracing::{debug, info, trace, warn};

use crate::{
    central::CentralEvaluator,
    checkpoint::Checkpoint,
    config::CoordinatorConfig,
    connection::{
        INBOUND_EVENTS, Inbound, LINGER, LinkPolicy, Listener, PeerLink, accept_loop, check_config,
        close_code,
    },
    error::{CoordinatorError, Result},
    events::{CoordinatorEvent, EventSender},
    metrics::{MetricsWriter, RoundRecord},
    privacy::{DpLedger, DpRound, RecordLedger},
    run_record::{ImageCipher, RunRecord},
    strategy::Strategy,
    tls,
};

mod records;

/// The outcome of a finished session.
#[derive(Debug)]
pub struct RunReport {
    /// One record per completed round.
    pub rounds: Vec<RoundRecord>,
    /// Number of rounds that completed.
    pub rounds_completed: u32,
    /// Rounds planned.
    pub rounds_planned: u32,
    /// The final global model (`None` when the model was to be built for
    /// the participants' input and nobody was admitted).
    pub final_model: Option<ModelWeights>,
    /// Where the final model was written (a [`ModelFile`]; not written
    /// when nobody was admitted).
    pub model_path: PathBuf,
}

/// A bound coordinator, ready to [`run`](Coordinator::run).
pub struct Coordinator {
    endpoint: quinn::Endpoint,
    config: CoordinatorConfig,
    /// The server settings for participants on this machine, where they
    /// differ from the endpoint's (see
    /// [`greyfed_protocol::transport::TransportSettings::for_peer`]).
    loopback_server: Option<Arc<quinn::ServerConfig>>,
}

impl Coordinator {
    /// Validates the configuration, loads the certificate and binds the
    /// QUIC endpoint. With participant-level DP it also turns on the
    /// participants' noise and Poisson selection (at least 2 a round).
    pub fn bind(mut config: CoordinatorConfig) -> Result<Self> {
        if config.rounds == 0 || config.participants == 0 {
            return Err(CoordinatorError::Config(
                "rounds and participants must be at least 1".into(),
            ));
        }
        check_config(&config)?;
        config
            .transport
            .validate()
            .map_err(CoordinatorError::Config)?;
        if let Some(dp) = config.dp {
            dp.check(
                config.secagg.max_norm,
                matches!(config.aggregation, AggregationKind::SecAgg { .. }),
            )?;
            if let Err(line) = DpLedger::new(dp, config.selection.fraction).check_next()? {
                return Err(CoordinatorError::Config(format!(
                    "the DP budget does not allow a single round: {line}"
                )));
            }
            config.secagg.noise = Some(dp.noise());
            config.selection.poisson = true;
            config.selection.minimum = config.selection.minimum.max(2);
        }
        if let InitialModel::Fixed { weights, .. } = &config.initial {
            weights.validate()?;
        }
        if let Some(cp) = &config.resume {
            if let InitialModel::Fixed { weights, .. } = &config.initial
                && !cp.global.same_layout(weights)
            {
                return Err(CoordinatorError::Checkpoint(
                    "the checkpoint's model does not fit the configured architecture".into(),
                ));
            }
            if session_start(&config)?.is_none() {
                return Err(CoordinatorError::Checkpoint(
                    "the checkpoint does not record its model architecture; resume it with a \
                     fixed model"
                        .into(),
                ));
            }
            if cp.rounds_completed >= config.rounds {
                return Err(CoordinatorError::Checkpoint(format!(
                    "all {} rounds are already completed",
                    cp.rounds_completed
                )));
            }
            match &cp.settings {
                Some(s) => {
                    let diffs = s.differences(&config.record());
                    if !diffs.is_empty() {
                        return Err(CoordinatorError::Checkpoint(format!(
                            "the checkpoint was written with other settings; resume with the \
                             interrupted run's settings ({})",
                            diffs.join("; ")
                        )));
                    }
                }
                None => warn!("the checkpoint does not record its settings; they are not checked"),
            }
        }
        std::fs::create_dir_all(&config.out_dir).map_err(|source| CoordinatorError::Io {
            path: config.out_dir.clone(),
            source,
        })?;
        let mut server_config = tls::server_config(&config.tls)?;
        server_config.transport_config(Arc::new(tls::transport_config(config.transport)));
        // The same TLS settings with the transport for peers on this machine.
        let loopback = config.transport.for_peer(Ipv6Addr::LOCALHOST.into());
        let loopback_server = (loopback != config.transport).then(|| {
            let mut server = server_config.clone();
            server.transport_config(Arc::new(tls::transport_config(loopback)));
            Arc::new(server)
        });
        let endpoint =
            greyfed_quic::endpoint(config.listen, Some(server_config)).map_err(|source| {
                CoordinatorError::Bind {
                    addr: config.listen,
                    source,
                }
            })?;
        Ok(Self {
            endpoint,
            config,
            loopback_server,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint
            .local_addr()
            .map_err(|source| CoordinatorError::Io {
                path: PathBuf::from("<quic endpoint>"),
                source,
            })
    }

    /// Runs the session to its end or until `shutdown` completes.
    ///
    /// Writes the run's record to `OUT/run.json` when it starts, and again
    /// when the first admitted participant fixes the model, classes or
    /// cipher (see [`crate::run_record`]).
    ///
    /// # Errors
    /// [`CoordinatorError::Aborted`] when too few participants remain,
    /// [`CoordinatorError::Interrupted`] on shutdown, I/O errors writing
    /// `run.json`, metrics, checkpoints or the model.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<RunReport> {
        let Coordinator {
            endpoint,
            config,
            loopback_server,
        } = self;
        let started = Instant::now();
        let dp_ledger = config
            .dp
            .map(|dp| DpLedger::new(dp, config.selection.fraction));
        // From the OS: the session id separates this session's secure
        // aggregation keys from any other's, so nobody may predict it (the
        // run seed is a setting others can read).
        let session_id = {
            let mut bytes = [0u8; 8];
            rand::TryRng::try_fill_bytes(&mut rand::rngs::SysRng, &mut bytes)
                .map_err(|e| CoordinatorError::Config(format!("no OS randomness: {e}")))?;
            u64::from_le_bytes(bytes)
        };
        let session = CoordinatorSession::new(
            SessionConfig {
                session_id,
                participants: config.participants,
                min_participants: config.min_participants.max(1),
                selection: config.selection,
                rounds: config.rounds,
                training: config.training.clone(),
                round_timeout: config.round_timeout,
                // Not one stage: a single silent evaluator holds the first stage
                // to its deadline, and the others still need theirs.
                evaluation_timeout: config.secagg.sum_deadline(),
                join_timeout: config.join_timeout,
                key_fingerprint: config.key_fingerprint.clone(),
                seed: config.seed,
                first_round: config.resume.as_ref().map_or(1, |c| c.rounds_completed + 1),
                max_claimed_samples: config.max_claimed_samples,
                fold_evaluation: true,
            },
            session_start(&config)?.unwrap_or_else(|| config.initial.clone()),
            build_aggregator(&config, session_id)?,
            started,
        )?
        .with_sealed(config.resume.as_ref().and_then(|cp| cp.sealed.clone()));
        let mut record = config.record();
        learn_from_session(&mut record, &session);
        // Record-level DP goes on from the ledger an interrupted run's
        // checkpoint recorded.
        let record_dp = match config.training.dp_sgd {
            Some(spec) => {
                let previous = config
                    .resume
                    .as_ref()
                    .and_then(|cp| cp.settings.as_ref()?.dp.as_ref())
                    .filter(|dp| dp.guarantee == "record")
                    .map(|dp| dp.participants.clone())
                    .unwrap_or_default();
                let ledger = RecordLedger::resumed(
                    spec,
                    config.training.batch_size,
                    config.training.local_epochs,
                    previous,
                );
                if let Some(dp) = &mut record.dp {
                    dp.participants = ledger.entries().clone();
                }
                Some(ledger)
            }
            None => None,
        };
        record.write(&config.out_dir)?;
        let mut strategy = match &config.custom_strategy {
            Some(factory) => factory.build(),
            None => config.strategy.build(),
        };
        let mut metrics = MetricsWriter::create(&config.out_dir.join("metrics.jsonl"))?;
        let mut records = Vec::new();
        if let Some(cp) = &config.resume {
            strategy.restore(cp.strategy_state.clone())?;
            // metrics.jsonl may hold a round the crash interrupted after its
            // line was written but before its checkpoint: rewrite it.
            for r in &cp.records {
                metrics.append(r)?;
            }
            records = cp.records.clone();
            info!(
                rounds_completed = cp.rounds_completed,
                "resuming from checkpoint"
            );
        }
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_EVENTS);
        let (links, upload_limits) = LinkPolicy::new(&config);
        let accept = tokio::spawn(accept_loop(
            endpoint.clone(),
            Listener::new(&config, inbound_tx, upload_limits, loopback_server),
        ));
        info!(
            addr = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            participants = config.participants,
            rounds = config.rounds,
            model = ?config.initial,
            "coordinator listening"
        );
        let mut driver = Driver {
            strategy,
            session,
            connections: HashMap::new(),
            metrics,
            records,
            checkpoint_dir: Checkpoint::dir_in(&config.out_dir),
            unsaved: None,
            checkpoint_write: None,
            rounds_planned: config.rounds,
            recent_models: crate::strategy::RecentModels::new(config.average_last),
            round_start: BTreeMap::new(),
            dump_aggregates: config.dump_aggregates.clone(),
            central_evaluator: config.central_evaluator.clone(),
            record,
            out_dir: config.out_dir.clone(),
            round_bytes: BTreeMap::new(),
            max_frame: config.max_frame,
            events: config.events.clone(),
            last_progress: None,
            links,
            model_deltas: config.model_deltas,
            dp: dp_ledger,
            record_dp,
            dp_rounds: BTreeMap::new(),
        };
        driver.report_progress();
        let outcome = driver.run(inbound_rx, shutdown).await;
        // Let writers flush their last frames and peers close, then stop.
        for (_, link) in driver.connections.drain() {
            link.finish(close_code::SHUTDOWN, "coordinator stopped");
        }
        accept.abort();
        let _ = tokio::time::timeout(LINGER, endpoint.wait_idle()).await;
        endpoint.close(close_code::SHUTDOWN.into(), b"coordinator stopped");

        let final_model = driver.session.global().cloned();
        let model_path = config.out_dir.join("model.safetensors");
        match model_file(&driver.session) {
            Some(file) => {
                crate::checkpoint::write_atomic(&model_path, &file.to_safetensors()?)?;
                info!(path = %model_path.display(), "wrote final model");
            }
            None => warn!("nobody was admitted: no model to write"),
        }
        let rounds_completed = driver.session.rounds_completed();
        match outcome {
            Ok(()) => Ok(RunReport {
                rounds: driver.records,
                rounds_completed,
                rounds_planned: config.rounds,
                final_model,
                model_path,
            }),
            Err(e) => Err(e),
        }
    }
}

struct Driver {
    session: CoordinatorSession,
    strategy: Box<dyn Strategy>,
    connections: HashMap<ParticipantId, PeerLink>,
    metrics: MetricsWriter,
    records: Vec<RoundRecord>,
    /// Where a checkpoint is written after every completed round.
    checkpoint_dir: PathBuf,
    /// The last completed round's checkpoint, written once the session's
    /// outputs are drained: when a round completes as the next one's sum
    /// ends (its evaluation rode in that sum), the next round's requests go
    /// out first.
    unsaved: Option<(u32, Checkpoint)>,
    /// The checkpoint being written, and its round.
    checkpoint_write: Option<tokio::task::JoinHandle<Result<u32>>>,
    rounds_planned: u32,
    /// The last rounds' global models, averaged into the final one.
    recent_models: crate::strategy::RecentModels,
    round_start: BTreeMap<u32, Instant>,
    dump_aggregates: Option<PathBuf>,
    central_evaluator: Option<Arc<dyn CentralEvaluator>>,
    /// The run's record: `OUT/run.json` and every checkpoint's settings.
    record: RunRecord,
    /// Where `run.json` is rewritten when the record learns more.
    out_dir: PathBuf,
    /// Frame bytes (up, down) by the round in progress when they crossed.
    round_bytes: BTreeMap<u32, (u64, u64)>,
    max_frame: usize,
    /// Where progress events go, if anywhere.
    events: Option<EventSender>,
    /// Participant-level DP: ε so far (`None`: no DP).
    dp: Option<DpLedger>,
    /// Record-level DP: ε so far per participant (`None`: no DP-SGD).
    record_dp: Option<RecordLedger>,
    /// Each aggregated round's DP figures, until its record is written.
    dp_rounds: BTreeMap<u32, DpRound>,
    /// The progress last sent (only changes are sent).
    last_progress: Option<SessionProgress>,
    /// Admission, upload limits and queue bounds of connections.
    links: LinkPolicy,
    /// Which participants get model deltas.
    model_deltas: ModelDeltas,
}

impl Driver {
    /// Sends `event` to the display, if there is one (a display that went
    /// away is not an error).
    fn emit(&self, event: CoordinatorEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(event);
        }
    }

    /// Completes the record with what the session learnt (see
    /// [`learn_from_session`]) and rewrites `run.json` when that changed it.
    fn update_record(&mut self) -> Result<()> {
        if learn_from_session(&mut self.record, &self.session) {
            self.record.write(&self.out_dir)?;
            debug!("run.json updated");
        }
        Ok(())
    }

    /// Sends the session's progress when it changed since the last call.
    fn report_progress(&mut self) {
        if self.events.is_none() {
            return;
        }
        let now = self.session.progress();
        if self.last_progress != Some(now) {
            self.last_progress = Some(now);
            self.emit(CoordinatorEvent::Progress(now));
        }
    }

    async fn run(
        &mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        tokio::pin!(shutdown);
        loop {
            let deadline = self.session.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => std::future::pending().await,
                }
            };
            // One clock reading per input: the session's stage times and the
            // round times recorded here then agree.
            let now = tokio::select! {
                ev = inbound.recv() => {
                    let Some(ev) = ev else { return Err(CoordinatorError::Aborted("listener stopped".into())) };
                    let now = Instant::now();
                    self.handle_inbound(now, ev);
                    now
                }
                () = sleep => {
                    let now = Instant::now();
                    self.session.handle_timeout(now);
                    now
                }
                () = &mut shutdown => {
                    info!("shutdown requested");
                    return Err(CoordinatorError::Interrupted { rounds_completed: self.session.rounds_completed() });
                }
            };
            let done = self.process_outputs(now).await?;
            self.report_progress();
            if let Some(done) = done {
                return done;
            }
        }
    }

    fn handle_inbound(&mut self, now: Instant, ev: Inbound) {
        match ev {
            Inbound::Connected { id, link } => {
                debug!(id, remote = %link.remote, identity = link.identity, "connection opened");
                self.session.handle_connect(id, link.identity.clone());
                if !self.model_deltas.for_peer(link.remote.ip()) {
                    self.session.send_whole_models(id);
                }
                self.connections.insert(id, link);
            }
            // A connection the driver closed: what it still sent is dropped.
            Inbound::Message { id, .. } if !self.connections.contains_key(&id) => {
                debug!(id, "dropping a message of a closed connection");
            }
            Inbound::Message {
                id,
                msg,
                wire_bytes,
                _permit,
            } => {
                let round = self.round_of(&msg);
                self.round_bytes.entry(round).or_default().0 += wire_bytes as u64;
                let kind = msg.kind();
                trace!(id, kind, "received");
                match self.session.handle_message(now, id, msg) {
                    Ok(()) => {
                        if let Some(link) = self.connections.get_mut(&id) {
                            link.note_accepted();
                        }
                    }
                    // Late or repeated messages: ignore, the peer may still be
                    // useful, unless it sends too many of them in a row. A
                    // reply to a round that moved on without it (a secure
                    // sum needs only some of them) is routine.
                    Err(e @ ProtocolError::WrongRound { current, got }) if got < current => {
                        debug!(id, kind, "ignoring a late message: {e}");
                        self.note_ignored(now, id);
                    }
                    Err(
                        e @ (ProtocolError::WrongRound { .. }
                        | ProtocolError::DuplicateContribution(_)),
                    ) => {
                        warn!(id, kind, "ignoring message: {e}");
                        self.note_ignored(now, id);
                    }
                    Err(e @ ProtocolError::Late(_)) => {
                        debug!(id, kind, "{e}");
                        self.note_ignored(now, id);
                    }
                    Err(e) => {
                        warn!(id, kind, "closing connection: {e}");
                        self.close(id, close_code::PROTOCOL_ERROR, &e.to_string());
                        self.session.handle_disconnect(now, id);
                    }
                }
            }
            Inbound::Closed { id, reason } => {
                if self.connections.remove(&id).is_some() {
                    if let Some(identity) = self.session.participant_identity(id) {
                        warn!(id, identity, "participant disconnected: {reason}");
                    } else {
                        debug!(id, "connection closed: {reason}");
                    }
                }
                self.session.handle_disconnect(now, id);
            }
        }
    }

    /// Counts a message of `id` the session ignored, and disconnects `id`
    /// when that makes [`LinkPolicy::max_ignored`] in a row.
    fn note_ignored(&mut self, now: Instant, id: ParticipantId) {
        let max = self.links.max_ignored;
        let Some(link) = self.connections.get_mut(&id) else {
            return;
        };
        if link.note_ignored(max) {
            let reason = format!(
                "{} sent {} ignored messages in a row (limit {max})",
                link.identity,
                link.ignored()
            );
            warn!(id, identity = link.identity, "disconnecting: {reason}");
            self.close(id, close_code::LIMIT, &reason);
            self.session.handle_disconnect(now, id);
        }
    }

    /// The round whose byte counts `msg` goes to: the one it names (a
    /// round's evaluation overlaps the next round's training), else the
    /// round in progress.
    /// The round whose `bytes_down` counts `msg`: its own, else the current
    /// one; a Welcome (which carries the model) sent before the first round
    /// counts towards that round, which trains from it.
    fn round_of(&self, msg: &Message) -> u32 {
        msg.round().unwrap_or_else(|| match msg {
            Message::Welcome { .. } => self.session.current_round().max(self.session.first_round()),
            _ => self.session.current_round(),
        })
    }

    /// Queues an encoded frame for `to`, counting it towards the `bytes_down`
    /// of `round`. A participant too far behind to take it is closed (its
    /// Closed event then tells the session).
    fn send_frame(&mut self, to: ParticipantId, round: u32, frame: Bytes) {
        let budget = self.links.outbound_budget(&self.session);
        let Some(link) = self.connections.get(&to) else {
            return;
        };
        let len = frame.len() as u64;
        match link.send_frame(frame, budget) {
            Ok(()) => self.round_bytes.entry(round).or_default().1 += len,
            Err(backlog) => {
                warn!(
                    id = to,
                    identity = link.identity,
                    "closing a participant that is {backlog}"
                );
                if let Some(link) = self.connections.remove(&to) {
                    link.close_now(close_code::LIMIT, "too far behind");
                }
            }
        }
    }

    /// Sends an error frame and closes the connection of `id`.
    fn close(&mut self, id: ParticipantId, code: u32, reason: &str) {
        if let Ok(frame) = encode_frame(
            &Message::Error {
                message: reason.to_string(),
            },
            self.max_frame,
        ) {
            let round = self.session.current_round();
            self.send_frame(id, round, frame.into());
        }
        if let Some(link) = self.connections.remove(&id) {
            link.finish(code, reason);
        }
    }

    /// Drains the session: transmits, then events. Returns `Some` when the
    /// session is over.
    async fn process_outputs(&mut self, now: Instant) -> Result<Option<Result<()>>> {
        loop {
            self.flush_transmits();
            let Some(ev) = self.session.poll_event() else {
                self.save_checkpoint().await?;
                return Ok(None);
            };
            match ev {
                SessionEvent::Joined { id, identity } => {
                    self.update_record()?;
                    info!(
                        id,
                        identity,
                        joined = self.session.num_participants(),
                        "participant joined"
                    );
                }
                SessionEvent::Rejected { id, reason } => {
                    warn!(id, "refused participant: {reason}");
                    if let Some(link) = self.connections.remove(&id) {
                        // The Reject frame is already queued; finish after it.
                        link.finish(close_code::REJECTED, &reason);
                    }
                }
                SessionEvent::RoundStarted { round, cohort } => {
                    info!(round, cohort = cohort.len(), "round started");
                    self.round_start.insert(round, now);
                }
                SessionEvent::Aggregated(result) => {
                    debug!(round = result.round, "aggregated");
                    if let Some(dir) = &self.dump_aggregates {
                        let names: Vec<String> = result
                            .contributors
                            .iter()
                            .map(|&id| {
                                self.session
                                    .participant_identity(id)
                                    .unwrap_or("?")
                                    .to_string()
                            })
                            .collect();
                        dump_aggregate(dir, round_global(&self.session)?, &result, &names)?;
                    }
                    let global = round_global(&self.session)?;
                    let stepped = self.strategy.apply(global, &result.mean_update)?;
                    let factor = self.record.server_lr_schedule.factor(
                        u64::from(result.round.saturating_sub(1)),
                        u64::from(self.rounds_planned),
                    );
                    let mut next = crate::strategy::scaled_step(global, stepped, factor)?;
                    if result.round == self.rounds_planned {
                        next = self.recent_models.mean_with(next)?;
                    } else {
                        self.recent_models.push(&next);
                    }
                    if let Some(figures) =
                        self.account_privacy(result.round, &result.contributors)?
                    {
                        self.dp_rounds.insert(result.round, figures);
                    }
                    self.session.apply_global(now, next)?;
                }
                SessionEvent::RoundAbandoned { round, reason } => {
                    warn!(round, "round abandoned, model unchanged: {reason}");
                    self.emit(CoordinatorEvent::RoundAbandoned { round, reason });
                }
                SessionEvent::EvaluationFailed { round, reason } => {
                    warn!(round, "evaluation failed, no metrics this round: {reason}");
                }
                SessionEvent::RoundCompleted(summary) => {
                    let central = match self.central_evaluator.clone() {
                        Some(evaluator) => {
                            let global = round_global(&self.session)?.clone();
                            evaluate_centrally(evaluator, global, summary.round).await
                        }
                        None => None,
                    };
                    self.record_round(now, &summary, central).await?;
                }
                SessionEvent::Finished { rounds_completed } => {
                    info!(rounds_completed, "session finished");
                    self.save_checkpoint().await?;
                    self.checkpoint_written().await?;
                    self.finish_all(close_code::DONE, "session finished");
                    return Ok(Some(Ok(())));
                }
                SessionEvent::Aborted { reason } => {
                    warn!("session aborted: {reason}");
                    self.save_checkpoint().await?;
                    self.checkpoint_written().await?;
                    self.finish_all(close_code::SHUTDOWN, "session aborted");
                    return Ok(Some(Err(CoordinatorError::Aborted(reason))));
                }
                SessionEvent::ClaimClamped {
                    id,
                    identity,
                    field,
                    claimed,
                    cap,
                } => {
                    warn!(
                        id,
                        identity, "{field} claim {claimed} is above the cap; counted as {cap}"
                    );
                }
                SessionEvent::WeightBoundLowered {
                    round,
                    sum,
                    claimed,
                    bound,
                } => {
                    warn!(
                        round,
                        "{sum:?} sum: weight bound lowered from {claimed} to {bound} to fit \
                         the secure-aggregation ring"
                    );
                }
                _ => {}
            }
        }
    }

    /// Encodes and queues everything the session wants to send. The session
    /// gives every evaluator's `EvaluateRequest` the same model (or delta)
    /// `Arc`: that request is encoded once and its bytes shared (not
    /// copied), so a round's evaluation holds one encoded model (and one
    /// delta), not one per evaluator.
    fn flush_transmits(&mut self) {
        let mut evaluate_frames: Vec<(u32, *const (), Bytes)> = Vec::new();
        while let Some((to, msg)) = self.session.poll_transmit() {
            let Some(link) = self.connections.get_mut(&to) else {
                continue;
            };
            trace!(id = to, kind = msg.kind(), "sending");
            if let Message::Welcome { .. } = msg {
                // Admitted: raise the connection's upload limits before the
                // participant can see its Welcome.
                self.links.admit(&self.session, link);
            }
            let frame = match &msg {
                Message::EvaluateRequest { round, global, .. } => {
                    use greyfed_protocol::GlobalModel;
                    let shared = match global {
                        GlobalModel::Weights(w) => Arc::as_ptr(w).cast::<()>(),
                        GlobalModel::Delta(d) => Arc::as_ptr(d).cast::<()>(),
                        GlobalModel::Held { .. } => std::ptr::null(),
                    };
                    match evaluate_frames
                        .iter()
                        .find(|(r, p, _)| r == round && *p == shared)
                    {
                        Some((_, _, frame)) => Ok(frame.clone()),
                        None => encode_frame(&msg, self.max_frame).map(|f| {
                            let f = Bytes::from(f);
                            evaluate_frames.push((*round, shared, f.clone()));
                            f
                        }),
                    }
                }
                _ => encode_frame(&msg, self.max_frame).map(Bytes::from),
            };
            match frame {
                Ok(frame) => {
                    let round = self.round_of(&msg);
                    self.send_frame(to, round, frame);
                }
                Err(e) => warn!(to, kind = msg.kind(), "cannot encode message: {e}"),
            }
        }
    }

    fn finish_all(&mut self, code: u32, reason: &str) {
        // Flush the session's last messages (Finished / Error) first.
        self.flush_transmits();
        for (_, link) in self.connections.drain() {
            link.finish(code, reason);
        }
    }
}

/// Central evaluation of `global` (round `round`'s model) on a blocking
/// thread: the next round's requests are already out, so participants train
/// meanwhile. Failures are logged, not fatal.
async fn evaluate_centrally(
    evaluator: Arc<dyn CentralEvaluator>,
    global: ModelWeights,
    round: u32,
) -> Option<EvalMetrics> {
    match tokio::task::spawn_blocking(move || evaluator.evaluate(&global)).await {
        Ok(Ok(m)) => Some(m),
        Ok(Err(e)) => {
            warn!(round, "central evaluation failed: {e}");
            None
        }
        Err(e) => {
            warn!(round, "central evaluation task failed: {e}");
            None
        }
    }
}

/// A metric for the log: four decimals, or `-` when absent.
fn fmt_metric(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"))
}

/// The global model during a round (the session builds it when the first
/// participant is admitted, before any round).
fn round_global(session: &CoordinatorSession) -> Result<&ModelWeights> {
    session.global().ok_or_else(|| {
        CoordinatorError::Aborted("a round started before the model was built".into())
    })
}

/// The session's final model as a [`ModelFile`]: `None` when nobody was
/// admitted (the input, classes or cipher are then unknown).
fn model_file(session: &CoordinatorSession) -> Option<ModelFile> {
    Some(ModelFile {
        spec: session.model()?.clone(),
        classes: session.classes()?.to_vec(),
        cipher: session.cipher()?.clone(),
        rounds_completed: session.rounds_completed(),
        key_layer_mask: session.training().key_layer_mask,
        sealed: session.sealed().cloned(),
        weights: session.global()?.clone(),
    })
}

/// Fills in what `session` knows and `record` does not yet: the model and
/// classes (fixed at the first admission when built for the participants'
/// input) and the participants' cipher. Returns whether `record` changed.
fn learn_from_session(record: &mut RunRecord, session: &CoordinatorSession) -> bool {
    let mut changed = false;
    if let Some(spec) = session.model()
        && record.model.as_ref() != Some(spec)
    {
        record.model = Some(spec.clone());
        changed = true;
    }
    if let Some(classes) = session.classes()
        && record.classes != classes
    {
        record.classes = classes.to_vec();
        changed = true;
    }
    if let Some(cipher) = session.cipher() {
        let cipher = ImageCipher::from(cipher.clone());
        if record.cipher.as_ref() != Some(&cipher) {
            record.cipher = Some(cipher);
            changed = true;
        }
    }
    changed
}

/// Where a session starts when resuming: the checkpoint's model, with the
/// architecture and classes it records (or the configured fixed ones).
/// `Ok(None)` without a checkpoint.
fn session_start(config: &CoordinatorConfig) -> Result<Option<InitialModel>> {
    let Some(cp) = &config.resume else {
        return Ok(None);
    };
    let recorded = cp.settings.as_ref();
    let fixed = match &config.initial {
        InitialModel::Fixed { spec, classes, .. } => Some((spec, classes)),
        InitialModel::ForInput(_) => None,
    };
    let Some(spec) = recorded
        .and_then(|s| s.model.as_ref())
        .or(fixed.map(|(spec, _)| spec))
    else {
        return Ok(None);
    };
    let classes = recorded
        .map(|s| s.classes.clone())
        .filter(|c| !c.is_empty())
        .or_else(|| fixed.and_then(|(_, c)| c.clone()));
    Ok(Some(InitialModel::Fixed {
        spec: spec.clone(),
        weights: cp.global.clone(),
        classes,
    }))
}

/// The aggregator the configuration asks for. Secure aggregation gets a
/// fresh seed from the OS for its graph order.
fn build_aggregator(
    config: &CoordinatorConfig,
    session_id: u64,
) -> Result<Box<dyn greyfed_protocol::aggregate::Aggregator>> {
    Ok(match config.aggregation {
        AggregationKind::Plain => Box::new(PlainAggregator::with_timeout(config.round_timeout)),
        AggregationKind::SecAgg { full } => {
            let mut seed = [0u8; 32];
            rand::TryRng::try_fill_bytes(&mut rand::rngs::SysRng, &mut seed)
                .map_err(|e| CoordinatorError::Config(format!("no OS randomness: {e}")))?;
            let mut secagg = config.secagg.clone();
            secagg.session_id = session_id;
            secagg.seed = seed;
            secagg.full = full;
            // Signatures are checked before they are relayed, so one
            // participant's bad signature cannot make its neighbours abort.
            // (The TLS handshake already enforces the allow list.)
            let verifier = CertificateVerifier::new(
                &config.tls.client_ca_pem,
                rustls_pki_types::UnixTime::now(),
            )?;
            Box::new(SecAggCoordinator::new(secagg)?.with_verifier(Arc::new(verifier)))
        }
    })
}

/// Test mode: writes a round's mean update, the contributors' names and
/// their total weight.
fn dump_aggregate(
    dir: &Path,
    layout: &ModelWeights,
    result: &greyfed_protocol::aggregate::AggregateResult,
    names: &[String],
) -> Result<()> {
    let mean = layout.with_flat_values(&result.mean_update)?;
    let mut meta = std::collections::HashMap::new();
    meta.insert(
        "greyfed.total_weight".into(),
        result.total_weight.to_string(),
    );
    meta.insert("greyfed.contributors".into(), names.join(","));
    let path = dir.join(format!("round-{}.safetensors", result.round));
    std::fs::write(&path, mean.to_safetensors(&meta)?)
        .map_err(|source| CoordinatorError::Io { path, source })
}
