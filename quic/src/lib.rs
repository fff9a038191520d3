//! The QUIC glue the coordinator and the participants share: quinn's
//! transport settings from [`TransportSettings`], and endpoints on UDP
//! sockets with large buffers. The protocol itself stays in the sans-IO
//! `greyfed-protocol` crate; this crate only configures quinn.

use std::net::SocketAddr;
use std::sync::Arc;

use greyfed_protocol::transport::{self, Congestion, TransportSettings};

/// quinn's transport settings for `settings`: its congestion controller
/// (for what this side sends; [`Congestion::Auto`] unresolved means BBR, so
/// resolve it with [`TransportSettings::for_peer`] where the peer is
/// known), keep-alives every
/// [`transport::KEEP_ALIVE_INTERVAL`] so that a vanished peer is noticed,
/// and its idle timeout. Each side adds its own stream limits.
pub fn transport_config(settings: TransportSettings) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.congestion_controller_factory(congestion_controller(settings.congestion));
    t.keep_alive_interval(Some(transport::KEEP_ALIVE_INTERVAL));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(settings.idle_timeout).unwrap_or(quinn::VarInt::MAX.into()),
    ));
    t
}

/// quinn's controller for `congestion`.
fn congestion_controller(
    congestion: Congestion,
) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync + 'static> {
    match congestion {
        Congestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
        Congestion::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
        Congestion::Bbr | Congestion::Auto => Arc::new(quinn::congestion::BbrConfig::default()),
    }
}

/// A quinn endpoint on [`udp_socket`]`(addr)`: a server when `server` is
/// given, a client otherwise. Call it inside a tokio runtime.
///
/// # Errors
/// The socket cannot be opened or bound.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        udp_socket(addr)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// A UDP socket bound to `addr` with [`transport::UDP_BUFFER_BYTES`] of
/// receive and send buffer asked for; warns, naming the sysctl, when the
/// kernel grants less.
///
/// # Errors
/// The socket cannot be opened or bound.
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let wanted = transport::UDP_BUFFER_BYTES;
    if socket.set_recv_buffer_size(wanted).is_err() || granted(socket.recv_buffer_size()) < wanted {
        tracing::warn!(
            granted = granted(socket.recv_buffer_size()),
            wanted,
            "the kernel caps this UDP socket's receive buffer: bursts may be dropped and \
             rounds run slower; raise net.core.rmem_max (docs/deploy.md)"
        );
    }
    if socket.set_send_buffer_size(wanted).is_err() || granted(socket.send_buffer_size()) < wanted {
        tracing::warn!(
            granted = granted(socket.send_buffer_size()),
            wanted,
            "the kernel caps this UDP socket's send buffer; raise net.core.wmem_max \
             (docs/deploy.md)"
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The buffer size the kernel granted, from what it reports (Linux reports
/// twice the size it grants, its bookkeeping included).
fn granted(reported: std::io::Result<usize>) -> usize {
    let per_granted = if cfg!(target_os = "linux") { 2 } else { 1 };
    reported.map_or(0, |s| s / per_granted)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket gets the buffer asked for, or all the kernel allows.
    #[cfg(target_os = "linux")]
    #[test]
    fn udp_sockets_get_the_buffer_the_kernel_allows() {
        let socket = udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let limit = |name: &str| -> usize {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let socket = socket2::Socket::from(socket);
        let wanted = transport::UDP_BUFFER_BYTES;
        assert!(granted(socket.recv_buffer_size()) >= wanted.min(limit("rmem_max")));
        assert!(granted(socket.send_buffer_size()) >= wanted.min(limit("wmem_max")));
    }

    #[tokio::test]
    async fn a_client_endpoint_binds_a_free_port() {
        let client = endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
        assert_ne!(client.local_addr().unwrap().port(), 0);
    }
}
