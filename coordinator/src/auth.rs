//! Participant authentication: the allow list, the TLS client-certificate
//! verifier that enforces it, and reloading it on SIGHUP.
//!
//! A participant is admitted at the TLS handshake only if its certificate
//! (1) chains to the deployment CA, is within its validity period and is
//! meant for TLS clients (checked by rustls' WebPKI verifier), and (2) is
//! listed in the allow list: its SHA-256 fingerprint is there, under the
//! identity the certificate names. Anything else ends the handshake with a
//! TLS alert before any protocol message is read.
//!
//! # Allow-list file format
//!
//! UTF-8 text, one entry per line: an identity and a certificate
//! fingerprint separated by white space. `#` starts a comment (to the end
//! of the line); blank lines are ignored.
//!
//! ```text
//! # greyfed allow list
//! participant-0 sha256:8f1c...   (64 hex digits)
//! participant-1 sha256:03ab...
//! ```
//!
//! - The identity is the certificate's subject common name
//!   ([`pki::certificate_identity`]); the fingerprint is
//!   [`pki::fingerprint`] of the DER certificate. Both must match, so a
//!   second certificate issued for a listed name is refused until its own
//!   fingerprint is listed.
//! - An identity or a fingerprint may appear only once.
//! - A malformed line makes the whole file invalid (the error names the
//!   line): at start-up the coordinator refuses to start; on a reload it
//!   keeps the previous list.
//!
//! # Revocation
//!
//! Delete (or comment out) a participant's line and send the coordinator
//! SIGHUP ([`reload_on_sighup`]). New handshakes see the new list at once,
//! and the open connection of a participant that is no longer listed is
//! closed ([`crate::server`] watches [`SharedAllowList::subscribe`]).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, UnixTime},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    error::{CoordinatorError, Result},
    pki,
};

/// Largest allow-list file read (a deployment lists at most thousands of
/// participants; about 90 bytes each).
pub const MAX_ALLOW_LIST_BYTES: u64 = 4 << 20;

/// One admitted participant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowEntry {
    /// The identity its certificate names (subject common name).
    pub identity: String,
    /// [`pki::fingerprint`] of its certificate.
    pub fingerprint: String,
}

/// The participants a coordinator admits. See the module docs for the file
/// format.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    /// Entries in file order.
    entries: Vec<AllowEntry>,
    /// Fingerprint → index into `entries`.
    by_fingerprint: HashMap<String, usize>,
}

impl AllowList {
    /// A list of `entries`.
    ///
    /// # Errors
    /// [`CoordinatorError::AllowList`] (line 0) for an invalid identity or
    /// fingerprint, or one that appears twice.
    pub fn new(entries: impl IntoIterator<Item = AllowEntry>) -> Result<Self> {
        let mut list = Self::default();
        for e in entries {
            list.push(e)
                .map_err(|reason| allow_list_error("<entries>", 0, reason))?;
        }
        Ok(list)
    }

    fn push(&mut self, entry: AllowEntry) -> std::result::Result<(), String> {
        pki::validate_identity(&entry.identity).map_err(|e| e.to_string())?;
        let fingerprint = normalise_fingerprint(&entry.fingerprint)?;
        if self.entries.iter().any(|e| e.identity == entry.identity) {
            return Err(format!("{} is listed twice", entry.identity));
        }
        if self.by_fingerprint.contains_key(&fingerprint) {
            return Err(format!("fingerprint {fingerprint} is listed twice"));
        }
        self.by_fingerprint
            .insert(fingerprint.clone(), self.entries.len());
        self.entries.push(AllowEntry {
            identity: entry.identity,
            fingerprint,
        });
        Ok(())
    }

    /// Parses the allow-list format; `source` names the text in errors
    /// (usually the file's path).
    ///
    /// # Errors
    /// [`CoordinatorError::AllowList`] naming the first bad line (from 1).
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let mut list = Self::default();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let entry = match fields.as_slice() {
                [identity, fingerprint] => AllowEntry {
                    identity: identity.to_string(),
                    fingerprint: fingerprint.to_string(),
                },
                _ => {
                    return Err(allow_list_error(
                        source,
                        index + 1,
                        format!(
                            "expected IDENTITY FINGERPRINT, found {} field(s)",
                            fields.len()
                        ),
                    ));
                }
            };
            list.push(entry)
                .map_err(|reason| allow_list_error(source, index + 1, reason))?;
        }
        Ok(list)
    }

    /// Reads and parses an allow-list file.
    ///
    /// # Errors
    /// [`CoordinatorError::Io`] when it cannot be read,
    /// [`CoordinatorError::AllowList`] when it is too large or malformed.
    pub fn read_file(path: &Path) -> Result<Self> {
        use std::io::Read;
        let io = |source| CoordinatorError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(io)?
            .take(MAX_ALLOW_LIST_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(io)?;
        let source = path.display().to_string();
        if text.len() as u64 > MAX_ALLOW_LIST_BYTES {
            return Err(allow_list_error(
                &source,
                0,
                format!("larger than {MAX_ALLOW_LIST_BYTES} bytes"),
            ));
        }
        Self::parse(&text, &source)
    }

    /// The list in the file format, with a header explaining it.
    pub fn to_text(&self) -> String {
        let mut s = String::from(
            "# greyfed allow list: the participants this coordinator admits.\n\
             # One entry per line: IDENTITY FINGERPRINT (the certificate's subject common\n\
             # name, and sha256: with the SHA-256 of the DER certificate in hex).\n\
             # Revoke a participant: delete or comment out its line, then send the\n\
             # coordinator SIGHUP (e.g. `systemctl reload greyfed-coordinator`).\n",
        );
        for e in &self.entries {
            s.push_str(&format!("{} {}\n", e.identity, e.fingerprint));
        }
        s
    }

    /// The entries in order.
    pub fn entries(&self) -> &[AllowEntry] {
        &self.entries
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the list admits nobody.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when a certificate with this fingerprint is listed.
    pub fn contains_fingerprint(&self, fingerprint: &str) -> bool {
        self.by_fingerprint.contains_key(fingerprint)
    }

    /// Checks a (chain-verified) DER end-entity certificate against the
    /// list and returns its identity.
    ///
    /// # Errors
    /// [`CoordinatorError::NotAdmitted`] when its fingerprint is not listed,
    /// or is listed under another name than the certificate's identity.
    pub fn admit(&self, cert_der: &[u8]) -> Result<String> {
        let fingerprint = pki::fingerprint(cert_der);
        let identity = pki::certificate_identity(cert_der)
            .map_err(|e| CoordinatorError::NotAdmitted(format!("{fingerprint}: {e}")))?;
        match self.by_fingerprint.get(&fingerprint) {
            None => Err(CoordinatorError::NotAdmitted(format!(
                "certificate of {identity} ({fingerprint}) is not in the allow list"
            ))),
            Some(&i) if self.entries[i].identity != identity => {
                Err(CoordinatorError::NotAdmitted(format!(
                    "the allow list names certificate {fingerprint} {}, but it belongs to \
                     {identity}",
                    self.entries[i].identity
                )))
            }
            Some(_) => Ok(identity),
        }
    }
}

fn allow_list_error(source: &str, line: usize, reason: impl Into<String>) -> CoordinatorError {
    CoordinatorError::AllowList {
        source_name: source.to_string(),
        line,
        reason: reason.into(),
    }
}

/// `sha256:` and 64 hex digits (either case) → lowercase.
fn normalise_fingerprint(s: &str) -> std::result::Result<String, String> {
    let shown: String = s.chars().take(80).collect();
    let hex = s
        .strip_prefix(pki::FINGERPRINT_PREFIX)
        .ok_or_else(|| format!("fingerprint {shown:?} does not start with sha256:"))?;
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "fingerprint {shown:?} is not sha256: and 64 hex digits"
        ));
    }
    Ok(format!(
        "{}{}",
        pki::FINGERPRINT_PREFIX,
        hex.to_ascii_lowercase()
    ))
}

/// What a reload changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Entries in the new list.
    pub entries: usize,
    /// Identities (or re-issued certificates) newly admitted.
    pub added: Vec<String>,
    /// Identities (or old certificates of re-issued ones) no longer admitted.
    pub removed: Vec<String>,
}

#[derive(Debug)]
struct Shared {
    current: watch::Sender<Arc<AllowList>>,
    path: Option<PathBuf>,
}

/// The allow list in force, shared by the TLS verifier (new handshakes),
/// the connections (which close when their certificate is revoked) and
/// whoever reloads it. Cloning shares the same list.
#[derive(Clone, Debug)]
pub struct SharedAllowList {
    inner: Arc<Shared>,
}

impl SharedAllowList {
    /// A list held in memory only ([`reload`](Self::reload) then fails;
    /// use [`replace`](Self::replace)).
    pub fn new(list: AllowList) -> Self {
        Self::with_path(list, None)
    }

    fn with_path(list: AllowList, path: Option<PathBuf>) -> Self {
        let (current, _) = watch::channel(Arc::new(list));
        Self {
            inner: Arc::new(Shared { current, path }),
        }
    }

    /// Reads the list from `path`, which later [`reload`](Self::reload)s
    /// read again.
    ///
    /// # Errors
    /// As [`AllowList::read_file`].
    pub fn from_file(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let list = AllowList::read_file(&path)?;
        Ok(Self::with_path(list, Some(path)))
    }

    /// The file this list is reloaded from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The list in force now.
    pub fn current(&self) -> Arc<AllowList> {
        self.inner.current.borrow().clone()
    }

    /// A receiver that sees every later replacement of the list.
    pub fn subscribe(&self) -> watch::Receiver<Arc<AllowList>> {
        self.inner.current.subscribe()
    }

    /// Puts `list` in force and returns what changed.
    pub fn replace(&self, list: AllowList) -> ReloadSummary {
        let old = self.current();
        let key = |e: &AllowEntry| (e.identity.clone(), e.fingerprint.clone());
        let before: BTreeSet<_> = old.entries().iter().map(key).collect();
        let after: BTreeSet<_> = list.entries().iter().map(key).collect();
        let summary = ReloadSummary {
            entries: list.len(),
            added: after.difference(&before).map(|e| e.0.clone()).collect(),
            removed: before.difference(&after).map(|e| e.0.clone()).collect(),
        };
        self.inner.current.send_replace(Arc::new(list));
        summary
    }

    /// Reads the file again and puts it in force. On any error the list in
    /// force stays as it was.
    ///
    /// # Errors
    /// [`CoordinatorError::Config`] for a list without a file, otherwise as
    /// [`AllowList::read_file`].
    pub fn reload(&self) -> Result<ReloadSummary> {
        let path = self.path().ok_or_else(|| {
            CoordinatorError::Config("this allow list was not read from a file".into())
        })?;
        let list = AllowList::read_file(path)?;
        Ok(self.replace(list))
    }

    /// [`reload`](Self::reload), logging the outcome once: what changed at
    /// info level, or the error (and that the old list stays) at error level.
    pub fn reload_and_log(&self) -> Result<ReloadSummary> {
        let result = self.reload();
        match &result {
            Ok(s) => info!(
                entries = s.entries,
                added = ?s.added,
                removed = ?s.removed,
                "allow list reloaded"
            ),
            Err(e) => error!(
                entries = self.current().len(),
                "allow list not reloaded, keeping the previous one: {e}"
            ),
        }
        result
    }
}

/// Reloads `list` from its file on every SIGHUP, for as long as the
/// returned task runs. The signal handler is installed before this returns,
/// so a SIGHUP sent afterwards never terminates the process.
///
/// # Errors
/// [`CoordinatorError::Config`] when the list has no file or the handler
/// cannot be installed. Must be called within a tokio runtime.
#[cfg(unix)]
pub fn reload_on_sighup(list: SharedAllowList) -> Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    if list.path().is_none() {
        return Err(CoordinatorError::Config(
            "SIGHUP reloads need an allow-list file".into(),
        ));
    }
    let mut hangups = signal(SignalKind::hangup())
        .map_err(|e| CoordinatorError::Config(format!("cannot handle SIGHUP: {e}")))?;
    Ok(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let _ = list.reload_and_log();
        }
    }))
}

/// An allow-list refusal inside a rustls error. rustls shows it with
/// `Debug`, which therefore prints the message (sent to the peer in the
/// TLS alert's close reason and logged once by the coordinator).
struct Refusal(CoordinatorError);

impl std::fmt::Debug for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Refusal {}

/// The client-certificate verifier: WebPKI against the deployment CA
/// (chain, validity period, `clientAuth` usage), then the allow list.
#[derive(Debug)]
struct AllowListVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    allow: SharedAllowList,
}

impl ClientCertVerifier for AllowListVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        self.allow.current().admit(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(Refusal(e)),
            )))
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The verifier for participants' client certificates: issued by a CA in
/// `ca_pem` (the deployment CA), valid now, and admitted by `allow`.
///
/// # Errors
/// [`CoordinatorError::Tls`] when `ca_pem` holds no usable CA certificate.
pub fn client_verifier(
    ca_pem: &[u8],
    allow: SharedAllowList,
) -> Result<Arc<dyn ClientCertVerifier>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| CoordinatorError::Tls(format!("CA file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| CoordinatorError::Tls(format!("CA certificate unusable: {e}")))?;
    }
    if roots.is_empty() {
        return Err(CoordinatorError::Tls("CA file holds no certificate".into()));
    }
    if allow.current().is_empty() {
        warn!(
            "the allow list is empty: no participant can connect until it is filled and reloaded"
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| CoordinatorError::Tls(format!("client verifier: {e}")))?;
    Ok(Arc::new(AllowListVerifier { webpki, allow }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP_A: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    const FP_B: &str = "sha256:ABCDEFabcdef0000000000000000000000000000000000000000000000000000";

    #[test]
    fn the_format_allows_comments_blank_lines_and_any_white_space() {
        let text = format!(
            "# header\n\n   \nparticipant-0 {FP_A}  # trailing comment\r\n\
             \tparticipant-1\t  {FP_B}\n# participant-2 {FP_A}\n"
        );
        let list = AllowList::parse(&text, "test").unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list.entries()[1].identity, "participant-1");
        assert!(
            list.contains_fingerprint(&FP_B.to_ascii_lowercase()),
            "fingerprints are stored in lowercase"
        );
        // What to_text writes parses back to the same list.
        assert_eq!(AllowList::parse(&list.to_text(), "again").unwrap(), list);
        assert!(AllowList::parse("", "empty").unwrap().is_empty());
        assert!(
            AllowList::parse("# only comments\n", "c")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn malformed_lines_are_errors_naming_the_line() {
        let cases = [
            (format!("participant-0 {FP_A}\nparticipant-1\n"), 2, "field"),
            (format!("p0 {FP_A} extra\n"), 1, "3 field"),
            ("p0 sha1:abcd\n".to_string(), 1, "sha256:"),
            (format!("p0 {}\n", &FP_A[..70]), 1, "64 hex"),
            (format!("p0 {}g\n", &FP_A[..70]), 1, "64 hex"),
            (format!("\n\nbad/name {FP_A}\n"), 3, "identity"),
            (format!("p0 {FP_A}\np0 {FP_B}\n"), 2, "twice"),
            (format!("p0 {FP_A}\np1 {FP_A}\n"), 2, "twice"),
        ];
        for (text, line, what) in cases {
            let err = AllowList::parse(&text, "list.txt").unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, CoordinatorError::AllowList { line: l, .. } if l == line),
                "{text:?}: {msg}"
            );
            assert!(
                msg.contains(&format!("list.txt: line {line}")) && msg.contains(what),
                "{text:?}: {msg}"
            );
        }
        // Hostile input is cut short in messages.
        let long = format!("p0 sha256:{}\n", "f".repeat(100_000));
        let msg = AllowList::parse(&long, "x").unwrap_err().to_string();
        assert!(msg.len() < 400, "{}", msg.len());
    }

    #[test]
    fn admits_only_listed_certificates_under_their_own_name() {
        use crate::pki::{CertificateAuthority, Validity};
        let ca = CertificateAuthority::generate(Validity::days_from_now(1)).unwrap();
        let der = |pem: &str| {
            use rustls::pki_types::pem::PemObject;
            CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
        };
        let a = ca.issue_client("a", Validity::days_from_now(1)).unwrap();
        let b = ca.issue_client("b", Validity::days_from_now(1)).unwrap();
        let entry = |identity: &str, fingerprint: &str| AllowEntry {
            identity: identity.into(),
            fingerprint: fingerprint.into(),
        };
        let list = AllowList::new([entry("a", &a.fingerprint)]).unwrap();
        assert_eq!(list.admit(&der(&a.cert_pem)).unwrap(), "a");
        let err = list.admit(&der(&b.cert_pem)).unwrap_err().to_string();
        assert!(err.contains("not in the allow list"), "{err}");
        // b's certificate listed under a's name.
        let swapped = AllowList::new([entry("a", &b.fingerprint)]).unwrap();
        let err = swapped.admit(&der(&b.cert_pem)).unwrap_err().to_string();
        assert!(err.contains("belongs to b"), "{err}");
        assert!(AllowList::new([entry("a", "sha256:00")]).is_err());
    }

    #[test]
    fn a_bad_reload_keeps_the_list_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allow.txt");
        std::fs::write(&path, format!("p0 {FP_A}\np1 {FP_B}\n")).unwrap();
        let shared = SharedAllowList::from_file(&path).unwrap();
        let mut changes = shared.subscribe();
        std::fs::write(&path, format!("p0 {FP_A}\n")).unwrap();
        let summary = shared.reload_and_log().unwrap();
        assert_eq!(summary.removed, vec!["p1".to_string()]);
        assert!(summary.added.is_empty());
        assert!(changes.has_changed().unwrap());
        assert_eq!(changes.borrow_and_update().len(), 1);
        std::fs::write(&path, "p0 not-a-fingerprint\n").unwrap();
        assert!(shared.reload_and_log().is_err());
        assert_eq!(shared.current().len(), 1, "the old list stays");
        assert!(!changes.has_changed().unwrap());
        std::fs::remove_file(&path).unwrap();
        assert!(shared.reload().is_err());
        assert_eq!(shared.current().len(), 1);
        assert!(SharedAllowList::new(AllowList::default()).reload().is_err());
    }
}
