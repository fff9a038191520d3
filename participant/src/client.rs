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

use greyfed_protocol::transport::{self, TransportSettings};
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
    config.transport_config(Arc::new(greyfed_quic::transport_config(
        TransportSettings::default(),
    )));
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
    let mut endpoint = greyfed_quic::endpoint(bind, None)
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
