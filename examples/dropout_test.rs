//! How to write your own dropout test with `greyfed::federation`: a federation on
//! loopback (real QUIC, real secure aggregation) where chosen participants
//! crash at chosen stages of chosen rounds, then assertions on what the
//! coordinator recorded.
//!
//! ```sh
//! cargo run --release --example dropout_test
//! ```
//!
//! In a test crate, put the same body in a `#[tokio::test(flavor = "multi_thread")]`.

use anyhow::{Result, ensure};
use greyfed::federation::Federation;
use greyfed_participant::dropout::{DropoutPlan, DropoutStage};
use greyfed_protocol::{OptimizerSpec, TrainingConfig};

#[tokio::main]
async fn main() -> Result<()> {
    let report = Federation::builder()
        .participants(6)
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
        })
        // Participant 2 vanishes after advertising its keys in round 1 ...
        .dropout(
            2,
            DropoutPlan {
                round: 1,
                stage: DropoutStage::Share,
            },
        )
        // ... and participant 4 after sending its masked update in round 2:
        // its input is in the sum, the others' shares unmask it.
        .dropout(
            4,
            DropoutPlan {
                round: 2,
                stage: DropoutStage::Unmask,
            },
        )
        .run()
        .await?;

    for r in &report.rounds {
        println!(
            "round {}: {} in the sum, {} dropped, accuracy {:.2}%",
            r.round,
            r.participants,
            r.dropped,
            100.0 * r.accuracy.unwrap_or(f64::NAN)
        );
    }
    ensure!(report.rounds.len() == 3, "every round completed");
    ensure!(
        report.rounds[0].participants == 5,
        "round 1 without participant 2"
    );
    ensure!(
        report.rounds[1].participants == 5,
        "round 2 with participant 4's input"
    );
    ensure!(report.rounds[2].participants == 4, "round 3 without both");
    ensure!(report.final_accuracy() > 0.8, "the model still learned");
    println!("all assertions hold");
    Ok(())
}
