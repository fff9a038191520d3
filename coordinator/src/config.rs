//! [`CoordinatorConfig`]: everything a coordinator run needs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use greyfed_protocol::{
    AggregationKind, LrSchedule, ModelSpec, ModelWeights, TrainingConfig,
    frame::DEFAULT_MAX_FRAME,
    secagg::coordinator::SecAggConfig,
    session::{InitialModel, ModelFactory, Selection},
};

use std::sync::Arc;

use crate::{
    central::CentralEvaluator,
    checkpoint::Checkpoint,
    events::EventSender,
    privacy::{DpRecord, ParticipantDp},
    run_record::{RunRecord, SecAggRecord, SelectionRecord, TimeoutRecord},
    strategy::{StrategyConfig, StrategyFactory},
    tls::ServerTls,
};

/// Configuration of one coordinator run.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// UDP address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Our certificate and key, the deployment CA and the allow list of
    /// participant certificates (mutual TLS; see [`crate::auth`]).
    pub tls: ServerTls,
    /// Participants to wait for before round 1.
    pub participants: usize,
    /// Fewest participants a round may run with.
    pub min_participants: usize,
    /// Which connected participants train each round (default: all).
    pub selection: Selection,
    /// Rounds to run.
    pub rounds: u32,
    /// The last planned round's model is the mean of the global models of
    /// the last `average_last` rounds, itself included (Polyak averaging of
    /// the iterates: it settles noisy, DP, training and, computed from the
    /// released models, costs no privacy). 0 or 1: no averaging. A resumed
    /// run averages only rounds it ran itself; a session ended early (a DP
    /// budget) keeps its last model.
    pub average_last: u32,
    /// The model round 1 starts from: fixed, or built for the first
    /// admitted participant's input (image size, planes, classes).
    pub initial: InitialModel,
    /// Local training settings sent to participants.
    pub training: TrainingConfig,
    /// How the mean update becomes the next global model.
    pub strategy: StrategyConfig,
    /// The strategy's step over the rounds: round `r` of `R` moves the
    /// model `factor(r - 1, R)` times the way the strategy says (for the
    /// built-in strategies: their server learning rate times that factor;
    /// their momentum buffers are unchanged). `Constant` (the default):
    /// the strategy's step. A decaying step settles a noisy (DP) training.
    pub server_lr_schedule: LrSchedule,
    /// A strategy of the user's own, used instead of `strategy` when set
    /// (the run record names it).
    pub custom_strategy: Option<Arc<dyn StrategyFactory>>,
    /// How updates are summed: secure aggregation (default, SecAgg+) or plain.
    pub aggregation: AggregationKind,
    /// Secure-aggregation parameters (clipping, bits, dropout and corrupt
    /// bounds, stage timeout). `session_id`, `seed`, `full` and `max_weight`
    /// are set per session (the last from the cohort's sample counts).
    pub secagg: SecAggConfig,
    /// Hard limit on a round's training phase (local training plus
    /// aggregation); evaluations get [`SecAggConfig::sum_deadline`].
    pub round_timeout: Duration,
    /// How long to wait for participants to join (`None`: forever).
    pub join_timeout: Option<Duration>,
    /// Image key fingerprint participants must present (`None`: the first
    /// admitted participant's, which the others must then match). A
    /// fingerprint, never the key: the coordinator cannot decrypt images.
    pub key_fingerprint: Option<String>,
    /// Largest frame accepted from a participant, in bytes.
    pub max_frame: usize,
    /// Congestion controller and idle timeout of the coordinator's QUIC
    /// endpoint.
    pub transport: greyfed_protocol::transport::TransportSettings,
    /// Which participants get model downloads as deltas from the model
    /// they hold (default: all but those on this machine).
    pub model_deltas: greyfed_protocol::model_delta::ModelDeltas,
    /// Caps on the training and test sample counts a participant may claim
    /// (default 1 000 000 each). A claim bounds the participant's weight in
    /// the weighted means; larger claims are clamped to the cap (the session
    /// reports each as `SessionEvent::ClaimClamped`), so that one
    /// participant cannot dominate the mean or overflow the
    /// secure-aggregation ring. Raise it for participants with more data.
    pub max_claimed_samples: greyfed_protocol::session::SampleClaimCaps,
    /// A connection must open its stream and send a complete Hello within
    /// this time after its TLS handshake, or it is closed (default 10 s).
    pub hello_timeout: Duration,
    /// Most simultaneous connections of one participant identity (from its
    /// certificate); more are refused at once (default 2: a live one and
    /// the one replacing it after a restart).
    pub max_connections_per_identity: usize,
    /// Most connections not yet admitted to the session (in their TLS
    /// handshake or before their Hello was accepted); more are refused
    /// before their handshake (default 256).
    pub max_pending_connections: usize,
    /// A participant whose messages are ignored this many times in a row
    /// (late, duplicate or for another round; an accepted message starts
    /// the count again) is disconnected (default 16).
    pub max_ignored_messages: u32,
    /// Messages one connection may have waiting for the session; its reader
    /// then waits, and QUIC flow control holds the peer back (default 4).
    pub inbound_queue: usize,
    /// Frames queued for one participant may hold at most this many copies
    /// of the model (plus 1 MiB of small messages); a participant that
    /// falls further behind is disconnected (default 4).
    pub outbound_queue_models: usize,
    /// Directory for `metrics.jsonl` and `model.safetensors`.
    pub out_dir: PathBuf,
    /// Test mode only: write each round's aggregated mean update (with the
    /// contributors and their total weight) to `DIR/round-R.safetensors`.
    pub dump_aggregates: Option<PathBuf>,
    /// Seed for session id and participants' training seeds.
    pub seed: u64,
    /// Continue from this checkpoint: the session starts at round
    /// `rounds_completed + 1` with its model, strategy state and metrics.
    pub resume: Option<Checkpoint>,
    /// Also evaluate every round's global model centrally (off by default;
    /// see [`crate::central`] for why it needs the image key).
    pub central_evaluator: Option<Arc<dyn CentralEvaluator>>,
    /// Where to send progress events for a display (none by default).
    pub events: Option<EventSender>,
    /// Participant-level differential privacy through the secure sum (off
    /// by default). Needs `secagg.max_norm` and secure aggregation; turns on
    /// Poisson selection at `selection.fraction` and weighs every update 1.
    pub dp: Option<ParticipantDp>,
}

impl CoordinatorConfig {
    /// The run's record (`OUT/run.json` and every checkpoint's settings;
    /// see [`crate::run_record`]) as far as the configuration knows it: the
    /// model and classes only when fixed in advance, no cipher (the first
    /// admitted participant fixes it). [`crate::Coordinator::run`] fills
    /// in the rest from the session.
    pub fn record(&self) -> RunRecord {
        let (model, classes) = match &self.initial {
            InitialModel::Fixed { spec, classes, .. } => {
                (Some(spec.clone()), classes.clone().unwrap_or_default())
            }
            InitialModel::ForInput(_) => (None, Vec::new()),
        };
        RunRecord {
            greyfed_version: env!("CARGO_PKG_VERSION").to_string(),
            model,
            classes,
            training: self.training.clone(),
            strategy: self.strategy,
            server_lr_schedule: self.server_lr_schedule,
            average_last: self.average_last,
            custom_strategy: self.custom_strategy.as_ref().map(|f| f.name().to_string()),
            aggregation: self.aggregation,
            seed: self.seed,
            rounds: self.rounds,
            participants: self.participants,
            min_participants: self.min_participants.max(1),
            selection: SelectionRecord::from(self.selection),
            secagg: SecAggRecord::from(&self.secagg),
            timeouts: TimeoutRecord::new(
                self.secagg.stage_timeout,
                self.round_timeout,
                self.join_timeout,
            ),
            key_fingerprint: self.key_fingerprint.clone(),
            cipher: None,
            central_evaluation: self.central_evaluator.is_some(),
            dp: self
                .dp
                .map(|dp| {
                    DpRecord::new(
                        &dp,
                        self.selection.fraction,
                        self.rounds,
                        self.secagg.max_norm.unwrap_or(0.0),
                    )
                })
                .or_else(|| self.training.dp_sgd.as_ref().map(DpRecord::record_level)),
            resumed: self.resume.is_some(),
        }
    }

    /// A configuration with greyfed's defaults for everything but the TLS
    /// material, the initial model (fixed: participants' input must fit
    /// `model`) and the output directory.
    pub fn new(
        tls: ServerTls,
        model: ModelSpec,
        initial_weights: ModelWeights,
        out_dir: PathBuf,
    ) -> Self {
        Self::with_initial(
            tls,
            InitialModel::Fixed {
                spec: model,
                weights: initial_weights,
                classes: None,
            },
            out_dir,
        )
    }

    /// A configuration whose model `factory` builds for the first admitted
    /// participant's input, with greyfed's defaults otherwise.
    pub fn for_input(tls: ServerTls, factory: Arc<dyn ModelFactory>, out_dir: PathBuf) -> Self {
        Self::with_initial(tls, InitialModel::ForInput(factory), out_dir)
    }

    /// A configuration starting from `initial`, with greyfed's defaults
    /// otherwise.
    pub fn with_initial(tls: ServerTls, initial: InitialModel, out_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls,
            participants: 10,
            min_participants: 1,
            selection: Selection::default(),
            rounds: 10,
            initial,
            training: TrainingConfig::default(),
            strategy: StrategyConfig::default(),
            server_lr_schedule: LrSchedule::Constant,
            average_last: 1,
            custom_strategy: None,
            aggregation: AggregationKind::SecAgg { full: false },
            secagg: SecAggConfig::new(0, [0; 32]),
            round_timeout: Duration::from_secs(600),
            join_timeout: None,
            key_fingerprint: None,
            max_frame: DEFAULT_MAX_FRAME,
            transport: Default::default(),
            model_deltas: Default::default(),
            max_claimed_samples: greyfed_protocol::session::SampleClaimCaps::default(),
            hello_timeout: Duration::from_secs(10),
            max_connections_per_identity: 2,
            max_pending_connections: 256,
            max_ignored_messages: 16,
            inbound_queue: 4,
            outbound_queue_models: 4,
            out_dir,
            dump_aggregates: None,
            seed: 0,
            resume: None,
            central_evaluator: None,
            events: None,
            dp: None,
        }
    }
}
