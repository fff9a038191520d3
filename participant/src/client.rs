//! The participant's QUIC client: TLS 1.3 configuration trusting the
//! deployment's CA, and connecting to the coordinator.

use std::net::SocketAddr;
use std::sync::Arc;

use greyfed_protocol::transport;
use rustls_pki_types::{CertificateDer, pem::PemObject};

use crate::error::{ParticipantError, Result};

/// QUIC client configuration that trusts only the CA certificates in
/// `ca_pem` (the file `greyfed keygen` writes as `ca.pem`).
pub fn client_config(ca_pem: &[u8]) -> Result<quinn::ClientConfig> {
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
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ParticipantError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![transport::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| ParticipantError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(transport::KEEP_ALIVE_INTERVAL));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(transport::IDLE_TIMEOUT).expect("idle timeout fits a VarInt"),
    ));
    config.transport_config(Arc::new(t));
    Ok(config)
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
    let mut endpoint = quinn::Endpoint::client(bind)
        .map_err(|e| ParticipantError::Connection(format!("cannot open a UDP socket: {e}")))?;
    endpoint.set_default_client_config(config);
    let connecting = endpoint
        .connect(addr, server_name)
        .map_err(|e| ParticipantError::Connection(format!("{addr}: {e}")))?;
    let conn = connecting
        .await
        .map_err(|e| ParticipantError::Connection(format!("{addr} (as {server_name}): {e}")))?;
    Ok((endpoint, conn))
}
