//! Secure-aggregation rounds in-process with real crypto (no training, no
//! network): the coordinator's and the participants' time per round, timed
//! against the keystream lower bound, and the bytes per masked element.
//!
//! ```sh
//! cargo run --release --example secagg_bench -- --participants 100 --dim 1000000 --dropout 0.1
//! cargo run --release --example secagg_bench -- --participants 10 --dim 100000 --dropout 0.1 --full
//! # 1,000 participants, blocknet's parameter count, 3 rounds:
//! cargo run --release --example secagg_bench -- --participants 1000 --blocknet --rounds 3 --dropout 0.1
//! ```
//!
//! `--no-auth` swaps the certificate signatures and checks for a stand-in
//! that signs and checks nothing (benchmarks only; never a deployment),
//! which times the cost of authentication side by side:
//!
//! ```sh
//! cargo run --release --example secagg_bench -- --participants 10 --dim 100000 --rounds 5
//! cargo run --release --example secagg_bench -- --participants 10 --dim 100000 --rounds 5 --no-auth
//! ```
//!
//! All five stages run, `--rounds` times with the same coordinator (fresh
//! participants each round, as in a session); in each round a fraction
//! `--dropout` of the participants, drawn anew, drops right after stage 2
//! (before sending its masked input: the expensive case for the coordinator,
//! which must rebuild their pairwise masks). Every call into the coordinator
//! (`begin_round`, `handle_payload`, `handle_dropout`, draining its outbox)
//! is timed, per stage, and so is every call into a participant
//! (`set_input` included, making up the update excluded). The update is
//! masked on one participant at a time, so only one `d`-sized input lives at
//! once.
//!
//! The bounds count keystreams of `d + 1` words: a participant expands
//! `k + 1` (`k` = its live degree), the coordinator `n - D + Σ k_v` to unmask
//! (`D` dropped participants, `k_v` = the surviving neighbours of dropped
//! `v`, at most its degree). The bytes per masked element are the framed
//! `Contribution` carrying one masked input divided by the `d + 1` elements
//! it masks (the update and the weight). The last line is machine-readable.

use std::time::{Duration, Instant};

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use greyfed_protocol::{
    AggregationPayload, Message, ModelSpec,
    aggregate::Aggregator,
    frame::{DEFAULT_MAX_FRAME, encode_frame},
    secagg::{
        auth::{PeerVerifier, SecAggAuth, SecAggPolicy, Signature, StatementSigner},
        coordinator::{SecAggConfig, SecAggCoordinator},
        graph::NeighbourGraph,
        keys::RoundContext,
        participant::SecAggParticipant,
        prg::{PrgKind, fill_mask},
        testing::TestCa,
    },
};
use rand::{RngExt, SeedableRng, rngs::StdRng};

#[derive(Parser)]
#[command(about = "Time secure-aggregation rounds in-process")]
struct Args {
    /// Number of participants n.
    #[arg(long, default_value_t = 100)]
    participants: usize,
    /// Model parameters d per update.
    #[arg(long, default_value_t = 100_000, conflicts_with = "blocknet")]
    dim: usize,
    /// Use the parameter count of the default model (blocknet, block size 4)
    /// as d.
    #[arg(long)]
    blocknet: bool,
    /// Rounds to run with the same coordinator.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Fraction of participants that drop after stage 2, every round.
    #[arg(long, default_value_t = 0.1)]
    dropout: f64,
    /// The dropout fraction the neighbour graph is sized for (`greyfed
    /// --dropout-bound`; the corrupt fraction is the default 0.1).
    #[arg(long, default_value_t = 0.1)]
    dropout_bound: f64,
    /// Full SecAgg (complete graph) instead of SecAgg+.
    #[arg(long)]
    full: bool,
    /// Quantisation bits.
    #[arg(long, default_value_t = 16)]
    bits: u32,
    /// Largest aggregation weight.
    #[arg(long, default_value_t = 16)]
    max_weight: u32,
    /// Seed for everything random.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Sign and check nothing (a stand-in for the certificates), to time
    /// what authentication costs.
    #[arg(long)]
    no_auth: bool,
}

const SESSION: u64 = 42;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The four stages, by their index in [`Times`].
const STAGES: [&str; 5] = ["advertise", "share", "masked", "consistency", "unmask"];

/// Time spent per stage (`0..5` as in [`STAGES`]).
#[derive(Clone, Copy, Default)]
struct Times([Duration; 5]);

impl Times {
    fn total(&self) -> Duration {
        self.0.iter().sum()
    }

    /// Runs `f`, adding its time to `stage`.
    fn time<T>(&mut self, stage: usize, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.0[stage] += t.elapsed();
        out
    }
}

/// One round's measurements.
struct RoundStats {
    coordinator: Times,
    participants: Times,
    /// Participants' stage-3 work alone (opening shares, masking, packing).
    masking: Duration,
    contributors: usize,
    mask_streams: usize,
    unmask_streams: usize,
    upload_bytes: usize,
    max_err: f64,
}

/// Drains the coordinator's outbox into per-participant inboxes.
fn drain(coord: &mut SecAggCoordinator, inbox: &mut [Vec<Message>]) {
    while let Some((to, m)) = coord.poll_transmit() {
        inbox[to as usize].push(m);
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let n = args.participants;
    let d = if args.blocknet {
        greyfed_participant::model::init_weights(&ModelSpec::blocknet_28x28(4), 0)?.num_parameters()
    } else {
        args.dim
    };
    if n < 2 || d == 0 || !(0.0..1.0).contains(&args.dropout) || args.rounds == 0 {
        bail!("need --participants >= 2, --dim >= 1, --rounds >= 1 and 0 <= --dropout < 1");
    }
    let config = SecAggConfig {
        bits: args.bits,
        max_weight: args.max_weight,
        dropout_fraction: args.dropout_bound,
        full: args.full,
        ..SecAggConfig::new(SESSION, [args.seed as u8; 32])
    };
    // Every participant signs with its own certificate; everyone (the
    // coordinator included) checks the signatures, as in a deployment.
    let ca = TestCa::new();
    let policy = SecAggPolicy {
        min_cohort: 2,
        max_dropout_fraction: config.dropout_fraction,
        corrupt_fraction: config.corrupt_fraction,
        min_noise_multiplier: None,
    };
    let (auths, verifier): (Vec<SecAggAuth>, Arc<dyn PeerVerifier>) = if args.no_auth {
        let none = Arc::new(NoAuth);
        let auths = (0..n)
            .map(|_| SecAggAuth {
                signer: none.clone(),
                verifier: none.clone(),
                policy: policy.clone(),
            })
            .collect();
        (auths, none)
    } else {
        let auths = (0..n)
            .map(|i| ca.auth(&format!("participant-{i}"), policy.clone()))
            .collect();
        (auths, ca.verifier())
    };
    let mut coord = SecAggCoordinator::new(config)
        .context("coordinator configuration")?
        .with_verifier(verifier);
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut stats = Vec::new();
    let mut stream = Duration::MAX;
    for round in 1..=args.rounds {
        let s = run_round(&args, &auths, &mut coord, &mut rng, round, d)?;
        let setup = coord.setup().expect("round begun");
        if round == 1 {
            println!(
                "secure aggregation: n = {n}, d = {d}, {} (k = {}, t = {}), PRG {:?}, ring {} bits, \
                 {} dropped after stage 2 per round",
                if args.full { "SecAgg" } else { "SecAgg+" },
                setup.degree,
                setup.threshold,
                setup.prg,
                setup.encoding.ring_bits,
                n - s.contributors
            );
            println!();
            println!(
                "{:>5}  {:>10} {:>10} {:>10} {:>10} {:>10} {:>11}  {:>12} {:>15}  {:>9}",
                "round",
                STAGES[0],
                STAGES[1],
                STAGES[2],
                STAGES[3],
                STAGES[4],
                "coordinator",
                "participants",
                "per participant",
                "max err"
            );
            println!(
                "{:>5}  {:>10} {:>10} {:>10} {:>10} {:>10} {:>11}  {:>12} {:>15}",
                "",
                "(coord ms)",
                "(coord ms)",
                "(coord ms)",
                "(coord ms)",
                "(coord ms)",
                "(ms)",
                "(ms, all)",
                "(ms, mean)"
            );
        }
        let c = &s.coordinator.0;
        println!(
            "{:>5}  {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>11.1}  {:>12.1} {:>15.3}  {:>9.2e}",
            round,
            ms(c[0]),
            ms(c[1]),
            ms(c[2]),
            ms(c[3]),
            ms(c[4]),
            ms(s.coordinator.total()),
            ms(s.participants.total()),
            ms(s.participants.total()) / n as f64,
            s.max_err
        );
        // The keystream lower bound: the fastest of several timings taken
        // between rounds (the minimum is the hardware's speed; a busy moment
        // only inflates single samples).
        stream = stream.min(keystream_time(setup.prg, d + 1));
        stats.push(s);
    }

    let rounds = stats.len() as f64;
    let mean = |f: &dyn Fn(&RoundStats) -> f64| stats.iter().map(f).sum::<f64>() / rounds;
    let coord_ms = mean(&|s| ms(s.coordinator.total()));
    let part_ms = mean(&|s| ms(s.participants.total()));
    let contributors = mean(&|s| s.contributors as f64);
    let avg_mask = mean(&|s| s.masking.as_secs_f64() / s.contributors as f64);
    let mask_bound =
        stream.as_secs_f64() * mean(&|s| s.mask_streams as f64 / s.contributors as f64);
    let unmask = mean(&|s| s.coordinator.0[4].as_secs_f64());
    let unmask_streams = mean(&|s| s.unmask_streams as f64);
    let unmask_bound = stream.as_secs_f64() * unmask_streams;
    let upload_bytes = stats[0].upload_bytes;
    let per_element = upload_bytes as f64 / (d + 1) as f64;
    let stage = |i: usize| mean(&|s| ms(s.coordinator.0[i]));

    println!();
    println!("mean over {} round(s):", stats.len());
    println!(
        "  coordinator per round        {coord_ms:>11.1} ms  ({})",
        (0..STAGES.len())
            .map(|i| format!("{} {:.1}", STAGES[i], stage(i)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  participants per round       {part_ms:>11.1} ms  ({:.3} ms per participant, {:.0} contributors)",
        part_ms / n as f64,
        contributors
    );
    println!();
    println!(
        "{:<38} {:>11} {:>9} {:>11} {:>7}",
        "", "time (ms)", "streams", "bound (ms)", "ratio"
    );
    println!(
        "{:<38} {:>11.3} {:>9} {:>11} {:>7}",
        "keystream, one stream of d+1 words",
        ms(stream),
        1,
        "",
        ""
    );
    println!(
        "{:<38} {:>11.3} {:>9.1} {:>11.3} {:>7.2}",
        "masking, per participant (avg)",
        avg_mask * 1e3,
        mask_bound / stream.as_secs_f64(),
        mask_bound * 1e3,
        avg_mask / mask_bound
    );
    println!(
        "{:<38} {:>11.3} {:>9.0} {:>11.3} {:>7.2}",
        "unmasking, coordinator",
        unmask * 1e3,
        unmask_streams,
        unmask_bound * 1e3,
        unmask / unmask_bound
    );
    println!(
        "{:<38} {:>11}  = {per_element:.3} bytes per masked element ({:.3} per parameter)",
        "masked upload (framed bytes)",
        upload_bytes,
        upload_bytes as f64 / d as f64
    );
    let peak_mb = greyfed::memory::peak_rss_bytes().map_or(0.0, |b| b as f64 / 1e6);
    println!("{:<38} {peak_mb:>11.1} MB", "peak RSS of this process");
    println!();
    println!(
        "coordinator_ms_per_round={coord_ms:.3} participants_ms_per_round={part_ms:.3} \
         mask_vs_bound={:.3} unmask_vs_bound={:.3} bytes_per_element={per_element:.3} \
         peak_rss_mb={peak_mb:.1}",
        avg_mask / mask_bound,
        unmask / unmask_bound,
    );
    Ok(())
}

/// Runs round `round` and checks its result against the exact weighted mean.
fn run_round(
    args: &Args,
    auths: &[SecAggAuth],
    coord: &mut SecAggCoordinator,
    rng: &mut StdRng,
    round: u32,
    d: usize,
) -> Result<RoundStats> {
    let n = args.participants;
    let (mut ct, mut pt) = (Times::default(), Times::default());
    let now = Instant::now();
    let cohort: Vec<u32> = (0..n as u32).collect();
    let mut inbox: Vec<Vec<Message>> = vec![Vec::new(); n];
    let model = [round as u8; 32];
    ct.time(0, || -> Result<()> {
        coord.set_model_digest(model);
        coord
            .begin_round(now, round, &cohort, d)
            .context("begin_round")?;
        drain(coord, &mut inbox);
        Ok(())
    })?;
    let setup = coord.setup().expect("round begun").clone();
    let graph = NeighbourGraph::from_order(setup.graph_order.clone(), setup.degree as usize)?;
    let ctx = RoundContext::update(SESSION, round);
    let mut parts: Vec<SecAggParticipant> = cohort
        .iter()
        .map(|&id| SecAggParticipant::new(id, ctx, Some(d), auths[id as usize].clone(), model))
        .collect();

    // Stages 1 and 2: keys and shares, everyone.
    for stage in 0..2 {
        for (id, p) in parts.iter_mut().enumerate() {
            let msgs = std::mem::take(&mut inbox[id]);
            let ups = pt.time(stage, || -> Result<Vec<AggregationPayload>> {
                for m in msgs {
                    p.handle_message(m, rng)?;
                }
                Ok(std::iter::from_fn(|| p.poll_transmit()).collect())
            })?;
            ct.time(stage, || -> Result<()> {
                for up in ups {
                    coord.handle_payload(now, id as u32, up)?;
                }
                Ok(())
            })?;
        }
        ct.time(stage, || drain(coord, &mut inbox));
    }

    // Who drops before stage 3.
    let dropped_count = (args.dropout * n as f64).round() as usize;
    let mut order = cohort.clone();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let mut is_dropped = vec![false; n];
    ct.time(2, || {
        for &id in &order[..dropped_count] {
            is_dropped[id as usize] = true;
            coord.handle_dropout(now, id);
        }
        drain(coord, &mut inbox);
    });

    // Stage 3: one participant at a time.
    let mut exact = vec![0f64; d];
    let mut total_weight = 0u64;
    let mut masking = Duration::ZERO;
    let mut mask_streams = 0usize;
    let mut upload_bytes = 0usize;
    let live: Vec<usize> = (0..n).filter(|&i| !is_dropped[i]).collect();
    for &id in &live {
        let update: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let weight = rng.random_range(1..=args.max_weight);
        for (e, u) in exact.iter_mut().zip(&update) {
            *e += weight as f64 * *u as f64;
        }
        total_weight += weight as u64;
        let p = &mut parts[id];
        pt.time(2, || p.set_input(&update, weight, rng))?;
        drop(update);
        let msgs = std::mem::take(&mut inbox[id]);
        let t = Instant::now();
        let up = pt.time(2, || -> Result<AggregationPayload> {
            for m in msgs {
                p.handle_message(m, rng)?;
            }
            p.poll_transmit().context("no masked input")
        })?;
        masking += t.elapsed();
        // Everyone in N2 (who completed stage 2, later dropouts included).
        mask_streams += graph.neighbours(id as u32).len() + 1;
        if upload_bytes == 0 {
            let frame = encode_frame(
                &Message::Contribution {
                    round,
                    train_loss: 0.0,
                    payload: up.clone(),
                },
                DEFAULT_MAX_FRAME,
            )?;
            upload_bytes = frame.len();
        }
        ct.time(2, || coord.handle_payload(now, id as u32, up))?;
    }
    ct.time(2, || drain(coord, &mut inbox));

    // Stage 4: the survivors sign the survivor set.
    for &id in &live {
        let p = &mut parts[id];
        let msgs = std::mem::take(&mut inbox[id]);
        let up = pt.time(3, || -> Result<AggregationPayload> {
            for m in msgs {
                p.handle_message(m, rng)?;
            }
            p.poll_transmit().context("no survivor signature")
        })?;
        ct.time(3, || coord.handle_payload(now, id as u32, up))?;
    }
    ct.time(3, || drain(coord, &mut inbox));

    // Stage 5: the survivors answer; the coordinator unmasks.
    let mut result = None;
    for &id in &live {
        let p = &mut parts[id];
        let msgs = std::mem::take(&mut inbox[id]);
        let up = pt.time(4, || -> Result<AggregationPayload> {
            for m in msgs {
                p.handle_message(m, rng)?;
            }
            p.poll_transmit().context("no unmasking shares")
        })?;
        ct.time(4, || -> Result<()> {
            coord.handle_payload(now, id as u32, up)?;
            if result.is_none() {
                result = coord.poll_result();
            }
            Ok(())
        })?;
    }
    let result = result.context("no result")??;
    if result.contributors.len() != live.len() {
        bail!(
            "round {round}: {} contributors, expected {}",
            result.contributors.len(),
            live.len()
        );
    }
    let max_err = result
        .mean_update
        .iter()
        .zip(&exact)
        .map(|(m, e)| (*m as f64 - (e / total_weight as f64).clamp(-1.0, 1.0)).abs())
        .fold(0.0, f64::max);
    let step = setup.encoding.step() as f64;
    if max_err > step * 1.001 + 1e-6 {
        bail!(
            "round {round}: |mean - exact| = {max_err:.3e} exceeds one quantisation step {step:.3e}"
        );
    }
    let unmask_streams = live.len()
        + order[..dropped_count]
            .iter()
            .map(|&v| {
                graph
                    .neighbours(v)
                    .iter()
                    .filter(|&&u| !is_dropped[u as usize])
                    .count()
            })
            .sum::<usize>();
    Ok(RoundStats {
        coordinator: ct,
        participants: pt,
        masking,
        contributors: live.len(),
        mask_streams,
        unmask_streams,
        upload_bytes,
        max_err,
    })
}

/// Fastest of 15 timings of one mask stream of `len` words.
fn keystream_time(prg: PrgKind, len: usize) -> Duration {
    let mut buf = vec![0u32; len];
    let seed = [7u8; 32];
    fill_mask(prg, &seed, &mut buf);
    (0..15)
        .map(|_| {
            let t = Instant::now();
            fill_mask(prg, &seed, &mut buf);
            std::hint::black_box(&buf);
            t.elapsed()
        })
        .min()
        .expect("15 samples")
}

/// Signs and checks nothing: `--no-auth`, to time authentication's cost.
struct NoAuth;

impl StatementSigner for NoAuth {
    fn credential(&self) -> &[u8] {
        b"no credential"
    }

    fn sign(&self, _: &[u8]) -> Result<Signature, greyfed_protocol::ProtocolError> {
        Ok(Signature {
            scheme: 0,
            bytes: vec![0],
        })
    }
}

impl PeerVerifier for NoAuth {
    fn identity(&self, _: &[u8]) -> Result<String, greyfed_protocol::ProtocolError> {
        // Distinct identities are checked: give each call its own.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Ok(format!(
            "anyone-{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ))
    }

    fn verify(
        &self,
        _: &[u8],
        _: &[u8],
        _: &Signature,
    ) -> Result<(), greyfed_protocol::ProtocolError> {
        Ok(())
    }
}
