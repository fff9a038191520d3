//! The participant's I/O shell: connects to the coordinator, drives the
//! sans-IO [`ParticipantSession`], and runs local training and evaluation on
//! blocking threads when the session asks for them.
//!
//! Images are encrypted once, in [`LocalData::prepare`], before any
//! connection is made; what leaves the process is only model updates and
//! evaluation sums.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use greyfed_protocol::{
    Hello, InputSpec, Message, ModelSpec, ModelWeights, PROTOCOL_VERSION, ParticipantId,
    ProtocolError,
    frame::{DEFAULT_MAX_FRAME, FrameDecoder, encode_frame},
    model_file::ModelFile,
    participant::{ParticipantEvent, ParticipantSession},
    secagg::{
        auth::{SecAggAuth, SecAggPolicy},
        x509::{CertificateSigner, CertificateVerifier},
    },
};
use rand::{
    SeedableRng,
    rngs::{StdRng, SysRng},
};
use tracing::{debug, info, trace, warn};

use self::dp::{OwnDpLedger, check_dp_sgd_floor};
use crate::{
    client,
    dropout::{CrashMode, DropoutPlan, DropoutStage, TestHooks, kill_this_process},
    error::{ParticipantError, Result},
    train::{StepProgress, evaluate},
};

mod dp;
mod local_data;
mod training;

pub use local_data::LocalData;
use training::{Trained, Training, TrainingJob, keep, submit_metrics};

/// Batch size used for evaluation (does not affect results).
const EVAL_BATCH: usize = 256;
/// First wait before reconnecting; doubles after each failed attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Shortest time between two [`ParticipantProgress::Training`] events.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// What a participant tells a progress display (see
/// [`ParticipantConfig::progress`]); the participant draws nothing itself.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ParticipantProgress {
    /// Admitted to the coordinator's session.
    Joined {
        /// Our id in the session.
        id: ParticipantId,
        /// Rounds the session plans.
        rounds: u32,
    },
    /// Local training of `round` under way: sent after the first step, then
    /// at most every 100 ms, and after the last step of every epoch.
    Training {
        /// Round number.
        round: u32,
        /// Steps and epochs done.
        progress: StepProgress,
    },
    /// Local training of `round` finished.
    Trained {
        /// Round number.
        round: u32,
        /// Mean training loss.
        loss: f32,
        /// Seconds the training took.
        secs: f64,
    },
    /// The global model of `round` was evaluated on the local test split.
    Evaluated {
        /// Round number.
        round: u32,
    },
    /// The session finished.
    Finished {
        /// Rounds the coordinator completed.
        rounds_completed: u32,
    },
}

/// The sending half of a participant's progress channel.
pub type ProgressSender = tokio::sync::mpsc::UnboundedSender<ParticipantProgress>;

/// Where and how to reach the coordinator.
#[derive(Clone, Debug)]
pub struct ParticipantConfig {
    /// Coordinator's UDP address.
    pub coordinator: SocketAddr,
    /// Name the coordinator's certificate must carry (DNS name or IP).
    pub server_name: String,
    /// PEM of the CA that signed the coordinator's certificate.
    pub ca_pem: Vec<u8>,
    /// Our client certificate and key: the coordinator admits and knows us
    /// by this certificate's identity.
    pub identity: client::ClientIdentity,
    /// Name for our own logs and dump files; set it to the certificate's
    /// identity (it is never sent: the coordinator reads the certificate).
    pub name: String,
    /// Largest frame accepted from the coordinator, in bytes.
    pub max_frame: usize,
    /// Congestion controller and idle timeout of the participant's QUIC
    /// endpoint.
    pub transport: greyfed_protocol::transport::TransportSettings,
    /// Simulations and tests only: scheduled crashes and update dumps
    /// ([`TestHooks`]). A deployment keeps the default, no hook.
    pub hooks: TestHooks,
    /// How long to keep trying to reconnect, with exponential backoff, after
    /// the connection fails or is lost before the session finished. Zero
    /// gives up at once. A rejection or a protocol error is never retried.
    pub reconnect_for: Duration,
    /// Where to send progress events for a display (none by default).
    pub progress: Option<ProgressSender>,
    /// Where to keep the final global model when the session finishes, as
    /// a [`ModelFile`] (architecture, classes, cipher spec; `greyfed
    /// predict` reads it with the image key). `None`: not kept.
    pub save_model: Option<PathBuf>,
    /// Floors on every secure-aggregation round (cohort size, graph degree,
    /// threshold); a round below them is refused, not joined.
    pub secagg_policy: SecAggPolicy,
    /// The peers this participant accepts as neighbours in secure
    /// aggregation, as `(identity, certificate fingerprint)` (the allow
    /// list's entries). `None`: any participant certificate of the CA.
    pub peer_allow_list: Option<Vec<(String, String)>>,
    /// Record-level DP floor: refuse (end the session with an error) when
    /// the coordinator asks for local training without DP-SGD or with a
    /// noise multiplier below this (`None`: no floor; the coordinator then
    /// decides whether there is any DP-SGD).
    pub min_dp_sgd_noise_multiplier: Option<f32>,
}

impl ParticipantConfig {
    /// A configuration with default limits.
    pub fn new(
        coordinator: SocketAddr,
        server_name: impl Into<String>,
        ca_pem: Vec<u8>,
        identity: client::ClientIdentity,
    ) -> Self {
        Self {
            coordinator,
            server_name: server_name.into(),
            ca_pem,
            identity,
            name: String::from("participant"),
            max_frame: DEFAULT_MAX_FRAME,
            transport: Default::default(),
            hooks: TestHooks::default(),
            reconnect_for: Duration::from_secs(60),
            progress: None,
            save_model: None,
            secagg_policy: SecAggPolicy::default(),
            peer_allow_list: None,
            min_dp_sgd_noise_multiplier: None,
        }
    }

    /// The credentials this participant signs its secure-aggregation keys
    /// with (its TLS client certificate and key) and checks its neighbours'
    /// with (the CA, the peer allow list), with its floors.
    ///
    /// # Errors
    /// Unreadable certificate or key, or a key that is not the certificate's.
    pub fn secagg_auth(&self) -> Result<SecAggAuth> {
        let tls = |e: greyfed_protocol::ProtocolError| {
            ParticipantError::Tls(format!("secure-aggregation credentials: {e}"))
        };
        let signer = CertificateSigner::from_pem(&self.identity.cert_pem, &self.identity.key_pem)
            .map_err(tls)?;
        let mut verifier =
            CertificateVerifier::new(&self.ca_pem, rustls_pki_types::UnixTime::now())
                .map_err(tls)?;
        if let Some(allow) = &self.peer_allow_list {
            verifier = verifier.with_allow_list(allow.iter().cloned());
        }
        Ok(SecAggAuth {
            signer: Arc::new(signer),
            verifier: Arc::new(verifier),
            policy: self.secagg_policy.clone(),
        })
    }
}

/// What a participant did in a session.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParticipantReport {
    /// Our id in the session.
    pub id: Option<ParticipantId>,
    /// Rounds we trained in.
    pub rounds_trained: u32,
    /// Rounds the coordinator completed, as its closing message said (0 when
    /// we [`vanished`](Self::vanished) before it).
    pub rounds_completed: u32,
    /// The scheduled dropout that ended us, when it did so by
    /// [`CrashMode::Vanish`] (a simulation's planned outcome, not an error);
    /// `None` when we stayed to the end. A [`CrashMode::KillProcess`] crash
    /// never returns.
    pub vanished: Option<DropoutPlan>,
    /// Record-level DP: ε (at the session's δ) of the DP-SGD steps behind
    /// the updates we submitted, by our own accountant from our own image
    /// count (`None` without DP-SGD).
    pub dp_epsilon: Option<f64>,
}

/// Joins the coordinator's session and takes part until it finishes.
///
/// When the connection fails or is lost before the session finished, it
/// reconnects with exponential backoff for up to
/// [`ParticipantConfig::reconnect_for`] and joins afresh (a new Hello); a
/// restarted coordinator admits it again, and a running one lets it train
/// from the next round.
///
/// # Returns
/// What we did: once the session finished, or, with a scheduled dropout of
/// [`CrashMode::Vanish`] ([`ParticipantConfig::hooks`]), as soon as we
/// vanished, with [`ParticipantReport::vanished`] set.
///
/// # Errors
/// Connection failures (once reconnecting gave up), TLS failures (a
/// certificate the coordinator refuses is not retried), a rejection by the
/// coordinator, protocol violations, or a model the local data does not
/// fit.
pub async fn run(config: &ParticipantConfig, data: Arc<LocalData>) -> Result<ParticipantReport> {
    config
        .transport
        .validate()
        .map_err(ParticipantError::Connection)?;
    let mut tls = client::client_config(&config.ca_pem, &config.identity)?;
    tls.transport_config(Arc::new(greyfed_quic::transport_config(
        config.transport.for_peer(config.coordinator.ip()),
    )));
    let mut report = ParticipantReport::default();
    // Across reconnections: every update we submitted counts.
    let mut own_dp = OwnDpLedger::default();
    let mut lost_since: Option<Instant> = None;
    let mut backoff = FIRST_BACKOFF;
    loop {
        report.id = None;
        let err =
            match connect_once(config, tls.clone(), data.clone(), &mut report, &mut own_dp).await {
                Ok(Ended::Finished) => return Ok(report),
                Ok(Ended::Vanished(plan)) => {
                    report.vanished = Some(plan);
                    return Ok(report);
                }
                Err(e @ ParticipantError::Connection(_)) => e,
                Err(e) => return Err(e),
            };
        if report.id.is_some() {
            // We had joined: the loss starts a fresh reconnection window.
            lost_since = Some(Instant::now());
            backoff = FIRST_BACKOFF;
        }
        let since = *lost_since.get_or_insert_with(Instant::now);
        let left = config.reconnect_for.saturating_sub(since.elapsed());
        if left.is_zero() {
            return Err(err);
        }
        let wait = backoff.min(left);
        warn!(
            "{err}; reconnecting in {:.1} s ({:.0} s left)",
            wait.as_secs_f64(),
            left.as_secs_f64()
        );
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// How a session ended without an error (private: a vanish is a test
/// hook's outcome, reported through [`ParticipantReport::vanished`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// The coordinator finished the session.
    Finished,
    /// A scheduled dropout with [`CrashMode::Vanish`] stopped us.
    Vanished(DropoutPlan),
}

/// One connection: connects, takes part in the session, closes.
async fn connect_once(
    config: &ParticipantConfig,
    tls: quinn::ClientConfig,
    data: Arc<LocalData>,
    report: &mut ParticipantReport,
    own_dp: &mut OwnDpLedger,
) -> Result<Ended> {
    let (endpoint, conn) = client::connect(tls, config.coordinator, &config.server_name).await?;
    info!(coordinator = %config.coordinator, name = config.name, "connected");
    let result = session_loop(config, &conn, data, report, own_dp).await;
    match &result {
        Ok(Ended::Finished) => conn.close(0u32.into(), b"done"),
        // A simulated crash says nothing; the handles are simply dropped.
        Ok(Ended::Vanished(_)) => return result,
        Err(e) => conn.close(1u32.into(), e.to_string().as_bytes()),
    }
    // A vanished coordinator never answers the close: do not wait for it.
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
    result
}

/// Sends `event` to the display, if there is one.
fn emit(config: &ParticipantConfig, event: ParticipantProgress) {
    if let Some(tx) = &config.progress {
        let _ = tx.send(event);
    }
}

async fn session_loop(
    config: &ParticipantConfig,
    conn: &quinn::Connection,
    data: Arc<LocalData>,
    report: &mut ParticipantReport,
    own_dp: &mut OwnDpLedger,
) -> Result<Ended> {
    let mut rng = StdRng::try_from_rng(&mut SysRng)
        .map_err(|e| ParticipantError::Connection(format!("no OS randomness: {e}")))?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| client::connection_error(&e))?;
    let mut session = ParticipantSession::new(Hello {
        protocol_version: PROTOCOL_VERSION,
        train_samples: data.train.len() as u64,
        test_samples: data.test.len() as u64,
        image_size: data.image_size,
        classes: data.classes.clone(),
        cipher: data.cipher.clone(),
    })
    .with_secagg_auth(config.secagg_auth()?);
    if let Some(mask) = &data.layer_mask {
        session = session.with_seal_key(mask.seal_key());
    }
    // The latest global model we evaluated, with its round (kept at the end).
    let mut latest: Option<(u32, ModelWeights)> = None;
    let mut spec: Option<ModelSpec> = None;
    let mut training: Option<Training> = None;
    let mut decoder = FrameDecoder::new(config.max_frame);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Send what the session queued, then act on its events.
        while let Some(msg) = session.poll_transmit() {
            if let (Some(plan), Message::Contribution { round, .. }) = (config.hooks.dropout, &msg)
                && plan.round == *round
                && DropoutStage::of_message(&msg) == Some(plan.stage)
            {
                return Ok(crash(&config.hooks, plan));
            }
            trace!(kind = msg.kind(), "sending");
            let frame = encode_frame(&msg, config.max_frame)?;
            send.write_all(&frame)
                .await
                .map_err(|e| client::write_error(&e))?;
        }
        let mut acted = false;
        while let Some(event) = session.poll_event() {
            acted = true;
            match event {
                ParticipantEvent::Joined { id, session: info } => {
                    check_model_fits(&info.model, &data)?;
                    info!(
                        id,
                        model = info.model.name(),
                        rounds = info.rounds,
                        aggregation = info.aggregation.name(),
                        "joined session"
                    );
                    report.id = Some(id);
                    emit(
                        config,
                        ParticipantProgress::Joined {
                            id,
                            rounds: info.rounds,
                        },
                    );
                    spec = Some(info.model);
                }
                ParticipantEvent::Train {
                    round,
                    global,
                    seed,
                    sealed,
                    evaluates,
                } => {
                    if let Some(plan) = config.hooks.dropout
                        && plan
                            == (DropoutPlan {
                                round,
                                stage: DropoutStage::Train,
                            })
                    {
                        return Ok(crash(&config.hooks, plan));
                    }
                    let spec = spec.clone().ok_or_else(|| no_session("Train"))?;
                    let training_config = session
                        .session()
                        .map(|s| s.training.for_round(round, s.rounds))
                        .ok_or_else(|| no_session("Train"))?;
                    check_dp_sgd_floor(config.min_dp_sgd_noise_multiplier, training_config.dp_sgd)?;
                    let dp_sgd = training_config.dp_sgd.map(|dp| {
                        let rate = greyfed_protocol::privacy::Guarantee::Record {
                            samples: data.train.len().max(1) as u64,
                            batch_size: u64::from(training_config.batch_size),
                            local_epochs: training_config.local_epochs,
                        }
                        .sampling_rate();
                        (dp, rate)
                    });
                    let global = data.session_model(&spec, &training_config, global, sealed)?;
                    // Sealed coordinates carry the trained values, not an update.
                    let sealed_range = training_config
                        .sealed_layers
                        .map(|l| l.range(global.num_parameters()))
                        .transpose()?;
                    let frozen = if training_config.freeze_key_layers {
                        if !training_config.key_layer_mask {
                            return Err(ParticipantError::Model(
                                "the coordinator asks to freeze the key-bearing layers of a \
                                 start that is not masked"
                                    .into(),
                            ));
                        }
                        crate::layer_mask::key_bearing_tensors(&spec)?
                    } else {
                        0..0
                    };
                    // The coordinator's seed alone would let it replay this
                    // round to a subset and isolate our update.
                    let seed = if config.hooks.coordinator_seeds {
                        seed
                    } else {
                        seed ^ rand::Rng::next_u64(&mut rng)
                    };
                    let data = data.clone();
                    // A training still running for an older round goes on
                    // to its end, its result dropped.
                    drop(training.take());
                    debug!(round, "training started");
                    training = Some(Training {
                        round,
                        started: Instant::now(),
                        dp_sgd,
                        sealed_range,
                        evaluates,
                        task: TrainingJob {
                            round,
                            spec,
                            global,
                            data,
                            config: training_config,
                            seed,
                            frozen,
                            evaluates,
                            progress: config.progress.clone(),
                        }
                        .spawn()?,
                    });
                }
                ParticipantEvent::Evaluate {
                    round,
                    global,
                    sealed,
                } => {
                    let spec = spec.clone().ok_or_else(|| no_session("Evaluate"))?;
                    let training_config = session
                        .session()
                        .map(|s| s.training.clone())
                        .ok_or_else(|| no_session("Evaluate"))?;
                    let global = data.session_model(&spec, &training_config, global, sealed)?;
                    let data = data.clone();
                    // Awaited here: the session takes no other message
                    // (the next TrainRequest) until the metrics are in. The
                    // model comes back from the task, kept without a copy.
                    let (metrics, global) = tokio::task::spawn_blocking(move || {
                        evaluate(&spec, &global, &data.test, EVAL_BATCH).map(|m| (m, global))
                    })
                    .await
                    .map_err(|e| {
                        ParticipantError::Model(format!("evaluation task failed: {e}"))
                    })??;
                    keep(&mut latest, round, global);
                    submit_metrics(config, &mut session, round, metrics, &mut rng)?;
                }
                ParticipantEvent::Finished { rounds_completed } => {
                    info!(rounds_completed, "session finished");
                    report.rounds_completed = rounds_completed;
                    if let (Some(path), Some(spec)) = (&config.save_model, &spec) {
                        save_model(path, spec, &data, latest.take(), rounds_completed)?;
                    }
                    emit(config, ParticipantProgress::Finished { rounds_completed });
                    let _ = send.finish();
                    return Ok(Ended::Finished);
                }
                _ => {}
            }
        }
        if acted {
            continue; // flush what the events queued before waiting again
        }
        // Wait for the next message, or for local training to finish.
        let msg = if let Some(m) = decoder.next_message()? {
            m
        } else {
            tokio::select! {
                done = async { (&mut training.as_mut().expect("guarded").task).await }, if training.is_some() => {
                    let Training { round, started, dp_sgd, sealed_range, evaluates, .. } = training.take().expect("guarded");
                    let Trained { outcome, global, cpu_secs, evaluation } = done
                        .map_err(|_| ParticipantError::Model("local training panicked".into()))??;
                    emit(config, ParticipantProgress::Trained {
                        round,
                        loss: outcome.mean_loss,
                        secs: started.elapsed().as_secs_f64(),
                    });
                    if let Some(evaluated) = evaluates {
                        let metrics = evaluation.ok_or_else(|| {
                            ParticipantError::Model("the evaluation asked for did not run".into())
                        })??;
                        submit_metrics(config, &mut session, evaluated, metrics, &mut rng)?;
                    }
                    let update = outcome.weights.sub(&global)?;
                    if let Some(evaluated) = evaluates {
                        keep(&mut latest, evaluated, global);
                    }
                    if let Some(dir) = &config.hooks.dump_updates {
                        dump_update(dir, &config.name, round, &update, outcome.samples)?;
                    }
                    let mut update = update.to_flat();
                    if let Some(range) = sealed_range {
                        update[range.clone()].copy_from_slice(&outcome.weights.to_flat()[range]);
                    }
                    debug!(round, loss = outcome.mean_loss, "trained");
                    let submitted = if update.iter().all(|v| v.is_finite()) {
                        if let Some(secs) = cpu_secs {
                            // Late only: submit_update says so below.
                            let _ = session.report_training_time(round, secs);
                        }
                        session.submit_update(round, outcome.mean_loss, update, outcome.samples as f64, &mut rng)
                    } else {
                        Err(ProtocolError::InvalidContribution(
                            "the trained update holds NaN or infinity: local training diverged \
                             (a lower --lr may help)"
                                .into(),
                        ))
                    };
                    match submitted {
                        Ok(()) => {
                            report.rounds_trained += 1;
                            if let Some((dp, rate)) = dp_sgd {
                                report.dp_epsilon = Some(own_dp.add(round, dp, rate, outcome.steps)?);
                            }
                        }
                        // The coordinator moved on without us: nothing to do.
                        Err(e @ ProtocolError::Late(_)) => warn!(round, "update not used: {e}"),
                        // Not fatal: the coordinator leaves us out of this
                        // round at once instead of at its deadline.
                        Err(e) => {
                            warn!(round, "withdrawing from the round: {e}");
                            if let Err(e) = session.withdraw(round) {
                                warn!(round, "could not withdraw: {e}");
                            }
                        }
                    }
                    continue;
                }
                read = recv.read(&mut buf) => match read {
                    Ok(Some(n)) => {
                        decoder.push(&buf[..n]);
                        continue;
                    }
                    Ok(None) => {
                        decoder.finish()?;
                        return Err(ParticipantError::Connection(
                            "the coordinator closed the stream before the session finished".into(),
                        ));
                    }
                    Err(e) => return Err(client::read_error(&e)),
                },
            }
        };
        if let Message::Reject { reason } = &msg {
            return Err(ParticipantError::Rejected(reason.clone()));
        }
        trace!(kind = msg.kind(), "received");
        if let Err(e) = session.handle_message(msg, &mut rng) {
            if session.is_finished() {
                return Err(e.into());
            }
            // A secure-aggregation round we cannot complete; the coordinator
            // leaves us out of it and the next round starts afresh.
            warn!("secure aggregation round failed: {e}");
        }
    }
}

/// Keeps the last global model we evaluated in `path` as a [`ModelFile`]
/// (atomically: a temporary file, then a rename). Nothing to keep (we never
/// evaluated) is logged, not an error.
fn save_model(
    path: &Path,
    spec: &ModelSpec,
    data: &LocalData,
    latest: Option<(u32, ModelWeights)>,
    rounds_completed: u32,
) -> Result<()> {
    let Some((round, weights)) = latest else {
        warn!("no global model was evaluated here; nothing to save");
        return Ok(());
    };
    if round < rounds_completed {
        warn!(
            round,
            rounds_completed, "the last model we received is from an earlier round"
        );
    }
    let file = ModelFile {
        spec: spec.clone(),
        classes: data.classes.clone(),
        cipher: data.cipher.clone(),
        rounds_completed: round.min(rounds_completed),
        key_layer_mask: false,
        sealed: None,
        weights,
    };
    let bytes = file.to_safetensors()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ParticipantError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    // A temporary name of our own: participants on one machine may be told
    // to keep their models at the same path.
    static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("{}-{n}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
        .map_err(|source| ParticipantError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    info!(path = %path.display(), round, "kept the final model");
    Ok(())
}

/// Ends the participant as `plan` says: the process dies, or the session
/// loop is told to stop without a word.
fn crash(hooks: &TestHooks, plan: DropoutPlan) -> Ended {
    warn!(%plan, "scheduled dropout");
    match hooks.crash {
        CrashMode::KillProcess => kill_this_process(),
        CrashMode::Vanish => Ended::Vanished(plan),
    }
}

/// Test mode: writes an unmasked update and its weight for later checks.
fn dump_update(
    dir: &Path,
    name: &str,
    round: u32,
    update: &ModelWeights,
    samples: usize,
) -> Result<()> {
    let mut meta = std::collections::HashMap::new();
    meta.insert("greyfed.weight".to_string(), samples.to_string());
    let bytes = update.to_safetensors(&meta)?;
    let path = dir.join(format!("round-{round}-{name}.safetensors"));
    std::fs::write(&path, bytes).map_err(|source| ParticipantError::Io { path, source })
}

fn no_session(what: &str) -> ParticipantError {
    ParticipantError::Protocol(greyfed_protocol::ProtocolError::UnexpectedMessage {
        expected: "Welcome first",
        got: if what == "Train" {
            "TrainRequest"
        } else {
            "EvaluateRequest"
        },
    })
}

/// Refuses a model whose input size or block size does not match the data
/// and the cipher: a block-wise model only absorbs block-wise encryption when
/// its block size equals the cipher's.
fn check_model_fits(model: &ModelSpec, data: &LocalData) -> Result<()> {
    let input = InputSpec {
        rows: data.image_size.0,
        cols: data.image_size.1,
        channels: data
            .cipher
            .as_ref()
            .map_or(1, |c| c.steps.output_channels()),
        classes: data.classes.clone(),
    };
    if let Some(why) = model.input_mismatch(&input) {
        return Err(ParticipantError::Model(format!(
            "the coordinator's model does not fit our data: {why}"
        )));
    }
    let model_block = match model {
        ModelSpec::BlockNet { block_size, .. } => Some(*block_size),
        ModelSpec::Vit { patch_size, .. } => Some(*patch_size),
        // A custom architecture is block-wise when it says so.
        _ => model
            .param("block_size")
            .and_then(|b| u32::try_from(b).ok()),
    };
    match (model_block, &data.cipher) {
        (Some(m), Some(c)) if m != c.block_size && !c.steps.is_pixel_based() => {
            Err(ParticipantError::Model(format!(
                "the coordinator's {} uses blocks of {m} pixels but our images are \
                 encrypted with block size {}; both must be equal",
                model.name(),
                c.block_size
            )))
        }
        _ => Ok(()),
    }
}
