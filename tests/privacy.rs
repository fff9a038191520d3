//! Participant-level DP over real QUIC: the noise goes through the secure
//! sum, and every round reports the ε the accountant gives for the noise
//! that round's survivors actually carried.

use greyfed::federation::Federation;
use greyfed_coordinator::privacy::ParticipantDp;
use greyfed_participant::dropout::{DropoutPlan, DropoutStage};
use greyfed_protocol::privacy::{RdpAccountant, SampledGaussian};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_round_reports_the_epsilon_of_the_noise_its_survivors_carried() {
    let dp = ParticipantDp {
        noise_multiplier: 1.0,
        min_survivors: 4,
        delta: 1e-5,
        max_epsilon: None,
    };
    // Everyone is selected (rate 1); participant 2 vanishes before masking
    // in round 2, so that round's sum carries the noise of 3, not 4.
    let report = Federation::builder()
        .participants(4)
        .rounds(3)
        .max_train_samples(200)
        .participant_dp(dp, 1.0)
        .dropout(
            2,
            DropoutPlan {
                round: 2,
                stage: DropoutStage::Masked,
            },
        )
        .run()
        .await
        .unwrap();
    assert_eq!(report.rounds.len(), 3, "every round completed");
    let mut accountant = RdpAccountant::new();
    let mut coordinator = RdpAccountant::new();
    let mut last = 0.0;
    for r in &report.rounds {
        let z = r.dp_noise_multiplier.expect("a DP round records its noise");
        let expected_z = (r.survivors as f64 / 4.0).sqrt();
        assert!((z - expected_z).abs() < 1e-12, "round {}: {z}", r.round);
        let mechanism = |q| SampledGaussian {
            noise_multiplier: z,
            sampling_rate: q,
        };
        accountant.compose(mechanism(1.0), 1).unwrap();
        coordinator.compose(mechanism(1.0), 1).unwrap();
        let eps = r.dp_epsilon.expect("a DP round records epsilon");
        assert_eq!(eps, accountant.epsilon(1e-5).unwrap().epsilon);
        // At rate 1 sampling amplifies nothing: the two figures agree.
        assert_eq!(r.dp_epsilon_coordinator, Some(eps));
        assert!(eps > last, "epsilon grows: {eps} after {last}");
        last = eps;
    }
    assert_eq!(report.rounds[0].survivors, 4);
    assert_eq!(report.rounds[1].survivors, 3);
    assert!(report.rounds[1].dp_noise_multiplier < report.rounds[0].dp_noise_multiplier);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_settings_out_of_range_fail_at_once_with_the_cause() {
    let started = std::time::Instant::now();
    // delta 2 is no probability: refused when the coordinator binds.
    let err = Federation::builder()
        .participants(3)
        .rounds(1)
        .max_train_samples(100)
        .participant_dp(
            ParticipantDp {
                noise_multiplier: 1.0,
                min_survivors: 2,
                delta: 2.0,
                max_epsilon: None,
            },
            1.0,
        )
        .run()
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("delta"), "{text}");
    assert!(
        started.elapsed().as_secs() < 30,
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_ends_the_session_before_the_round_that_would_exceed_it() {
    // At rate 1 with everyone surviving, epsilon after r rounds is known in
    // advance: a budget between 2 and 3 rounds' worth stops after round 2.
    let eps = |rounds| {
        greyfed_protocol::privacy::epsilon_after(
            SampledGaussian {
                noise_multiplier: 2.0,
                sampling_rate: 1.0,
            },
            rounds,
            1e-5,
        )
        .unwrap()
    };
    let budget = 0.5 * (eps(2) + eps(3));
    let dp = ParticipantDp {
        noise_multiplier: 2.0,
        min_survivors: 3,
        delta: 1e-5,
        max_epsilon: Some(budget),
    };
    let report = Federation::builder()
        .participants(3)
        .rounds(5)
        .max_train_samples(100)
        .participant_dp(dp, 1.0)
        .run()
        .await
        .unwrap();
    assert_eq!(report.rounds.len(), 2, "stopped after round 2 of 5");
    let last = report.rounds[1].dp_epsilon.unwrap();
    assert!(
        last <= budget && (last - eps(2)).abs() < 1e-9,
        "{last} vs budget {budget}"
    );
    for p in &report.participants {
        let p = p.as_ref().expect("participants finish cleanly");
        assert_eq!(p.rounds_completed, 2);
    }

    // A budget below one round's epsilon: refused at once.
    let err = Federation::builder()
        .participants(3)
        .rounds(5)
        .max_train_samples(100)
        .participant_dp(
            ParticipantDp {
                max_epsilon: Some(0.5 * eps(1)),
                ..dp
            },
            1.0,
        )
        .run()
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("does not allow a single round"),
        "{err:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_sgd_rounds_report_the_worst_participants_epsilon() {
    use greyfed_protocol::TrainingConfig;
    use greyfed_protocol::message::DpSgdSpec;
    let training = TrainingConfig {
        batch_size: 32,
        local_epochs: 1,
        dp_sgd: Some(DpSgdSpec {
            clip: 1.0,
            noise_multiplier: 1.2,
            delta: 1e-5,
        }),
        ..TrainingConfig::default()
    };
    let report = Federation::builder()
        .participants(3)
        .rounds(2)
        .max_train_samples(100)
        .training(training)
        .run()
        .await
        .unwrap();
    assert_eq!(report.rounds.len(), 2);
    // Every participant holds 100 images: each round is ceil(100/32) = 4
    // steps at rate 32/100.
    let mut last = 0.0;
    for (i, r) in report.rounds.iter().enumerate() {
        assert_eq!(r.survivors, 3);
        let eps = r.dp_epsilon.expect("DP-SGD rounds record epsilon");
        let expected = greyfed_protocol::privacy::epsilon_after(
            SampledGaussian {
                noise_multiplier: f64::from(1.2f32),
                sampling_rate: 0.32,
            },
            (i as u64 + 1) * 4,
            1e-5,
        )
        .unwrap();
        assert!(
            (eps - expected).abs() < 1e-9,
            "round {}: {eps} vs {expected}",
            r.round
        );
        assert_eq!(r.dp_noise_multiplier, Some(f64::from(1.2f32)));
        assert!(eps > last);
        last = eps;
    }
    // Every participant's own accountant, from its own image count, agrees.
    for p in &report.participants {
        let own = p.as_ref().unwrap().dp_epsilon.expect("its own ε");
        assert!((own - last).abs() < 1e-9, "{own} vs {last}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverged_participant_withdraws_and_the_round_ends_at_once() {
    use greyfed_protocol::{OptimizerSpec, TrainingConfig};
    // A learning rate that overflows every weight in the first step.
    let training = TrainingConfig {
        batch_size: 32,
        local_epochs: 1,
        optimizer: OptimizerSpec::Sgd {
            lr: 1e30,
            momentum: 0.0,
        },
        ..TrainingConfig::default()
    };
    let run = Federation::builder()
        .participants(3)
        .rounds(1)
        .max_train_samples(64)
        .training(training)
        .round_timeout(std::time::Duration::from_secs(600))
        .run();
    // The secure sum's stages wait 60 s for a participant that says
    // nothing; withdrawing ends the wait when the update is known bad.
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(50), run)
        .await
        .expect("the round waited for a deadline instead of ending at once");
    let report = outcome.unwrap();
    assert!(report.rounds.is_empty(), "{:?}", report.rounds);
    for p in &report.participants {
        let p = p.as_ref().expect("participants stay in the session");
        assert_eq!(p.rounds_trained, 0, "no update was used");
    }
}
