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
    let mut names = cert.subject().iter_common_name();
    let (Some(cn), None) = (names.next(), names.next()) else {
        return Err(CoordinatorError::Tls(
            "a participant certificate must have exactly one subject common name".into(),
        ));
    };
    let name = cn
        .as_str()
        .map_err(|e| tls_err("certificate common name", e))?;
    validate_identity(name).map_err(|e| CoordinatorError::Tls(format!("certificate: {e}")))?;
    Ok(name.to_string())
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
}
