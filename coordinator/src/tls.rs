//! TLS material for the coordinator: generating a private CA and a server
//! certificate (`greyfed keygen`), and the QUIC server configuration.
//!
//! Only TLS 1.3 is offered (QUIC requires it). The crypto provider is *ring*,
//! which builds from crates.io alone; aws-lc-rs is kept out of the graph.

use std::sync::Arc;

use greyfed_protocol::transport;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::error::{CoordinatorError, Result};

/// A fresh private CA and a coordinator certificate signed by it, in PEM.
/// The `*_key_pem` fields are secrets: write them owner-only, never log them.
pub struct GeneratedCerts {
    /// CA certificate: participants trust this file.
    pub ca_cert_pem: String,
    /// CA private key (needed later to issue more certificates).
    pub ca_key_pem: String,
    /// Coordinator certificate, with the requested host names as subject names.
    pub server_cert_pem: String,
    /// Coordinator private key.
    pub server_key_pem: String,
}

impl std::fmt::Debug for GeneratedCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedCerts").finish_non_exhaustive()
    }
}

fn tls_err(e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Tls(e.to_string())
}

/// Generates a CA and a coordinator certificate valid for `hosts` (DNS names
/// or IP addresses; IPs become IP subject names).
pub fn generate_certificates(hosts: &[String]) -> Result<GeneratedCerts> {
    if hosts.is_empty() {
        return Err(CoordinatorError::Config(
            "at least one host name is needed for the coordinator certificate".into(),
        ));
    }
    let ca_key = KeyPair::generate().map_err(tls_err)?;
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "greyfed private CA");
    ca_params.distinguished_name = dn;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(tls_err)?;
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);

    let server_key = KeyPair::generate().map_err(tls_err)?;
    let mut params = CertificateParams::new(hosts.to_vec()).map_err(tls_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "greyfed coordinator");
    params.distinguished_name = dn;
    let server_cert = params.signed_by(&server_key, &issuer).map_err(tls_err)?;
    Ok(GeneratedCerts {
        ca_cert_pem: ca_cert.pem(),
        ca_key_pem: ca_key.serialize_pem(),
        server_cert_pem: server_cert.pem(),
        server_key_pem: server_key.serialize_pem(),
    })
}

/// The QUIC server configuration for a certificate chain and key in PEM.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<quinn::ServerConfig> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| CoordinatorError::Tls(format!("certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(CoordinatorError::Tls(
            "certificate file holds no certificate".into(),
        ));
    }
    // The key error never includes the key bytes.
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|_| CoordinatorError::Tls("key file holds no usable private key".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| CoordinatorError::Tls(format!("certificate and key do not fit: {e}")))?;
    tls.alpn_protocols = vec![transport::ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).map_err(tls_err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// Transport settings shared by both sides: keep-alives so that a vanished
/// peer is noticed within the idle timeout.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(transport::KEEP_ALIVE_INTERVAL));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(transport::IDLE_TIMEOUT).expect("idle timeout fits a VarInt"),
    ));
    t.max_concurrent_uni_streams(0u8.into());
    t.max_concurrent_bidi_streams(1u8.into());
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_build_a_server_config() {
        let c = generate_certificates(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        assert!(c.ca_cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(c.server_key_pem.contains("PRIVATE KEY"));
        server_config(c.server_cert_pem.as_bytes(), c.server_key_pem.as_bytes()).unwrap();
        assert!(!format!("{c:?}").contains("PRIVATE"));
    }

    #[test]
    fn bad_pem_is_a_clear_error_without_key_material() {
        let c = generate_certificates(&["localhost".into()]).unwrap();
        let err = server_config(b"garbage", c.server_key_pem.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
        let err = server_config(c.server_cert_pem.as_bytes(), b"not a key").unwrap_err();
        assert!(err.to_string().contains("no usable private key"), "{err}");
        // Key of another certificate.
        let other = generate_certificates(&["localhost".into()]).unwrap();
        let err = server_config(
            c.server_cert_pem.as_bytes(),
            other.server_key_pem.as_bytes(),
        )
        .unwrap_err();
        assert!(!err.to_string().contains("PRIVATE KEY"));
        assert!(generate_certificates(&[]).is_err());
    }
}
