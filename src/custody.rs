//! Key custody for real deployments: each party generates its own secrets.
//!
//! `greyfed keygen deployment` makes every key on one machine, which suits
//! simulations and set-ups where one operator is trusted with everything.
//! This module splits that up so that no private key travels:
//!
//! - **Certificate requests** ([`request`], [`sign`]). A participant makes
//!   its TLS key pair and a certificate request (PKCS#10) on its own
//!   machine; only the request goes to the CA operator, who checks it and
//!   issues a client certificate ([`CertificateAuthority::sign_request`])
//!   and the allow-list line that admits it.
//! - **A sealed image key** ([`seal`], [`unseal`]). One participant
//!   generates the image key and seals it to each other participant's
//!   certificate with HPKE (RFC 9180, base mode, suite
//!   DHKEM(P-256, HKDF-SHA256) / HKDF-SHA256 / ChaCha20Poly1305): only the
//!   holder of the certificate's private key can open it. The coordinator
//!   and the CA operator relay sealed files at most and never hold the key.
//!
//! A sealed file ([`SealedImageKey`]) is a small JSON document: a format
//! tag and version, the suite, the recipient's identity and certificate
//! fingerprint, the image key's fingerprint (public: the coordinator's
//! `key-fingerprint` is the same), the HPKE encapsulated key and the
//! ciphertext. HPKE's `info` binds the format label and the recipient's
//! certificate fingerprint, and every header field is authenticated as
//! associated data, so a file altered anywhere, or opened with another key,
//! fails to open. The image key itself is never in the clear in it.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use greyfed_coordinator::auth::{AllowEntry, AllowList};
use greyfed_coordinator::pki::{self, CertificateAuthority, CertificateRequest, Validity};
use greyfed_participant::cipher::{ImageKey, KEY_LEN};
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::keygen::{files, read_secret, write_new_file};

/// The HPKE KEM: DHKEM(P-256, HKDF-SHA256), the curve of greyfed's TLS keys.
type Kem = hpke::kem::DhP256HkdfSha256;
/// The HPKE KDF.
type Kdf = hpke::kdf::HkdfSha256;
/// The HPKE AEAD.
type Aead = hpke::aead::ChaCha20Poly1305;

/// Format tag of a sealed image key file.
pub const SEALED_FORMAT: &str = "greyfed-sealed-image-key";

/// Version of the sealed image key format this build reads and writes.
pub const SEALED_VERSION: u32 = 1;

/// The HPKE suite of format version 1, as written in sealed files.
pub const SEALED_SUITE: &str =
    "HPKE base mode (RFC 9180): DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305";

/// Label that starts HPKE's `info` and the associated data.
const SEALED_LABEL: &[u8] = b"greyfed sealed image key v1";

/// Largest sealed file, certificate or request read (each is a few KiB).
pub const MAX_PUBLIC_FILE_BYTES: u64 = 64 * 1024;

/// Length of an uncompressed P-256 point (`04 || x || y`): the HPKE
/// encapsulated key.
const ENC_LEN: usize = 65;

/// Length of the ciphertext: the key and ChaCha20Poly1305's 16-byte tag.
const CIPHERTEXT_LEN: usize = KEY_LEN + 16;

/// The certificate request `greyfed keygen request` writes next to the key.
pub const CSR_FILE: &str = "participant.csr";

/// The file a sealed image key for `identity` is written to.
pub fn sealed_file_name(identity: &str) -> String {
    format!("{identity}.image-key.sealed")
}

/// What `greyfed keygen request` makes.
#[derive(Clone, Debug)]
pub struct RequestOptions {
    /// The identity to request (the certificate's common name).
    pub identity: String,
    /// Directory for the key and the request (created 0700 if missing).
    pub out: PathBuf,
}

/// What [`request`] wrote.
#[derive(Debug)]
pub struct RequestOutput {
    /// Every file written, in order.
    pub written: Vec<PathBuf>,
    /// The certificate request (public: for the CA operator).
    pub csr: PathBuf,
    /// [`pki::public_key_fingerprint`] of the new key: the CA operator sees
    /// the same when signing, which is how both check the request arrived
    /// unaltered.
    pub key_fingerprint: String,
}

/// Generates this participant's TLS key (ECDSA P-256, like every greyfed
/// key) into `OUT/participant-key.pem` (0600) and a certificate request
/// for `identity` into `OUT/participant.csr`. Refuses to overwrite either.
///
/// # Errors
/// A bad identity, an existing key or request, I/O failures.
pub fn request(opts: &RequestOptions) -> Result<RequestOutput> {
    pki::validate_identity(&opts.identity)?;
    let key_path = opts.out.join(files::PARTICIPANT_KEY);
    let csr_path = opts.out.join(CSR_FILE);
    for path in [&key_path, &csr_path] {
        if path.exists() {
            bail!(
                "{} exists; refusing to overwrite a key or request (choose another --out)",
                path.display()
            );
        }
    }
    let CertificateRequest {
        csr_pem,
        key_pem,
        key_fingerprint,
        ..
    } = CertificateRequest::generate(&opts.identity)?;
    let key_pem = Zeroizing::new(key_pem);
    private_dir(&opts.out)?;
    write_new_file(&key_path, key_pem.as_bytes(), 0o600)?;
    if let Err(e) = write_new_file(&csr_path, csr_pem.as_bytes(), 0o644) {
        // Best effort: no key without its request (a rerun would refuse).
        let _ = std::fs::remove_file(&key_path);
        return Err(e);
    }
    Ok(RequestOutput {
        written: vec![key_path, csr_path.clone()],
        csr: csr_path,
        key_fingerprint,
    })
}

/// What `greyfed keygen sign` does.
#[derive(Clone, Debug)]
pub struct SignOptions {
    /// The deployment CA certificate.
    pub ca_cert: PathBuf,
    /// The CA's private key (owner-only).
    pub ca_key: PathBuf,
    /// The participant's certificate request.
    pub csr: PathBuf,
    /// Directory for `IDENTITY/participant-cert.pem`, `IDENTITY/ca.pem` and,
    /// when `deployment.json` is next to the CA certificate,
    /// `IDENTITY/participant.toml` and `IDENTITY/run.sh`.
    pub out: PathBuf,
    /// Days the certificate stays valid.
    pub valid_days: u32,
    /// An allow-list file to append the new line to (created if missing).
    pub allow_list: Option<PathBuf>,
}

/// What [`sign`] wrote.
#[derive(Debug)]
pub struct SignOutput {
    /// Every file written or appended to, in order.
    pub written: Vec<PathBuf>,
    /// The identity the certificate names.
    pub identity: String,
    /// The allow-list line that admits the certificate.
    pub allow_line: String,
    /// Fingerprint of the certified public key (compare with what the
    /// participant's `keygen request` printed).
    pub key_fingerprint: String,
    /// What the request asked for and was not granted.
    pub not_granted: Vec<String>,
    /// The directory to send back to the participant.
    pub dir: PathBuf,
}

/// Checks a participant's certificate request and issues its client
/// certificate from the deployment CA ([`CertificateAuthority::sign_request`]):
/// writes `OUT/IDENTITY/participant-cert.pem` and `OUT/IDENTITY/ca.pem`
/// (to send back to the participant; with `participant.toml` and `run.sh`
/// pointing at the coordinator when `deployment.json` is next to the CA
/// certificate, as `keygen ca` leaves it) and, with `allow_list`, appends the
/// allow-list line there. Refuses to overwrite a certificate, and an
/// allow list that already names the identity.
///
/// # Errors
/// An unreadable or altered request, a key other than P-256, a bad
/// identity, a CA key that is not the certificate's or readable by others,
/// I/O failures.
pub fn sign(opts: &SignOptions) -> Result<SignOutput> {
    if opts.valid_days == 0 {
        bail!("--valid-days must be at least 1");
    }
    let ca_cert = String::from_utf8(read_public(&opts.ca_cert)?)
        .with_context(|| format!("{}: not PEM text", opts.ca_cert.display()))?;
    let ca_key = Zeroizing::new(read_secret(&opts.ca_key)?);
    let ca_key = std::str::from_utf8(&ca_key)
        .map_err(|_| anyhow::anyhow!("{}: not PEM text", opts.ca_key.display()))?;
    let ca = CertificateAuthority::from_pem(&ca_cert, ca_key)
        .with_context(|| format!("{} and {}", opts.ca_cert.display(), opts.ca_key.display()))?;
    let csr = String::from_utf8(read_public(&opts.csr)?)
        .with_context(|| format!("{}: not PEM text", opts.csr.display()))?;
    let signed = ca
        .sign_request(&csr, Validity::days_from_now(opts.valid_days))
        .with_context(|| format!("{}", opts.csr.display()))?;
    let allow_line = format!("{} {}", signed.identity, signed.fingerprint);
    // Check the allow list takes the line before anything is written.
    let existing_list = match &opts.allow_list {
        Some(path) if path.exists() => {
            let text = String::from_utf8(read_public(path)?)
                .with_context(|| format!("{}: not text", path.display()))?;
            let list = AllowList::parse(&text, &path.display().to_string())?;
            let mut entries = list.entries().to_vec();
            entries.push(AllowEntry {
                identity: signed.identity.clone(),
                fingerprint: signed.fingerprint.clone(),
            });
            AllowList::new(entries).with_context(|| {
                format!(
                    "{}: cannot add {allow_line} (to re-issue, remove the old line first)",
                    path.display()
                )
            })?;
            Some(text)
        }
        _ => None,
    };
    let dir = opts.out.join(&signed.identity);
    let cert_path = dir.join(files::PARTICIPANT_CERT);
    if cert_path.exists() {
        bail!(
            "{} exists; refusing to overwrite (move it away to re-issue)",
            cert_path.display()
        );
    }
    private_dir(&opts.out)?;
    private_dir(&dir)?;
    let mut written = Vec::new();
    write_new_file(&cert_path, signed.cert_pem.as_bytes(), 0o644)?;
    written.push(cert_path);
    let ca_copy = dir.join(files::CA_CERT);
    if !ca_copy.exists() {
        write_new_file(&ca_copy, ca_cert.as_bytes(), 0o644)?;
        written.push(ca_copy);
    }
    // The coordinator's address, when the CA directory knows it
    // (`keygen ca` writes deployment.json next to ca.pem).
    if !dir.join(files::PARTICIPANT_TOML).exists() && !dir.join(files::RUN_SH).exists() {
        let ca_dir = match opts.ca_cert.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        written.extend(crate::keygen::participant_settings_from_ca_dir(
            ca_dir,
            &dir,
            &signed.identity,
        )?);
    }
    if let Some(path) = &opts.allow_list {
        append_allow_line(path, existing_list.as_deref(), &allow_line)?;
        written.push(path.clone());
    }
    Ok(SignOutput {
        written,
        identity: signed.identity,
        allow_line,
        key_fingerprint: signed.key_fingerprint,
        not_granted: signed.not_granted,
        dir,
    })
}

/// Appends `line` to the allow-list file `path` (whose current text is
/// `existing`, or creates it with the usual header).
fn append_allow_line(path: &Path, existing: Option<&str>, line: &str) -> Result<()> {
    use std::io::Write;
    match existing {
        None => {
            let text = AllowList::default().to_text() + line + "\n";
            write_new_file(path, text.as_bytes(), 0o644)
        }
        Some(text) => {
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            let sep = if text.is_empty() || text.ends_with('\n') {
                ""
            } else {
                "\n"
            };
            file.write_all(format!("{sep}{line}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .with_context(|| format!("writing {}", path.display()))
        }
    }
}

/// What `greyfed keygen seal-image-key` does.
#[derive(Clone, Debug)]
pub struct SealOptions {
    /// The recipients' certificates (PEM), one sealed file each.
    pub to: Vec<PathBuf>,
    /// Directory for the sealed files (and a new image key).
    pub out: PathBuf,
    /// An existing image key to seal; without it a new one is generated
    /// and written to `OUT/image.key`.
    pub key: Option<PathBuf>,
    /// The deployment CA certificate: every recipient certificate must be a
    /// participant credential it issued (strongly recommended).
    pub ca_cert: Option<PathBuf>,
}

/// What [`seal`] wrote.
#[derive(Debug)]
pub struct SealOutput {
    /// Every file written, in order.
    pub written: Vec<PathBuf>,
    /// The image key's fingerprint (public; never the key).
    pub image_key_fingerprint: String,
    /// The new key file, when a key was generated.
    pub generated_key: Option<PathBuf>,
    /// Each recipient's identity, certificate fingerprint and sealed file.
    pub recipients: Vec<(String, String, PathBuf)>,
    /// Whether the recipients were checked against a CA certificate.
    pub ca_checked: bool,
}

/// A recipient certificate, checked.
struct Recipient {
    identity: String,
    cert_der: Vec<u8>,
    sealed_path: PathBuf,
}

/// Seals the image key (a new one, or `key`) to each certificate of `to`:
/// writes `OUT/IDENTITY.image-key.sealed` per recipient and, for a new key,
/// `OUT/image.key` (0600). Every certificate is checked first (a P-256
/// participant certificate, distinct identities, issued by `ca_cert` when
/// given); nothing is written if one is refused, and nothing is
/// overwritten.
///
/// # Errors
/// A refused certificate, an existing output file, an unreadable key file,
/// I/O failures.
pub fn seal(opts: &SealOptions) -> Result<SealOutput> {
    if opts.to.is_empty() {
        bail!("give at least one --to certificate");
    }
    let ca_pem = opts.ca_cert.as_deref().map(read_public).transpose()?;
    let mut recipients: Vec<Recipient> = Vec::new();
    for path in &opts.to {
        let pem = read_public(path)?;
        let cert_der =
            pki::certificate_der_from_pem(&pem).with_context(|| format!("{}", path.display()))?;
        let identity = match &ca_pem {
            Some(ca) => pki::verify_participant_certificate(ca, &cert_der),
            None => pki::certificate_identity(&cert_der),
        }
        .with_context(|| format!("{}: not a participant certificate", path.display()))?;
        pki::certificate_p256_public_key(&cert_der)
            .with_context(|| format!("{}", path.display()))?;
        if let Some(other) = recipients.iter().find(|r| r.identity == identity) {
            bail!(
                "{} and another --to certificate both name {}{}",
                path.display(),
                identity,
                if other.cert_der == cert_der {
                    " (the same certificate given twice)"
                } else {
                    ""
                }
            );
        }
        let sealed_path = opts.out.join(sealed_file_name(&identity));
        if sealed_path.exists() {
            bail!("{} exists; refusing to overwrite", sealed_path.display());
        }
        recipients.push(Recipient {
            identity,
            cert_der,
            sealed_path,
        });
    }
    let new_key_path = opts.out.join(files::IMAGE_KEY);
    let (image_key, generated) = match &opts.key {
        Some(path) => (ImageKey::read_file(path)?, false),
        None => {
            if new_key_path.exists() {
                bail!(
                    "{} exists; refusing to overwrite an image key (pass it with --key to \
                     seal it again)",
                    new_key_path.display()
                );
            }
            (ImageKey::generate(), true)
        }
    };
    // Seal everything in memory before writing anything.
    let sealed: Vec<String> = recipients
        .iter()
        .map(|r| {
            SealedImageKey::seal(&image_key, &r.cert_der)
                .and_then(|s| s.to_text())
                .with_context(|| format!("sealing to {}", r.identity))
        })
        .collect::<Result<_>>()?;
    private_dir(&opts.out)?;
    let mut written = Vec::new();
    if generated {
        image_key.write_file(&new_key_path)?;
        written.push(new_key_path.clone());
    }
    let mut out_recipients = Vec::new();
    for (r, text) in recipients.iter().zip(&sealed) {
        write_new_file(&r.sealed_path, text.as_bytes(), 0o644)?;
        written.push(r.sealed_path.clone());
        out_recipients.push((
            r.identity.clone(),
            pki::fingerprint(&r.cert_der),
            r.sealed_path.clone(),
        ));
    }
    Ok(SealOutput {
        written,
        image_key_fingerprint: image_key.fingerprint(),
        generated_key: generated.then_some(new_key_path),
        recipients: out_recipients,
        ca_checked: ca_pem.is_some(),
    })
}

/// What `greyfed keygen unseal-image-key` does.
#[derive(Clone, Debug)]
pub struct UnsealOptions {
    /// The sealed file.
    pub sealed: PathBuf,
    /// This participant's certificate (the one the file was sealed to).
    pub cert: PathBuf,
    /// This participant's TLS private key (owner-only).
    pub key: PathBuf,
    /// The image key file to write (0600; must not exist).
    pub out: PathBuf,
}

/// What [`unseal`] wrote.
#[derive(Debug)]
pub struct UnsealOutput {
    /// The identity the file was sealed to.
    pub identity: String,
    /// The image key's fingerprint (compare with the sealer's).
    pub image_key_fingerprint: String,
    /// The image key file written.
    pub written: PathBuf,
}

/// Opens a sealed image key with this participant's certificate and TLS
/// key and writes the image key file (`--image-key` of `greyfed
/// participant`, the format `keygen deployment` writes) with mode 0600.
///
/// # Errors
/// A file sealed to another certificate, a key that is not the
/// certificate's, a file altered or damaged, an existing `out`, I/O
/// failures. No error shows key material.
pub fn unseal(opts: &UnsealOptions) -> Result<UnsealOutput> {
    if opts.out.exists() {
        bail!(
            "{} exists; refusing to overwrite an image key",
            opts.out.display()
        );
    }
    let text = read_public(&opts.sealed)?;
    let sealed =
        SealedImageKey::parse(&text).with_context(|| format!("{}", opts.sealed.display()))?;
    let cert_der = pki::certificate_der_from_pem(&read_public(&opts.cert)?)
        .with_context(|| format!("{}", opts.cert.display()))?;
    let key_pem = Zeroizing::new(read_secret(&opts.key)?);
    let image_key = sealed.open(&cert_der, &key_pem).with_context(|| {
        format!(
            "cannot unseal {} with {} and {}",
            opts.sealed.display(),
            opts.cert.display(),
            opts.key.display()
        )
    })?;
    image_key.write_file(&opts.out)?;
    Ok(UnsealOutput {
        identity: sealed.recipient,
        image_key_fingerprint: image_key.fingerprint(),
        written: opts.out.clone(),
    })
}

/// An image key sealed to one participant's certificate (the file format;
/// see the module docs). Holds no secret in the clear.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedImageKey {
    /// [`SEALED_FORMAT`].
    pub format: String,
    /// [`SEALED_VERSION`].
    pub version: u32,
    /// [`SEALED_SUITE`].
    pub suite: String,
    /// The recipient's identity (its certificate's common name).
    pub recipient: String,
    /// [`pki::fingerprint`] of the recipient's certificate.
    pub recipient_certificate: String,
    /// [`ImageKey::fingerprint`] of the sealed key.
    pub image_key_fingerprint: String,
    /// HPKE encapsulated key (base64; an uncompressed P-256 point).
    pub enc: String,
    /// The key sealed with the HPKE context (base64; key and tag).
    pub ciphertext: String,
}

/// Standard base64 with padding.
fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl SealedImageKey {
    /// Seals `key` to the certificate `cert_der` (DER), whose key must be
    /// P-256 and whose subject a participant identity.
    ///
    /// # Errors
    /// A certificate that does not parse, is no participant certificate or
    /// has another kind of key.
    pub fn seal(key: &ImageKey, cert_der: &[u8]) -> Result<Self> {
        use base64::Engine as _;
        let recipient = pki::certificate_identity(cert_der)?;
        let point = pki::certificate_p256_public_key(cert_der)?;
        let public = <Kem as hpke::Kem>::PublicKey::from_bytes(&point)
            .map_err(|_| anyhow::anyhow!("the certificate's P-256 key is not a valid point"))?;
        let mut sealed = Self {
            format: SEALED_FORMAT.to_string(),
            version: SEALED_VERSION,
            suite: SEALED_SUITE.to_string(),
            recipient,
            recipient_certificate: pki::fingerprint(cert_der),
            image_key_fingerprint: key.fingerprint(),
            enc: String::new(),
            ciphertext: String::new(),
        };
        let plaintext = key_bytes(key)?;
        let (enc, ciphertext) = hpke::single_shot_seal::<Aead, Kdf, Kem>(
            &OpModeS::Base,
            &public,
            &sealed.info(),
            &plaintext[..],
            &sealed.aad(),
        )
        .map_err(|e| anyhow::anyhow!("HPKE sealing failed: {e}"))?;
        sealed.enc = b64().encode(enc.to_bytes());
        sealed.ciphertext = b64().encode(&ciphertext);
        Ok(sealed)
    }

    /// Opens the sealed key with the recipient's certificate (DER) and its
    /// PKCS#8 PEM private key, and checks the key's fingerprint.
    ///
    /// # Errors
    /// A certificate other than the recipient's, a private key that is not
    /// the certificate's, or a file that fails HPKE's authentication
    /// (altered, damaged, or sealed to another key). Errors never contain
    /// key material.
    pub fn open(&self, cert_der: &[u8], key_pem: &[u8]) -> Result<ImageKey> {
        use base64::Engine as _;
        self.check()?;
        let fingerprint = pki::fingerprint(cert_der);
        if fingerprint != self.recipient_certificate {
            let identity = pki::certificate_identity(cert_der)
                .unwrap_or_else(|_| "no participant identity".to_string());
            bail!(
                "it is sealed to {} (certificate {}), not to this certificate ({identity}, {fingerprint}); \
                 each participant unseals its own file",
                self.recipient,
                self.recipient_certificate,
            );
        }
        let secret = p256_private_key(key_pem)?;
        let point = pki::certificate_p256_public_key(cert_der)?;
        if Kem::sk_to_pk(&secret).to_bytes().as_slice() != point.as_slice() {
            bail!("the private key does not belong to the certificate");
        }
        let enc = b64()
            .decode(&self.enc)
            .ok()
            .and_then(|b| <Kem as hpke::Kem>::EncappedKey::from_bytes(&b).ok())
            .context("the file is damaged: its encapsulated key is not a P-256 point")?;
        let ciphertext = b64()
            .decode(&self.ciphertext)
            .ok()
            .filter(|c| c.len() == CIPHERTEXT_LEN)
            .context("the file is damaged: its ciphertext is not base64 of the right length")?;
        let plaintext = hpke::single_shot_open::<Aead, Kdf, Kem>(
            &OpModeR::Base,
            &secret,
            &enc,
            &self.info(),
            &ciphertext,
            &self.aad(),
        )
        .map(Zeroizing::new)
        .map_err(|_| {
            anyhow::anyhow!(
                "the sealed image key does not open: the file was altered or damaged, or it \
                 was sealed to another key (HPKE authentication failed)"
            )
        })?;
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        if plaintext.len() != KEY_LEN {
            bail!("the sealed image key has the wrong length");
        }
        bytes.copy_from_slice(&plaintext);
        let key = ImageKey::from_bytes(*bytes);
        if key.fingerprint() != self.image_key_fingerprint {
            bail!("the unsealed image key does not have the fingerprint the file names");
        }
        Ok(key)
    }

    /// The file's text: pretty JSON and a final newline.
    ///
    /// # Errors
    /// Only if JSON serialisation fails.
    pub fn to_text(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)? + "\n")
    }

    /// Parses and checks a sealed file's text (format, version, suite and
    /// the shape of every field).
    ///
    /// # Errors
    /// Not a sealed image key, another version or suite, a malformed field.
    pub fn parse(text: &[u8]) -> Result<Self> {
        // The JSON error's position only: its message may quote the text,
        // and a file given here by mistake could be a secret.
        let sealed: Self = serde_json::from_slice(text).map_err(|e| {
            anyhow::anyhow!(
                "not a greyfed sealed image key (a JSON object with format \
                 {SEALED_FORMAT:?}): {:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            )
        })?;
        sealed.check()?;
        Ok(sealed)
    }

    /// Checks the header fields, so that [`aad`](Self::aad) is unambiguous.
    fn check(&self) -> Result<()> {
        if self.format != SEALED_FORMAT {
            bail!(
                "not a greyfed sealed image key (format {:?})",
                truncate(&self.format)
            );
        }
        if self.version != SEALED_VERSION {
            bail!(
                "sealed image key format version {} is not supported (this greyfed reads \
                 version {SEALED_VERSION})",
                self.version
            );
        }
        if self.suite != SEALED_SUITE {
            bail!("unsupported HPKE suite {:?}", truncate(&self.suite));
        }
        pki::validate_identity(&self.recipient).context("the file's recipient")?;
        let hex64 = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !self
            .recipient_certificate
            .strip_prefix(pki::FINGERPRINT_PREFIX)
            .is_some_and(|h| hex64(h, 64))
        {
            bail!("the file's recipient certificate fingerprint is malformed");
        }
        if !hex64(&self.image_key_fingerprint, 16) {
            bail!("the file's image key fingerprint is malformed");
        }
        if self.enc.len() > 4 * ENC_LEN || self.ciphertext.len() > 4 * CIPHERTEXT_LEN {
            bail!("the file is damaged: a field is too long");
        }
        Ok(())
    }

    /// HPKE `info`: the format label and the recipient certificate's
    /// fingerprint.
    fn info(&self) -> Vec<u8> {
        let mut info = SEALED_LABEL.to_vec();
        info.push(0);
        info.extend_from_slice(self.recipient_certificate.as_bytes());
        info
    }

    /// Associated data: every header field, one per line (each is checked
    /// to hold no newline).
    fn aad(&self) -> Vec<u8> {
        let mut aad = SEALED_LABEL.to_vec();
        for field in [
            self.format.as_str(),
            &self.version.to_string(),
            &self.suite,
            &self.recipient,
            &self.recipient_certificate,
            &self.image_key_fingerprint,
        ] {
            aad.push(b'\n');
            aad.extend_from_slice(field.as_bytes());
        }
        aad
    }
}

/// At most 80 characters of untrusted text, for error messages.
fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// The raw bytes of an image key, wiped when dropped.
fn key_bytes(key: &ImageKey) -> Result<Zeroizing<[u8; KEY_LEN]>> {
    let hex = Zeroizing::new(key.expose_secret_hex());
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let hex = hex.as_bytes();
    if hex.len() != 2 * KEY_LEN {
        bail!("internal: the image key has an unexpected length");
    }
    for (i, byte) in bytes.iter_mut().enumerate() {
        match (digit(hex[2 * i]), digit(hex[2 * i + 1])) {
            (Some(h), Some(l)) => *byte = h << 4 | l,
            _ => bail!("internal: the image key is not hex"),
        }
    }
    Ok(bytes)
}

/// The HPKE private key of a PKCS#8 PEM P-256 private key (what rcgen and
/// `greyfed keygen` write). The error never quotes the file.
fn p256_private_key(key_pem: &[u8]) -> Result<<Kem as hpke::Kem>::PrivateKey> {
    use p256::pkcs8::DecodePrivateKey as _;
    let text = std::str::from_utf8(key_pem)
        .map_err(|_| anyhow::anyhow!("the private key file is not PEM text"))?;
    let secret = p256::SecretKey::from_pkcs8_pem(text).map_err(|_| {
        anyhow::anyhow!(
            "the private key file holds no ECDSA P-256 key in PKCS#8 PEM \
             (-----BEGIN PRIVATE KEY-----); greyfed keys are P-256"
        )
    })?;
    let mut scalar = secret.to_bytes();
    let key = <Kem as hpke::Kem>::PrivateKey::from_bytes(scalar.as_slice())
        .map_err(|_| anyhow::anyhow!("the private key is not a valid P-256 scalar"));
    scalar.as_mut_slice().zeroize();
    key
}

/// Reads a public file (certificate, request, sealed key, allow list) of
/// at most [`MAX_PUBLIC_FILE_BYTES`].
fn read_public(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut contents = Vec::new();
    file.take(MAX_PUBLIC_FILE_BYTES + 1)
        .read_to_end(&mut contents)
        .with_context(|| format!("reading {}", path.display()))?;
    if contents.len() as u64 > MAX_PUBLIC_FILE_BYTES {
        bail!(
            "{}: larger than {MAX_PUBLIC_FILE_BYTES} bytes; not a certificate, request or \
             sealed key",
            path.display()
        );
    }
    Ok(contents)
}

/// Creates `dir` (and its parents) owner-only if it does not exist; an
/// existing directory keeps its permissions.
fn private_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    /// A CA and a participant certificate from a request, with its key.
    fn participant(ca: &CertificateAuthority, identity: &str) -> (Vec<u8>, String) {
        let req = CertificateRequest::generate(identity).unwrap();
        let signed = ca
            .sign_request(&req.csr_pem, Validity::days_from_now(1))
            .unwrap();
        (
            pki::certificate_der_from_pem(signed.cert_pem.as_bytes()).unwrap(),
            req.key_pem,
        )
    }

    #[test]
    fn a_sealed_key_opens_only_for_its_recipient() {
        let ca = CertificateAuthority::generate(Validity::days_from_now(10)).unwrap();
        let (cert_a, key_a) = participant(&ca, "lab-a");
        let (cert_b, key_b) = participant(&ca, "lab-b");
        let image_key = ImageKey::generate();
        let sealed = SealedImageKey::seal(&image_key, &cert_a).unwrap();
        let text = sealed.to_text().unwrap();
        assert!(!text.contains(&image_key.expose_secret_hex()));
        assert!(text.contains("\"recipient\": \"lab-a\""), "{text}");
        let parsed = SealedImageKey::parse(text.as_bytes()).unwrap();
        let opened = parsed.open(&cert_a, key_a.as_bytes()).unwrap();
        assert_eq!(opened.expose_secret_hex(), image_key.expose_secret_hex());

        // Another participant's certificate, or its key with A's certificate.
        let err = format!("{:#}", parsed.open(&cert_b, key_b.as_bytes()).unwrap_err());
        assert!(err.contains("sealed to lab-a"), "{err}");
        let err = format!("{:#}", parsed.open(&cert_a, key_b.as_bytes()).unwrap_err());
        assert!(err.contains("does not belong"), "{err}");
        assert!(!err.contains("PRIVATE"), "{err}");

        // Redirected to B (header and info changed): B's key cannot open it.
        let mut redirected = parsed.clone();
        redirected.recipient = "lab-b".into();
        redirected.recipient_certificate = pki::fingerprint(&cert_b);
        let err = format!(
            "{:#}",
            redirected.open(&cert_b, key_b.as_bytes()).unwrap_err()
        );
        assert!(err.contains("does not open"), "{err}");

        // Any header field or ciphertext bit altered: refused.
        let mut renamed = parsed.clone();
        renamed.image_key_fingerprint = "0".repeat(16);
        assert!(renamed.open(&cert_a, key_a.as_bytes()).is_err());
        let mut flipped = parsed.clone();
        let mut ct = b64().decode(&flipped.ciphertext).unwrap();
        ct[3] ^= 1;
        flipped.ciphertext = base64::Engine::encode(&b64(), &ct);
        let err = format!("{:#}", flipped.open(&cert_a, key_a.as_bytes()).unwrap_err());
        assert!(err.contains("does not open"), "{err}");
        let mut version = parsed.clone();
        version.version = 2;
        assert!(
            format!("{:#}", version.open(&cert_a, key_a.as_bytes()).unwrap_err())
                .contains("version 2")
        );
        assert!(SealedImageKey::parse(b"{\"format\": 1}").is_err());
        assert!(SealedImageKey::parse(b"garbage").is_err());
    }

    #[test]
    fn non_p256_keys_and_the_coordinator_certificate_are_refused() {
        let ca = CertificateAuthority::generate(Validity::days_from_now(10)).unwrap();
        let server = ca
            .issue_server(&["localhost".into()], Validity::days_from_now(1))
            .unwrap();
        let der = pki::certificate_der_from_pem(server.cert_pem.as_bytes()).unwrap();
        assert!(SealedImageKey::seal(&ImageKey::generate(), &der).is_err());
        // A broken key, and an Ed25519 PKCS#8 key (RFC 8410's example), are
        // refused with a message that names P-256 and quotes nothing.
        let ed25519 = "-----BEGIN PRIVATE KEY-----\n\
                       MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
                       -----END PRIVATE KEY-----\n";
        for pem in [
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            ed25519,
        ] {
            let Err(err) = p256_private_key(pem.as_bytes()) else {
                panic!("a key that is not P-256 was accepted");
            };
            let err = err.to_string();
            assert!(err.contains("P-256") && !err.contains("MC4C"), "{err}");
        }
    }

    #[test]
    fn key_bytes_round_trip() {
        let key = ImageKey::generate();
        let bytes = key_bytes(&key).unwrap();
        assert_eq!(
            ImageKey::from_bytes(*bytes).expose_secret_hex(),
            key.expose_secret_hex()
        );
    }
}
