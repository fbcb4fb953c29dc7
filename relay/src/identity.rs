//! The relay's identity in its state directory: a self-signed TLS
//! certificate (nodes accept it by its SHA-256 pin) and the static X25519
//! key that clients prove their keys against. Created on first start; the
//! keys are written 0600 and never logged.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshd_proto::relay::{ALPN, SERVER_NAME};
use meshd_proto::token::{cert_pin, Hex};
use rand::RngCore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x25519_dalek::StaticSecret;

pub const CERT_FILE: &str = "relay-cert.der";
pub const KEY_FILE: &str = "relay-key.der";
pub const STATIC_FILE: &str = "relay-x25519.key";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("relay state {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the relay's certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("{}: not 32 bytes of X25519 private key; restore it from a backup or remove it to make a new one (nodes then need the relay's new key)", path.display())]
    Malformed { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// `Debug` shows the pin only.
pub(crate) struct Identity {
    pub cert_der: Vec<u8>,
    key: PrivateKeyDer<'static>,
    pub static_key: StaticSecret,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("pin", &Hex(&self.pin()).to_string())
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read(path: &Path) -> Result<Option<Vec<u8>>, IdentityError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Writes a new file readable by its owner only, synced; never replaces one.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

impl Identity {
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        let (cert_der, key_der) = match (read(&cert_path)?, read(&key_path)?) {
            (Some(c), Some(k)) => (c, k),
            (c, k) => {
                if c.is_none() && k.is_some() {
                    // A crash between the two writes below: nothing was ever
                    // pinned to the lone key, so start over.
                    fs::remove_file(&key_path).map_err(io_err(&key_path))?;
                }
                let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])?;
                let (c, k) = (ck.cert.der().to_vec(), ck.signing_key.serialize_der());
                write_private(&key_path, &k)?;
                write_private(&cert_path, &c)?;
                tracing::info!(pin = %Hex(&cert_pin(&c)), "created the relay's TLS identity");
                (c, k)
            }
        };
        let static_path = dir.join(STATIC_FILE);
        let static_key = match read(&static_path)? {
            Some(b) => {
                let bytes: [u8; 32] = b
                    .try_into()
                    .map_err(|_| IdentityError::Malformed { path: static_path })?;
                StaticSecret::from(bytes)
            }
            None => {
                let mut bytes = [0u8; 32];
                rand::rng().fill_bytes(&mut bytes);
                write_private(&static_path, &bytes)?;
                StaticSecret::from(bytes)
            }
        };
        Ok(Identity {
            cert_der,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
            static_key,
        })
    }

    pub fn pin(&self) -> [u8; 32] {
        cert_pin(&self.cert_der)
    }

    /// TLS 1.3 only, ALPN `meshd-relay/1`, no client certificates.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, IdentityError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(self.cert_der.clone())],
                self.key.clone_key(),
            )?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}
