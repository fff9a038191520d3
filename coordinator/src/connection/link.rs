//! The driver's side of a connection ([`PeerLink`]) and the bookkeeping
//! that bounds what connections may cost: pending-connection and
//! per-identity slots, participant ids that never wrap, and the limits the
//! driver hands to connections when the session admits them
//! ([`LinkPolicy`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use greyfed_protocol::{
    ParticipantId,
    limits::{SessionShape, UploadLimits, model_frame_bytes},
    message::MAX_CLASSES,
    session::CoordinatorSession,
};
use tokio::sync::{Notify, mpsc, watch};

use super::Outbound;
use crate::{
    auth::SharedAllowList,
    config::CoordinatorConfig,
    error::{CoordinatorError, Result},
};

/// Room for small frames (Welcome, secure-aggregation stage messages) in a
/// participant's outbound budget, on top of its model copies.
pub(crate) const OUTBOUND_SLACK_BYTES: usize = 1 << 20;

/// The driver's handle on one connection: where its frames go, and what the
/// connection task needs to hear from the driver (admission, stop).
pub(crate) struct PeerLink {
    /// From the verified client certificate.
    pub(crate) identity: String,
    /// The peer's address.
    pub(crate) remote: SocketAddr,
    pub(super) tx: mpsc::Sender<Outbound>,
    /// Bytes of frames queued and not yet handed to QUIC.
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) conn: quinn::Connection,
    /// Set once the session admitted the connection: its reader then
    /// applies the session's upload limits instead of the Hello's.
    pub(super) admitted: Arc<AtomicBool>,
    /// Tells the reader to stop reading (the driver is closing the link).
    pub(super) stop: Arc<Notify>,
    /// The connection's place among those not yet admitted, released on
    /// admission.
    pub(super) pending: Option<PendingSlot>,
    /// Messages of this connection the session ignored in a row.
    ignored: u32,
}

/// A frame that would put a participant too far behind.
#[derive(Debug)]
pub(crate) struct Backlog {
    /// Bytes already queued for it.
    pub(crate) queued: usize,
    /// Its budget.
    pub(crate) budget: usize,
}

impl std::fmt::Display for Backlog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "too far behind: {} bytes of frames queued for it, limit {} bytes",
            self.queued, self.budget
        )
    }
}

impl PeerLink {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        identity: String,
        remote: SocketAddr,
        tx: mpsc::Sender<Outbound>,
        queued: Arc<AtomicUsize>,
        conn: quinn::Connection,
        admitted: Arc<AtomicBool>,
        stop: Arc<Notify>,
        pending: PendingSlot,
    ) -> Self {
        Self {
            identity,
            remote,
            tx,
            queued,
            conn,
            admitted,
            stop,
            pending: Some(pending),
            ignored: 0,
        }
    }

    /// Queues `frame` unless the frames already queued and this one would
    /// exceed `budget` bytes (a frame into an empty queue always goes).
    /// A connection whose writer has already stopped takes nothing.
    ///
    /// # Errors
    /// [`Backlog`] when the peer is too far behind: close it.
    pub(crate) fn send_frame(&self, frame: Bytes, budget: usize) -> Result<(), Backlog> {
        let len = frame.len();
        let queued = self.queued.load(Ordering::Acquire);
        if over_budget(queued, len, budget) {
            return Err(Backlog { queued, budget });
        }
        self.queued.fetch_add(len, Ordering::AcqRel);
        match self.tx.try_send(Outbound::Frame(frame)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.queued.fetch_sub(len, Ordering::AcqRel);
                Err(Backlog { queued, budget })
            }
            // The writer is gone: the connection is closing and its Closed
            // event is on its way.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.queued.fetch_sub(len, Ordering::AcqRel);
                Ok(())
            }
        }
    }

    /// The session admitted this connection: raise its upload limits and
    /// give back its pending slot.
    pub(crate) fn admit(&mut self) {
        self.admitted.store(true, Ordering::Release);
        self.pending = None;
    }

    /// Counts a message the session ignored; true when that makes
    /// `max` in a row (the caller disconnects the peer).
    pub(crate) fn note_ignored(&mut self, max: u32) -> bool {
        self.ignored = self.ignored.saturating_add(1);
        self.ignored >= max
    }

    /// Messages ignored in a row so far.
    pub(crate) fn ignored(&self) -> u32 {
        self.ignored
    }

    /// The session accepted a message: the ignored count starts again.
    pub(crate) fn note_accepted(&mut self) {
        self.ignored = 0;
    }

    /// Stops reading, flushes the frames already queued, finishes the
    /// stream and closes with `code` and `reason`; closes at once when the
    /// queue has no room left for the finish.
    pub(crate) fn finish(self, code: u32, reason: &str) {
        self.stop.notify_one();
        let finish = Outbound::Finish {
            code,
            reason: reason.to_string(),
        };
        if self.tx.try_send(finish).is_err() {
            self.conn.close(code.into(), reason.as_bytes());
        }
    }

    /// Closes the connection now, dropping whatever is queued.
    pub(crate) fn close_now(self, code: u32, reason: &str) {
        self.stop.notify_one();
        self.conn.close(code.into(), reason.as_bytes());
    }
}

/// Whether a frame of `len` bytes on top of `queued` exceeds `budget`; a
/// frame into an empty queue never does.
fn over_budget(queued: usize, len: usize, budget: usize) -> bool {
    queued > 0 && queued.checked_add(len).is_none_or(|total| total > budget)
}

/// What the driver needs to admit connections and bound their queues.
pub(crate) struct LinkPolicy {
    /// The upload limits of admitted connections, shared with every
    /// connection task.
    upload_limits: watch::Sender<UploadLimits>,
    allow: SharedAllowList,
    participants: usize,
    max_frame: usize,
    /// See [`CoordinatorConfig::max_ignored_messages`].
    pub(crate) max_ignored: u32,
    outbound_models: usize,
}

impl LinkPolicy {
    /// The policy of `config`, and the receiver of the admitted upload
    /// limits for connection tasks.
    pub(crate) fn new(config: &CoordinatorConfig) -> (Self, watch::Receiver<UploadLimits>) {
        let (upload_limits, rx) = watch::channel(UploadLimits::before_admission(config.max_frame));
        (
            Self {
                upload_limits,
                allow: config.tls.allow_list.clone(),
                participants: config.participants,
                max_frame: config.max_frame,
                max_ignored: config.max_ignored_messages,
                outbound_models: config.outbound_queue_models.max(1),
            },
            rx,
        )
    }

    /// Admits `link` to `session` (call before its Welcome is queued):
    /// updates the upload limits of admitted connections for the session's
    /// model, classes and participants, then raises the link's limits.
    pub(crate) fn admit(&self, session: &CoordinatorSession, link: &mut PeerLink) {
        let shape = SessionShape {
            // Without a model (never, once a Welcome goes out) only the
            // configured maximum frame bounds an update.
            parameters: session.global().map_or(usize::MAX, |g| g.num_parameters()),
            classes: session.classes().map_or(MAX_CLASSES, <[String]>::len),
            peers: self
                .participants
                .max(session.num_participants())
                .max(self.allow.current().len()),
        };
        let limits = UploadLimits::for_session(shape, self.max_frame);
        self.upload_limits.send_if_modified(|current| {
            let changed = *current != limits;
            *current = limits;
            changed
        });
        link.admit();
    }

    /// How many bytes of frames may wait for one participant: a few copies
    /// of the session's model plus [`OUTBOUND_SLACK_BYTES`].
    pub(crate) fn outbound_budget(&self, session: &CoordinatorSession) -> usize {
        let parameters = session.global().map_or(0, |g| g.num_parameters())
            + session.sealed().map_or(0, |s| s.values.len());
        model_frame_bytes(parameters)
            .saturating_mul(self.outbound_models)
            .saturating_add(OUTBOUND_SLACK_BYTES)
    }
}

/// A counter with a ceiling: how many connections hold a slot.
#[derive(Debug)]
pub(crate) struct Slots {
    held: Arc<AtomicUsize>,
    limit: usize,
}

/// One held slot of [`Slots`]; released on drop.
#[derive(Debug)]
pub(crate) struct PendingSlot {
    held: Arc<AtomicUsize>,
}

impl Slots {
    /// At most `limit` slots.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            held: Arc::new(AtomicUsize::new(0)),
            limit,
        }
    }

    /// A slot, or `None` when all `limit` are held.
    pub(crate) fn try_acquire(&self) -> Option<PendingSlot> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()?;
        Some(PendingSlot {
            held: self.held.clone(),
        })
    }

    /// Slots held now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// The ceiling.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Open connections per participant identity, at most `limit` each.
#[derive(Debug)]
pub(crate) struct IdentitySlots {
    open: Arc<Mutex<HashMap<String, usize>>>,
    limit: usize,
}

/// One connection's place in [`IdentitySlots`]; released on drop.
#[derive(Debug)]
pub(crate) struct IdentitySlot {
    open: Arc<Mutex<HashMap<String, usize>>>,
    identity: String,
}

impl IdentitySlots {
    /// At most `limit` connections per identity.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            open: Arc::default(),
            limit,
        }
    }

    /// A place for one more connection of `identity`.
    ///
    /// # Errors
    /// The number of connections `identity` already has open when that is
    /// the limit.
    pub(crate) fn try_acquire(&self, identity: &str) -> std::result::Result<IdentitySlot, usize> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(identity.to_string()).or_insert(0);
        if *count >= self.limit {
            return Err(*count);
        }
        *count += 1;
        Ok(IdentitySlot {
            open: self.open.clone(),
            identity: identity.to_string(),
        })
    }

    /// The ceiling.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.identity) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.identity);
            }
        }
    }
}

/// Participant ids in connection order, never reused and never wrapped:
/// once `u32::MAX` ids are spent, no more connections are admitted.
#[derive(Debug, Default)]
pub(crate) struct IdAllocator {
    next: AtomicU32,
}

impl IdAllocator {
    /// Ids from `first` on (tests start near the end).
    #[cfg(test)]
    pub(crate) fn starting_at(first: ParticipantId) -> Self {
        Self {
            next: AtomicU32::new(first),
        }
    }

    /// The next id.
    ///
    /// # Errors
    /// [`CoordinatorError::ParticipantIdsExhausted`] once every id was used.
    pub(crate) fn next(&self) -> Result<ParticipantId> {
        self.next
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_add(1))
            .map_err(|_| CoordinatorError::ParticipantIdsExhausted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_never_wrap() {
        let ids = IdAllocator::starting_at(u32::MAX - 2);
        assert_eq!(ids.next().unwrap(), u32::MAX - 2);
        assert_eq!(ids.next().unwrap(), u32::MAX - 1);
        for _ in 0..3 {
            let err = ids.next().unwrap_err();
            assert!(
                matches!(err, CoordinatorError::ParticipantIdsExhausted),
                "{err}"
            );
            assert!(err.to_string().contains("ids"), "{err}");
        }
        assert_eq!(IdAllocator::default().next().unwrap(), 0);
    }

    #[test]
    fn the_outbound_budget_bounds_the_queue_but_not_a_lone_frame() {
        assert!(!over_budget(0, 10, 5), "a lone frame always goes");
        assert!(!over_budget(3, 2, 5));
        assert!(over_budget(3, 3, 5));
        assert!(over_budget(usize::MAX, usize::MAX, usize::MAX));
    }

    #[test]
    fn slots_are_capped_and_released_on_drop() {
        let slots = Slots::new(2);
        let a = slots.try_acquire().unwrap();
        let b = slots.try_acquire().unwrap();
        assert!(slots.try_acquire().is_none());
        assert_eq!(slots.held(), 2);
        drop(a);
        let c = slots.try_acquire().unwrap();
        assert!(slots.try_acquire().is_none());
        drop((b, c));
        assert_eq!(slots.held(), 0);
    }

    #[test]
    fn identity_slots_count_each_identity_separately() {
        let slots = IdentitySlots::new(2);
        let a1 = slots.try_acquire("a").unwrap();
        let _a2 = slots.try_acquire("a").unwrap();
        assert_eq!(slots.try_acquire("a").unwrap_err(), 2);
        let _b = slots.try_acquire("b").unwrap();
        drop(a1);
        let _a3 = slots.try_acquire("a").unwrap();
        assert_eq!(slots.try_acquire("a").unwrap_err(), 2);
        drop(_a3);
        drop(_a2);
        assert!(!slots.open.lock().unwrap().contains_key("a"));
    }
}
