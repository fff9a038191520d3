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
/// its idle timeout, and path MTU discovery up to its datagram ceiling.
/// Each side adds its own stream limits.
pub fn transport_config(settings: TransportSettings) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.congestion_controller_factory(congestion_controller(settings.congestion));
    t.keep_alive_interval(Some(transport::KEEP_ALIVE_INTERVAL));
    let mut discovery = quinn::MtuDiscoveryConfig::default();
    discovery.upper_bound(settings.datagram_ceiling);
    t.mtu_discovery_config(Some(discovery));
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
    let mut config = quinn::EndpointConfig::default();
    // What this endpoint accepts and announces: datagrams up to the largest
    // ceiling either side may reach (peers elsewhere stop at theirs).
    config
        .max_udp_payload_size(transport::LOOPBACK_DATAGRAM_CEILING)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    quinn::Endpoint::new(
        config,
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

    /// A connection over loopback between two endpoints with `settings`
    /// that carries data one way, 256 KB at a time, until the sender's path
    /// MTU is above the network ceiling or 16 MB have gone (discovery runs
    /// beside the data, so a loaded machine may need more than a model's
    /// worth); the path MTU each side ends with.
    async fn mtu_after_a_transfer(settings: TransportSettings) -> (u16, u16) {
        use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = certified.cert.der().clone();
        let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        server_tls.alpn_protocols = vec![b"test".to_vec()];
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).unwrap(),
        ));
        server.transport_config(Arc::new(transport_config(settings)));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_tls.alpn_protocols = vec![b"test".to_vec()];
        let mut client = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap(),
        ));
        client.transport_config(Arc::new(transport_config(settings)));

        let server = endpoint("127.0.0.1:0".parse().unwrap(), Some(server)).unwrap();
        let addr = server.local_addr().unwrap();
        let receiver = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let mut stream = conn.accept_uni().await.unwrap();
            let got = stream.read_to_end(32 << 20).await.unwrap();
            assert!(got.len() >= 256 << 10 && got.iter().all(|&b| b == 7));
            let mtu = conn.stats().path.current_mtu;
            conn.close(0u32.into(), b"done");
            server.wait_idle().await;
            mtu
        });
        let client_endpoint = endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let conn = client_endpoint
            .connect_with(client, addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        let mut stream = conn.open_uni().await.unwrap();
        let chunk = vec![7u8; 256 << 10];
        for _ in 0..64 {
            stream.write_all(&chunk).await.unwrap();
            if conn.stats().path.current_mtu > transport::NETWORK_DATAGRAM_CEILING {
                break;
            }
        }
        stream.finish().unwrap();
        let server_mtu = receiver.await.unwrap();
        (conn.stats().path.current_mtu, server_mtu)
    }

    /// Path MTU discovery climbs to the loopback ceiling with a peer on
    /// this machine, and stays within the network ceiling otherwise.
    #[tokio::test]
    async fn datagrams_reach_the_ceiling_their_settings_allow() {
        let loopback = TransportSettings::default().for_peer("127.0.0.1".parse().unwrap());
        let (sender, receiver) = mtu_after_a_transfer(loopback).await;
        assert!(
            sender > transport::NETWORK_DATAGRAM_CEILING
                && sender <= transport::LOOPBACK_DATAGRAM_CEILING,
            "sender's MTU {sender}"
        );
        assert!(
            receiver <= transport::LOOPBACK_DATAGRAM_CEILING,
            "receiver's MTU {receiver}"
        );
        let (sender, receiver) = mtu_after_a_transfer(TransportSettings::default()).await;
        assert!(
            sender <= transport::NETWORK_DATAGRAM_CEILING,
            "sender's MTU {sender}"
        );
        assert!(
            receiver <= transport::NETWORK_DATAGRAM_CEILING,
            "receiver's MTU {receiver}"
        );
    }

    #[tokio::test]
    async fn a_client_endpoint_binds_a_free_port() {
        let client = endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
        assert_ne!(client.local_addr().unwrap().port(), 0);
    }
}
