//! Transport parameters both sides must agree on. Pure constants: the QUIC
//! endpoints themselves live in the coordinator and participant crates.

use std::time::Duration;

/// TLS ALPN protocol id; carries the protocol version so that mismatched
/// releases fail at the handshake with a clear error.
pub const ALPN: &[u8] = b"greyfed/5";

/// QUIC keep-alive interval: keeps idle connections open during long local
/// training and lets each side notice a vanished peer.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// A connection with no traffic (keep-alives included) for this long is
/// considered dead. A participant killed abruptly (no close frame; UDP gives
/// no other sign) is noticed after this time, so each crash costs its round
/// about this much. Five keep-alives fit in it, so only a network outage of
/// about 5 s (or a process starved of CPU that long) drops a live peer,
/// which then reconnects and rejoins the next round.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
