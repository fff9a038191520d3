//! End-to-end federated round time and bytes on the wire for N participants,
//! in one process over real QUIC on loopback with SecAgg+ (or another
//! aggregation), on the built-in digits or an IDX directory.
//!
//! ```sh
//! cargo run --release --example round_bench
//! cargo run --release --example round_bench -- --participants 2,5,10,20 --rounds 3 --data ../shared/data/mnist-10k
//! cargo run --release --example round_bench -- --aggregation plain
//! ```
//!
//! Every participant trains one local epoch on at most `--max-train`
//! images (batch 32, SGD), so the figures are dominated by the protocol
//! rather than by training. The first round includes start-up (joins,
//! TLS handshakes) and is reported apart from the warm rounds. Per-stage
//! times are measured at the coordinator (`masked` includes training).

use std::time::Instant;

use anyhow::{Result, bail};
use clap::Parser;
use greyfed::federation::Federation;
use greyfed_coordinator::metrics::RoundRecord;
use greyfed_protocol::{AggregationKind, OptimizerSpec, TrainingConfig};

#[derive(Parser)]
struct Args {
    /// Participant counts to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "2,5,10,20")]
    participants: Vec<usize>,
    /// Rounds per federation (the first is reported apart).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// IDX data directory (default: the built-in synthetic digits).
    #[arg(long)]
    data: Option<String>,
    /// Training images per participant.
    #[arg(long, default_value_t = 200)]
    max_train: usize,
    /// `secagg+`, `secagg` or `plain`.
    #[arg(long, default_value = "secagg+")]
    aggregation: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.rounds < 2 {
        bail!("--rounds must be at least 2 (the first round is reported apart)");
    }
    let aggregation = match args.aggregation.as_str() {
        "secagg+" => AggregationKind::SecAgg { full: false },
        "secagg" => AggregationKind::SecAgg { full: true },
        "plain" => AggregationKind::Plain,
        other => bail!("unknown aggregation {other:?}"),
    };
    println!(
        "| participants | first round s | warm round s | advertise | share | masked (incl. training) | consistency | unmask | evaluate | up bytes/participant/round | down bytes/participant/round | wall s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &args.participants {
        let mut builder = Federation::builder()
            .participants(n)
            .rounds(args.rounds)
            .aggregation(aggregation)
            .max_train_samples(args.max_train)
            .training(TrainingConfig {
                label_smoothing: 0.0,
                round_lr_schedule: Default::default(),
                key_layer_mask: false,
                freeze_key_layers: false,
                sealed_layers: None,
                local_epochs: 1,
                batch_size: 32,
                optimizer: OptimizerSpec::Sgd {
                    lr: 0.05,
                    momentum: 0.9,
                },
                proximal_mu: 0.0,
                lr_schedule: Default::default(),
                dp_sgd: None,
            });
        if let Some(dir) = &args.data {
            builder = builder.data_dir(dir);
        }
        let started = Instant::now();
        let report = builder.run().await?;
        let wall = started.elapsed().as_secs_f64();
        if report.rounds.len() != args.rounds as usize {
            bail!(
                "{n} participants: {} of {} rounds completed",
                report.rounds.len(),
                args.rounds
            );
        }
        let warm = &report.rounds[1..];
        let mean =
            |f: &dyn Fn(&RoundRecord) -> f64| warm.iter().map(f).sum::<f64>() / warm.len() as f64;
        let stage = |name: &str| mean(&|r| r.stage_secs.get(name).copied().unwrap_or(0.0));
        let per_participant = n as f64;
        println!(
            "| {n} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.0} | {wall:.2} |",
            report.rounds[0].secs,
            mean(&|r| r.secs),
            stage("advertise"),
            stage("share"),
            stage("masked"),
            stage("consistency"),
            stage("unmask"),
            stage("evaluate"),
            mean(&|r| r.bytes_up as f64) / per_participant,
            mean(&|r| r.bytes_down as f64) / per_participant,
        );
    }
    Ok(())
}
