//! X.509 credentials for authenticated secure aggregation: a participant
//! signs with the private key of its TLS client certificate
//! ([`CertificateSigner`]), and checks its peers' certificates against the
//! deployment CA and, optionally, an allow list ([`CertificateVerifier`]).
//!
//! Signing goes through rustls' key loading (RSA, ECDSA P-256/P-384,
//! Ed25519), verification through WebPKI (the same code rustls runs for the
//! TLS handshake). Nothing here reads a clock: the verifier checks validity
//! periods at the time it is given.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::{SignatureScheme, sign::SigningKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor, UnixTime, pem::PemObject};
use sha2::{Digest, Sha256};
use webpki::{EndEntityCert, KeyUsage};

use crate::{
    error::ProtocolError,
    secagg::auth::{MAX_CREDENTIAL_BYTES, PeerVerifier, Signature, StatementSigner},
};

/// Schemes a signer may pick, most preferred first.
const SCHEMES: [SignatureScheme; 4] = [
    SignatureScheme::ED25519,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
];

/// Longest participant identity (a certificate's common name).
pub const MAX_IDENTITY_LEN: usize = 64;

fn crypto(what: &str, e: impl std::fmt::Display) -> ProtocolError {
    ProtocolError::Crypto(format!("{what}: {e}"))
}

/// Signs with the private key of a certificate.
pub struct CertificateSigner {
    cert: Vec<u8>,
    key: Arc<dyn SigningKey>,
}

impl std::fmt::Debug for CertificateSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CertificateSigner {{ certificate: {}, key: <redacted> }}",
            fingerprint(&self.cert)
        )
    }
}

impl CertificateSigner {
    /// From a PEM certificate (the first one in `cert_pem`) and its PEM private key.
    ///
    /// # Errors
    /// Unreadable PEM, an unsupported key type, or a key that does not belong
    /// to the certificate. Errors never contain key material.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, ProtocolError> {
        let cert =
            CertificateDer::from_pem_slice(cert_pem).map_err(|e| crypto("certificate PEM", e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|_| ProtocolError::Crypto("private key PEM is unreadable".into()))?;
        Self::from_der(cert.to_vec(), &key)
    }

    /// From a DER certificate and its private key.
    ///
    /// # Errors
    /// See [`from_pem`](Self::from_pem).
    pub fn from_der(cert: Vec<u8>, key: &PrivateKeyDer<'_>) -> Result<Self, ProtocolError> {
        let key = rustls::crypto::ring::sign::any_supported_type(key).map_err(|_| {
            ProtocolError::Crypto("the private key is not an RSA, ECDSA or Ed25519 key".into())
        })?;
        let signer = Self { cert, key };
        // A key that does not match the certificate would only show up as
        // every peer refusing our signatures: check it now.
        let probe = b"greyfed/secagg/key-check";
        let sig = signer.sign(probe)?;
        verify_signature(&signer.cert, probe, &sig).map_err(|_| {
            ProtocolError::Crypto("the private key does not belong to the certificate".into())
        })?;
        Ok(signer)
    }
}

impl StatementSigner for CertificateSigner {
    fn credential(&self) -> &[u8] {
        &self.cert
    }

    fn sign(&self, statement: &[u8]) -> Result<Signature, ProtocolError> {
        let signer = self
            .key
            .choose_scheme(&SCHEMES)
            .ok_or_else(|| ProtocolError::Crypto("no supported signature scheme".into()))?;
        let bytes = signer
            .sign(statement)
            .map_err(|e| crypto("signing failed", e))?;
        Ok(Signature {
            scheme: u16::from(signer.scheme()),
            bytes,
        })
    }
}

/// The SHA-256 fingerprint of a DER certificate as allow lists write it:
/// `sha256:` and 64 lowercase hex digits.
pub fn fingerprint(cert_der: &[u8]) -> String {
    let digest = Sha256::digest(cert_der);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Whether `identity` is a valid participant identity: 1 to 64 characters
/// from `A-Z a-z 0-9 . _ -`, starting with a letter or digit.
pub fn is_valid_identity(identity: &str) -> bool {
    !identity.is_empty()
        && identity.len() <= MAX_IDENTITY_LEN
        && identity.starts_with(|c: char| c.is_ascii_alphanumeric())
        && identity
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The participant identity a DER certificate names: its subject's single
/// common name, which must be a valid identity ([`is_valid_identity`]).
///
/// # Errors
/// [`ProtocolError::Crypto`] when the certificate does not parse, has no or
/// several common names, or the name is not a valid identity.
pub fn certificate_identity(cert_der: &[u8]) -> Result<String, ProtocolError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| crypto("unreadable certificate", e))?;
    let mut names = cert.subject().iter_common_name();
    let (Some(cn), None) = (names.next(), names.next()) else {
        return Err(ProtocolError::Crypto(
            "a participant certificate must have exactly one subject common name".into(),
        ));
    };
    let name = cn
        .as_str()
        .map_err(|e| crypto("certificate common name", e))?;
    if !is_valid_identity(name) {
        return Err(ProtocolError::Crypto(format!(
            "certificate names {:?}, not a valid participant identity (1 to \
             {MAX_IDENTITY_LEN} characters from A-Z a-z 0-9 . _ -)",
            name.chars().take(80).collect::<String>()
        )));
    }
    Ok(name.to_string())
}

/// The WebPKI algorithm for a TLS signature scheme.
fn algorithm(scheme: u16) -> Option<&'static dyn rustls_pki_types::SignatureVerificationAlgorithm> {
    Some(match SignatureScheme::from(scheme) {
        SignatureScheme::ED25519 => webpki::ring::ED25519,
        SignatureScheme::ECDSA_NISTP256_SHA256 => webpki::ring::ECDSA_P256_SHA256,
        SignatureScheme::ECDSA_NISTP384_SHA384 => webpki::ring::ECDSA_P384_SHA384,
        SignatureScheme::RSA_PSS_SHA256 => webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
        _ => return None,
    })
}

/// Checks `signature` over `statement` with the public key of `cert_der`.
fn verify_signature(
    cert_der: &[u8],
    statement: &[u8],
    signature: &Signature,
) -> Result<(), ProtocolError> {
    signature.check_size()?;
    let alg = algorithm(signature.scheme).ok_or_else(|| {
        ProtocolError::Crypto(format!(
            "unsupported signature scheme {:#06x}",
            signature.scheme
        ))
    })?;
    let der = CertificateDer::from(cert_der);
    let cert = EndEntityCert::try_from(&der).map_err(|e| crypto("unreadable certificate", e))?;
    cert.verify_signature(alg, statement, &signature.bytes)
        .map_err(|_| ProtocolError::Crypto("the signature does not verify".into()))
}

/// Checks peers' certificates against trust anchors, their client usage,
/// their validity at a given time and, when set, an allow list; verified
/// certificates are remembered by fingerprint, so each is checked once.
pub struct CertificateVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    /// Fingerprint → identity; `None`: any valid identity the CA certified.
    allow: Option<HashMap<String, String>>,
    now: UnixTime,
    verified: Mutex<HashMap<[u8; 32], String>>,
}

impl std::fmt::Debug for CertificateVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateVerifier")
            .field("anchors", &self.anchors.len())
            .field("allow_list", &self.allow.as_ref().map(HashMap::len))
            .finish_non_exhaustive()
    }
}

impl CertificateVerifier {
    /// Trusts the CA certificates in `ca_pem`, checking validity at `now`.
    ///
    /// # Errors
    /// No certificate in `ca_pem`, or one that is no usable trust anchor.
    pub fn new(ca_pem: &[u8], now: UnixTime) -> Result<Self, ProtocolError> {
        let mut anchors = Vec::new();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| crypto("CA certificate PEM", e))?;
            let anchor =
                webpki::anchor_from_trusted_cert(&cert).map_err(|e| crypto("CA certificate", e))?;
            anchors.push(anchor.to_owned());
        }
        if anchors.is_empty() {
            return Err(ProtocolError::Crypto(
                "no CA certificate in the trust file".into(),
            ));
        }
        Ok(Self {
            anchors,
            allow: None,
            now,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Accepts only certificates whose fingerprint is listed, under the
    /// identity listed with it (`(identity, fingerprint)` pairs, the allow
    /// list's entries).
    pub fn with_allow_list(mut self, entries: impl IntoIterator<Item = (String, String)>) -> Self {
        self.allow = Some(
            entries
                .into_iter()
                .map(|(identity, fp)| (fp.to_ascii_lowercase(), identity))
                .collect(),
        );
        self.verified.lock().map(|mut v| v.clear()).ok();
        self
    }
}

impl PeerVerifier for CertificateVerifier {
    fn identity(&self, credential: &[u8]) -> Result<String, ProtocolError> {
        if credential.is_empty() || credential.len() > MAX_CREDENTIAL_BYTES {
            return Err(ProtocolError::Crypto(format!(
                "a credential of {} bytes (at most {MAX_CREDENTIAL_BYTES})",
                credential.len()
            )));
        }
        let key: [u8; 32] = Sha256::digest(credential).into();
        if let Some(identity) = self.verified.lock().ok().and_then(|v| v.get(&key).cloned()) {
            return Ok(identity);
        }
        let der = CertificateDer::from(credential);
        let cert =
            EndEntityCert::try_from(&der).map_err(|e| crypto("unreadable certificate", e))?;
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.anchors,
            &[],
            self.now,
            KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| crypto("certificate refused", e))?;
        let identity = certificate_identity(credential)?;
        if let Some(allow) = &self.allow {
            match allow.get(&fingerprint(credential)) {
                Some(listed) if *listed == identity => {}
                Some(listed) => {
                    return Err(ProtocolError::Crypto(format!(
                        "certificate of {identity} is allow-listed as {listed}"
                    )));
                }
                None => {
                    return Err(ProtocolError::Crypto(format!(
                        "certificate of {identity} is not in the allow list"
                    )));
                }
            }
        }
        if let Ok(mut v) = self.verified.lock() {
            v.insert(key, identity.clone());
        }
        Ok(identity)
    }

    fn verify(
        &self,
        credential: &[u8],
        statement: &[u8],
        signature: &Signature,
    ) -> Result<(), ProtocolError> {
        verify_signature(credential, statement, signature)
    }
}
