//! The coordinator's connections: accepting them, authenticating the peer
//! (its identity comes from its verified client certificate), and one task
//! per connection that turns the stream into [`Inbound`] events for the
//! driver in [`crate::server`] and writes what the driver sends back.
//!
//! Per connection: a reader (bytes → frames → `Inbound` events on a
//! channel), a writer (encoded frames from a channel → stream) and a
//! watcher that closes the connection when its certificate leaves the allow
//! list. A peer without an admitted certificate never gets here: the TLS
//! handshake refuses it ([`crate::auth`]), which is logged once below.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use greyfed_protocol::{
    Message, ParticipantId, ProtocolError,
    frame::{FrameDecoder, encode_frame},
};
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::{
    auth::{AllowList, SharedAllowList},
    error::{CoordinatorError, Result},
    pki,
};

/// QUIC application close codes.
pub(crate) mod close_code {
    pub const DONE: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const REJECTED: u32 = 2;
    pub const SHUTDOWN: u32 = 3;
}

/// A connection must open its stream and say Hello within this time.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest first frame (the Hello) accepted from a connection: a peer not
/// yet admitted to the session cannot make the coordinator buffer a huge frame.
const HELLO_MAX_FRAME: usize = 64 * 1024;
/// How long a finishing connection waits for the peer to close.
pub(crate) const LINGER: Duration = Duration::from_secs(5);

/// What connection tasks tell the driver.
pub(crate) enum Inbound {
    Connected {
        id: ParticipantId,
        remote: SocketAddr,
        /// From the verified client certificate.
        identity: String,
        tx: mpsc::UnboundedSender<Outbound>,
    },
    Message {
        id: ParticipantId,
        msg: Message,
        /// Size of the frame on the wire (header included).
        wire_bytes: usize,
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

/// Accepts connections until the endpoint closes, each in its own task
/// with the next [`ParticipantId`].
pub(crate) async fn accept_loop(
    endpoint: quinn::Endpoint,
    inbound: mpsc::UnboundedSender<Inbound>,
    max_frame: usize,
    allow: SharedAllowList,
) {
    let mut next_id: ParticipantId = 0;
    while let Some(incoming) = endpoint.accept().await {
        let id = next_id;
        next_id = next_id.wrapping_add(1);
        tokio::spawn(connection_task(
            incoming,
            id,
            inbound.clone(),
            max_frame,
            allow.clone(),
        ));
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

async fn connection_task(
    incoming: quinn::Incoming,
    id: ParticipantId,
    inbound: mpsc::UnboundedSender<Inbound>,
    max_frame: usize,
    allow: SharedAllowList,
) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // The one log line of a refused peer: unknown CA, expired, not
            // in the allow list, no certificate (or a failed handshake).
            warn!(%remote, "connection refused at the TLS handshake: {e}");
            return;
        }
    };
    let (identity, fingerprint) = match authenticated_peer(&conn, &allow.current()) {
        Ok(peer) => peer,
        Err(e) => {
            warn!(%remote, "connection refused: {e}");
            conn.close(close_code::REJECTED.into(), b"not admitted");
            return;
        }
    };
    let revocation = tokio::spawn(close_when_revoked(
        conn.clone(),
        allow.subscribe(),
        identity.clone(),
        fingerprint,
    ));
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%remote, "connection closed before opening a stream: {e}");
            return;
        }
        Err(_) => {
            conn.close(
                close_code::PROTOCOL_ERROR.into(),
                b"no stream opened in time",
            );
            return;
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    if inbound
        .send(Inbound::Connected {
            id,
            remote,
            identity,
            tx: tx.clone(),
        })
        .is_err()
    {
        revocation.abort();
        return;
    }
    let writer_conn = conn.clone();
    let writer = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            match out {
                Outbound::Frame(bytes) => {
                    // write_chunk keeps the shared buffer instead of copying it.
                    if send.write_chunk(bytes).await.is_err() {
                        break;
                    }
                }
                Outbound::Finish { code, reason } => {
                    let _ = send.finish();
                    let _ = tokio::time::timeout(LINGER, writer_conn.closed()).await;
                    writer_conn.close(code.into(), reason.as_bytes());
                    break;
                }
            }
        }
    });
    let reason = match read_frames(&mut recv, id, &inbound, max_frame).await {
        ReadEnd::Closed(reason) => reason,
        ReadEnd::ProtocolError(e) => {
            // Tell the peer why before closing; nothing it sent is used.
            debug!(id, %remote, "protocol error: {e}");
            let message = e.to_string();
            if let Ok(frame) = encode_frame(
                &Message::Error {
                    message: message.clone(),
                },
                max_frame,
            ) {
                let _ = tx.send(Outbound::Frame(frame.into()));
            }
            let _ = tx.send(Outbound::Finish {
                code: close_code::PROTOCOL_ERROR,
                reason: message.clone(),
            });
            format!("protocol error: {message}")
        }
    };
    drop(tx);
    let _ = inbound.send(Inbound::Closed { id, reason });
    let _ = writer.await;
    revocation.abort();
}

/// Why a connection's reader stopped.
enum ReadEnd {
    /// The stream ended or the connection went away.
    Closed(String),
    /// The peer sent bytes that are not valid greyfed frames.
    ProtocolError(ProtocolError),
}

/// Reads frames until the stream ends or fails.
async fn read_frames(
    recv: &mut quinn::RecvStream,
    id: ParticipantId,
    inbound: &mpsc::UnboundedSender<Inbound>,
    max_frame: usize,
) -> ReadEnd {
    let mut decoder = FrameDecoder::new(HELLO_MAX_FRAME.min(max_frame));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match recv.read(&mut buf).await {
            Ok(Some(n)) => {
                decoder.push(&buf[..n]);
                loop {
                    let before = decoder.buffered();
                    match decoder.next_message() {
                        Ok(Some(msg)) => {
                            decoder.set_max_frame(max_frame);
                            let wire_bytes = before - decoder.buffered();
                            if inbound
                                .send(Inbound::Message {
                                    id,
                                    msg,
                                    wire_bytes,
                                })
                                .is_err()
                            {
                                return ReadEnd::Closed("coordinator stopped".into());
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return ReadEnd::ProtocolError(e),
                    }
                }
            }
            Ok(None) => {
                return ReadEnd::Closed(match decoder.finish() {
                    Ok(()) => "stream finished".into(),
                    Err(e) => e.to_string(),
                });
            }
            Err(e) => return ReadEnd::Closed(format!("connection lost: {e}")),
        }
    }
}
