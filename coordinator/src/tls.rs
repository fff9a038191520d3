//! The coordinator's QUIC server configuration: TLS 1.3 with mutual
//! authentication. Certificates come from [`crate::pki`]; which participant
//! certificates are admitted is decided by [`crate::auth`].
//!
//! Only TLS 1.3 is offered (QUIC requires it). The crypto provider is *ring*,
//! which builds from crates.io alone; aws-lc-rs is kept out of the graph.
//! Session resumption is off: every connection presents and verifies its
//! certificate against the allow list in force, so a revoked participant
//! cannot come back on a ticket from before its revocation.

use std::sync::Arc;

use greyfed_protocol::transport::{self, TransportSettings};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::{
    auth::{self, SharedAllowList},
    error::{CoordinatorError, Result},
    pki::DeploymentPki,
};

/// What the coordinator's TLS needs: its certificate and key, the CA that
/// issues participant certificates, and the allow list.
#[derive(Clone)]
pub struct ServerTls {
    /// PEM certificate chain of the coordinator.
    pub cert_pem: Vec<u8>,
    /// PEM private key of the coordinator (secret; `Debug` leaves it out).
    pub key_pem: Vec<u8>,
    /// PEM of the deployment CA: participants' certificates must chain to it.
    pub client_ca_pem: Vec<u8>,
    /// The participants admitted (shared with whoever reloads it).
    pub allow_list: SharedAllowList,
}

impl ServerTls {
    /// The TLS material of a deployment generated in memory (simulations and
    /// tests): its coordinator certificate and key, its CA, and an allow list
    /// of all its participants.
    pub fn from_pki(pki: &DeploymentPki) -> ServerTls {
        ServerTls {
            cert_pem: pki.coordinator.cert_pem.clone().into_bytes(),
            key_pem: pki.coordinator.key_pem.clone().into_bytes(),
            client_ca_pem: pki.ca.cert_pem().as_bytes().to_vec(),
            allow_list: SharedAllowList::new(pki.allow_list()),
        }
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("allow_list", &self.allow_list.current().len())
            .finish_non_exhaustive()
    }
}

/// The QUIC server configuration: our certificate chain and key, and
/// mandatory client certificates checked by [`auth::client_verifier`].
pub fn server_config(tls: &ServerTls) -> Result<quinn::ServerConfig> {
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| CoordinatorError::Tls(format!("certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(CoordinatorError::Tls(
            "certificate file holds no certificate".into(),
        ));
    }
    // The key error never includes the key bytes.
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem)
        .map_err(|_| CoordinatorError::Tls("key file holds no usable private key".into()))?;
    let verifier = auth::client_verifier(&tls.client_ca_pem, tls.allow_list.clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| CoordinatorError::Tls(format!("certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![transport::ALPN.to_vec()];
    // No resumption: a resumed session would skip the allow-list check.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(config)).map_err(tls_err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(TransportSettings::default())));
    Ok(config)
}

fn tls_err(e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Tls(e.to_string())
}

/// The coordinator's transport settings: `settings`' (see
/// [`greyfed_quic::transport_config`]; its congestion controller governs
/// what the coordinator sends, models above all) with one bidirectional
/// stream per connection.
pub fn transport_config(settings: TransportSettings) -> quinn::TransportConfig {
    let mut t = greyfed_quic::transport_config(settings);
    t.max_concurrent_uni_streams(0u8.into());
    t.max_concurrent_bidi_streams(1u8.into());
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Validity;

    #[test]
    fn a_generated_deployment_builds_a_server_config() {
        let pki = DeploymentPki::generate(
            &["localhost".into(), "127.0.0.1".into()],
            &["p0".into()],
            Validity::days_from_now(1),
        )
        .unwrap();
        let t = ServerTls::from_pki(&pki);
        server_config(&t).unwrap();
        assert!(!format!("{t:?}").contains("PRIVATE"));
    }

    #[test]
    fn bad_pem_is_a_clear_error_without_key_material() {
        let one = |hosts: &[String]| {
            DeploymentPki::generate(hosts, &[], Validity::days_from_now(1)).unwrap()
        };
        let pki = one(&["localhost".into()]);
        let mut t = ServerTls::from_pki(&pki);
        t.cert_pem = b"garbage".to_vec();
        let err = server_config(&t).unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
        let mut t = ServerTls::from_pki(&pki);
        t.key_pem = b"not a key".to_vec();
        let err = server_config(&t).unwrap_err();
        assert!(err.to_string().contains("no usable private key"), "{err}");
        let mut t = ServerTls::from_pki(&pki);
        t.client_ca_pem = b"no CA here".to_vec();
        let err = server_config(&t).unwrap_err();
        assert!(err.to_string().contains("CA file"), "{err}");
        // Key of another certificate.
        let other = one(&["localhost".into()]);
        let mut t = ServerTls::from_pki(&pki);
        t.key_pem = other.coordinator.key_pem.clone().into_bytes();
        let err = server_config(&t).unwrap_err();
        assert!(!err.to_string().contains("PRIVATE KEY"));
        assert!(DeploymentPki::generate(&[], &[], Validity::days_from_now(1)).is_err());
    }
}
