//! `greyfed keygen deployment`: everything a deployment on several machines
//! needs, written as one directory per machine.
//!
//! ```text
//! OUT/                        0700
//!   README.txt                which directory goes where
//!   ca/                       0700  stays with the operator, offline
//!     ca.pem                        the deployment CA certificate
//!     ca-key.pem              0600  the CA key: signs every credential
//!     image.key               0600  master copy of the image key
//!     deployment.json               coordinator names and port (for `keygen participant`)
//!   coordinator/              0700  -> the coordinator machine
//!     ca.pem                        checks participants' certificates
//!     coordinator-cert.pem          for the --host names, TLS server only
//!     coordinator-key.pem     0600
//!     allow-list.txt                the participants admitted (see coordinator::auth)
//!     coordinator.toml              its settings, keys named like the flags
//!     run.sh                  0700  the command line
//!   participant-I/            0700  -> participant machine I (I from 0)
//!     ca.pem                        checks the coordinator's certificate
//!     participant-cert.pem          identity participant-I, TLS client only
//!     participant-key.pem     0600
//!     image.key               0600  the shared image key (never to the coordinator)
//!     participant.toml
//!     run.sh                  0700
//! ```
//!
//! `greyfed keygen participant --bundle OUT --name NAME` adds `OUT/NAME/`
//! later from the same CA ([`participant`]): a new member, or a new
//! certificate for a revoked one.
//!
//! `greyfed keygen ca --out OUT` ([`ca`]) writes only `OUT/ca/` (without
//! `image.key`) and `OUT/coordinator/` (an empty allow list): for
//! deployments where each participant makes its own key and one of them
//! the image key ([`crate::custody`]).
//!
//! Secrets are created owner-only (0600, in 0700 directories) from the
//! start, and nothing is ever overwritten: `OUT` must not exist or be empty.
//! The coordinator never gets the image key, only its fingerprint.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use greyfed_coordinator::pki::{self, CertificateAuthority, DeploymentPki, IssuedCert, Validity};
use greyfed_participant::cipher::ImageKey;

/// Port the generated configurations use when none is given (the
/// coordinator's default `--listen` port).
pub const DEFAULT_PORT: u16 = 7447;

/// Most participants one bundle holds.
pub const MAX_PARTICIPANTS: usize = 10_000;

/// File and directory names inside a deployment bundle.
pub mod files {
    /// The operator's directory (CA key, master image key).
    pub const CA_DIR: &str = "ca";
    /// The coordinator machine's directory.
    pub const COORDINATOR_DIR: &str = "coordinator";
    /// CA certificate (in every directory).
    pub const CA_CERT: &str = "ca.pem";
    /// CA private key (secret, operator only).
    pub const CA_KEY: &str = "ca-key.pem";
    /// Coordinator certificate (`greyfed coordinator --cert`).
    pub const COORDINATOR_CERT: &str = "coordinator-cert.pem";
    /// Coordinator private key (secret; `--key`).
    pub const COORDINATOR_KEY: &str = "coordinator-key.pem";
    /// The coordinator's allow list (`--allow-list`).
    pub const ALLOW_LIST: &str = "allow-list.txt";
    /// The coordinator's settings.
    pub const COORDINATOR_TOML: &str = "coordinator.toml";
    /// A participant's certificate (`greyfed participant --cert`).
    pub const PARTICIPANT_CERT: &str = "participant-cert.pem";
    /// A participant's private key (secret; `--key`).
    pub const PARTICIPANT_KEY: &str = "participant-key.pem";
    /// A participant's settings.
    pub const PARTICIPANT_TOML: &str = "participant.toml";
    /// Shared image key (secret; participants' `--image-key`; never give it to the coordinator).
    pub const IMAGE_KEY: &str = "image.key";
    /// Each machine's command line.
    pub const RUN_SH: &str = "run.sh";
    /// Which directory goes where.
    pub const README: &str = "README.txt";
    /// The coordinator's names and port, for `keygen participant` (in `ca/`).
    pub const DEPLOYMENT_JSON: &str = "deployment.json";

    /// The identity and directory of participant `i`.
    pub fn participant(i: usize) -> String {
        format!("participant-{i}")
    }
}

/// What `greyfed keygen deployment` generates.
#[derive(Clone, Debug)]
pub struct DeploymentOptions {
    /// Directory to create (must not exist or be empty).
    pub out: PathBuf,
    /// Number of participants (identities `participant-0` ...).
    pub participants: usize,
    /// Coordinator host names or IP addresses; the first is the one
    /// participants connect to.
    pub hosts: Vec<String>,
    /// UDP port of the coordinator.
    pub port: u16,
    /// Days the coordinator and participant certificates stay valid.
    pub valid_days: u32,
}

/// What [`deployment`] wrote.
#[derive(Debug)]
pub struct DeploymentOutput {
    /// Every file written, in order.
    pub written: Vec<PathBuf>,
    /// Fingerprint of the image key (safe to show; not the key).
    pub image_key_fingerprint: String,
    /// Each participant's identity and certificate fingerprint.
    pub participants: Vec<(String, String)>,
}

/// A host name or address that can go into a certificate, a TOML string and
/// a shell word unquoted: letters, digits, `.`, `-` and `:` (IPv6).
fn check_host(host: &str) -> Result<()> {
    if host.is_empty()
        || host.len() > 253
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
    {
        bail!(
            "--host {:?}: expected a DNS name or an IP address",
            host.chars().take(80).collect::<String>()
        );
    }
    Ok(())
}

/// `HOST:PORT`, bracketing an IPv6 address.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Writes a deployment bundle (see the module docs).
///
/// # Errors
/// Bad options, an `out` directory that is not empty, I/O failures.
pub fn deployment(opts: &DeploymentOptions) -> Result<DeploymentOutput> {
    check_bundle_options(&opts.out, opts.participants, &opts.hosts, opts.valid_days)?;
    let identities: Vec<String> = (0..opts.participants).map(files::participant).collect();
    let pki = DeploymentPki::generate(
        &opts.hosts,
        &identities,
        Validity::days_from_now(opts.valid_days),
    )?;
    let image_key = ImageKey::generate();
    let fingerprint = image_key.fingerprint();
    let mut w = Writer::default();
    let out = &opts.out;
    w.dir(out)?;

    let ca_dir = out.join(files::CA_DIR);
    w.dir(&ca_dir)?;
    w.public(&ca_dir.join(files::CA_CERT), pki.ca.cert_pem())?;
    w.secret(&ca_dir.join(files::CA_KEY), &pki.ca.key_pem())?;
    w.image_key(&ca_dir.join(files::IMAGE_KEY), &image_key)?;

    write_coordinator(
        &mut w,
        out,
        &CoordinatorFiles {
            ca_pem: pki.ca.cert_pem(),
            cert: &pki.coordinator,
            allow_list: &pki.allow_list().to_text(),
            hosts: &opts.hosts,
            port: opts.port,
            participants: opts.participants,
            key_fingerprint: Some(&fingerprint),
            command: "deployment",
        },
    )?;

    let target = host_port(&opts.hosts[0], opts.port);
    let server_name = &opts.hosts[0];
    for (i, (identity, cert)) in pki.participants.iter().enumerate() {
        let machine = Machine {
            target: &target,
            server_name,
            shard: &format!("{i}/{}", opts.participants),
        };
        write_participant(
            &mut w,
            out,
            identity,
            cert,
            pki.ca.cert_pem(),
            &image_key,
            &machine,
        )?;
    }
    // What `keygen participant` needs later (nothing secret).
    w.public(
        &ca_dir.join(files::DEPLOYMENT_JSON),
        &(serde_json::to_string_pretty(&DeploymentInfo {
            hosts: opts.hosts.clone(),
            port: opts.port,
        })? + "\n"),
    )?;
    w.public(
        &out.join(files::README),
        &format!(
            "greyfed deployment bundle ({} participants, coordinator at {target}).\n\n\
             ca/            keep on the operator's machine, offline: the CA key signs every\n               \
             credential, image.key is the master copy of the image key.\n\
             coordinator/   copy to the coordinator machine (never with an image.key).\n\
             participant-I/ copy to participant machine I, one directory per machine.\n\n\
             Copy each directory as it is (owner-only: scp -rp, or tar), then run its\n\
             run.sh. See docs/deploy.md for systemd units and revocation.\n\
             Image key fingerprint: {fingerprint}\n",
            opts.participants
        ),
    )?;
    Ok(DeploymentOutput {
        written: w.written,
        image_key_fingerprint: fingerprint,
        participants: pki
            .participants
            .iter()
            .map(|(id, c)| (id.clone(), c.fingerprint.clone()))
            .collect(),
    })
}

/// What goes into `OUT/coordinator/`.
struct CoordinatorFiles<'a> {
    /// The CA certificate.
    ca_pem: &'a str,
    /// The coordinator's certificate and key.
    cert: &'a IssuedCert,
    /// The allow list's text.
    allow_list: &'a str,
    /// `--host` names; the first sets the listening address family.
    hosts: &'a [String],
    /// UDP port.
    port: u16,
    /// Participants to wait for.
    participants: usize,
    /// The image key's fingerprint, when known.
    key_fingerprint: Option<&'a str>,
    /// The keygen subcommand, for the files' comments.
    command: &'a str,
}

/// `OUT/coordinator/`: the coordinator machine's directory.
fn write_coordinator(w: &mut Writer, out: &Path, c: &CoordinatorFiles<'_>) -> Result<()> {
    let coord = out.join(files::COORDINATOR_DIR);
    w.dir(&coord)?;
    w.public(&coord.join(files::CA_CERT), c.ca_pem)?;
    w.public(&coord.join(files::COORDINATOR_CERT), &c.cert.cert_pem)?;
    w.secret(&coord.join(files::COORDINATOR_KEY), &c.cert.key_pem)?;
    w.public(&coord.join(files::ALLOW_LIST), c.allow_list)?;
    let listen = host_port(
        if c.hosts[0].contains(':') {
            "::"
        } else {
            "0.0.0.0"
        },
        c.port,
    );
    let fingerprint_line = match c.key_fingerprint {
        Some(fp) => format!("key-fingerprint = \"{fp}\"\n"),
        None => "# key-fingerprint = \"...\"  (the image key's fingerprint, as\n\
                 # `greyfed keygen seal-image-key` prints it; without it the first\n\
                 # participant's key sets it)\n"
            .to_string(),
    };
    w.public(
        &coord.join(files::COORDINATOR_TOML),
        &format!(
            "# greyfed coordinator: this machine's settings, written by `greyfed keygen {command}`.\n\
             # Keys are the flags of `greyfed coordinator` (run.sh reads this file with\n\
             # --config; check it with `greyfed config check coordinator.toml`).\n\
             # Paths are relative to this directory. Never copy image.key here.\n\
             [coordinator]\n\
             listen = \"{listen}\"\n\
             cert = \"{}\"\n\
             key = \"{}\"\n\
             ca = \"{}\"\n\
             allow-list = \"{}\"\n\
             participants = {}\n\
             {fingerprint_line}\
             out = \"out\"\n",
            files::COORDINATOR_CERT,
            files::COORDINATOR_KEY,
            files::CA_CERT,
            files::ALLOW_LIST,
            c.participants,
            command = c.command,
        ),
    )?;
    w.script(
        &coord.join(files::RUN_SH),
        &format!(
            "#!/bin/sh\n\
             # greyfed coordinator, written by `greyfed keygen {command}`: the settings\n\
             # are in {toml}. Extra flags override them: ./run.sh --rounds 20\n\
             # Revoke a participant: delete its line in allow-list.txt, then\n\
             # kill -HUP <pid of greyfed> (or systemctl reload greyfed-coordinator).\n\
             set -eu\n\
             cd \"$(dirname \"$0\")\"\n\
             exec \"${{GREYFED:-greyfed}}\" coordinator --config {toml} \"$@\"\n",
            toml = files::COORDINATOR_TOML,
            command = c.command,
        ),
    )
}

/// What `greyfed keygen ca` generates: the deployment CA and the
/// coordinator's directory, without participant keys or an image key (for
/// the certificate-request flow, [`crate::custody`]).
#[derive(Clone, Debug)]
pub struct CaOptions {
    /// Directory to create (must not exist or be empty).
    pub out: PathBuf,
    /// Participants the coordinator waits for.
    pub participants: usize,
    /// Coordinator host names or IP addresses; the first is the one
    /// participants connect to.
    pub hosts: Vec<String>,
    /// UDP port of the coordinator.
    pub port: u16,
    /// Days the coordinator certificate stays valid (the CA at least
    /// [`pki::CA_VALIDITY_DAYS`]).
    pub valid_days: u32,
}

/// What [`ca`] wrote.
#[derive(Debug)]
pub struct CaOutput {
    /// Every file written, in order.
    pub written: Vec<PathBuf>,
}

/// Checks the options `deployment` and `ca` share, and that `out` is
/// missing or empty.
fn check_bundle_options(
    out: &Path,
    participants: usize,
    hosts: &[String],
    valid_days: u32,
) -> Result<()> {
    if participants == 0 || participants > MAX_PARTICIPANTS {
        bail!("--participants must be between 1 and {MAX_PARTICIPANTS}");
    }
    if hosts.is_empty() {
        bail!(
            "give at least one --host: the name or address participants reach the coordinator at"
        );
    }
    for h in hosts {
        check_host(h)?;
    }
    if valid_days == 0 {
        bail!("--valid-days must be at least 1");
    }
    if out.exists()
        && std::fs::read_dir(out)
            .with_context(|| format!("reading {}", out.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} is not empty; refusing to overwrite keys (choose another --out)",
            out.display()
        );
    }
    Ok(())
}

/// Writes `OUT/ca/` (CA certificate and key, `deployment.json`),
/// `OUT/coordinator/` (as in a bundle, with an empty allow list and no
/// image key fingerprint) and `OUT/README.txt`. Participants then make
/// their own keys (`keygen request`), the CA signs their requests
/// (`keygen sign`), and one of them seals the image key to the others.
///
/// # Errors
/// Bad options, an `out` directory that is not empty, I/O failures.
pub fn ca(opts: &CaOptions) -> Result<CaOutput> {
    check_bundle_options(&opts.out, opts.participants, &opts.hosts, opts.valid_days)?;
    let validity = Validity::days_from_now(opts.valid_days);
    let ca = CertificateAuthority::generate(Validity {
        not_before: validity.not_before,
        not_after: validity
            .not_after
            .max(Validity::days_from_now(pki::CA_VALIDITY_DAYS).not_after),
    })?;
    let coordinator = ca.issue_server(&opts.hosts, validity)?;
    let mut w = Writer::default();
    let out = &opts.out;
    w.dir(out)?;
    let ca_dir = out.join(files::CA_DIR);
    w.dir(&ca_dir)?;
    w.public(&ca_dir.join(files::CA_CERT), ca.cert_pem())?;
    w.secret(&ca_dir.join(files::CA_KEY), &ca.key_pem())?;
    w.public(
        &ca_dir.join(files::DEPLOYMENT_JSON),
        &(serde_json::to_string_pretty(&DeploymentInfo {
            hosts: opts.hosts.clone(),
            port: opts.port,
        })? + "\n"),
    )?;
    write_coordinator(
        &mut w,
        out,
        &CoordinatorFiles {
            ca_pem: ca.cert_pem(),
            cert: &coordinator,
            allow_list: &greyfed_coordinator::auth::AllowList::default().to_text(),
            hosts: &opts.hosts,
            port: opts.port,
            participants: opts.participants,
            key_fingerprint: None,
            command: "ca",
        },
    )?;
    w.public(
        &out.join(files::README),
        &format!(
            "greyfed deployment CA (coordinator at {}), for certificate requests.\n\n\
             ca/            keep on the operator's machine, offline: the CA key signs every\n               \
             credential. Sign participants' requests with `greyfed keygen sign`.\n\
             coordinator/   copy to the coordinator machine; add each participant's\n               \
             allow-list line to its allow-list.txt.\n\n\
             There are no participant keys and no image key here: each participant makes its\n\
             own key (`greyfed keygen request`) and one participant seals the image key to\n\
             the others (`greyfed keygen seal-image-key`). See docs/deploy.md, \"Key custody\".\n",
            host_port(&opts.hosts[0], opts.port)
        ),
    )?;
    Ok(CaOutput { written: w.written })
}

/// Where a participant's settings point.
struct Machine<'a> {
    /// `HOST:PORT` of the coordinator.
    target: &'a str,
    /// The name its certificate must carry.
    server_name: &'a str,
    /// `--shard I/N`.
    shard: &'a str,
}

/// `OUT/IDENTITY/`: a participant machine's directory.
fn write_participant(
    w: &mut Writer,
    out: &Path,
    identity: &str,
    cert: &IssuedCert,
    ca_pem: &str,
    image_key: &ImageKey,
    m: &Machine<'_>,
) -> Result<()> {
    let dir = out.join(identity);
    w.dir(&dir)?;
    w.public(&dir.join(files::CA_CERT), ca_pem)?;
    w.public(&dir.join(files::PARTICIPANT_CERT), &cert.cert_pem)?;
    w.secret(&dir.join(files::PARTICIPANT_KEY), &cert.key_pem)?;
    w.image_key(&dir.join(files::IMAGE_KEY), image_key)?;
    write_participant_settings(w, &dir, identity, m)
}

/// `participant.toml` and `run.sh` of a participant's directory `dir`.
fn write_participant_settings(
    w: &mut Writer,
    dir: &Path,
    identity: &str,
    m: &Machine<'_>,
) -> Result<()> {
    let (target, server_name, shard) = (m.target, m.server_name, m.shard);
    w.public(
        &dir.join(files::PARTICIPANT_TOML),
        &format!(
            "# greyfed participant {identity}: this machine's settings, written by\n\
             # `greyfed keygen`. Keys are the flags of `greyfed participant` (run.sh\n\
             # reads this file with --config). Paths are relative to this directory.\n\
             # For this machine's own images add data = \"/path/to/images\" (an image\n\
             # folder, CSV manifest, .npz file or IDX directory) and set shard = \"0/1\"\n\
             # (the shard below splits one shared demo dataset among the machines).\n\
             # The final model is kept in out/model.safetensors.\n\
             [participant]\n\
             out = \"out\"\n\
             coordinator = \"{target}\"\n\
             server-name = \"{server_name}\"\n\
             ca = \"{}\"\n\
             cert = \"{}\"\n\
             key = \"{}\"\n\
             image-key = \"{}\"\n\
             shard = \"{shard}\"\n",
            files::CA_CERT,
            files::PARTICIPANT_CERT,
            files::PARTICIPANT_KEY,
            files::IMAGE_KEY,
        ),
    )?;
    w.script(
        &dir.join(files::RUN_SH),
        &format!(
            "#!/bin/sh\n\
             # greyfed participant {identity}, written by `greyfed keygen`: the settings\n\
             # are in {toml}. Extra flags override them: ./run.sh --data /srv/greyfed/data\n\
             # --shard {shard} picks this machine's part of one data set shared by all\n\
             # (demos); with data of its own use --shard 0/1.\n\
             set -eu\n\
             cd \"$(dirname \"$0\")\"\n\
             exec \"${{GREYFED:-greyfed}}\" participant --config {toml} \"$@\"\n",
            toml = files::PARTICIPANT_TOML,
        ),
    )
}

/// `OUT/ca/deployment.json`: the coordinator's names and port, so that
/// `keygen participant` can write settings that reach it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct DeploymentInfo {
    hosts: Vec<String>,
    port: u16,
}

/// Writes `participant.toml` and `run.sh` (with `--shard 0/1`) for
/// `identity` into `dir` when `ca_dir` holds the `deployment.json` that
/// `keygen deployment` and `keygen ca` write; returns the files written
/// (none without `deployment.json`). For `keygen sign`, whose output goes
/// back to a participant that made its own key.
///
/// # Errors
/// An unreadable `deployment.json`, an existing file, I/O failures.
pub(crate) fn participant_settings_from_ca_dir(
    ca_dir: &Path,
    dir: &Path,
    identity: &str,
) -> Result<Vec<PathBuf>> {
    let path = ca_dir.join(files::DEPLOYMENT_JSON);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let info: DeploymentInfo =
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let first = info
        .hosts
        .first()
        .context("deployment.json names no coordinator host")?;
    check_host(first)?;
    let mut w = Writer::default();
    write_participant_settings(
        &mut w,
        dir,
        identity,
        &Machine {
            target: &host_port(first, info.port),
            server_name: first,
            shard: "0/1",
        },
    )?;
    Ok(w.written)
}

/// What `greyfed keygen participant` writes: one more participant for an
/// existing bundle (a new member, or a new certificate for a revoked one).
#[derive(Clone, Debug)]
pub struct ParticipantOptions {
    /// The bundle `keygen deployment` wrote (its `ca/` is read).
    pub bundle: PathBuf,
    /// The new certificate's identity; `BUNDLE/IDENTITY` must not exist.
    pub identity: String,
    /// Days the certificate stays valid.
    pub valid_days: u32,
}

/// What [`participant`] wrote.
#[derive(Debug)]
pub struct ParticipantOutput {
    /// Every file written, in order.
    pub written: Vec<PathBuf>,
    /// The allow-list line that admits the new certificate.
    pub allow_line: String,
}

/// Issues a certificate from the bundle's CA and writes the participant's
/// directory `BUNDLE/IDENTITY/` (settings for `--shard 0/1`). The
/// coordinator admits it once [`ParticipantOutput::allow_line`] is in its
/// allow list and the list is reloaded.
///
/// # Errors
/// A bundle without its `ca/` files, a bad identity, an existing directory,
/// I/O failures.
pub fn participant(opts: &ParticipantOptions) -> Result<ParticipantOutput> {
    pki::validate_identity(&opts.identity)?;
    if opts.valid_days == 0 {
        bail!("--valid-days must be at least 1");
    }
    let ca_dir = opts.bundle.join(files::CA_DIR);
    let dir = opts.bundle.join(&opts.identity);
    if dir.exists() {
        bail!(
            "{} exists; refusing to overwrite (move it away to re-issue)",
            dir.display()
        );
    }
    let read = |name: &str| {
        let path = ca_dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let info: DeploymentInfo = serde_json::from_str(&read(files::DEPLOYMENT_JSON)?)
        .with_context(|| format!("{}", ca_dir.join(files::DEPLOYMENT_JSON).display()))?;
    let first = info
        .hosts
        .first()
        .context("deployment.json names no coordinator host")?;
    check_host(first)?;
    let ca_cert = read(files::CA_CERT)?;
    let ca_key = read_secret(&ca_dir.join(files::CA_KEY))?;
    let ca_key = String::from_utf8(ca_key).context("the CA key file is not PEM text")?;
    let ca = CertificateAuthority::from_pem(&ca_cert, &ca_key)?;
    let image_key = ImageKey::read_file(ca_dir.join(files::IMAGE_KEY))?;
    let cert = ca.issue_client(&opts.identity, Validity::days_from_now(opts.valid_days))?;
    let mut w = Writer::default();
    write_participant(
        &mut w,
        &opts.bundle,
        &opts.identity,
        &cert,
        &ca_cert,
        &image_key,
        &Machine {
            target: &host_port(first, info.port),
            server_name: first,
            shard: "0/1",
        },
    )?;
    Ok(ParticipantOutput {
        written: w.written,
        allow_line: format!("{} {}", opts.identity, cert.fingerprint),
    })
}

/// Creates files and directories with their final permissions, recording
/// what it wrote.
#[derive(Default)]
struct Writer {
    written: Vec<PathBuf>,
}

impl Writer {
    /// A directory only its owner can enter (it may exist if empty).
    fn dir(&mut self, path: &Path) -> Result<()> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder
            .create(path)
            .with_context(|| format!("creating {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("restricting {}", path.display()))?;
        }
        Ok(())
    }

    fn public(&mut self, path: &Path, contents: &str) -> Result<()> {
        self.file(path, contents.as_bytes(), 0o644)
    }

    fn secret(&mut self, path: &Path, contents: &str) -> Result<()> {
        self.file(path, contents.as_bytes(), 0o600)
    }

    fn script(&mut self, path: &Path, contents: &str) -> Result<()> {
        self.file(path, contents.as_bytes(), 0o700)
    }

    fn image_key(&mut self, path: &Path, key: &ImageKey) -> Result<()> {
        key.write_file(path)?;
        self.written.push(path.to_path_buf());
        Ok(())
    }

    fn file(&mut self, path: &Path, contents: &[u8], mode: u32) -> Result<()> {
        write_new_file(path, contents, mode)?;
        self.written.push(path.to_path_buf());
        Ok(())
    }
}

/// Reads a private key file, refusing one that group or others may read
/// (`greyfed keygen deployment` writes them 0600). Errors name the file,
/// never its contents.
///
/// # Errors
/// The file cannot be read, or its permissions let group or others read it.
pub fn read_secret(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    // One open file for the check and the read: the permissions checked are
    // those of the file read, whatever happens to the path in between.
    let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "{}: permissions {mode:04o} let group or others read this private key; \
                 restrict them with `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
    }
    if meta.len() > MAX_SECRET_FILE_BYTES {
        bail!(
            "{}: {} bytes is too large for a private key file (at most {MAX_SECRET_FILE_BYTES})",
            path.display(),
            meta.len()
        );
    }
    let mut contents = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut contents)
        .with_context(|| format!("reading {}", path.display()))?;
    if contents.len() as u64 > MAX_SECRET_FILE_BYTES {
        bail!("{}: the file grew while it was read", path.display());
    }
    Ok(contents)
}

/// Largest private key file [`read_secret`] reads (a PEM key is a few KiB).
pub const MAX_SECRET_FILE_BYTES: u64 = 1 << 20;

/// Creates `path` (failing if it exists) with permissions `mode` (on unix;
/// set at creation, so a secret is never readable by others, and again
/// afterwards so the umask cannot change them) and writes `contents`.
pub fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode & 0o700);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the permissions of {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    file.write_all(contents)
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(out: PathBuf) -> DeploymentOptions {
        DeploymentOptions {
            out,
            participants: 2,
            hosts: vec!["coord.example.org".into(), "10.0.0.5".into()],
            port: 7447,
            valid_days: 30,
        }
    }

    #[test]
    fn bad_options_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("bundle");
        for change in [
            |o: &mut DeploymentOptions| o.participants = 0,
            |o: &mut DeploymentOptions| o.hosts.clear(),
            |o: &mut DeploymentOptions| o.hosts = vec!["a b".into()],
            |o: &mut DeploymentOptions| o.hosts = vec!["x'; rm -rf /".into()],
            |o: &mut DeploymentOptions| o.valid_days = 0,
        ] {
            let mut o = opts(out.clone());
            change(&mut o);
            assert!(deployment(&o).is_err(), "{o:?}");
            assert!(!out.exists());
        }
    }

    #[test]
    fn configurations_name_the_first_host_and_ipv6_is_bracketed() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path().join("b"));
        o.hosts = vec!["::1".into()];
        o.participants = 1;
        deployment(&o).unwrap();
        let settings =
            std::fs::read_to_string(dir.path().join("b/participant-0/participant.toml")).unwrap();
        assert!(
            settings.contains("coordinator = \"[::1]:7447\""),
            "{settings}"
        );
        let toml =
            std::fs::read_to_string(dir.path().join("b/coordinator/coordinator.toml")).unwrap();
        assert!(toml.contains("listen = \"[::]:7447\""), "{toml}");
        // Refuses to write into a non-empty directory.
        let err = deployment(&o).unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_private_key_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_new_file(&path, b"PEM-CONTENTS", 0o600).unwrap();
        assert_eq!(read_secret(&path).unwrap(), b"PEM-CONTENTS");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600") && err.contains("0644"), "{err}");
        assert!(!err.contains("PEM-CONTENTS"), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = read_secret(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.pem"), "{err}");
        // Not a regular file, and too large: refused by name.
        let err = format!("{:#}", read_secret(dir.path()).unwrap_err());
        assert!(
            err.contains("not a regular file") || err.contains("Is a directory"),
            "{err}"
        );
        let big = dir.path().join("big.pem");
        write_new_file(&big, &vec![b'A'; MAX_SECRET_FILE_BYTES as usize + 1], 0o600).unwrap();
        let err = read_secret(&big).unwrap_err().to_string();
        assert!(err.contains("too large"), "{err}");
    }
}
