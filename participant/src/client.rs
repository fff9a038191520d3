//! The participant's QUIC client: TLS 1.3 configuration trusting the
//! deployment's CA and presenting this participant's client certificate
//! (mutual TLS), and connecting to the coordinator.
//!
//! The coordinator admits only certificates issued by the deployment CA and
//! listed in its allow list; it knows this participant by the identity in
//! the certificate. A refusal arrives as a TLS alert, which
//! [`connection_error`] turns into [`ParticipantError::Tls`]: it is never
//! retried, since the same certificate would be refused again.

use std::net::SocketAddr;
use std::sync::Arc;

use greyfed_protocol::transport::{self, Congestion, TransportSettings};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::error::{ParticipantError, Result};

/// This participant's TLS credentials: its certificate chain, issued by the
/// deployment CA, and its private key, both PEM. The key is a secret:
/// `Debug` leaves it out.
#[derive(Clone)]
pub struct ClientIdentity {
    /// Certificate chain (the end-entity certificate first).
    pub cert_pem: Vec<u8>,
    /// Private key of the certificate (secret).
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity").finish_non_exhaustive()
    }
}

/// QUIC client configuration that trusts only the CA certificates in
/// `ca_pem` (the deployment's `ca.pem`) and authenticates with `identity`.
/// Session resumption is off (the coordinator does not offer it either):
/// every connection is a full handshake with the certificate.
pub fn client_config(ca_pem: &[u8], identity: &ClientIdentity) -> Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| ParticipantError::Tls(format!("CA file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| ParticipantError::Tls(format!("CA certificate unusable: {e}")))?;
        found += 1;
    }
    if found == 0 {
        return Err(ParticipantError::Tls("CA file holds no certificate".into()));
    }
    let certs = CertificateDer::pem_slice_iter(&identity.cert_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| ParticipantError::Tls(format!("certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(ParticipantError::Tls(
            "certificate file holds no certificate".into(),
        ));
    }
    // The key error never includes the key bytes.
    let key = PrivateKeyDer::from_pem_slice(&identity.key_pem)
        .map_err(|_| ParticipantError::Tls("key file holds no usable private key".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ParticipantError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| ParticipantError::Tls(format!("certificate and key do not fit: {e}")))?;
    tls.alpn_protocols = vec![transport::ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| ParticipantError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(TransportSettings::default())));
    Ok(config)
}

/// The participant's transport settings: keep-alives so that a vanished
/// coordinator is noticed within the idle timeout, and `settings`'
/// congestion controller (for what it sends: its uploads) and idle
/// timeout. Set it on a [`client_config`] with
/// `quinn::ClientConfig::transport_config`.
pub fn transport_config(settings: TransportSettings) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.congestion_controller_factory(match settings.congestion {
        Congestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default())
            as Arc<dyn quinn::congestion::ControllerFactory + Send + Sync>,
        Congestion::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
        Congestion::Bbr => Arc::new(quinn::congestion::BbrConfig::default()),
    });
    t.keep_alive_interval(Some(transport::KEEP_ALIVE_INTERVAL));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(settings.idle_timeout).unwrap_or(quinn::VarInt::MAX.into()),
    ));
    t
}

/// A UDP socket bound to `addr` with [`transport::UDP_BUFFER_BYTES`] of
/// receive and send buffer asked for; warns, naming the sysctl, when the
/// kernel grants less.
///
/// # Errors
/// The socket cannot be opened or bound.
pub fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Linux reports twice the size it grants (its bookkeeping included).
    let wanted = transport::UDP_BUFFER_BYTES;
    let reported_per_granted = if cfg!(target_os = "linux") { 2 } else { 1 };
    let granted = |size: std::io::Result<usize>| size.map_or(0, |s| s / reported_per_granted);
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

/// Connects to the coordinator at `addr`, checking its certificate against
/// `server_name`. Returns the endpoint (keep it alive) and the connection.
pub async fn connect(
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
) -> Result<(quinn::Endpoint, quinn::Connection)> {
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse().expect("valid address")
    } else {
        "0.0.0.0:0".parse().expect("valid address")
    };
    let socket = udp_socket(bind)
        .map_err(|e| ParticipantError::Connection(format!("cannot open a UDP socket: {e}")))?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| ParticipantError::Connection(format!("cannot open a UDP socket: {e}")))?;
    endpoint.set_default_client_config(config);
    let connecting = endpoint
        .connect(addr, server_name)
        .map_err(|e| ParticipantError::Connection(format!("{addr}: {e}")))?;
    let conn = connecting.await.map_err(|e| match connection_error(&e) {
        ParticipantError::Connection(m) => {
            ParticipantError::Connection(format!("{addr} (as {server_name}): {m}"))
        }
        other => other,
    })?;
    Ok((endpoint, conn))
}

/// True for a QUIC error code that carries a TLS alert (0x100 to 0x1ff).
fn is_tls_alert(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// Classifies a failed or lost connection. A TLS alert, whether the
/// coordinator refused our certificate (another CA, expired, revoked, not
/// in its allow list) or we refused its certificate, is
/// [`ParticipantError::Tls`], which is never retried; anything else is
/// [`ParticipantError::Connection`], which is.
pub fn connection_error(e: &quinn::ConnectionError) -> ParticipantError {
    match e {
        quinn::ConnectionError::ConnectionClosed(close) if is_tls_alert(close.error_code) => {
            ParticipantError::Tls(format!(
                "the coordinator refused this participant at the TLS handshake: {close}"
            ))
        }
        quinn::ConnectionError::TransportError(t) if is_tls_alert(t.code) => {
            ParticipantError::Tls(format!("TLS handshake failed: {t}"))
        }
        other => ParticipantError::Connection(other.to_string()),
    }
}

/// [`connection_error`] for a failed stream read.
pub fn read_error(e: &quinn::ReadError) -> ParticipantError {
    match e {
        quinn::ReadError::ConnectionLost(c) => connection_error(c),
        other => ParticipantError::Connection(other.to_string()),
    }
}

/// [`connection_error`] for a failed stream write.
pub fn write_error(e: &quinn::WriteError) -> ParticipantError {
    match e {
        quinn::WriteError::ConnectionLost(c) => connection_error(c),
        other => ParticipantError::Connection(other.to_string()),
    }
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
        assert!(socket.recv_buffer_size().unwrap() / 2 >= wanted.min(limit("rmem_max")));
        assert!(socket.send_buffer_size().unwrap() / 2 >= wanted.min(limit("wmem_max")));
    }
}
