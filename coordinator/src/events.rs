//! What a running coordinator tells a progress display: the session's
//! progress after every input, and every completed or abandoned round.
//!
//! The coordinator sends these on the channel in
//! [`CoordinatorConfig::events`](crate::CoordinatorConfig::events) and
//! draws nothing itself; the `greyfed` command renders them (progress bars on
//! a terminal, plain or JSON lines otherwise).

use greyfed_protocol::session::SessionProgress;

use crate::metrics::RoundRecord;

/// One event for a progress display.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum CoordinatorEvent {
    /// Where the session stands now; sent whenever it changed.
    Progress(SessionProgress),
    /// A round completed; its record, as appended to `metrics.jsonl`.
    RoundCompleted(Box<RoundRecord>),
    /// A round produced no aggregate; the model is unchanged.
    RoundAbandoned {
        /// Round number.
        round: u32,
        /// Why.
        reason: String,
    },
}

/// The sending half of a coordinator's event channel.
pub type EventSender = tokio::sync::mpsc::UnboundedSender<CoordinatorEvent>;
