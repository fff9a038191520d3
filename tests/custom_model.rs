//! Bring your own model: the `block-mlp` of `examples/custom_model.rs`, a
//! model greyfed does not know, registered by name and federated over real
//! QUIC on encrypted images.

#[allow(dead_code)]
#[path = "../examples/custom_model.rs"]
mod custom_model;

use greyfed_participant::model::{
    Network, architecture_names, check_weights, init_weights, param_layout,
};
use greyfed_protocol::ModelSpec;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_custom_model_federates_and_learns() {
    let (spec, report) = custom_model::run_federation(3, 2, 400).await.unwrap();
    assert!(architecture_names().contains(&custom_model::ARCH.to_string()));
    assert!(
        matches!(&spec, ModelSpec::Custom { arch, .. } if arch == custom_model::ARCH),
        "{spec:?}"
    );
    assert_eq!(report.rounds.len(), 2, "every round completed");
    for (i, p) in report.participants.iter().enumerate() {
        assert!(p.is_ok(), "participant {i}: {p:?}");
    }
    let accuracy = report.final_accuracy();
    println!("block-mlp: final accuracy {accuracy:.3}");
    assert!(accuracy > 0.5, "accuracy {accuracy} (chance: 0.1)");
    // The final global model has the custom model's layout, and it is a
    // working block-mlp.
    check_weights(&spec, &report.final_model).unwrap();
    let names: Vec<_> = report
        .final_model
        .tensors()
        .iter()
        .map(|t| (t.name.as_str(), t.shape.clone()))
        .collect();
    assert_eq!(
        names,
        [
            ("block.weight", vec![16, 16]),
            ("block.bias", vec![16]),
            ("head.weight", vec![10, 49 * 16]),
            ("head.bias", vec![10]),
        ]
    );
    let layout = param_layout(&spec).unwrap();
    assert_eq!(
        layout.iter().map(|p| p.len()).sum::<usize>(),
        report.final_model.num_parameters()
    );
    assert_ne!(
        report.final_model,
        init_weights(&spec, 0).unwrap(),
        "trained"
    );
    let net = Network::new(&spec, &report.final_model, &candle_core::Device::Cpu).unwrap();
    assert_eq!(net.to_weights().unwrap(), report.final_model);
}
