//! `greyfed keygen`: a private CA, the coordinator's certificate and a fresh
//! shared image key, written to a directory. Secrets are created owner-only
//! (mode 0600) from the start and existing files are never overwritten.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use greyfed_participant::cipher::ImageKey;

/// File names inside a key directory.
pub mod files {
    /// CA certificate: participants trust it (`--ca`).
    pub const CA_CERT: &str = "ca.pem";
    /// CA private key (secret): issues further certificates.
    pub const CA_KEY: &str = "ca-key.pem";
    /// Coordinator certificate (`greyfed coordinator --cert`).
    pub const COORDINATOR_CERT: &str = "coordinator-cert.pem";
    /// Coordinator private key (secret; `--key`).
    pub const COORDINATOR_KEY: &str = "coordinator-key.pem";
    /// Shared image key (secret; participants' `--key-file`; never give it to the coordinator).
    pub const IMAGE_KEY: &str = "image.key";
}

/// What [`keygen`] wrote.
#[derive(Debug)]
pub struct KeygenOutput {
    /// Paths written, in order.
    pub written: Vec<PathBuf>,
    /// Fingerprint of the new image key (safe to show; not the key).
    pub image_key_fingerprint: String,
}

/// Writes CA, coordinator certificate and key, and an image key into `dir`.
pub fn keygen(dir: &Path, hosts: &[String]) -> Result<KeygenOutput> {
    for name in [
        files::CA_CERT,
        files::CA_KEY,
        files::COORDINATOR_CERT,
        files::COORDINATOR_KEY,
        files::IMAGE_KEY,
    ] {
        if dir.join(name).exists() {
            bail!(
                "{} already exists; refusing to overwrite keys (choose another --out or remove the old files)",
                dir.join(name).display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let certs = greyfed_coordinator::tls::generate_certificates(hosts)?;
    let mut written = Vec::new();
    for (name, contents, secret) in [
        (files::CA_CERT, &certs.ca_cert_pem, false),
        (files::CA_KEY, &certs.ca_key_pem, true),
        (files::COORDINATOR_CERT, &certs.server_cert_pem, false),
        (files::COORDINATOR_KEY, &certs.server_key_pem, true),
    ] {
        let path = dir.join(name);
        write_new_file(&path, contents.as_bytes(), secret)?;
        written.push(path);
    }
    let key = ImageKey::generate();
    let key_path = dir.join(files::IMAGE_KEY);
    key.write_file(&key_path)?;
    written.push(key_path);
    Ok(KeygenOutput {
        written,
        image_key_fingerprint: key.fingerprint(),
    })
}

/// Creates `path` (failing if it exists) and writes `contents`; `secret`
/// files get mode 0600 at creation, so they are never readable by others.
pub fn write_new_file(path: &Path, contents: &[u8], secret: bool) -> Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_secrets_owner_only_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = keygen(dir.path(), &["localhost".into()]).unwrap();
        assert_eq!(out.written.len(), 5);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for name in [files::CA_KEY, files::COORDINATOR_KEY, files::IMAGE_KEY] {
                let mode = std::fs::metadata(dir.path().join(name))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{name}");
            }
        }
        ImageKey::read_file(dir.path().join(files::IMAGE_KEY)).unwrap();
        let err = keygen(dir.path(), &["localhost".into()]).unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    }
}
