//! The deployment's private PKI: a CA that issues the coordinator's server
//! certificate and one client certificate per participant, certificate
//! fingerprints, and the participant identity a certificate carries.
//!
//! Every certificate is restricted to its use: the CA may sign only
//! end-entity certificates (path length 0), the coordinator's certificate is
//! valid only for TLS servers (`serverAuth`) and only for the host names it
//! was issued for, a participant's only for TLS clients (`clientAuth`). So a
//! participant cannot pose as the coordinator to the others, and the
//! coordinator's certificate is no participant credential.
//!
//! A participant's identity is the single common name (CN) of its
//! certificate's subject, e.g. `participant-3`: what the coordinator's
//! allow list names, its logs show and the session records. Identities are
//! restricted to `[A-Za-z0-9][A-Za-z0-9._-]{0,63}` so they are safe in file
//! names, logs and the allow-list format.

use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use x509_parser::certification_request::X509CertificationRequest;

use crate::error::{CoordinatorError, Result};

/// Longest identity accepted.
pub const MAX_IDENTITY_LEN: usize = 64;

/// Prefix of a certificate fingerprint as written in allow lists.
pub const FINGERPRINT_PREFIX: &str = "sha256:";

/// A certificate's validity period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// First instant the certificate is valid.
    pub not_before: SystemTime,
    /// Last instant the certificate is valid.
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from an hour ago (tolerating clocks a little behind) for
    /// `days` days from now.
    pub fn days_from_now(days: u32) -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

/// A certificate and its private key, in PEM, with the certificate's
/// fingerprint. `key_pem` is a secret: write it owner-only, never log it
/// (`Debug` leaves it out).
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (secret).
    pub key_pem: String,
    /// [`fingerprint`] of the certificate.
    pub fingerprint: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// The deployment's certificate authority: its certificate and signing key.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Tls(format!("{what}: {e}"))
}

fn time(t: SystemTime) -> Result<time::OffsetDateTime> {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|e| CoordinatorError::Config(format!("certificate validity out of range: {e}")))
}

fn apply_validity(params: &mut CertificateParams, validity: Validity) -> Result<()> {
    if validity.not_after <= validity.not_before {
        return Err(CoordinatorError::Config(
            "a certificate's validity must end after it begins".into(),
        ));
    }
    params.not_before = time(validity.not_before)?;
    params.not_after = time(validity.not_after)?;
    Ok(())
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

impl CertificateAuthority {
    /// A fresh CA (ECDSA P-256) valid for `validity`.
    pub fn generate(validity: Validity) -> Result<Self> {
        let key = KeyPair::generate().map_err(|e| tls_err("generating the CA key", e))?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // A name of its own (from its key), so that certificates of another
        // deployment's CA are told apart by issuer name: "unknown issuer".
        let tag = hex::encode(&Sha256::digest(key.public_key_raw())[..4]);
        params.distinguished_name = common_name(&format!("greyfed deployment CA {tag}"));
        apply_validity(&mut params, validity)?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| tls_err("signing the CA certificate", e))?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
        })
    }

    /// Loads a CA written earlier (`ca.pem` and `ca-key.pem`), to issue more
    /// certificates. The key error never includes key material.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|_| CoordinatorError::Tls("CA key file holds no usable private key".into()))?;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| tls_err("CA certificate file", e))?;
        // The key must be the certificate's.
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| tls_err("CA certificate", e))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CoordinatorError::Tls(
                "the CA key does not belong to the CA certificate".into(),
            ));
        }
        let issuer =
            Issuer::from_ca_cert_der(&der, key).map_err(|e| tls_err("CA certificate", e))?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_string(),
        })
    }

    /// The CA certificate in PEM (public: every machine gets it).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key in PEM. A secret that signs every credential of
    /// the deployment: keep it offline, owner-only.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues the coordinator's certificate for `hosts` (DNS names or IP
    /// addresses, which become IP subject names), valid only for TLS servers.
    pub fn issue_server(&self, hosts: &[String], validity: Validity) -> Result<IssuedCert> {
        if hosts.is_empty() {
            return Err(CoordinatorError::Config(
                "at least one host name is needed for the coordinator certificate".into(),
            ));
        }
        let mut params = CertificateParams::new(hosts.to_vec())
            .map_err(|e| tls_err("coordinator host names", e))?;
        params.distinguished_name = common_name("greyfed coordinator");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        apply_validity(&mut params, validity)?;
        self.issue(params)
    }

    /// Issues a participant's client certificate whose subject CN is
    /// `identity` (see the module docs for the allowed characters), valid
    /// only for TLS clients.
    pub fn issue_client(&self, identity: &str, validity: Validity) -> Result<IssuedCert> {
        validate_identity(identity)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(identity);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        apply_validity(&mut params, validity)?;
        self.issue(params)
    }

    /// Issues a participant certificate for a certificate request (PEM,
    /// from [`CertificateRequest::generate`] or `openssl req`), so that the
    /// participant's private key never leaves its machine.
    ///
    /// The request's signature must verify with its own key (proof that the
    /// requester holds the key, and that the request was not altered), its
    /// key must be ECDSA P-256 (the only kind greyfed issues: the image key
    /// is sealed to it), and its subject must have exactly one common name,
    /// a valid identity ([`validate_identity`]). The certificate gets the
    /// same properties as [`issue_client`](Self::issue_client): subject
    /// `CN=identity`, `clientAuth` only, `digitalSignature`, not a CA, the
    /// given validity. Nothing the request asks for is copied: what it asked
    /// for beyond that is listed in [`SignedRequest::not_granted`].
    ///
    /// # Errors
    /// [`CoordinatorError::Tls`] for a request that does not parse, whose
    /// signature does not verify, with another kind of key, or without a
    /// single valid common name; [`CoordinatorError::Config`] for a bad
    /// validity.
    pub fn sign_request(&self, csr_pem: &str, validity: Validity) -> Result<SignedRequest> {
        use rustls_pki_types::CertificateSigningRequestDer;
        if csr_pem.len() > MAX_REQUEST_BYTES {
            return Err(CoordinatorError::Tls(format!(
                "certificate request: {} bytes is too large (at most {MAX_REQUEST_BYTES})",
                csr_pem.len()
            )));
        }
        let der =
            CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|_| {
                CoordinatorError::Tls(
                    "certificate request: no PEM block `CERTIFICATE REQUEST` found".into(),
                )
            })?;
        self.sign_request_der(der.as_ref(), validity)
    }

    /// [`sign_request`](Self::sign_request) for a DER request.
    ///
    /// # Errors
    /// As [`sign_request`](Self::sign_request).
    pub fn sign_request_der(&self, csr_der: &[u8], validity: Validity) -> Result<SignedRequest> {
        use x509_parser::prelude::FromDer;
        let (rest, req) = X509CertificationRequest::from_der(csr_der)
            .map_err(|e| tls_err("certificate request does not parse", e))?;
        if !rest.is_empty() {
            return Err(CoordinatorError::Tls(
                "certificate request: trailing bytes after the request".into(),
            ));
        }
        req.verify_signature().map_err(|_| {
            CoordinatorError::Tls(
                "certificate request: its signature does not verify (the request was altered, \
                 or not signed with the key it carries)"
                    .into(),
            )
        })?;
        let info = &req.certification_request_info;
        let identity = name_identity(&info.subject, "certificate request")?;
        let point = p256_point(&info.subject_pki)
            .map_err(|e| CoordinatorError::Tls(format!("certificate request: {e}")))?;
        let key_fingerprint = public_key_fingerprint(info.subject_pki.raw);
        let not_granted = not_granted(&req);
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(&identity);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        apply_validity(&mut params, validity)?;
        let cert = params
            .signed_by(&RequestedKey(point), &self.issuer)
            .map_err(|e| tls_err("signing a certificate", e))?;
        Ok(SignedRequest {
            identity,
            fingerprint: fingerprint(cert.der()),
            cert_pem: cert.pem(),
            key_fingerprint,
            not_granted,
        })
    }

    fn issue(&self, params: CertificateParams) -> Result<IssuedCert> {
        let key = KeyPair::generate().map_err(|e| tls_err("generating a key", e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| tls_err("signing a certificate", e))?;
        Ok(IssuedCert {
            fingerprint: fingerprint(cert.der()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A participant certificate issued from a certificate request
/// ([`CertificateAuthority::sign_request`]): the CA never saw the private
/// key, so there is none here.
#[derive(Clone, Debug)]
pub struct SignedRequest {
    /// The identity the certificate names (the request's common name).
    pub identity: String,
    /// The certificate (PEM).
    pub cert_pem: String,
    /// [`fingerprint`] of the certificate: what the allow list names.
    pub fingerprint: String,
    /// [`public_key_fingerprint`] of the certified key: the requester
    /// compares it with what `greyfed keygen request` printed.
    pub key_fingerprint: String,
    /// What the request asked for and the CA did not grant (requested
    /// extensions are never copied; the CA sets the certificate's own).
    pub not_granted: Vec<String>,
}

/// A participant's fresh key pair and its certificate request (PKCS#10),
/// made on the participant's own machine so that the private key never
/// leaves it. `key_pem` is a secret: write it owner-only, never log it
/// (`Debug` leaves it out); callers should move it into a zeroizing
/// container at once.
pub struct CertificateRequest {
    /// The identity requested (the request's subject common name).
    pub identity: String,
    /// The request in PEM (`CERTIFICATE REQUEST`): public, for the CA.
    pub csr_pem: String,
    /// The private key in PKCS#8 PEM (secret).
    pub key_pem: String,
    /// [`public_key_fingerprint`] of the key, to compare with what the CA
    /// sees when it signs the request.
    pub key_fingerprint: String,
}

impl std::fmt::Debug for CertificateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateRequest")
            .field("identity", &self.identity)
            .field("key_fingerprint", &self.key_fingerprint)
            .finish_non_exhaustive()
    }
}

impl CertificateRequest {
    /// Generates a key pair of the kind every greyfed certificate has
    /// (ECDSA P-256) and a request for a participant certificate naming
    /// `identity`, signed with the new key. The request asks for no
    /// extensions: the CA decides them.
    ///
    /// # Errors
    /// An invalid identity, or a key or request the crypto library cannot
    /// make.
    pub fn generate(identity: &str) -> Result<Self> {
        validate_identity(identity)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| tls_err("generating a key", e))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(identity);
        let csr = params
            .serialize_request(&key)
            .map_err(|e| tls_err("making the certificate request", e))?;
        let csr_pem = csr
            .pem()
            .map_err(|e| tls_err("encoding the certificate request", e))?;
        Ok(Self {
            identity: identity.to_string(),
            key_fingerprint: public_key_fingerprint(
                &rcgen::PublicKeyData::subject_public_key_info(&key),
            ),
            csr_pem,
            key_pem: key.serialize_pem(),
        })
    }
}

/// The public key of a request, as rcgen signs it: an uncompressed P-256
/// point.
struct RequestedKey(Vec<u8>);

impl rcgen::PublicKeyData for RequestedKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Largest certificate request [`CertificateAuthority::sign_request`]
/// reads (one is well under 1 KiB).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What a request asked for beyond what the CA grants (a client
/// certificate: `clientAuth`, `digitalSignature`, not a CA).
fn not_granted(req: &X509CertificationRequest<'_>) -> Vec<String> {
    use x509_parser::extensions::ParsedExtension;
    let mut out = Vec::new();
    let Some(extensions) = req.requested_extensions() else {
        return out;
    };
    for ext in extensions {
        match ext {
            ParsedExtension::BasicConstraints(bc) if bc.ca => {
                out.push("basic constraints CA:true".to_string());
            }
            ParsedExtension::BasicConstraints(_) => {}
            ParsedExtension::ExtendedKeyUsage(eku) => {
                for (asked, name) in [
                    (eku.any, "anyExtendedKeyUsage"),
                    (eku.server_auth, "serverAuth"),
                    (eku.code_signing, "codeSigning"),
                    (eku.email_protection, "emailProtection"),
                    (eku.time_stamping, "timeStamping"),
                    (eku.ocsp_signing, "OCSPSigning"),
                ] {
                    if asked {
                        out.push(format!("extended key usage {name}"));
                    }
                }
                for oid in &eku.other {
                    out.push(format!("extended key usage {oid}"));
                }
            }
            ParsedExtension::KeyUsage(ku) => {
                if ku.flags & !1 != 0 {
                    out.push(format!("key usage {ku}"));
                }
            }
            ParsedExtension::SubjectAlternativeName(_) => {
                out.push("subject alternative names".to_string());
            }
            _ => out.push("an extension greyfed does not issue".to_string()),
        }
    }
    out
}

/// A whole deployment's certificates: the CA, the coordinator's server
/// certificate and one client certificate per participant.
#[derive(Debug)]
pub struct DeploymentPki {
    /// The CA that issued everything below.
    pub ca: CertificateAuthority,
    /// The coordinator's server certificate.
    pub coordinator: IssuedCert,
    /// Each participant's identity and client certificate, in order.
    pub participants: Vec<(String, IssuedCert)>,
}

/// How long a deployment CA stays valid at least (it must outlive the
/// certificates it issues, including ones issued later).
pub const CA_VALIDITY_DAYS: u32 = 3650;

impl DeploymentPki {
    /// Generates a CA, a coordinator certificate for `hosts` and a client
    /// certificate for each of `identities`, all valid for `validity` (the
    /// CA for at least [`CA_VALIDITY_DAYS`] from now).
    ///
    /// # Errors
    /// No hosts, a bad host name or identity, an identity given twice.
    pub fn generate(hosts: &[String], identities: &[String], validity: Validity) -> Result<Self> {
        let mut seen = std::collections::BTreeSet::new();
        for id in identities {
            validate_identity(id)?;
            if !seen.insert(id) {
                return Err(CoordinatorError::Config(format!(
                    "participant identity {id} given twice"
                )));
            }
        }
        let ca_validity = Validity {
            not_before: validity.not_before,
            not_after: validity
                .not_after
                .max(Validity::days_from_now(CA_VALIDITY_DAYS).not_after),
        };
        let ca = CertificateAuthority::generate(ca_validity)?;
        let coordinator = ca.issue_server(hosts, validity)?;
        let participants = identities
            .iter()
            .map(|id| Ok((id.clone(), ca.issue_client(id, validity)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            ca,
            coordinator,
            participants,
        })
    }

    /// The allow list admitting exactly these participants' certificates.
    pub fn allow_list(&self) -> crate::auth::AllowList {
        crate::auth::AllowList::new(self.participants.iter().map(|(id, c)| {
            crate::auth::AllowEntry {
                identity: id.clone(),
                fingerprint: c.fingerprint.clone(),
            }
        }))
        .expect("identities are validated and distinct, fingerprints are well-formed")
    }
}

/// The SHA-256 fingerprint of a DER certificate, as allow lists write it:
/// `sha256:` and 64 lowercase hex digits.
pub fn fingerprint(cert_der: &[u8]) -> String {
    format!(
        "{FINGERPRINT_PREFIX}{}",
        hex::encode(Sha256::digest(cert_der))
    )
}

/// The SHA-256 fingerprint of a DER `SubjectPublicKeyInfo` (a public
/// key), written like certificate fingerprints: `sha256:` and 64 lowercase
/// hex digits. A certificate request and the certificate issued for it
/// have the same one.
pub fn public_key_fingerprint(spki_der: &[u8]) -> String {
    format!(
        "{FINGERPRINT_PREFIX}{}",
        hex::encode(Sha256::digest(spki_der))
    )
}

/// The uncompressed P-256 point of a public key, refusing any other kind.
fn p256_point(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<Vec<u8>> {
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
    let algorithm = &spki.algorithm;
    let refuse = |found: String| {
        CoordinatorError::Tls(format!(
            "its key is {found}, not ECDSA P-256 (the only kind greyfed uses; \
             make the key with `greyfed keygen request`)"
        ))
    };
    if algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(refuse(format!("of algorithm {}", algorithm.algorithm)));
    }
    let curve = algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .ok_or_else(|| refuse("an elliptic-curve key without a named curve".into()))?;
    if curve != OID_EC_P256 {
        return Err(refuse(format!("on curve {curve}")));
    }
    let point = spki.subject_public_key.data.as_ref();
    if point.len() != 65 || point[0] != 4 {
        return Err(CoordinatorError::Tls(
            "its P-256 key is not an uncompressed point".into(),
        ));
    }
    Ok(point.to_vec())
}

/// The P-256 public key of a DER certificate as an uncompressed point
/// (65 bytes, `04 || x || y`), what HPKE's DHKEM(P-256) encrypts to.
///
/// # Errors
/// [`CoordinatorError::Tls`] when the certificate does not parse or its
/// key is not ECDSA P-256 (the message says which kind it is).
pub fn certificate_p256_public_key(cert_der: &[u8]) -> Result<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| tls_err("unreadable certificate", e))?;
    p256_point(cert.public_key()).map_err(|e| match e {
        CoordinatorError::Tls(m) => CoordinatorError::Tls(format!("certificate: {m}")),
        other => other,
    })
}

/// [`public_key_fingerprint`] of a DER certificate's key.
///
/// # Errors
/// [`CoordinatorError::Tls`] when the certificate does not parse.
pub fn certificate_key_fingerprint(cert_der: &[u8]) -> Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| tls_err("unreadable certificate", e))?;
    Ok(public_key_fingerprint(cert.public_key().raw))
}

/// Checks that a DER certificate is a participant credential of the
/// deployment whose CA certificate(s) `ca_pem` holds, as the coordinator
/// checks it at the TLS handshake: it chains to that CA, is within its
/// validity period and allows `clientAuth`. Returns its identity.
///
/// # Errors
/// [`CoordinatorError::Tls`] naming why the certificate is refused (for
/// example `UnknownIssuer` for another deployment's certificate), or when
/// `ca_pem` holds no usable certificate.
pub fn verify_participant_certificate(ca_pem: &[u8], cert_der: &[u8]) -> Result<String> {
    use rustls_pki_types::{CertificateDer, UnixTime};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| tls_err("CA file", e))?;
        roots
            .add(cert)
            .map_err(|e| tls_err("CA certificate unusable", e))?;
    }
    if roots.is_empty() {
        return Err(CoordinatorError::Tls("CA file holds no certificate".into()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        provider,
    )
    .build()
    .map_err(|e| tls_err("certificate verifier", e))?;
    verifier
        .verify_client_cert(&CertificateDer::from(cert_der), &[], UnixTime::now())
        .map_err(|e| tls_err("certificate refused by the deployment CA", e))?;
    certificate_identity(cert_der)
}

/// The identity a subject name carries: its single common name, a valid
/// identity. `what` ("certificate", "certificate request") names the
/// object in errors.
fn name_identity(name: &x509_parser::x509::X509Name<'_>, what: &str) -> Result<String> {
    let mut names = name.iter_common_name();
    let (Some(cn), None) = (names.next(), names.next()) else {
        return Err(CoordinatorError::Tls(format!(
            "a participant {what} must have exactly one subject common name"
        )));
    };
    let name = cn
        .as_str()
        .map_err(|e| tls_err(&format!("{what} common name"), e))?;
    validate_identity(name).map_err(|e| CoordinatorError::Tls(format!("{what}: {e}")))?;
    Ok(name.to_string())
}

/// Checks that `identity` is usable as a participant identity: 1 to 64
/// characters from `A-Z a-z 0-9 . _ -`, starting with a letter or digit.
pub fn validate_identity(identity: &str) -> Result<()> {
    let ok = !identity.is_empty()
        && identity.len() <= MAX_IDENTITY_LEN
        && identity.starts_with(|c: char| c.is_ascii_alphanumeric())
        && identity
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CoordinatorError::Config(format!(
            "{:?} is not a valid participant identity (1 to {MAX_IDENTITY_LEN} characters \
             from A-Z a-z 0-9 . _ -, starting with a letter or digit)",
            identity.chars().take(80).collect::<String>()
        )))
    }
}

/// The participant identity of a DER certificate: its subject's single
/// common name, which must be a valid identity ([`validate_identity`]).
///
/// # Errors
/// [`CoordinatorError::Tls`] when the certificate does not parse, has no or
/// several common names, or the name is not a valid identity.
pub fn certificate_identity(cert_der: &[u8]) -> Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| tls_err("unreadable certificate", e))?;
    name_identity(cert.subject(), "certificate")
}

/// The DER bytes of the first certificate in a PEM file.
///
/// # Errors
/// [`CoordinatorError::Tls`] when the text holds no PEM `CERTIFICATE`.
pub fn certificate_der_from_pem(cert_pem: &[u8]) -> Result<Vec<u8>> {
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem)
        .map_err(|e| tls_err("certificate file", e))?;
    Ok(der.as_ref().to_vec())
}

/// The identity of a PEM certificate (its first certificate); see
/// [`certificate_identity`].
pub fn certificate_identity_pem(cert_pem: &[u8]) -> Result<String> {
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem)
        .map_err(|e| tls_err("certificate file", e))?;
    certificate_identity(&der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_certificates_carry_their_identity_and_fingerprint() {
        let ca = CertificateAuthority::generate(Validity::days_from_now(10)).unwrap();
        let c = ca
            .issue_client("participant-3", Validity::days_from_now(1))
            .unwrap();
        assert_eq!(
            certificate_identity_pem(c.cert_pem.as_bytes()).unwrap(),
            "participant-3"
        );
        assert!(c.fingerprint.starts_with("sha256:"));
        assert_eq!(c.fingerprint.len(), 7 + 64);
        assert!(!format!("{c:?}").contains("PRIVATE"));
        // A second certificate for the same name has another fingerprint.
        let again = ca
            .issue_client("participant-3", Validity::days_from_now(1))
            .unwrap();
        assert_ne!(again.fingerprint, c.fingerprint);
    }

    #[test]
    fn identities_are_restricted() {
        for good in ["participant-0", "a", "host.example_1", &"x".repeat(64)] {
            validate_identity(good).unwrap();
        }
        for bad in [
            "",
            "-leading",
            ".hidden",
            "with space",
            "new\nline",
            "slash/",
            "ünicode",
            &"x".repeat(65),
        ] {
            assert!(validate_identity(bad).is_err(), "{bad:?}");
        }
        let ca = CertificateAuthority::generate(Validity::days_from_now(1)).unwrap();
        assert!(ca.issue_client("a b", Validity::days_from_now(1)).is_err());
        // The server certificate's CN is no participant identity.
        let server = ca
            .issue_server(&["localhost".into()], Validity::days_from_now(1))
            .unwrap();
        assert!(certificate_identity_pem(server.cert_pem.as_bytes()).is_err());
        assert!(certificate_identity(b"garbage").is_err());
    }

    #[test]
    fn a_ca_reloaded_from_pem_issues_certificates_and_checks_its_key() {
        let ca = CertificateAuthority::generate(Validity::days_from_now(10)).unwrap();
        let again = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        again
            .issue_client("late-joiner", Validity::days_from_now(1))
            .unwrap();
        let other = CertificateAuthority::generate(Validity::days_from_now(10)).unwrap();
        let err = CertificateAuthority::from_pem(ca.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
        let err = CertificateAuthority::from_pem(ca.cert_pem(), "not a key").unwrap_err();
        assert!(!err.to_string().contains("PRIVATE"), "{err}");
        assert!(
            CertificateAuthority::generate(Validity {
                not_before: SystemTime::now(),
                not_after: SystemTime::now() - Duration::from_secs(1),
            })
            .is_err()
        );
    }

    /// A request for `params` signed by a new key of `alg`.
    fn csr_for(
        params: &CertificateParams,
        alg: &'static rcgen::SignatureAlgorithm,
    ) -> (String, Vec<u8>) {
        let key = KeyPair::generate_for(alg).unwrap();
        let csr = params.serialize_request(&key).unwrap();
        (csr.pem().unwrap(), csr.der().to_vec())
    }

    fn named(cn: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(cn);
        params
    }

    #[test]
    fn a_request_is_signed_as_a_client_certificate_of_its_identity() {
        let ca = CertificateAuthority::generate(Validity::days_from_now(10)).unwrap();
        let req = CertificateRequest::generate("lab-4").unwrap();
        assert!(!format!("{req:?}").contains("PRIVATE"));
        assert!(req.csr_pem.contains("BEGIN CERTIFICATE REQUEST"));
        let signed = ca
            .sign_request(&req.csr_pem, Validity::days_from_now(1))
            .unwrap();
        assert_eq!(signed.identity, "lab-4");
        assert!(signed.not_granted.is_empty(), "{:?}", signed.not_granted);
        let der = certificate_der_from_pem(signed.cert_pem.as_bytes()).unwrap();
        assert_eq!(signed.fingerprint, fingerprint(&der));
        // The certified key is the requester's.
        assert_eq!(signed.key_fingerprint, req.key_fingerprint);
        assert_eq!(
            certificate_key_fingerprint(&der).unwrap(),
            req.key_fingerprint
        );
        let key = KeyPair::from_pem(&req.key_pem).unwrap();
        assert_eq!(
            certificate_p256_public_key(&der).unwrap(),
            key.public_key_raw()
        );
        // A participant credential of this CA, like issue_client's.
        assert_eq!(
            verify_participant_certificate(ca.cert_pem().as_bytes(), &der).unwrap(),
            "lab-4"
        );
        let other = CertificateAuthority::generate(Validity::days_from_now(10)).unwrap();
        let err = verify_participant_certificate(other.cert_pem().as_bytes(), &der).unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
        assert!(CertificateRequest::generate("bad name").is_err());
    }

    #[test]
    fn a_request_for_ca_or_server_rights_gets_a_plain_client_certificate() {
        use x509_parser::extensions::ParsedExtension;
        let ca = CertificateAuthority::generate(Validity::days_from_now(10)).unwrap();
        let mut params = named("greedy");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![rcgen::SanType::DnsName(
            "coord.example.org".try_into().unwrap(),
        )];
        let (pem, _) = csr_for(&params, &rcgen::PKCS_ECDSA_P256_SHA256);
        let signed = ca.sign_request(&pem, Validity::days_from_now(1)).unwrap();
        for asked in [
            "basic constraints CA:true",
            "extended key usage serverAuth",
            "subject alternative names",
        ] {
            assert!(
                signed.not_granted.iter().any(|n| n == asked),
                "{asked}: {:?}",
                signed.not_granted
            );
        }
        assert!(
            signed
                .not_granted
                .iter()
                .any(|n| n.starts_with("key usage"))
        );
        let der = certificate_der_from_pem(signed.cert_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let mut saw_eku = false;
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) => assert!(!bc.ca, "CA:true granted"),
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    saw_eku = true;
                    assert!(eku.client_auth && !eku.server_auth && !eku.any, "{eku:?}");
                    assert!(eku.other.is_empty());
                }
                ParsedExtension::KeyUsage(ku) => {
                    assert!(ku.digital_signature() && !ku.key_cert_sign(), "{ku}");
                }
                ParsedExtension::SubjectAlternativeName(_) => panic!("SANs copied"),
                _ => {}
            }
        }
        assert!(saw_eku);
        // The certificate chains as a client but could not sign others.
        verify_participant_certificate(ca.cert_pem().as_bytes(), &der).unwrap();
    }

    #[test]
    fn bad_requests_are_refused() {
        let ca = CertificateAuthority::generate(Validity::days_from_now(10)).unwrap();
        let p256 = &rcgen::PKCS_ECDSA_P256_SHA256;
        let refused = |der: &[u8]| {
            ca.sign_request_der(der, Validity::days_from_now(1))
                .unwrap_err()
                .to_string()
        };
        // Altered after signing: the subject says another name.
        let (_, mut der) = csr_for(&named("participant-9"), p256);
        let at = der.windows(13).position(|w| w == b"participant-9").unwrap();
        der[at + 12] = b'8';
        let err = refused(&der);
        assert!(err.contains("signature does not verify"), "{err}");
        // Another key's signature.
        let (_, a) = csr_for(&named("participant-9"), p256);
        let (_, b) = csr_for(&named("participant-9"), p256);
        let info_len = a.len().min(b.len()) - 80;
        let mut spliced = a[..info_len].to_vec();
        spliced.extend_from_slice(&b[info_len..]);
        assert!(
            ca.sign_request_der(&spliced, Validity::days_from_now(1))
                .is_err()
        );
        // No common name, or one that is no identity.
        let mut no_cn = CertificateParams::default();
        no_cn.distinguished_name = DistinguishedName::new();
        no_cn
            .distinguished_name
            .push(DnType::OrganizationName, "Example Lab");
        let err = refused(&csr_for(&no_cn, p256).1);
        assert!(err.contains("exactly one subject common name"), "{err}");
        let err = refused(&csr_for(&named("bad name"), p256).1);
        assert!(err.contains("not a valid participant identity"), "{err}");
        let err = refused(&csr_for(&named("greyfed coordinator"), p256).1);
        assert!(err.contains("not a valid participant identity"), "{err}");
        // Keys other than P-256.
        let err = refused(&csr_for(&named("lab"), &rcgen::PKCS_ECDSA_P384_SHA384).1);
        assert!(
            err.contains("not ECDSA P-256") && err.contains("curve"),
            "{err}"
        );
        let err = refused(&csr_for(&named("lab"), &rcgen::PKCS_ED25519).1);
        assert!(err.contains("not ECDSA P-256"), "{err}");
        // Not a request at all.
        assert!(
            ca.sign_request("garbage", Validity::days_from_now(1))
                .is_err()
        );
        assert!(refused(b"\x30\x03\x02\x01\x00").contains("does not parse"));
        let cert = ca.issue_client("lab", Validity::days_from_now(1)).unwrap();
        assert!(
            ca.sign_request(&cert.cert_pem, Validity::days_from_now(1))
                .is_err()
        );
    }
}
