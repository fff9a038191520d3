//! Participants' training CPU time: summed per round over those who
//! reported it, checked, and never fatal to the session.

use super::util::*;
use crate::{
    ProtocolError,
    message::Message,
    session::{CoordinatorSession, SessionEvent},
};

#[test]
fn each_round_sums_the_training_time_of_those_who_trained() {
    let mut h = Harness::new(config(3, 2), 3);
    // Participant 2 leaves in round 2 before it trains.
    h.departures
        .push((2, 2, Stage::Train, Departure::Disconnect));
    h.drive(10_000);
    let rounds = h.completed();
    assert_eq!(rounds.len(), 2);
    let all: f64 = (0..3).map(training_secs).sum();
    let two: f64 = (0..2).map(training_secs).sum();
    assert_eq!(rounds[0].train_cpu_secs, Some(all));
    assert_eq!(rounds[1].train_cpu_secs, Some(two));
}

#[test]
fn bad_or_late_training_times_are_refused_without_harm() {
    let mut h = Harness::new(config(2, 1), 2);
    // Admit both and let round 1 start, then hold the participants back.
    h.step();
    assert!(
        h.events
            .iter()
            .any(|e| matches!(e, SessionEvent::RoundStarted { .. }))
    );
    let s: &mut CoordinatorSession = &mut h.coordinator;
    let time = |round, cpu_secs| Message::TrainingTime { round, cpu_secs };
    for bad in [f32::NAN, -1.0, f32::INFINITY] {
        assert!(matches!(
            s.handle_message(h.now, 0, time(1, bad)),
            Err(ProtocolError::Malformed(_))
        ));
    }
    assert!(matches!(
        s.handle_message(h.now, 0, time(2, 1.0)),
        Err(ProtocolError::Late(_))
    ));
    assert!(matches!(
        s.handle_message(h.now, 9, time(1, 1.0)),
        Err(ProtocolError::UnknownParticipant(9))
    ));
    // Only the first report counts.
    s.handle_message(h.now, 0, time(1, 5.0)).unwrap();
    s.handle_message(h.now, 0, time(1, 50.0)).unwrap();
    h.drive(10_000);
    let rounds = h.completed();
    assert_eq!(rounds.len(), 1);
    assert_eq!(
        rounds[0].train_cpu_secs,
        Some(5.0 + training_secs(1)),
        "participant 0's first report, participant 1's own"
    );
}
