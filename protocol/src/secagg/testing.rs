//! An in-memory deployment CA that issues participant credentials, for
//! tests, examples and benchmarks that run secure aggregation without TLS
//! files (feature `test-credentials`). Deployments use the real CA and
//! [`CertificateSigner::from_pem`] instead.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};

use crate::secagg::{
    auth::{PeerVerifier, SecAggAuth, SecAggPolicy},
    x509::{CertificateSigner, CertificateVerifier},
};

/// A throw-away CA and a verifier that trusts it.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    verifier: Arc<CertificateVerifier>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

impl TestCa {
    /// A fresh CA (ECDSA P-256).
    ///
    /// # Panics
    /// If key generation or self-signing fails (test support only).
    pub fn new() -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.distinguished_name = name("greyfed test CA");
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca_pem = cert.pem();
        let verifier = Arc::new(
            CertificateVerifier::new(ca_pem.as_bytes(), UnixTime::now()).expect("trust anchor"),
        );
        Self {
            issuer: Issuer::new(params, key),
            ca_pem,
            verifier,
        }
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A verifier that trusts this CA (no allow list).
    pub fn verifier(&self) -> Arc<dyn PeerVerifier> {
        self.verifier.clone()
    }

    /// A client certificate for `identity` and its signer.
    ///
    /// # Panics
    /// If issuing fails (test support only).
    pub fn signer(&self, identity: &str) -> CertificateSigner {
        let key = KeyPair::generate().expect("participant key");
        let mut params = CertificateParams::default();
        params.distinguished_name = name(identity);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        CertificateSigner::from_der(cert.der().to_vec(), &der).expect("signer")
    }

    /// Credentials for `identity` with `policy`, checked by this CA's verifier.
    pub fn auth(&self, identity: &str, policy: SecAggPolicy) -> SecAggAuth {
        SecAggAuth {
            signer: Arc::new(self.signer(identity)),
            verifier: self.verifier(),
            policy,
        }
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}
