//! The coordinator's connections: accepting them, authenticating the peer
//! (its identity comes from its verified client certificate), and one task
//! per connection that turns the stream into [`Inbound`] events for the
//! driver in [`crate::server`] and writes what the driver sends back.
//!
//! Per connection: a reader (frames → `Inbound` events), a writer (encoded
//! frames from a bounded queue → stream) and a watcher that closes the
//! connection when its certificate leaves the allow list. A peer without an
//! admitted certificate never gets here: the TLS handshake refuses it
//! ([`crate::auth`]), which is logged once below.
//!
//! What a connection may cost is bounded (see [`CoordinatorConfig`] for the
//! settings):
//! - at most `max_pending_connections` connections are in their handshake
//!   or not yet admitted by the session; more are refused before their
//!   handshake;
//! - at most `max_connections_per_identity` connections per certificate
//!   identity;
//! - a connection must send its Hello within `hello_timeout`, and until the
//!   session admits it every frame is held to the Hello's size limit; after
//!   that each message kind has its own limit for the session's model
//!   ([`greyfed_protocol::limits`]), checked from the frame header and the
//!   payload's first byte, before the payload is read;
//! - at most `inbound_queue` messages per connection wait for the driver;
//!   the reader then stops reading and QUIC flow control holds the peer;
//! - frames queued for a participant are bounded in number and bytes (a
//!   few copies of the model); a participant further behind is closed
//!   ([`PeerLink::send_frame`]);
//! - participant ids are given only to connections that sent a Hello, and
//!   never wrap ([`IdAllocator`]).

mod link;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use greyfed_protocol::{
    Message, ParticipantId,
    frame::{FrameDecoder, HEADER_LEN, decode_payload, encode_frame},
    limits::{UploadKind, UploadLimits},
};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{debug, error, warn};

use link::{IdAllocator, IdentitySlots, PendingSlot, Slots};
pub(crate) use link::{LinkPolicy, PeerLink};

use crate::{
    auth::{AllowList, SharedAllowList},
    config::CoordinatorConfig,
    error::{CoordinatorError, Result},
    pki,
};

/// QUIC application close codes.
pub(crate) mod close_code {
    pub const DONE: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const REJECTED: u32 = 2;
    pub const SHUTDOWN: u32 = 3;
    /// A resource limit: too many connections, too slow, too many ignored
    /// messages, no Hello in time.
    pub const LIMIT: u32 = 4;
}

/// How long a finishing connection waits for the peer to close.
pub(crate) const LINGER: Duration = Duration::from_secs(5);
/// Events from all connections waiting for the driver. Each connection has
/// at most `inbound_queue` messages among them, so this only evens out
/// bursts; a full queue makes connection tasks wait.
pub(crate) const INBOUND_EVENTS: usize = 256;
/// Most frames queued for one participant (their bytes are bounded too).
const OUTBOUND_FRAMES: usize = 1024;
/// A payload is read in steps of at most this many bytes more than it has
/// so far, so that a frame's announced length alone allocates little.
const READ_STEP: usize = 64 * 1024;

/// What connection tasks tell the driver.
pub(crate) enum Inbound {
    /// A connection sent its Hello (the next event): the driver's handle.
    Connected {
        id: ParticipantId,
        link: PeerLink,
    },
    Message {
        id: ParticipantId,
        msg: Message,
        /// Size of the frame on the wire (header included).
        wire_bytes: usize,
        /// One of the connection's `inbound_queue` places, free again
        /// when the driver drops the event.
        _permit: OwnedSemaphorePermit,
    },
    Closed {
        id: ParticipantId,
        reason: String,
    },
}

/// What the driver tells a connection's writer.
pub(crate) enum Outbound {
    /// One encoded frame; several connections may share its bytes (every
    /// evaluator gets the same `EvaluateRequest`).
    Frame(Bytes),
    /// Finish the stream, wait briefly for the peer to close, then close.
    Finish { code: u32, reason: String },
}

/// Checks the connection limits of `config`.
///
/// # Errors
/// [`CoordinatorError::Config`] naming the first zero limit.
pub(crate) fn check_config(config: &CoordinatorConfig) -> Result<()> {
    let zero = [
        ("hello_timeout", config.hello_timeout.is_zero()),
        (
            "max_connections_per_identity",
            config.max_connections_per_identity == 0,
        ),
        (
            "max_pending_connections",
            config.max_pending_connections == 0,
        ),
        ("inbound_queue", config.inbound_queue == 0),
        ("outbound_queue_models", config.outbound_queue_models == 0),
    ];
    match zero.iter().find(|(_, is_zero)| *is_zero) {
        Some((name, _)) => Err(CoordinatorError::Config(format!(
            "{name} must be greater than zero"
        ))),
        None => Ok(()),
    }
}

/// What every connection task shares.
pub(crate) struct Listener {
    inbound: mpsc::Sender<Inbound>,
    allow: SharedAllowList,
    max_frame: usize,
    hello_timeout: Duration,
    inbound_queue: usize,
    /// The upload limits of admitted connections (see [`LinkPolicy::admit`]).
    upload_limits: watch::Receiver<UploadLimits>,
    pending: Slots,
    identities: IdentitySlots,
    ids: IdAllocator,
    /// Whether the last connection was refused for want of a pending slot
    /// (the refusals of one episode are logged once).
    saturated: AtomicBool,
    /// The server settings for peers on this machine, where they differ
    /// from the endpoint's (its congestion controller: see
    /// [`greyfed_protocol::transport::Congestion::for_peer`]).
    loopback_server: Option<Arc<quinn::ServerConfig>>,
}

impl Listener {
    /// The listener of `config`, sending to `inbound`, with the admitted
    /// limits from `upload_limits` ([`LinkPolicy::new`]), accepting peers on
    /// this machine with `loopback_server` when given.
    pub(crate) fn new(
        config: &CoordinatorConfig,
        inbound: mpsc::Sender<Inbound>,
        upload_limits: watch::Receiver<UploadLimits>,
        loopback_server: Option<Arc<quinn::ServerConfig>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            inbound,
            allow: config.tls.allow_list.clone(),
            max_frame: config.max_frame,
            hello_timeout: config.hello_timeout,
            inbound_queue: config.inbound_queue.max(1),
            upload_limits,
            pending: Slots::new(config.max_pending_connections.max(1)),
            identities: IdentitySlots::new(config.max_connections_per_identity.max(1)),
            ids: IdAllocator::default(),
            saturated: AtomicBool::new(false),
            loopback_server,
        })
    }

    /// The server settings for a connection from `remote` where they are
    /// not the endpoint's: those for peers on this machine (a loopback
    /// address, IPv4-mapped ones included), if any.
    fn server_config_for(&self, remote: std::net::SocketAddr) -> Option<Arc<quinn::ServerConfig>> {
        self.loopback_server
            .clone()
            .filter(|_| greyfed_protocol::transport::on_this_machine(remote.ip()))
    }
}

/// Accepts connections until the endpoint closes, each in its own task,
/// refusing them before their handshake while `max_pending_connections`
/// are not yet admitted.
pub(crate) async fn accept_loop(endpoint: quinn::Endpoint, listener: Arc<Listener>) {
    while let Some(incoming) = endpoint.accept().await {
        let Some(slot) = listener.pending.try_acquire() else {
            let remote = incoming.remote_address();
            if !listener.saturated.swap(true, Ordering::AcqRel) {
                warn!(
                    %remote,
                    limit = listener.pending.limit(),
                    "too many connections waiting for admission: refusing new connections \
                     until some are admitted or closed"
                );
            } else {
                debug!(%remote, "connection refused: too many waiting for admission");
            }
            incoming.refuse();
            continue;
        };
        listener.saturated.store(false, Ordering::Release);
        tokio::spawn(connection_task(incoming, listener.clone(), slot));
    }
}

/// The identity and certificate fingerprint of an established connection's
/// verified client certificate, checked again against the allow list in
/// force (it may have been reloaded since the handshake).
fn authenticated_peer(conn: &quinn::Connection, allow: &AllowList) -> Result<(String, String)> {
    let not_admitted = |what: &str| CoordinatorError::NotAdmitted(what.to_string());
    let certs = conn
        .peer_identity()
        .ok_or_else(|| not_admitted("no client certificate"))?
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| not_admitted("unexpected peer identity type"))?;
    let end_entity = certs
        .first()
        .ok_or_else(|| not_admitted("empty client certificate chain"))?;
    let identity = allow.admit(end_entity)?;
    Ok((identity, pki::fingerprint(end_entity)))
}

/// Closes `conn` as soon as the allow list no longer holds `fingerprint`
/// (checked at once, then after every reload); returns when the connection
/// closes for any reason.
async fn close_when_revoked(
    conn: quinn::Connection,
    mut allow: watch::Receiver<Arc<AllowList>>,
    identity: String,
    fingerprint: String,
) {
    loop {
        if !allow.borrow_and_update().contains_fingerprint(&fingerprint) {
            warn!(
                identity,
                "certificate no longer in the allow list: closing its connection"
            );
            conn.close(close_code::REJECTED.into(), b"certificate revoked");
            return;
        }
        tokio::select! {
            changed = allow.changed() => if changed.is_err() { return },
            _ = conn.closed() => return,
        }
    }
}

/// Aborts a task when dropped (on every way out of the connection task).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn connection_task(incoming: quinn::Incoming, listener: Arc<Listener>, pending: PendingSlot) {
    let remote = incoming.remote_address();
    let connecting = match listener.server_config_for(remote) {
        Some(server) => incoming.accept_with(server),
        None => incoming.accept(),
    };
    let conn = match connecting {
        Ok(connecting) => connecting.await,
        Err(e) => Err(e),
    };
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            // The one log line of a refused peer: unknown CA, expired, not
            // in the allow list, no certificate (or a failed handshake).
            warn!(%remote, "connection refused at the TLS handshake: {e}");
            return;
        }
    };
    let (identity, fingerprint) = match authenticated_peer(&conn, &listener.allow.current()) {
        Ok(peer) => peer,
        Err(e) => {
            warn!(%remote, "connection refused: {e}");
            conn.close(close_code::REJECTED.into(), b"not admitted");
            return;
        }
    };
    let identity_slot = match listener.identities.try_acquire(&identity) {
        Ok(slot) => slot,
        Err(open) => {
            let reason = format!(
                "too many connections for {identity}: {open} already open (limit {})",
                listener.identities.limit()
            );
            warn!(identity, %remote, "connection refused: {reason}");
            conn.close(close_code::LIMIT.into(), reason.as_bytes());
            return;
        }
    };
    let _revocation = AbortOnDrop(tokio::spawn(close_when_revoked(
        conn.clone(),
        listener.allow.subscribe(),
        identity.clone(),
        fingerprint,
    )));

    // The stream and a complete Hello, within the deadline.
    let deadline = tokio::time::Instant::now() + listener.hello_timeout;
    let no_hello = |conn: &quinn::Connection| {
        let reason = format!(
            "no Hello within {:.1} s of the TLS handshake",
            listener.hello_timeout.as_secs_f64()
        );
        warn!(identity, %remote, "closing connection: {reason}");
        conn.close(close_code::LIMIT.into(), reason.as_bytes());
    };
    let (mut send, mut recv) = match tokio::time::timeout_at(deadline, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(identity, %remote, "connection closed before opening a stream: {e}");
            return;
        }
        Err(_) => return no_hello(&conn),
    };
    let hello_limits = UploadLimits::before_admission(listener.max_frame);
    let first = tokio::time::timeout_at(
        deadline,
        read_frame(&mut recv, || hello_limits, Some(UploadKind::Hello)),
    )
    .await;
    let (hello, wire_bytes) = match first {
        Err(_) => return no_hello(&conn),
        Ok(Ok(Some(frame))) => frame,
        Ok(Ok(None)) => {
            debug!(identity, %remote, "stream finished before a Hello");
            return;
        }
        Ok(Err(ReadEnd::Closed(reason))) => {
            debug!(identity, %remote, "connection closed before its Hello: {reason}");
            return;
        }
        Ok(Err(ReadEnd::Refused(reason))) => {
            warn!(identity, %remote, "closing connection: {reason}");
            // Refused: its slots are free while it lingers to read why.
            drop(pending);
            drop(identity_slot);
            refuse(&mut send, &conn, listener.max_frame, &reason).await;
            return;
        }
    };

    // Only a connection that said Hello gets an id.
    let id = match listener.ids.next() {
        Ok(id) => id,
        Err(e) => {
            error!(identity, %remote, "connection refused: {e}");
            drop(pending);
            drop(identity_slot);
            refuse(&mut send, &conn, listener.max_frame, &e.to_string()).await;
            return;
        }
    };
    let (tx, rx) = mpsc::channel(OUTBOUND_FRAMES);
    let queued = Arc::new(AtomicUsize::new(0));
    let admitted = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(Notify::new());
    let link = PeerLink::new(
        identity.clone(),
        remote,
        tx.clone(),
        queued.clone(),
        conn.clone(),
        admitted.clone(),
        stop.clone(),
        pending,
    );
    if listener
        .inbound
        .send(Inbound::Connected { id, link })
        .await
        .is_err()
    {
        return;
    }
    let writer = tokio::spawn(write_frames(send, rx, conn.clone(), queued));
    let reader = Reader {
        id,
        listener: &listener,
        admitted,
        permits: Arc::new(Semaphore::new(listener.inbound_queue)),
    };
    let end = match reader.forward(hello, wire_bytes).await {
        Ok(()) => tokio::select! {
            biased;
            () = stop.notified() => ReadEnd::Closed("closed by the coordinator".into()),
            end = reader.read_loop(&mut recv) => end,
        },
        Err(end) => end,
    };
    let reason = match end {
        ReadEnd::Closed(reason) => reason,
        ReadEnd::Refused(message) => {
            // Tell the peer why before closing; nothing it sent is used.
            warn!(id, identity, %remote, "closing connection: {message}");
            if let Ok(frame) = encode_frame(
                &Message::Error {
                    message: message.clone(),
                },
                listener.max_frame,
            ) {
                let _ = tx.try_send(Outbound::Frame(frame.into()));
            }
            let finish = Outbound::Finish {
                code: close_code::PROTOCOL_ERROR,
                reason: message.clone(),
            };
            if tx.try_send(finish).is_err() {
                conn.close(close_code::PROTOCOL_ERROR.into(), message.as_bytes());
            }
            format!("protocol error: {message}")
        }
    };
    drop(tx);
    let _ = listener.inbound.send(Inbound::Closed { id, reason }).await;
    let _ = writer.await;
}

/// Writes an Error frame with `message`, finishes the stream, waits briefly
/// for the peer to close and closes (a connection refused before it had a
/// writer).
async fn refuse(send: &mut quinn::SendStream, conn: &quinn::Connection, max: usize, message: &str) {
    let error = Message::Error {
        message: message.to_string(),
    };
    if let Ok(frame) = encode_frame(&error, max) {
        let _ = tokio::time::timeout(LINGER, send.write_all(&frame)).await;
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(LINGER, conn.closed()).await;
    conn.close(close_code::PROTOCOL_ERROR.into(), message.as_bytes());
}

/// Writes the driver's frames to the stream, keeping `queued` (bytes not
/// yet handed to QUIC) up to date.
async fn write_frames(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Outbound>,
    conn: quinn::Connection,
    queued: Arc<AtomicUsize>,
) {
    while let Some(out) = rx.recv().await {
        match out {
            Outbound::Frame(bytes) => {
                let len = bytes.len();
                // write_chunk keeps the shared buffer instead of copying it.
                let written = send.write_chunk(bytes).await;
                queued.fetch_sub(len, Ordering::AcqRel);
                if written.is_err() {
                    break;
                }
            }
            Outbound::Finish { code, reason } => {
                let _ = send.finish();
                let _ = tokio::time::timeout(LINGER, conn.closed()).await;
                conn.close(code.into(), reason.as_bytes());
                break;
            }
        }
    }
}

/// Why a connection's reader stopped.
#[derive(Debug, PartialEq)]
enum ReadEnd {
    /// The stream ended or the connection went away.
    Closed(String),
    /// The peer sent something refused: bytes that are not valid greyfed
    /// frames, or a frame over its kind's limit.
    Refused(String),
}

/// A connection's reader after its Hello.
struct Reader<'a> {
    id: ParticipantId,
    listener: &'a Listener,
    admitted: Arc<AtomicBool>,
    permits: Arc<Semaphore>,
}

impl Reader<'_> {
    /// Hands one message to the driver, waiting for one of the connection's
    /// places in the inbound queue.
    async fn forward(&self, msg: Message, wire_bytes: usize) -> Result<(), ReadEnd> {
        let stopped = || ReadEnd::Closed("coordinator stopped".into());
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| stopped())?;
        self.listener
            .inbound
            .send(Inbound::Message {
                id: self.id,
                msg,
                wire_bytes,
                _permit: permit,
            })
            .await
            .map_err(|_| stopped())
    }

    /// The upload limits in force: the Hello's until the session admitted
    /// the connection, the session's after.
    fn limits(&self) -> UploadLimits {
        if self.admitted.load(Ordering::Acquire) {
            *self.listener.upload_limits.borrow()
        } else {
            UploadLimits::before_admission(self.listener.max_frame)
        }
    }

    /// Reads and forwards frames until the stream ends or fails.
    async fn read_loop<R: AsyncRead + Unpin>(&self, recv: &mut R) -> ReadEnd {
        loop {
            let (msg, wire_bytes) = match read_frame(recv, || self.limits(), None).await {
                Ok(Some(frame)) => frame,
                Ok(None) => return ReadEnd::Closed("stream finished".into()),
                Err(end) => return end,
            };
            if let Err(end) = self.forward(msg, wire_bytes).await {
                return end;
            }
        }
    }
}

/// Reads one frame, checking its header and then its kind (the payload's
/// first byte) against the limits in force once the header arrived
/// (`limits()`: a connection may have been admitted while the reader
/// waited) before reading the rest; with `expect`, only that kind is
/// accepted. `Ok(None)`: the stream ended between frames. Returns the
/// message and the frame's size on the wire.
async fn read_frame<R: AsyncRead + Unpin>(
    recv: &mut R,
    limits: impl FnOnce() -> UploadLimits,
    expect: Option<UploadKind>,
) -> Result<Option<(Message, usize)>, ReadEnd> {
    let lost = |e: std::io::Error| ReadEnd::Closed(format!("connection lost: {e}"));
    let truncated = |got: usize| {
        ReadEnd::Closed(format!(
            "connection closed in the middle of a frame ({got} bytes buffered)"
        ))
    };
    let mut header = [0u8; HEADER_LEN];
    if recv.read(&mut header[..1]).await.map_err(lost)? == 0 {
        return Ok(None);
    }
    let mut got = 1;
    while got < HEADER_LEN {
        match recv.read(&mut header[got..]).await.map_err(lost)? {
            0 => return Err(truncated(got)),
            n => got += n,
        }
    }
    let limits = limits();
    // Magic, version and the largest limit of any kind: frame.rs's checks.
    let mut decoder = FrameDecoder::new(limits.largest());
    decoder.push(&header);
    let len = match decoder.pending_frame_len() {
        Ok(Some(total)) => total - HEADER_LEN,
        Ok(None) => return Err(ReadEnd::Refused("incomplete frame header".into())),
        Err(e) => return Err(ReadEnd::Refused(e.to_string())),
    };
    if len == 0 {
        return Err(ReadEnd::Refused("malformed message: empty payload".into()));
    }
    let mut payload = vec![0u8; len.min(READ_STEP)];
    recv.read_exact(&mut payload[..1])
        .await
        .map_err(|_| truncated(HEADER_LEN))?;
    let kind =
        UploadKind::from_first_byte(payload[0]).map_err(|e| ReadEnd::Refused(e.to_string()))?;
    if let Some(expected) = expect
        && kind != expected
    {
        return Err(ReadEnd::Refused(format!(
            "expected a {} first, got a {}",
            expected.name(),
            kind.name()
        )));
    }
    limits
        .check(kind, len)
        .map_err(|e| ReadEnd::Refused(e.to_string()))?;
    let mut filled = 1;
    while filled < len {
        if filled == payload.len() {
            // Grow with what arrived, never past the announced length.
            payload.resize(filled.saturating_mul(2).max(READ_STEP).min(len), 0);
        }
        match recv.read(&mut payload[filled..]).await.map_err(lost)? {
            0 => return Err(truncated(HEADER_LEN + filled)),
            n => filled += n,
        }
    }
    let msg = decode_payload(&payload).map_err(|e| ReadEnd::Refused(e.to_string()))?;
    if UploadKind::of(&msg) != kind {
        return Err(ReadEnd::Refused(format!(
            "malformed message: a {} frame decoded as {}",
            kind.name(),
            msg.kind()
        )));
    }
    Ok(Some((msg, HEADER_LEN + len)))
}

#[cfg(test)]
mod tests;
