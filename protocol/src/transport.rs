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

/// Receive and send buffer, in bytes, each side asks the kernel for on its
/// QUIC endpoint's UDP socket. The coordinator takes every participant's
/// upload on one socket and a participant a whole model in a burst: with
/// Linux's usual 208 KiB, bursts overflow the buffer, and the datagrams
/// lost cost retransmissions and slower sending (on loopback, 10 processes
/// on 2 cores: rounds about 3% longer). The kernel grants at most
/// `net.core.rmem_max` (`wmem_max` for sending); each side warns when it
/// got less (see docs/deploy.md).
pub const UDP_BUFFER_BYTES: usize = 4 << 20;

/// Largest UDP payload, in bytes, of a QUIC datagram to a peer on another
/// machine: the ceiling of QUIC's path MTU discovery there (quinn's
/// default: Ethernet's 1500 bytes less the IPv6 and UDP headers).
pub const NETWORK_DATAGRAM_CEILING: u16 = 1452;

/// Largest UDP payload, in bytes, of a QUIC datagram to a peer on this
/// machine ([`on_this_machine`]) under [`Congestion::Auto`]: the ceiling of
/// path MTU discovery there.
/// Loopback carries 64 KiB datagrams, and every datagram costs a pass
/// through quinn and the kernel whatever its size: on the 10 × 10 MNIST
/// simulation, 6,500-byte datagrams took `round_overhead` from 1.15-1.19
/// to 1.12-1.15 (docs/benchmarks.md). The bound is what one segmentation-
/// offload batch allows: quinn sends up to [`GSO_BATCH_DATAGRAMS`]
/// datagrams of one size in a single UDP send, and the whole batch must fit
/// in one 65,507-byte UDP payload; larger datagrams make the kernel refuse
/// the batch. MTU discovery probes its way up, so a path that cannot carry
/// them keeps to the size that gets through. A relay onto a network may
/// carry them in fragments, each of which a lossy link can lose: a
/// coordinator behind one, which sees its peers on loopback, is given an
/// explicit congestion controller, and with it the network ceiling.
pub const LOOPBACK_DATAGRAM_CEILING: u16 = 6500;

/// Datagrams quinn 0.11 puts in one segmentation-offload batch (its
/// `MAX_TRANSMIT_SEGMENTS`); see [`LOOPBACK_DATAGRAM_CEILING`].
pub const GSO_BATCH_DATAGRAMS: usize = 10;

const _: () = assert!(LOOPBACK_DATAGRAM_CEILING as usize * GSO_BATCH_DATAGRAMS <= 65_507);

/// Whether a peer at `remote` is on this machine: a loopback address (an
/// IPv4 address seen through a dual-stack socket counts as IPv4). The
/// per-peer defaults ([`Congestion::Auto`],
/// [`crate::model_delta::ModelDeltas::Auto`]) go by it.
pub fn on_this_machine(remote: std::net::IpAddr) -> bool {
    remote.to_canonical().is_loopback()
}

/// The congestion controller a QUIC endpoint uses for what it sends (the
/// coordinator for models, participants for their uploads). Each side
/// chooses its own; they need not agree. The default, [`Congestion::Auto`],
/// is BBR across networks: on a link with 2% random loss and 100 ms round
/// trip it brought the netem test's rounds from 27-38 s (CUBIC) to 2-4 s
/// (docs/benchmarks.md). On loopback it is CUBIC: BBR sizes its window
/// from the round trip it measures, microseconds there, and holds a fresh
/// connection to 4 packets in flight, so a 1.6 MB model took 30 ms instead
/// of 5 ms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Congestion {
    /// CUBIC (quinn's default): loss-based, so its rate falls as
    /// `1/sqrt(loss)`; about 100 KB/s at 2% loss and 100 ms round trip.
    Cubic,
    /// NewReno: loss-based, as CUBIC.
    NewReno,
    /// BBR (quinn marks its implementation experimental): paced at the
    /// measured bottleneck bandwidth, so random loss barely slows it.
    Bbr,
    /// CUBIC to a peer on this machine (a loopback address), BBR to any
    /// other ([`Congestion::for_peer`]); larger datagrams to a peer on this
    /// machine too ([`TransportSettings::for_peer`]).
    #[default]
    Auto,
}

impl Congestion {
    /// The name the command line uses: `cubic`, `new-reno` or `bbr`.
    pub fn name(self) -> &'static str {
        match self {
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "new-reno",
            Congestion::Bbr => "bbr",
            Congestion::Auto => "auto",
        }
    }

    /// The controller for a connection with `remote`: [`Congestion::Auto`]
    /// resolved ([`on_this_machine`]), any other choice as it is.
    pub fn for_peer(self, remote: std::net::IpAddr) -> Self {
        match self {
            Congestion::Auto if on_this_machine(remote) => Congestion::Cubic,
            Congestion::Auto => Congestion::Bbr,
            other => other,
        }
    }
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cubic" => Ok(Congestion::Cubic),
            "new-reno" | "newreno" => Ok(Congestion::NewReno),
            "bbr" => Ok(Congestion::Bbr),
            "auto" => Ok(Congestion::Auto),
            other => Err(format!(
                "unknown congestion controller {other:?}: auto, cubic, new-reno or bbr"
            )),
        }
    }
}

/// What a deployment tunes of a QUIC endpoint's transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportSettings {
    /// Congestion controller for what this side sends.
    pub congestion: Congestion,
    /// How long a silent peer (no packet, keep-alives included) lasts
    /// before it counts as gone. Each side announces its own and the
    /// smaller one applies; quinn never uses less than three probe timeouts
    /// of the path, so slow links stretch it by themselves. Shorter notices
    /// a crashed participant sooner (each crash costs its round about this
    /// much); longer rides out longer outages.
    pub idle_timeout: Duration,
    /// Ceiling of path MTU discovery: the largest UDP payload a datagram
    /// may carry once probes show the path takes it.
    /// [`NETWORK_DATAGRAM_CEILING`] unless [`Self::for_peer`] finds the
    /// peer on this machine under [`Congestion::Auto`]
    /// ([`LOOPBACK_DATAGRAM_CEILING`]).
    pub datagram_ceiling: u16,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            congestion: Congestion::default(),
            idle_timeout: IDLE_TIMEOUT,
            datagram_ceiling: NETWORK_DATAGRAM_CEILING,
        }
    }
}

impl TransportSettings {
    /// These settings for a connection with `remote`: [`Congestion::Auto`]
    /// resolved ([`Congestion::for_peer`]), and under it larger datagrams
    /// to a peer on this machine ([`LOOPBACK_DATAGRAM_CEILING`]). An
    /// explicit controller treats every peer alike.
    pub fn for_peer(self, remote: std::net::IpAddr) -> Self {
        Self {
            congestion: self.congestion.for_peer(remote),
            datagram_ceiling: if self.congestion == Congestion::Auto && on_this_machine(remote) {
                LOOPBACK_DATAGRAM_CEILING
            } else {
                self.datagram_ceiling
            },
            ..self
        }
    }

    /// Longest idle timeout accepted (QUIC encodes it in milliseconds; a
    /// day is far beyond any use).
    pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

    /// Checks the idle timeout: longer than the keep-alive interval (or
    /// keep-alives could not keep a live peer) and at most
    /// [`Self::MAX_IDLE_TIMEOUT`].
    ///
    /// # Errors
    /// A message naming the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        if self.idle_timeout <= KEEP_ALIVE_INTERVAL || self.idle_timeout > Self::MAX_IDLE_TIMEOUT {
            return Err(format!(
                "the idle timeout must be above the {} s keep-alive interval and at most {} s, \
                 got {:?}",
                KEEP_ALIVE_INTERVAL.as_secs(),
                Self::MAX_IDLE_TIMEOUT.as_secs(),
                self.idle_timeout
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn congestion_names_round_trip_and_idle_timeouts_are_bounded() {
        for c in [
            Congestion::Cubic,
            Congestion::NewReno,
            Congestion::Bbr,
            Congestion::Auto,
        ] {
            assert_eq!(c.name().parse::<Congestion>(), Ok(c));
        }
        assert!("vegas".parse::<Congestion>().is_err());
        assert_eq!(Congestion::default(), Congestion::Auto);
        let with = |secs: u64| TransportSettings {
            idle_timeout: Duration::from_secs(secs),
            ..TransportSettings::default()
        };
        assert!(TransportSettings::default().validate().is_ok());
        assert!(with(2).validate().is_ok());
        assert!(with(86_400).validate().is_ok());
        for bad in [0, 1, 86_401] {
            assert!(with(bad).validate().is_err(), "{bad} s");
        }
    }

    #[test]
    fn auto_congestion_is_cubic_on_loopback_and_bbr_elsewhere() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let auto = Congestion::Auto;
        assert_eq!(auto.for_peer(ip("127.0.0.1")), Congestion::Cubic);
        assert_eq!(auto.for_peer(ip("::1")), Congestion::Cubic);
        // A dual-stack listener sees IPv4 loopback as IPv4-mapped IPv6.
        assert_eq!(auto.for_peer(ip("::ffff:127.0.0.1")), Congestion::Cubic);
        assert_eq!(auto.for_peer(ip("10.0.0.2")), Congestion::Bbr);
        assert_eq!(auto.for_peer(ip("2001:db8::1")), Congestion::Bbr);
        // An explicit choice holds for every peer.
        for c in [Congestion::Cubic, Congestion::NewReno, Congestion::Bbr] {
            assert_eq!(c.for_peer(ip("127.0.0.1")), c);
            assert_eq!(c.for_peer(ip("10.0.0.2")), c);
        }
        let settings = TransportSettings::default().for_peer(ip("127.0.0.1"));
        assert_eq!(settings.congestion, Congestion::Cubic);
        assert_eq!(settings.idle_timeout, IDLE_TIMEOUT);
    }

    #[test]
    fn datagrams_grow_only_towards_peers_on_this_machine() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let settings = TransportSettings::default();
        assert_eq!(settings.datagram_ceiling, NETWORK_DATAGRAM_CEILING);
        for local in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            let s = settings.for_peer(ip(local));
            assert_eq!(s.datagram_ceiling, LOOPBACK_DATAGRAM_CEILING, "{local}");
        }
        for remote in ["10.0.0.2", "2001:db8::1"] {
            let s = settings.for_peer(ip(remote));
            assert_eq!(s.datagram_ceiling, NETWORK_DATAGRAM_CEILING, "{remote}");
        }
        // An explicit controller (a coordinator behind a relay) treats
        // every peer alike.
        for congestion in [Congestion::Cubic, Congestion::NewReno, Congestion::Bbr] {
            let explicit = TransportSettings {
                congestion,
                ..settings
            };
            assert_eq!(
                explicit.for_peer(ip("127.0.0.1")).datagram_ceiling,
                NETWORK_DATAGRAM_CEILING,
                "{congestion:?}"
            );
        }
    }
}
