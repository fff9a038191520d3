//! Command-line definitions (clap). No logic lives here.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use greyfed_coordinator::strategy::StrategyConfig;
use greyfed_participant::data::partition::Partition;
use greyfed_participant::data::{Augmentation, RandomAffine, ShiftedCopies};
use greyfed_participant::dropout::{DropoutPlan, DropoutStage};
use greyfed_protocol::cipher::CipherSteps;

/// greyfed: federated training on encrypted grey-scale images.
#[derive(Debug, Parser)]
// A flag given twice takes its last value, so that flags appended to a
// generated run.sh override the file's (`./run.sh --listen 127.0.0.1:7447`).
#[command(name = "greyfed", version, about, long_about = None, args_override_self = true)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
    /// Write this process's peak resident set size in bytes to FILE at exit
    /// (how `simulate` measures its coordinator and participant processes).
    #[arg(long, global = true, hide = true, value_name = "FILE")]
    pub peak_rss_file: Option<PathBuf>,
    /// No progress bars: one plain line per round on stderr, and only
    /// warnings and errors in the log (unless RUST_LOG says otherwise).
    #[arg(long, short, global = true, conflicts_with = "json")]
    pub quiet: bool,
    /// No progress bars: progress events as JSON lines on stdout (one
    /// object a line with an `event` field), for scripts.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate keys and certificates.
    #[command(subcommand)]
    Keygen(KeygenCommand),
    /// Run the coordinator of a federation.
    Coordinator(Box<CoordinatorArgs>),
    /// Run one participant.
    Participant(ParticipantArgs),
    /// Run a whole federation on this machine: one coordinator and N
    /// participant processes on loopback.
    Simulate(SimulateArgs),
    /// Show what encryption does to images: `--preview out.png` draws plain
    /// images beside their encryption in each mode and the attacks' results.
    Encrypt(EncryptArgs),
    /// Experiments that measure greyfed (accuracy and security tables).
    #[command(subcommand)]
    Experiment(ExperimentCommand),
    /// Render a run's report: PNG plots per round (accuracy, loss, bytes,
    /// stage times, survivors), sample encrypted images, and one
    /// self-contained RUN_DIR/report/report.html.
    Report(ReportArgs),
    /// Configuration files (`--config FILE` of coordinator and participant).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Model files.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Classify images with a trained model file.
    ///
    /// Reads a model.safetensors (kept by every participant), encrypts the
    /// images as training did (--image-key for a model trained on encrypted
    /// images) and writes one CSV row per image with the predicted class and
    /// every class's probability.
    Predict(PredictArgs),
    /// Measure a trained model file's accuracy on labelled test images.
    ///
    /// Evaluates the test split of the data (which must have the model's
    /// classes) and prints per-class accuracy, the confusion matrix and, as
    /// the last line, `accuracy=X samples=N`.
    Evaluate(EvaluateArgs),
    /// Differential privacy: `greyfed dp plan` prints ε for given settings
    /// without training.
    #[command(subcommand)]
    Dp(DpCommand),
}

/// `greyfed model ...`.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// The key transform of a blocknet for plain images: writes the model
    /// that computes the same function on images encrypted with the key
    /// and cipher. Use it to start a federation from a model whose first
    /// layer already fits the cipher (`greyfed coordinator --init OUT`,
    /// with `--fresh`), or to hand out a model trained on plain images that
    /// only works on images encrypted with the key.
    Transform(TransformArgs),
    /// The grid CNN's aligned start for a federation on encrypted images
    /// (`greyfed coordinator --model gridcnn --init OUT`): its token map
    /// places every encrypted block in its plain position. Made by a key
    /// holder from the data's image size and classes, and written masked
    /// with the image key's layer mask, which participants remove
    /// (docs/threat-model.md).
    AlignedStart(AlignedStartArgs),
}

/// `greyfed model aligned-start`.
#[derive(Debug, Args)]
pub struct AlignedStartArgs {
    /// The image key file (omit with --plain).
    #[arg(long, value_name = "FILE", required_unless_present = "plain")]
    pub key_file: Option<PathBuf>,
    /// A start for plain images (no key).
    #[arg(long, conflicts_with = "key_file")]
    pub plain: bool,
    /// The cipher the participants use (`greyfed participant --cipher`).
    #[arg(long, value_parser = parse_cipher, default_value = "block")]
    pub cipher: CipherSteps,
    /// Block size of the cipher and patch size of the model.
    #[arg(long, default_value_t = 4)]
    pub block_size: u32,
    /// Seed of the rest of the initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the model (safetensors).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The data the federation trains on (read for its image size and
    /// classes).
    #[command(flatten)]
    pub data: DataArgs,
}

/// `greyfed model transform`.
#[derive(Debug, Args)]
pub struct TransformArgs {
    /// Model for plain images (a `model.safetensors` of a federation run
    /// with `--plain`); with `--from-key-file`, a model for images encrypted
    /// under that key.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "fresh",
        conflicts_with = "fresh"
    )]
    pub model: Option<PathBuf>,
    /// Transform a fresh initialisation drawn from OS randomness (never
    /// written anywhere): with a known plain model the transformed one
    /// would reveal the key (docs/threat-model.md).
    #[arg(long)]
    pub fresh: bool,
    /// Key rotation: the image key `--model` was trained under. The model is
    /// rotated to `--key-file` (a masked grid CNN is unmasked with the old
    /// key's layer mask and masked with the new key's). Unmasked, the model
    /// and its rotation together show the relative key to whoever holds
    /// both (docs/threat-model.md).
    #[arg(
        long,
        value_name = "FILE",
        requires = "model",
        conflicts_with = "fresh"
    )]
    pub from_key_file: Option<PathBuf>,
    /// The image key file (with `--from-key-file`: the new key).
    #[arg(long, value_name = "FILE")]
    pub key_file: PathBuf,
    /// The cipher the participants use (`greyfed participant --cipher`);
    /// a shared first layer absorbs modes without per-block or per-pixel keys.
    #[arg(long, value_parser = parse_cipher)]
    pub cipher: CipherSteps,
    /// Block size of the cipher and of blocknet.
    #[arg(long, default_value_t = 4)]
    pub block_size: u32,
    /// Where to write the transformed model (safetensors).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

impl TransformArgs {
    /// The typed settings of `greyfed model transform`.
    pub fn settings(&self) -> crate::transform::TransformSettings {
        use crate::transform::TransformSource;
        crate::transform::TransformSettings {
            source: match (&self.model, &self.from_key_file) {
                (Some(model), Some(key)) => TransformSource::Rotate {
                    model: model.clone(),
                    from_key_file: key.clone(),
                },
                (Some(model), None) => TransformSource::Model(model.clone()),
                (None, _) => TransformSource::Fresh,
            },
            key_file: self.key_file.clone(),
            cipher: self.cipher,
            block_size: self.block_size,
            out: self.out.clone(),
        }
    }
}

/// `greyfed config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a configuration file: every table and key, each value as its
    /// flag would parse it, and what the command line must still give.
    /// Errors name the line.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
}

/// `greyfed report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The run's output directory (the --out of `greyfed simulate` or
    /// `greyfed coordinator`): holds metrics.jsonl and run.json.
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
    /// Directory to write the report into (default: RUN_DIR/report).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Image key to encrypt the sample images with (default:
    /// RUN_DIR/keys/ca/image.key, where `simulate` keeps it). Only its
    /// fingerprint appears in the report.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// IDX directory of the sample images (default: the run's data as
    /// recorded in RUN_DIR/summary.json, else the built-in digits).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Seed of the built-in digits for the sample images (default: the run's).
    #[arg(long)]
    pub data_seed: Option<u64>,
}

/// `greyfed experiment ...`.
#[derive(Debug, Subcommand)]
pub enum ExperimentCommand {
    /// Accuracy on encrypted vs plain images per model, cipher mode and
    /// setting, and the attacks on every mode: writes OUT/table.md,
    /// OUT/table.csv, OUT/attacks.md, OUT/attacks.csv and OUT/cells.jsonl.
    Encryption(ExperimentArgs),
    /// What the attacks on the image cipher recover per mode: ciphertext
    /// only with N images of one participant, known plaintext with K pairs,
    /// the fold, and the coordinator's attack on a trained model; writes
    /// OUT/attacks.md, OUT/attacks.csv and OUT/attacks.png.
    Attacks(AttackArgs),
    /// Runs one cell of an experiment grid (used by --jobs).
    #[command(hide = true)]
    Cell {
        /// The cell, as JSON.
        #[arg(long)]
        cell: String,
        /// The experiment's settings.
        #[command(flatten)]
        args: ExperimentArgs,
    },
}

/// `greyfed encrypt`.
#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// PNG file to write the preview grid to (its legend goes to FILE.md).
    #[arg(long)]
    pub preview: PathBuf,
    /// Cipher modes, comma-separated: presets (block, extended, le,
    /// le-extended, pixel) or steps joined by `+` (split, block-shuffle,
    /// rotate-flip, pixel-shuffle, negpos, component-shuffle, pixel-negpos,
    /// per-block).
    #[arg(long, value_delimiter = ',', value_parser = parse_cipher,
          default_value = "block-shuffle,negpos,block,extended,le,le-extended,pixel-negpos,pixel")]
    pub modes: Vec<CipherSteps>,
    /// Image key file (default: a fresh random key, used only for the picture).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Block size of the ciphers.
    #[arg(long, default_value_t = 4)]
    pub block_size: usize,
    /// Test images shown per mode.
    #[arg(long, default_value_t = 6)]
    pub count: usize,
    /// Known plain/cipher pairs (training images) given to the attack.
    #[arg(long, default_value_t = 20)]
    pub known_pairs: usize,
    /// Magnification of every pixel.
    #[arg(long, default_value_t = 2)]
    pub scale: usize,
    /// Data settings (--data DIR: IDX files; default: built-in digits).
    #[command(flatten)]
    pub data: DataArgs,
}

/// Where a model is trained in an experiment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Setting {
    /// One process trains on the whole training split.
    Central,
    /// In-process federation (QUIC on loopback, SecAgg+) of --participants.
    Federated,
}

impl Setting {
    /// `central` or `federated`.
    pub fn name(self) -> &'static str {
        match self {
            Setting::Central => "central",
            Setting::Federated => "federated",
        }
    }
}

/// The first-layer choice of `greyfed experiment encryption`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FirstLayerArg {
    /// Per block for modes that need it, shared otherwise.
    Auto,
    /// Always one kernel for all blocks.
    Shared,
    /// Always one kernel per block position.
    PerBlock,
}

/// How `greyfed experiment encryption` initialises the model of an
/// encrypted cell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum InitArg {
    /// Drawn from the seed, like the plain cell's model (for split modes a
    /// fresh two-plane model).
    #[default]
    Seeded,
    /// The key transform of the plain cell's initial model
    /// (`greyfed_participant::model::encrypted_domain_weights`): the same
    /// function on encrypted images as the plain model on plain images.
    KeyTransformed,
    /// Grid CNN only: the token map starts at the identity for the plain
    /// cell and at its key transform (the block permutation) for encrypted
    /// cells; see docs/threat-model.md for what that start reveals.
    Aligned,
}

/// `greyfed experiment encryption`.
#[derive(Clone, Debug, Args)]
pub struct ExperimentArgs {
    /// A named recipe that sets this command's flags (explicit flags win):
    /// `accurate` (the grid CNN, aligned start in simulate, AdamW, online affine
    /// augmentation) or `demo` (the defaults).
    #[arg(long, value_enum, value_name = "NAME")]
    pub preset: Option<crate::preset::Preset>,
    /// Output directory.
    #[arg(long, default_value = "experiment-encryption")]
    pub out: PathBuf,
    /// Models, comma-separated: blocknet, vit, mixer, gridcnn, cnn.
    #[arg(long, value_delimiter = ',', default_value = "blocknet,vit,cnn")]
    pub models: Vec<String>,
    /// Cipher modes, comma-separated (presets or `+`-joined steps).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "block-shuffle,rotate-flip,negpos,pixel-shuffle,block,extended,le,le-extended,pixel-negpos,pixel"
    )]
    pub modes: Vec<String>,
    /// Settings, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "central,federated"
    )]
    pub settings: Vec<Setting>,
    /// Seeds per cell (0..N): model initialisation, data order and key.
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Training epochs (central).
    #[arg(long, default_value_t = 5)]
    pub epochs: u32,
    /// Rounds (federated).
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// Local epochs per round (federated).
    #[arg(long, default_value_t = 1)]
    pub local_epochs: u32,
    /// Participants (federated).
    #[arg(long, default_value_t = 10)]
    pub participants: usize,
    /// Seconds a federated round may take (each secure-aggregation stage a
    /// fifth of it). A cell's participants share one compute thread, so a
    /// stage lasts as long as all of their local training together.
    #[arg(long, default_value_t = DEFAULT_EXPERIMENT_ROUND_TIMEOUT_SECS)]
    pub round_timeout: u64,
    /// Server strategy of federated cells (central cells ignore it).
    #[command(flatten)]
    pub strategy: StrategyArgs,
    /// Minibatch size.
    #[arg(long, default_value_t = 64)]
    pub batch_size: u32,
    /// Adam learning rate.
    #[arg(long, default_value_t = 0.001)]
    pub lr: f32,
    /// Decoupled weight decay (AdamW); 0 is plain Adam.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Learning-rate schedule over each training (central: all epochs;
    /// federated: each round's local epochs).
    #[arg(long, value_enum, default_value_t = LrScheduleArg::Constant)]
    pub lr_schedule: LrScheduleArg,
    /// Learning-rate schedule over the rounds of federated cells, on top
    /// of `--lr-schedule` (central cells ignore it).
    #[arg(long, value_enum, default_value_t = LrScheduleArg::Constant)]
    pub round_lr_schedule: LrScheduleArg,
    /// Share of the steps spent warming up with `--lr-schedule warmup-cosine`.
    #[arg(long, default_value_t = 0.05, value_parser = parse_share)]
    pub warmup: f32,
    /// Label smoothing of the training loss: the target puts this share of
    /// its mass evenly on all classes (0: plain cross-entropy).
    #[arg(long, default_value_t = 0.0, value_parser = parse_label_smoothing)]
    pub label_smoothing: f32,
    /// Block size of the ciphers and patch size of blocknet and the ViT.
    #[arg(long, default_value_t = 4)]
    pub block_size: u32,
    /// Cells run at once, each in its own process with one compute thread.
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// First layer of blocknet and the ViT: `auto` takes one kernel per
    /// block position exactly for modes with per-block or per-pixel keys
    /// (which a shared kernel cannot absorb), else one shared kernel.
    #[arg(long, value_enum, default_value_t = FirstLayerArg::Auto)]
    pub first_layer: FirstLayerArg,
    /// Initial model of encrypted cells.
    #[arg(long, value_enum, default_value_t = InitArg::Seeded)]
    pub init: InitArg,
    /// Known plain/cipher pairs given to the known-plaintext attack.
    #[arg(long, default_value_t = 20)]
    pub known_pairs: usize,
    /// Held-out test images the attacks are scored on.
    #[arg(long, default_value_t = 200)]
    pub attack_samples: usize,
    /// Keep only the first N training images (federated: N / participants
    /// each); for quick runs.
    #[arg(long)]
    pub max_train: Option<usize>,
    /// Data settings (--data DIR: IDX files; default: built-in digits).
    #[command(flatten)]
    pub data: DataArgs,
}

impl ExperimentArgs {
    /// The arguments a `greyfed experiment cell` child needs to run a cell
    /// exactly as this process would.
    pub fn to_cell_args(&self) -> Vec<String> {
        let mut a = vec![
            format!("--epochs={}", self.epochs),
            format!("--rounds={}", self.rounds),
            format!("--local-epochs={}", self.local_epochs),
            format!("--participants={}", self.participants),
            format!("--batch-size={}", self.batch_size),
            format!("--lr={}", self.lr),
            format!("--weight-decay={}", self.weight_decay),
            format!("--lr-schedule={}", value_name(self.lr_schedule)),
            format!("--warmup={}", self.warmup),
            format!("--block-size={}", self.block_size),
            format!("--first-layer={}", value_name(self.first_layer)),
            format!("--data-seed={}", self.data.data_seed),
        ];
        // Only when set, so that older result directories still match.
        if self.round_lr_schedule != LrScheduleArg::Constant {
            a.push(format!(
                "--round-lr-schedule={}",
                value_name(self.round_lr_schedule)
            ));
        }
        if let Some(dir) = &self.data.data {
            a.push(format!("--data={}", dir.display()));
            // Only when given, so that older result directories still match.
            if let Some((rows, cols)) = self.data.image_size {
                a.push(format!("--image-size={rows}x{cols}"));
            }
            if let Some(fraction) = self.data.test_fraction {
                a.push(format!("--test-fraction={fraction}"));
            }
        }
        if let Some(n) = self.max_train {
            a.push(format!("--max-train={n}"));
        }
        // Only when set, so that older result directories still match.
        if self.label_smoothing > 0.0 {
            a.push(format!("--label-smoothing={}", self.label_smoothing));
        }
        // Only when set, so that results written before the option existed
        // still match their settings.
        if self.round_timeout != DEFAULT_EXPERIMENT_ROUND_TIMEOUT_SECS {
            a.push(format!("--round-timeout={}", self.round_timeout));
        }
        if !self.strategy.is_default() {
            a.extend(
                self.strategy
                    .to_flags()
                    .into_iter()
                    .map(|(flag, value)| format!("--{flag}={value}")),
            );
        }
        if self.init != InitArg::Seeded {
            a.push(format!("--init={}", value_name(self.init)));
        }
        if self.data.shifted_copies > 0 {
            a.push(format!("--shifted-copies={}", self.data.shifted_copies));
            a.push(format!("--max-shift={}", self.data.max_shift));
        }
        if self.data.pixel_noise > 0 {
            a.push(format!("--pixel-noise={}", self.data.pixel_noise));
        }
        a.extend(self.data.affine_flags());
        a
    }
}

/// Default `--round-timeout` of `greyfed experiment encryption`, in seconds.
pub const DEFAULT_EXPERIMENT_ROUND_TIMEOUT_SECS: u64 = 1200;

/// `greyfed keygen ...`.
#[derive(Debug, Subcommand)]
pub enum KeygenCommand {
    /// Everything a deployment on several machines needs, one directory per
    /// machine: a CA, the coordinator's certificate and allow list, a client
    /// certificate and key per participant, the shared image key, and each
    /// machine's settings and run.sh (docs/deploy.md).
    Deployment(DeploymentArgs),
    /// One more participant for an existing bundle, from its CA: a new
    /// member, or a new certificate for a revoked one. Writes BUNDLE/NAME/
    /// and prints the allow-list line to add on the coordinator.
    Participant(AddParticipantArgs),
    /// A deployment CA and the coordinator's directory, without participant
    /// keys or an image key: for certificate requests (`keygen request`,
    /// `keygen sign`) and a sealed image key (docs/deploy.md, "Key custody").
    Ca(CaArgs),
    /// On a participant machine: make this participant's TLS key (it never
    /// leaves the machine; 0600) and a certificate request for the CA.
    Request(RequestArgs),
    /// On the CA machine: check a participant's certificate request and
    /// issue its client certificate; prints the allow-list line.
    Sign(SignArgs),
    /// On one participant machine: seal the image key (a new one, or --key)
    /// to other participants' certificates, one file each (HPKE, RFC 9180).
    SealImageKey(SealImageKeyArgs),
    /// On a participant machine: open a sealed image key with this
    /// participant's certificate and TLS key, and write the image key file.
    UnsealImageKey(UnsealImageKeyArgs),
}

/// `greyfed keygen ca`.
#[derive(Debug, Args)]
pub struct CaArgs {
    /// Directory to create (must not exist or be empty): OUT/ca (stays with
    /// the operator, offline) and OUT/coordinator (the coordinator machine).
    #[arg(long)]
    pub out: PathBuf,
    /// Participants the coordinator waits for (its `participants` setting).
    #[arg(long)]
    pub participants: usize,
    /// Host names or IP addresses of the coordinator (subject names of its
    /// certificate); participants connect to the first. Repeatable.
    #[arg(long = "host", required = true)]
    pub hosts: Vec<String>,
    /// UDP port the coordinator listens on.
    #[arg(long, default_value_t = crate::keygen::DEFAULT_PORT)]
    pub port: u16,
    /// Days the coordinator certificate stays valid (the CA at least ten
    /// years).
    #[arg(long, default_value_t = 365)]
    pub valid_days: u32,
}

/// `greyfed keygen request`.
#[derive(Debug, Args)]
pub struct RequestArgs {
    /// This participant's identity: its certificate's common name and its
    /// name in the coordinator's allow list (letters, digits, `.`, `_`, `-`).
    #[arg(long)]
    pub identity: String,
    /// Directory for participant-key.pem (0600) and participant.csr
    /// (created 0700 if missing; existing files are never overwritten).
    #[arg(long)]
    pub out: PathBuf,
}

/// `greyfed keygen sign`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// The deployment CA certificate (ca/ca.pem).
    #[arg(long)]
    pub ca_cert: PathBuf,
    /// The CA's private key (ca/ca-key.pem, owner-only).
    #[arg(long)]
    pub ca_key: PathBuf,
    /// The participant's certificate request (its participant.csr).
    #[arg(long)]
    pub csr: PathBuf,
    /// Directory for OUT/IDENTITY/ (participant-cert.pem, ca.pem and, when
    /// deployment.json is next to --ca-cert, participant.toml and run.sh),
    /// to send back to the participant.
    #[arg(long)]
    pub out: PathBuf,
    /// Days the certificate stays valid.
    #[arg(long, default_value_t = 365)]
    pub valid_days: u32,
    /// Also append the allow-list line to this file (created if missing),
    /// e.g. the coordinator's allow-list.txt.
    #[arg(long, value_name = "FILE")]
    pub allow_list: Option<PathBuf>,
}

/// `greyfed keygen seal-image-key`.
#[derive(Debug, Args)]
pub struct SealImageKeyArgs {
    /// A recipient's participant certificate (PEM). Repeatable, or several
    /// after one --to.
    #[arg(long, required = true, num_args = 1..)]
    pub to: Vec<PathBuf>,
    /// Directory for OUT/IDENTITY.image-key.sealed per recipient and, when
    /// no --key is given, the new OUT/image.key (0600).
    #[arg(long)]
    pub out: PathBuf,
    /// Seal this existing image key file instead of generating one.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The deployment CA certificate: refuse any --to certificate it did
    /// not issue as a valid participant (client) certificate.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
}

/// `greyfed keygen unseal-image-key`.
#[derive(Debug, Args)]
pub struct UnsealImageKeyArgs {
    /// The sealed file for this participant (IDENTITY.image-key.sealed).
    #[arg(long)]
    pub sealed: PathBuf,
    /// This participant's certificate (participant-cert.pem).
    #[arg(long)]
    pub cert: PathBuf,
    /// This participant's TLS private key (participant-key.pem, owner-only).
    #[arg(long)]
    pub key: PathBuf,
    /// The image key file to write (0600; must not exist), e.g. image.key.
    #[arg(long)]
    pub out: PathBuf,
}

/// `greyfed keygen participant`.
#[derive(Debug, Args)]
pub struct AddParticipantArgs {
    /// The bundle `greyfed keygen deployment` wrote (its ca/ directory is used).
    #[arg(long)]
    pub bundle: PathBuf,
    /// The new certificate's identity (letters, digits, `.`, `_`, `-`);
    /// BUNDLE/NAME must not exist yet.
    #[arg(long)]
    pub name: String,
    /// Days the certificate stays valid.
    #[arg(long, default_value_t = 365)]
    pub valid_days: u32,
}

/// `greyfed keygen deployment`.
#[derive(Debug, Args)]
pub struct DeploymentArgs {
    /// Directory to create (must not exist or be empty; nothing is ever
    /// overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of participants: identities participant-0 ... participant-(N-1).
    #[arg(long)]
    pub participants: usize,
    /// Host names or IP addresses of the coordinator (subject names of its
    /// certificate); participants connect to the first. Repeatable.
    #[arg(long = "host", required = true)]
    pub hosts: Vec<String>,
    /// UDP port the coordinator listens on.
    #[arg(long, default_value_t = crate::keygen::DEFAULT_PORT)]
    pub port: u16,
    /// Days the coordinator and participant certificates stay valid (the CA
    /// at least ten years); an expired certificate is refused.
    #[arg(long, default_value_t = 365)]
    pub valid_days: u32,
}

/// Local optimiser choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OptimizerKind {
    /// Adam (betas 0.9, 0.999).
    Adam,
    /// SGD with momentum.
    Sgd,
    /// Adam with decoupled weight decay (`--weight-decay`).
    Adamw,
}

/// Learning-rate schedule choice (see [`greyfed_protocol::LrSchedule`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LrScheduleArg {
    /// The same learning rate at every step.
    Constant,
    /// Cosine decay towards 0 over each local training.
    Cosine,
    /// Linear warm-up over the first `--warmup` share of the steps, then
    /// cosine decay.
    WarmupCosine,
}

impl LrScheduleArg {
    /// The schedule, with `warmup` (a share of the steps, 0 to 1) used by
    /// `warmup-cosine`.
    pub fn schedule(self, warmup: f32) -> greyfed_protocol::LrSchedule {
        use greyfed_protocol::LrSchedule;
        match self {
            LrScheduleArg::Constant => LrSchedule::Constant,
            LrScheduleArg::Cosine => LrSchedule::Cosine,
            LrScheduleArg::WarmupCosine => LrSchedule::WarmupCosine {
                warmup_permille: (warmup.clamp(0.0, 1.0) * 1000.0).round() as u16,
            },
        }
    }
}

/// Parses `--server-lr-schedule`: `constant` or `cosine`.
fn server_lr_schedule(s: &str) -> Result<LrScheduleArg, String> {
    match LrScheduleArg::from_str(s, false)? {
        LrScheduleArg::WarmupCosine => Err("the server's schedule is constant or cosine".into()),
        other => Ok(other),
    }
}

/// Parses a share between 0 and 1 (`--warmup`).
fn parse_share(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

fn parse_label_smoothing(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not in [0, 1)"))
    }
}

/// Server strategy choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StrategyKind {
    /// FedAvg: `x += server_lr * mean_update`.
    Fedavg,
    /// FedAvg with server momentum (`--server-momentum`).
    Fedavgm,
    /// FedProx: FedAvg on the server, a proximal term in local training (`--proximal-mu`).
    Fedprox,
    /// FedAdam (Reddi et al.): adaptive server steps.
    Fedadam,
}

/// The server strategy and its parameters (`--strategy` and friends), shared
/// by the coordinator, `simulate` and `experiment`.
#[derive(Clone, Debug, PartialEq, Args)]
pub struct StrategyArgs {
    /// Server strategy.
    #[arg(long, value_enum, default_value_t = StrategyKind::Fedavg)]
    pub strategy: StrategyKind,
    /// Server learning rate (default: 1 for FedAvg/FedAvgM, 0.01 for FedAdam).
    #[arg(long)]
    pub server_lr: Option<f32>,
    /// The server's step over the rounds: with `cosine`, round r of R
    /// moves the model (1 + cos(pi (r-1) / R)) / 2 times the strategy's
    /// step (its learning rate scaled, its momentum untouched); settles
    /// noisy (DP) training. `warmup-cosine` is not offered here.
    #[arg(long, value_enum, default_value_t = LrScheduleArg::Constant, value_parser = server_lr_schedule)]
    pub server_lr_schedule: LrScheduleArg,
    /// Server momentum for FedAvgM.
    #[arg(long, default_value_t = 0.9)]
    pub server_momentum: f32,
    /// FedProx proximal coefficient mu (used with `--strategy fedprox`).
    #[arg(long, default_value_t = 0.01)]
    pub proximal_mu: f32,
}

impl StrategyArgs {
    /// The coordinator's strategy; an error names the parameter out of range.
    pub fn config(&self) -> anyhow::Result<StrategyConfig> {
        let config = match self.strategy {
            StrategyKind::Fedavg | StrategyKind::Fedprox => StrategyConfig::FedAvg {
                server_lr: self.server_lr.unwrap_or(1.0),
            },
            StrategyKind::Fedavgm => StrategyConfig::FedAvgM {
                server_lr: self.server_lr.unwrap_or(1.0),
                momentum: self.server_momentum,
            },
            StrategyKind::Fedadam => match StrategyConfig::fedadam() {
                StrategyConfig::FedAdam {
                    beta1, beta2, tau, ..
                } => StrategyConfig::FedAdam {
                    server_lr: self.server_lr.unwrap_or(0.01),
                    beta1,
                    beta2,
                    tau,
                },
                other => other,
            },
        };
        config.validate()?;
        if !(self.proximal_mu.is_finite() && self.proximal_mu >= 0.0) {
            anyhow::bail!("--proximal-mu must be finite and non-negative");
        }
        Ok(config)
    }

    /// The proximal coefficient local training uses: `--proximal-mu` with
    /// FedProx, else 0.
    pub fn proximal_mu(&self) -> f32 {
        match self.strategy {
            StrategyKind::Fedprox => self.proximal_mu,
            _ => 0.0,
        }
    }

    /// The server's schedule (`--server-lr-schedule`; the parser admits
    /// only schedules without a warm-up).
    pub fn server_schedule(&self) -> greyfed_protocol::LrSchedule {
        self.server_lr_schedule.schedule(0.0)
    }

    /// Whether these are the defaults (plain FedAvg).
    pub fn is_default(&self) -> bool {
        self.strategy == StrategyKind::Fedavg
            && self.server_lr.is_none()
            && self.server_lr_schedule == LrScheduleArg::Constant
    }

    /// These settings as (flag without `--`, value) pairs, for the
    /// command lines of child processes.
    pub fn to_flags(&self) -> Vec<(&'static str, String)> {
        let mut flags = vec![("strategy", value_name(self.strategy))];
        if let Some(lr) = self.server_lr {
            flags.push(("server-lr", lr.to_string()));
        }
        flags.push(("server-lr-schedule", value_name(self.server_lr_schedule)));
        flags.push(("server-momentum", self.server_momentum.to_string()));
        flags.push(("proximal-mu", self.proximal_mu.to_string()));
        flags
    }
}

/// `--dropout-stage`: a stage, or `any` (a random stage per crash).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropoutStageArg {
    /// A random stage for each crashing participant.
    Any,
    /// This stage.
    Stage(DropoutStage),
}

impl std::str::FromStr for DropoutStageArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "any" => Ok(DropoutStageArg::Any),
            _ => s
                .parse()
                .map(DropoutStageArg::Stage)
                .map_err(|e| e.to_string()),
        }
    }
}

/// Aggregation scheme choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AggregationArg {
    /// SecAgg+ (sparse neighbour graph): the coordinator learns only the sum.
    #[value(name = "secagg+")]
    SecAggPlus,
    /// Full SecAgg (every pair of participants are neighbours).
    #[value(name = "secagg")]
    SecAgg,
    /// Unprotected sums, for comparison only: the coordinator sees every update.
    Plain,
}

/// Training settings the coordinator sends to participants.
#[derive(Clone, Debug, PartialEq, Args)]
pub struct TrainingArgs {
    /// Number of rounds.
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// The final model is the mean of the global models of the last K
    /// rounds (Polyak averaging: it settles a noisy training, and as a
    /// function of the released models it costs no ε); 1: the last model.
    #[arg(long, default_value_t = 1, value_name = "K", value_parser = clap::value_parser!(u32).range(1..))]
    pub average_last: u32,
    /// Participants do not train the key-bearing tensors (the grid CNN's
    /// patch embedding and token map), so the coordinator sees them only
    /// masked, never the sum of their updates (docs/threat-model.md).
    /// Needs a start masked with the image key's layer mask.
    #[arg(long)]
    pub freeze_key_layers: bool,
    /// Participants train the key-bearing tensors but seal them: they sum
    /// their trained values there under one-time pads from the image key,
    /// so the coordinator never sees those tensors' values or updates and
    /// the participants average them (docs/threat-model.md). Needs a
    /// masked start and secure aggregation without distributed DP.
    #[arg(long, conflicts_with = "freeze_key_layers")]
    pub seal_key_layers: bool,
    /// Local epochs per round.
    #[arg(long, default_value_t = 5)]
    pub local_epochs: u32,
    /// Minibatch size.
    #[arg(long, default_value_t = 32)]
    pub batch_size: u32,
    /// Local optimiser.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Sgd)]
    pub optimizer: OptimizerKind,
    /// Learning rate (default: 0.001 for Adam and AdamW, 0.1 for SGD).
    #[arg(long)]
    pub lr: Option<f32>,
    /// Momentum for SGD.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f32,
    /// Decoupled weight decay for AdamW.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f32,
    /// Learning-rate schedule over each round's local steps.
    #[arg(long, value_enum, default_value_t = LrScheduleArg::Constant)]
    pub lr_schedule: LrScheduleArg,
    /// Learning-rate schedule over the session's rounds, on top of
    /// `--lr-schedule`: with `cosine`, round r of R trains at the rate
    /// times (1 + cos(pi (r-1) / R)) / 2 (`warmup-cosine` warms up over the
    /// `--warmup` share of the rounds).
    #[arg(long, value_enum, default_value_t = LrScheduleArg::Constant)]
    pub round_lr_schedule: LrScheduleArg,
    /// Share of the steps spent warming up with `--lr-schedule warmup-cosine`.
    #[arg(long, default_value_t = 0.05, value_parser = parse_share)]
    pub warmup: f32,
    /// Label smoothing of the training loss: the target puts this share of
    /// its mass evenly on all classes (0: plain cross-entropy).
    #[arg(long, default_value_t = 0.0, value_parser = parse_label_smoothing)]
    pub label_smoothing: f32,
    /// Architecture to train, by its registered name: blocknet, vit, mixer, gridcnn or cnn
    /// (or a model a Rust program registered), built for the participants'
    /// image size and classes.
    #[arg(long, default_value = "blocknet")]
    pub model: String,
    /// Layer widths of the built-in model, comma-separated: blocknet `C,H`
    /// (convolution channels, hidden units; default 32,256), gridcnn
    /// `D,C1,C2,C3` (embedding, three convolutions; default 64,64,64,128).
    /// A smaller model needs less DP noise in total (docs/privacy.md).
    #[arg(long, value_delimiter = ',', value_name = "W,...")]
    pub model_widths: Option<Vec<u32>>,
    /// Block size of the blocknet model and of the image cipher.
    #[arg(long, default_value_t = 4)]
    pub block_size: u32,
    /// Image cipher mode the participants use (a preset such as block,
    /// extended, le, le-extended, pixel, or steps joined by `+`; see
    /// `greyfed encrypt --help`). Sets the model's input planes.
    #[arg(long, default_value = "block", value_parser = parse_cipher)]
    pub cipher: CipherSteps,
    /// Server strategy and its parameters.
    #[command(flatten)]
    pub strategy: StrategyArgs,
    /// How updates are aggregated.
    #[arg(long, value_enum, default_value_t = AggregationArg::SecAggPlus)]
    pub aggregation: AggregationArg,
    /// Secure aggregation: updates are clipped to [-C, C] before quantisation.
    #[arg(long, default_value_t = 1.0)]
    pub secagg_clip: f32,
    /// Secure aggregation: each participant scales its update down to this
    /// L2 norm before quantisation (named in every round's signed setup;
    /// default: no norm bound, only --secagg-clip per element).
    #[arg(long, value_name = "NORM")]
    pub max_update_norm: Option<f32>,
    /// Secure aggregation: at most this many quantisation bits (fewer when the
    /// 32-bit ring needs it for many participants or large sample counts).
    #[arg(long, default_value_t = 16)]
    pub secagg_bits: u32,
    /// Secure aggregation: the fraction of dropouts the neighbour graph is sized for.
    #[arg(long, default_value_t = 0.1)]
    pub dropout_bound: f64,
    /// Secure aggregation: seconds each of the four stages may take.
    #[arg(long, default_value_t = 60)]
    pub stage_timeout: u64,
    /// Seconds participants have to contribute (and to evaluate) per round.
    #[arg(long, default_value_t = 600)]
    pub round_timeout: u64,
    /// Fraction of the connected participants that train each round, chosen
    /// at random per round (every participant evaluates).
    #[arg(long, default_value_t = 1.0)]
    pub cohort_fraction: f64,
    /// Smallest number of participants to train each round.
    #[arg(long, default_value_t = 2)]
    pub min_cohort: usize,
    /// Differential privacy: `participant` (each participant adds discrete
    /// Gaussian noise to its update inside secure aggregation; the cohort
    /// is drawn by Poisson sampling at --cohort-fraction) or `record`
    /// (DP-SGD in local training: every example's gradient clipped to
    /// --dp-clip, Gaussian noise, Poisson batches of expected size
    /// --batch-size). See docs/privacy.md.
    #[arg(long, value_enum, requires = "dp_clip")]
    pub dp: Option<DpLevel>,
    /// DP: noise standard deviation of each round's sum over its L2
    /// sensitivity (with --dp-min-survivors contributors).
    #[arg(long, requires = "dp", conflicts_with = "dp_target_epsilon")]
    pub dp_noise_multiplier: Option<f64>,
    /// DP: choose the smallest noise multiplier that keeps all --rounds
    /// within this ε (the session then reports ε per round and stays
    /// within it if every round has at least --dp-min-survivors).
    #[arg(long, requires = "dp")]
    pub dp_target_epsilon: Option<f64>,
    /// DP: the L2 bound every update is scaled to (the sensitivity; sets
    /// --max-update-norm).
    #[arg(long, value_name = "NORM", requires = "dp")]
    pub dp_clip: Option<f32>,
    /// DP: δ of the reported (ε, δ).
    #[arg(long, default_value_t = 1e-5)]
    pub dp_delta: f64,
    /// DP: fewest contributors the noise is sized for (default: the
    /// expected cohort less the --dropout-bound fraction, at least 2).
    #[arg(long, requires = "dp")]
    pub dp_min_survivors: Option<usize>,
    /// DP budget: end the session, with a line saying so, before a round
    /// whose planned noise would take ε (against model holders) above E.
    /// Unlike --dp-target-epsilon, which sizes the noise for all --rounds,
    /// this leaves the noise alone and cuts the rounds.
    #[arg(long, value_name = "E", requires = "dp")]
    pub dp_max_epsilon: Option<f64>,
}

impl TrainingArgs {
    /// These settings as command-line arguments (how `simulate` passes them
    /// to the coordinator process). Every field appears; a test checks that
    /// parsing them back gives the same settings.
    pub fn to_args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |flag: &str, value: String| {
            a.push(format!("--{flag}"));
            a.push(value);
        };
        push("rounds", self.rounds.to_string());
        push("average-last", self.average_last.to_string());
        push("local-epochs", self.local_epochs.to_string());
        push("batch-size", self.batch_size.to_string());
        push("optimizer", value_name(self.optimizer));
        if let Some(lr) = self.lr {
            push("lr", lr.to_string());
        }
        push("momentum", self.momentum.to_string());
        push("weight-decay", self.weight_decay.to_string());
        push("lr-schedule", value_name(self.lr_schedule));
        push("round-lr-schedule", value_name(self.round_lr_schedule));
        push("warmup", self.warmup.to_string());
        push("label-smoothing", self.label_smoothing.to_string());
        push("model", self.model.clone());
        if let Some(widths) = &self.model_widths {
            let list: Vec<String> = widths.iter().map(u32::to_string).collect();
            push("model-widths", list.join(","));
        }
        push("block-size", self.block_size.to_string());
        push("cipher", self.cipher.to_string());
        for (flag, value) in self.strategy.to_flags() {
            push(flag, value);
        }
        push("aggregation", value_name(self.aggregation));
        push("secagg-clip", self.secagg_clip.to_string());
        if let Some(norm) = self.max_update_norm {
            push("max-update-norm", norm.to_string());
        }
        push("secagg-bits", self.secagg_bits.to_string());
        push("dropout-bound", self.dropout_bound.to_string());
        push("stage-timeout", self.stage_timeout.to_string());
        push("round-timeout", self.round_timeout.to_string());
        push("cohort-fraction", self.cohort_fraction.to_string());
        push("min-cohort", self.min_cohort.to_string());
        if let Some(dp) = self.dp {
            push("dp", value_name(dp));
        }
        if let Some(z) = self.dp_noise_multiplier {
            push("dp-noise-multiplier", z.to_string());
        }
        if let Some(eps) = self.dp_target_epsilon {
            push("dp-target-epsilon", eps.to_string());
        }
        if let Some(clip) = self.dp_clip {
            push("dp-clip", clip.to_string());
        }
        push("dp-delta", self.dp_delta.to_string());
        if let Some(m) = self.dp_min_survivors {
            push("dp-min-survivors", m.to_string());
        }
        if let Some(e) = self.dp_max_epsilon {
            push("dp-max-epsilon", e.to_string());
        }
        if self.freeze_key_layers {
            a.push("--freeze-key-layers".into());
        }
        if self.seal_key_layers {
            a.push("--seal-key-layers".into());
        }
        a
    }
}

/// QUIC transport flags, shared by `coordinator`, `participant` and
/// `simulate`.
#[derive(Args, Debug, Clone)]
pub struct TransportArgs {
    /// Congestion controller for what each side sends: `auto` (default:
    /// CUBIC and datagrams of up to 6,500 bytes to peers on this machine,
    /// BBR to others), `bbr` (paced, barely slowed by random loss, but slow
    /// to open on loopback), `cubic` or `new-reno` (loss-based: about
    /// 100 KB/s at 2% loss and 100 ms round trip). An explicit choice holds
    /// for every peer, with network-sized datagrams.
    #[arg(long, value_name = "NAME", default_value = "auto", value_parser = parse_congestion)]
    pub congestion: greyfed_protocol::transport::Congestion,
    /// Seconds of silence after which a peer counts as gone (the smaller of
    /// the two sides' values applies; quinn stretches it to three probe
    /// timeouts on slow links). Shorter notices a crashed peer sooner,
    /// longer rides out outages.
    #[arg(long, value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(2..=86_400))]
    pub idle_timeout: u64,
}

impl TransportArgs {
    /// The typed settings.
    pub fn settings(&self) -> greyfed_protocol::transport::TransportSettings {
        greyfed_protocol::transport::TransportSettings {
            congestion: self.congestion,
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout),
            ..Default::default()
        }
    }
}

/// Parses a model-delta policy for clap.
pub fn parse_model_deltas(
    text: &str,
) -> Result<greyfed_protocol::model_delta::ModelDeltas, String> {
    text.parse()
}

/// Parses a congestion controller name for clap.
pub fn parse_congestion(text: &str) -> Result<greyfed_protocol::transport::Congestion, String> {
    text.parse()
}

/// Parses a cipher mode for clap.
pub fn parse_cipher(text: &str) -> Result<CipherSteps, String> {
    text.parse()
}

/// Parses an image size `HxW` (rows x columns), e.g. `64x64`.
pub fn parse_image_size(text: &str) -> Result<(usize, usize), String> {
    greyfed_participant::data::parse_image_size(text).map_err(|e| e.to_string())
}

/// The command-line spelling of an enum value.
fn value_name(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .expect("no skipped values")
        .get_name()
        .to_string()
}

/// `greyfed coordinator`.
#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// A named recipe that sets this command's flags (explicit flags win):
    /// `accurate` (the grid CNN, aligned start in simulate, AdamW, online affine
    /// augmentation) or `demo` (the defaults).
    #[arg(long, value_enum, value_name = "NAME")]
    pub preset: Option<crate::preset::Preset>,
    /// TOML file with this command's settings in its `[coordinator]` table
    /// (keys are these flags' names); flags given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// UDP address to listen on.
    #[arg(long, default_value = "0.0.0.0:7447")]
    pub listen: SocketAddr,
    /// Coordinator certificate (PEM), from `greyfed keygen deployment`.
    #[arg(long)]
    pub cert: PathBuf,
    /// Coordinator private key (PEM, owner-only), from `greyfed keygen deployment`.
    #[arg(long)]
    pub key: PathBuf,
    /// The deployment CA certificate: participants' client certificates must
    /// be issued by it.
    #[arg(long)]
    pub ca: PathBuf,
    /// The participants admitted: one `IDENTITY sha256:FINGERPRINT` line
    /// each. Reloaded on SIGHUP; remove a line and reload to revoke.
    #[arg(long, value_name = "FILE")]
    pub allow_list: PathBuf,
    /// Participants to wait for before the first round.
    #[arg(long, default_value_t = 10)]
    pub participants: usize,
    /// Fewest participants a round may start with (default: half of
    /// --participants, at least 1; secure aggregation needs 2 per round).
    #[arg(long)]
    pub min_participants: Option<usize>,
    /// Seconds to wait for participants to join (default: forever).
    #[arg(long)]
    pub join_timeout: Option<u64>,
    /// Largest training or test sample count a participant's Hello may
    /// claim; larger claims are clamped to it (a claim bounds the
    /// participant's weight in the averages), never refused.
    #[arg(long, value_name = "N", default_value_t = greyfed_protocol::session::DEFAULT_MAX_CLAIMED_SAMPLES,
          value_parser = clap::value_parser!(u64).range(1..=u64::from(u32::MAX)))]
    pub max_claimed_samples: u64,
    /// Which participants get model downloads as lossless deltas from the
    /// model they hold: `auto` (all but those on this machine, for which
    /// loopback bytes cost less than the CPU a delta takes), `always` or
    /// `never`.
    #[arg(long, value_name = "WHEN", default_value = "auto", value_parser = parse_model_deltas)]
    pub model_deltas: greyfed_protocol::model_delta::ModelDeltas,
    /// QUIC transport settings.
    #[command(flatten)]
    pub transport: TransportArgs,
    /// Directory for metrics.jsonl and model.safetensors.
    #[arg(long, default_value = "out/coordinator")]
    pub out: PathBuf,
    /// Start from this model instead of a fresh initialisation.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Seed for model initialisation and participants' shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fingerprint of the image key participants must use (`greyfed keygen
    /// deployment` prints it). Default: the first participant's, which the
    /// others must match.
    #[arg(long)]
    pub key_fingerprint: Option<String>,
    /// Test mode only: write each round's aggregated update to DIR.
    #[arg(long, hide = true)]
    pub dump_aggregates: Option<PathBuf>,
    /// Write the bound address to this file once listening (for scripts).
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// Continue an interrupted run from its last completed round: DIR is
    /// that run's --out (its DIR/checkpoint is read). Give the same --out
    /// to continue in place; model, training, strategy, aggregation and seed
    /// settings must match the interrupted run's (checked), --rounds may grow.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Also evaluate every round's model centrally on the test split of this
    /// IDX directory (`builtin` or `builtin:SEED` for the built-in digits).
    /// Off by default: it needs the image key (--image-key), and a
    /// coordinator holding the key can decrypt any participant image it
    /// obtains (docs/threat-model.md).
    #[arg(long, value_name = "DIR")]
    pub test_data: Option<String>,
    /// The image key, for --test-data only (the coordinator encrypts its
    /// test set like the participants encrypt theirs).
    #[arg(long, value_name = "FILE", requires = "test_data")]
    pub image_key: Option<PathBuf>,
    /// With --test-data: participants train on plain images (--plain), so no
    /// key is needed.
    #[arg(long, requires = "test_data", conflicts_with = "image_key")]
    pub plain_test_data: bool,
    /// Training settings.
    #[command(flatten)]
    pub training: TrainingArgs,
}

/// Where a participant's images come from.
#[derive(Clone, Debug, Args)]
pub struct DataArgs {
    /// The images: an image folder (DIR/train/CLASS/* and DIR/test/CLASS/*,
    /// PNG, JPEG, BMP, TIFF or PGM), a CSV manifest (path,label), a
    /// MedMNIST-style .npz file, or an IDX directory; default: the built-in
    /// synthetic digits.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Resize every image to HxW pixels (bilinear); needed when the images
    /// differ in size.
    #[arg(long, value_name = "HxW", value_parser = parse_image_size)]
    pub image_size: Option<(usize, usize)>,
    /// Hold out this fraction of each class as the test split when the data
    /// has none (an image folder without test/, a manifest without a split
    /// column); drawn with --data-seed.
    #[arg(long, value_name = "F")]
    pub test_fraction: Option<f64>,
    /// How the training set is split among participants.
    #[arg(long, default_value = "iid")]
    pub partition: Partition,
    /// Seed of the built-in dataset and of partitioning (must be equal for
    /// all participants so that shards are disjoint).
    #[arg(long, default_value_t = 0)]
    pub data_seed: u64,
    /// Translated copies of every training image to add before encryption
    /// (data augmentation; 0: none). The ViT overfits small datasets, most
    /// of all on split (`le`) images, without them.
    #[arg(long, default_value_t = 0)]
    pub shifted_copies: usize,
    /// Largest translation of the shifted copies, in pixels, each way.
    #[arg(long, default_value_t = 2)]
    pub max_shift: usize,
    /// Uniform noise of up to this many grey levels added to every pixel of
    /// the shifted copies (0: none). It randomises the low 4 bits, which a
    /// model otherwise memorises on split images (le, le-extended, pixel).
    #[arg(long, default_value_t = 0, requires = "shifted_copies")]
    pub pixel_noise: u8,
    /// Online augmentation: rotate every training image by a random angle
    /// of up to this many degrees either way, drawn afresh in every epoch
    /// (on the plain image, before encryption).
    #[arg(long, value_name = "DEG", default_value_t = 0.0)]
    pub affine_rotation: f32,
    /// Online augmentation: scale by a random factor in 1 ± F.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub affine_scale: f32,
    /// Online augmentation: shear by up to this many degrees either way.
    #[arg(long, value_name = "DEG", default_value_t = 0.0)]
    pub affine_shear: f32,
    /// Online augmentation: translate by up to this many pixels along each
    /// axis either way (fractions resample bilinearly).
    #[arg(long, value_name = "PX", default_value_t = 0.0)]
    pub affine_shift: f32,
}

impl DataArgs {
    /// The augmentation the `--shifted-copies` and `--affine-*` flags ask
    /// for; an error names an `--affine-*` value out of range.
    pub fn augmentation(&self) -> anyhow::Result<Augmentation> {
        let random_affine = RandomAffine {
            max_rotation: self.affine_rotation,
            max_scale: self.affine_scale,
            max_shear: self.affine_shear,
            max_shift: self.affine_shift,
        };
        random_affine.validate()?;
        Ok(Augmentation {
            shifted_copies: ShiftedCopies {
                copies: self.shifted_copies,
                max_shift: self.max_shift,
                pixel_noise: self.pixel_noise,
            },
            random_affine,
        })
    }

    /// The `--affine-*` flags with their values (for child command lines);
    /// none when all are 0 (no distortion).
    pub fn affine_flags(&self) -> Vec<String> {
        let values = [
            self.affine_rotation,
            self.affine_scale,
            self.affine_shear,
            self.affine_shift,
        ];
        if values.iter().all(|&v| v == 0.0) {
            return Vec::new();
        }
        vec![
            format!("--affine-rotation={}", self.affine_rotation),
            format!("--affine-scale={}", self.affine_scale),
            format!("--affine-shear={}", self.affine_shear),
            format!("--affine-shift={}", self.affine_shift),
        ]
    }
}

/// `greyfed participant`.
#[derive(Debug, Args)]
pub struct ParticipantArgs {
    /// A named recipe that sets this command's flags (explicit flags win):
    /// `accurate` (the grid CNN, aligned start in simulate, AdamW, online affine
    /// augmentation) or `demo` (the defaults).
    #[arg(long, value_enum, value_name = "NAME")]
    pub preset: Option<crate::preset::Preset>,
    /// TOML file with this command's settings in its `[participant]` table
    /// (keys are these flags' names); flags given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Coordinator address, HOST:PORT.
    #[arg(long)]
    pub coordinator: String,
    /// Name in the coordinator's certificate (default: the HOST of --coordinator).
    #[arg(long)]
    pub server_name: Option<String>,
    /// CA certificate that signed the coordinator's certificate.
    #[arg(long)]
    pub ca: PathBuf,
    /// This participant's client certificate (PEM), from `greyfed keygen
    /// deployment`: the coordinator knows the participant by its identity.
    #[arg(long)]
    pub cert: PathBuf,
    /// The client certificate's private key (PEM, owner-only).
    #[arg(long)]
    pub key: PathBuf,
    /// Shared image key file (64 hex characters, owner-only permissions).
    #[arg(long, alias = "key-file", required_unless_present = "plain")]
    pub image_key: Option<PathBuf>,
    /// Train on plain images (no encryption), for comparison only.
    #[arg(long, conflicts_with = "image_key")]
    pub plain: bool,
    /// Which part of the data this participant holds, I/N (0-based).
    #[arg(long, default_value = "0/1")]
    pub shard: String,
    /// Block size of the image cipher (must equal the model's).
    #[arg(long, default_value_t = 4)]
    pub block_size: usize,
    /// Image cipher mode (must match every other participant's).
    #[arg(long, default_value = "block", value_parser = parse_cipher)]
    pub cipher: CipherSteps,
    /// Crash (SIGKILL this process) at ROUND:STAGE, STAGE one of train,
    /// advertise, share, masked, unmask: for dropout simulations and tests.
    #[arg(long)]
    pub drop_at: Option<DropoutPlan>,
    /// Test mode only: write each round's unmasked update to DIR (defeats
    /// secure aggregation locally; never use in a deployment).
    #[arg(long, hide = true)]
    pub dump_updates: Option<PathBuf>,
    /// Refuse secure-aggregation rounds with fewer participants than this
    /// (with two, each reads the other's update from the next model).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub min_cohort: usize,
    /// Differential privacy floor: refuse a round whose DP noise gives a
    /// noise multiplier below Z from the honest survivors this participant
    /// counts on, or that adds no noise at all (docs/privacy.md). Without
    /// it a coordinator that deviates can switch the noise off.
    #[arg(long, value_name = "Z")]
    pub dp_min_noise_multiplier: Option<f64>,
    /// Record-level differential privacy floor: refuse to train (ending
    /// the session with an error) when the coordinator asks for local
    /// training without DP-SGD or with a noise multiplier below Z. Each
    /// round's ε by this participant's own accountant goes to its log.
    #[arg(long, value_name = "Z")]
    pub dp_sgd_min_noise_multiplier: Option<f32>,
    /// Accept as secure-aggregation neighbours only the certificates listed
    /// in FILE (the coordinator's allow-list format: `identity sha256:…`
    /// per line), distributed out of band. Without it any participant
    /// certificate of the CA is accepted, so whoever holds the CA key could
    /// pose as other participants (docs/threat-model.md).
    #[arg(long, value_name = "FILE")]
    pub peers: Option<PathBuf>,
    /// QUIC transport settings.
    #[command(flatten)]
    pub transport: TransportArgs,
    /// Seconds to keep reconnecting (with backoff) when the coordinator
    /// goes away before the session finished; 0 gives up at once.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub reconnect_for: u64,
    /// Output directory: the final global model is kept there as
    /// model.safetensors (unless --save-model says otherwise).
    #[arg(long, value_name = "DIR", default_value = "out/participant")]
    pub out: PathBuf,
    /// Where to keep the final global model (default: OUT/model.safetensors);
    /// `greyfed predict --model FILE --image-key KEY` uses it.
    #[arg(long, value_name = "FILE", conflicts_with = "no_save_model")]
    pub save_model: Option<PathBuf>,
    /// Do not keep the final model.
    #[arg(long)]
    pub no_save_model: bool,
    /// Data settings.
    #[command(flatten)]
    pub data: DataArgs,
}

impl ParticipantArgs {
    /// Where the final model is kept, if anywhere.
    pub fn model_path(&self) -> Option<PathBuf> {
        if self.no_save_model {
            None
        } else {
            Some(
                self.save_model
                    .clone()
                    .unwrap_or_else(|| self.out.join("model.safetensors")),
            )
        }
    }
}

/// `greyfed simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// A named recipe that sets this command's flags (explicit flags win):
    /// `accurate` (the grid CNN, aligned start in simulate, AdamW, online affine
    /// augmentation) or `demo` (the defaults).
    #[arg(long, value_enum, value_name = "NAME")]
    pub preset: Option<crate::preset::Preset>,
    /// Number of participant processes.
    #[arg(long, default_value_t = 10)]
    pub participants: usize,
    /// Output directory (keys, logs, metrics.jsonl, model.safetensors).
    #[arg(long, default_value = "out/simulate")]
    pub out: PathBuf,
    /// Train on plain images (no encryption), for comparison.
    #[arg(long)]
    pub plain: bool,
    /// Seed for model initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fraction of participants that crash once during the run: that many
    /// (rounded), picked at random, each at a random round.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Where in the round the crashes happen.
    #[arg(long, default_value = "any")]
    pub dropout_stage: DropoutStageArg,
    /// Compute threads per participant process.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Which participants get model downloads as lossless deltas from the
    /// model they hold: `auto` (all but those on the coordinator's machine, for which
    /// loopback bytes cost less than the CPU a delta takes), `always` or
    /// `never`.
    #[arg(long, value_name = "WHEN", default_value = "auto", value_parser = parse_model_deltas)]
    pub model_deltas: greyfed_protocol::model_delta::ModelDeltas,
    /// QUIC transport settings of the coordinator and the participants.
    #[command(flatten)]
    pub transport: TransportArgs,
    /// Give the coordinator the image key so that it also evaluates every
    /// round's model on the whole test split (central evaluation; off by
    /// default, see docs/threat-model.md).
    #[arg(long)]
    pub central_eval: bool,
    /// How the model starts: `fresh` (drawn by the coordinator from
    /// --seed) or `aligned` (--model gridcnn only: the simulation, which
    /// holds the image key, gives the coordinator the key transform of a
    /// start whose token map is the identity, masked with the image key's
    /// layer mask; see docs/threat-model.md) or `digits` (the same, from a
    /// model first trained --start-epochs epochs on the built-in synthetic
    /// digits: public data, so no privacy cost; 28x28 images of 10 classes;
    /// the grid CNN from its aligned weights, other models fresh).
    #[arg(long, value_enum, default_value_t = StartArg::Fresh)]
    pub start: StartArg,
    /// Epochs of pre-training on the built-in digits for `--start digits`.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub start_epochs: u32,
    /// Synthetic digits generated for `--start digits` (each epoch shows
    /// every one randomly rotated, scaled, sheared and shifted).
    #[arg(long, default_value_t = 30_000, value_name = "N")]
    pub start_images: usize,
    /// With `--start digits` on encrypted images, train the key-bearing
    /// layers too. By default they are frozen there (`--freeze-key-layers`):
    /// the coordinator then sees no update of them, for 0.11 points of
    /// accuracy (docs/threat-model.md).
    #[arg(long, conflicts_with_all = ["freeze_key_layers", "seal_key_layers"])]
    pub train_key_layers: bool,
    /// Data settings.
    #[command(flatten)]
    pub data: DataArgs,
    /// Training settings.
    #[command(flatten)]
    pub training: TrainingArgs,
}

/// How `greyfed simulate` starts the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum StartArg {
    /// A fresh initialisation drawn by the coordinator.
    #[default]
    Fresh,
    /// The grid CNN's aligned start, made with the image key.
    Aligned,
    /// A model pre-trained on the built-in synthetic digits, made into the
    /// encrypted domain with the image key like the aligned start.
    Digits,
}

/// `greyfed predict`.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// The model file (model.safetensors written by a participant or the
    /// coordinator).
    #[arg(long, value_name = "FILE")]
    pub model: PathBuf,
    /// The image key the model's training images were encrypted with
    /// (needed unless the model was trained on plain images; its
    /// fingerprint must be the model's).
    #[arg(long, alias = "key-file", value_name = "FILE")]
    pub image_key: Option<PathBuf>,
    /// Classify every image of this dataset: an image folder (every image
    /// file below it, sorted by path), a CSV manifest (its path column, in
    /// order), an IDX directory or a .npz file (train then test images, rows
    /// named train:I and test:I), or `builtin[:SEED]` (the built-in digits).
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "files",
        required_unless_present = "files"
    )]
    pub data: Option<PathBuf>,
    /// Image files to classify (PNG, JPEG, BMP, TIFF, PNM); images of
    /// another size than the model's are resized to it (bilinear).
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Write the CSV (columns path, predicted, probability, then one per
    /// class) to FILE instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// `greyfed evaluate`.
#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// The model file (model.safetensors written by a participant or the
    /// coordinator).
    #[arg(long, value_name = "FILE")]
    pub model: PathBuf,
    /// The image key the model's training images were encrypted with
    /// (needed unless the model was trained on plain images).
    #[arg(long, alias = "key-file", value_name = "FILE")]
    pub image_key: Option<PathBuf>,
    /// Labelled data in any format training reads (image folder, CSV
    /// manifest, .npz, IDX directory), or `builtin` for the built-in digits
    /// (drawn from --data-seed); its test split is evaluated.
    #[arg(long, value_name = "PATH")]
    pub data: PathBuf,
    /// Image size to load the data at (default and only accepted value: the
    /// model's; images of another size are resized to it, bilinear).
    #[arg(long, value_name = "HxW", value_parser = parse_image_size)]
    pub image_size: Option<(usize, usize)>,
    /// Hold out this fraction of each class as the test split when the data
    /// has none: the training run's --test-fraction.
    #[arg(long, value_name = "F")]
    pub test_fraction: Option<f64>,
    /// Seed of that split (and of the built-in digits): the training run's
    /// --data-seed.
    #[arg(long, value_name = "SEED", default_value_t = 0)]
    pub data_seed: u64,
}

mod attacks;
mod dp;
mod settings;

pub use attacks::AttackArgs;
pub use dp::{DpCommand, DpLevel, DpPlanArgs};

pub use settings::parse_shard;

#[cfg(test)]
mod tests;
