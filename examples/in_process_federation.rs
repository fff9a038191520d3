//! A federation inside one process, over real QUIC on loopback: the shape of
//! an integration test a user would write with `greyfed::federation`.
//!
//! ```sh
//! cargo run --release --example in_process_federation
//! cargo run --release --example in_process_federation -- ../shared/data/mnist-10k
//! ```

use anyhow::Result;
use greyfed::federation::Federation;
use greyfed_protocol::{OptimizerSpec, TrainingConfig};

#[tokio::main]
async fn main() -> Result<()> {
    let mut builder = Federation::builder()
        .participants(4)
        .rounds(3)
        .training(TrainingConfig {
            label_smoothing: 0.0,
            round_lr_schedule: Default::default(),
            key_layer_mask: false,
            freeze_key_layers: false,
            sealed_layers: None,
            local_epochs: 2,
            batch_size: 32,
            optimizer: OptimizerSpec::Sgd {
                lr: 0.05,
                momentum: 0.9,
            },
            proximal_mu: 0.0,
            lr_schedule: Default::default(),
            dp_sgd: None,
        });
    if let Some(dir) = std::env::args().nth(1) {
        builder = builder.data_dir(dir);
    }
    let report = builder.run().await?;
    for r in &report.rounds {
        println!(
            "round {:>2}: accuracy {:.2}%  loss {:.4}  participants {}",
            r.round,
            100.0 * r.accuracy.unwrap_or(f64::NAN),
            r.loss.unwrap_or(f64::NAN),
            r.participants
        );
    }
    println!(
        "final model: {} parameters",
        report.final_model.num_parameters()
    );
    Ok(())
}
