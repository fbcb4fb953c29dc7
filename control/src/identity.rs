//! A server's identity (the coordinator's, a relay's) and its TLS
//! configuration: a self-signed certificate, or an operator's, which nodes
//! accept by its SHA-256 pin (so there is no CA and no name check), and the
//! static X25519 key that proofs of key possession are made against. Created
//! on first start in the server's state directory; keys are written 0600 and
//! never logged.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::RngCore;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x25519_dalek::StaticSecret;

use meshd_proto::token::{cert_pin, Hex};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("{}: not a key of the expected form ({what})", path.display())]
    Malformed { path: PathBuf, what: &'static str },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{}: {what}", path.display())]
    Pem { path: PathBuf, what: String },
}

/// Where a server keeps its identity, and what it calls itself.
#[derive(Debug, Clone, Copy)]
pub struct IdentityFiles {
    pub cert: &'static str,
    pub key: &'static str,
    pub static_key: &'static str,
    /// The name in the self-signed certificate (nodes check only the pin).
    pub server_name: &'static str,
    /// TLS ALPN protocol id.
    pub alpn: &'static [u8],
    /// For logs: "coordinator", "relay".
    pub role: &'static str,
}

/// What identifies a server: its TLS certificate and key, and the X25519
/// key the proofs of key possession are made against. `Debug` hides the keys.
pub struct Identity {
    /// The certificate the server presents (its SHA-256 is the pin).
    pub cert_der: Vec<u8>,
    /// Intermediate certificates sent after it (an operator's certificate
    /// chain); empty for the self-signed one.
    chain: Vec<Vec<u8>>,
    key: PrivateKeyDer<'static>,
    pub static_key: StaticSecret,
    alpn: &'static [u8],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("pin", &Hex(&self.pin()).to_string())
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Option<Vec<u8>>, IdentityError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IdentityError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes a new file readable by its owner only, and syncs it; never
/// replaces one.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    write_private(path, bytes).map_err(|source| IdentityError::Io {
        path: path.to_owned(),
        source,
    })
}

impl Identity {
    /// Loads the identity from `dir`, creating it on first start.
    pub fn load_or_create(dir: &Path, files: &IdentityFiles) -> Result<Self, IdentityError> {
        create_dir(dir)?;
        let (cert_path, key_path) = (dir.join(files.cert), dir.join(files.key));
        let (cert_der, key_der) = match (read(&cert_path)?, read(&key_path)?) {
            (Some(c), Some(k)) => (c, k),
            (c, k) => {
                if c.is_none() && k.is_some() {
                    // A crash between the two writes below: the key alone is
                    // useless (nothing was ever pinned to it), start over.
                    fs::remove_file(&key_path).map_err(|source| IdentityError::Io {
                        path: key_path.clone(),
                        source,
                    })?;
                }
                let ck = rcgen::generate_simple_self_signed(vec![files.server_name.to_owned()])?;
                let (c, k) = (ck.cert.der().to_vec(), ck.signing_key.serialize_der());
                // Key first: a crash in between leaves no certificate without its key.
                write_new(&key_path, &k)?;
                write_new(&cert_path, &c)?;
                tracing::info!(pin = %Hex(&cert_pin(&c)), role = files.role, "created the TLS identity");
                (c, k)
            }
        };
        Ok(Identity {
            cert_der,
            chain: Vec::new(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
            static_key: load_static_key(dir, files)?,
            alpn: files.alpn,
        })
    }

    /// An operator-supplied certificate (PEM, the server's certificate first,
    /// then any intermediates) and its private key (PEM: PKCS#8, SEC1 or
    /// PKCS#1) instead of the self-signed one. The pin is then that
    /// certificate's. The X25519 key for proofs still lives in `dir`. The key
    /// must belong to the certificate, which is checked here.
    pub fn with_certificate(
        dir: &Path,
        files: &IdentityFiles,
        cert_pem: &Path,
        key_pem: &Path,
    ) -> Result<Self, IdentityError> {
        let pem_error = |path: &Path, e: rustls::pki_types::pem::Error| IdentityError::Pem {
            path: path.to_owned(),
            what: match e {
                rustls::pki_types::pem::Error::Io(e) => e.to_string(),
                other => format!("not valid PEM ({other:?})"),
            },
        };
        let mut certs = Vec::new();
        for c in CertificateDer::pem_file_iter(cert_pem).map_err(|e| pem_error(cert_pem, e))? {
            certs.push(c.map_err(|e| pem_error(cert_pem, e))?.to_vec());
        }
        if certs.is_empty() {
            return Err(IdentityError::Pem {
                path: cert_pem.to_owned(),
                what: "contains no CERTIFICATE block".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(key_pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => IdentityError::Pem {
                path: key_pem.to_owned(),
                what: "contains no PRIVATE KEY block".into(),
            },
            e => pem_error(key_pem, e),
        })?;
        create_dir(dir)?;
        let cert_der = certs.remove(0);
        let identity = Identity {
            cert_der,
            chain: certs,
            key,
            static_key: load_static_key(dir, files)?,
            alpn: files.alpn,
        };
        // Refuses a key that does not match the certificate, or a key type
        // the TLS library cannot sign with, now rather than at the first
        // connection.
        identity.server_config().map_err(|e| match e {
            IdentityError::Tls(rustls::Error::InconsistentKeys(_)) => IdentityError::Pem {
                path: key_pem.to_owned(),
                what: format!("is not the private key of {}", cert_pem.display()),
            },
            e => e,
        })?;
        tracing::info!(pin = %Hex(&identity.pin()), certificate = %cert_pem.display(), "using the operator's certificate");
        Ok(identity)
    }

    /// The SHA-256 pin nodes accept it by.
    pub fn pin(&self) -> [u8; 32] {
        cert_pin(&self.cert_der)
    }

    /// TLS 1.3 only, the server's ALPN, no client certificates.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, IdentityError> {
        let chain = std::iter::once(&self.cert_der)
            .chain(&self.chain)
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(chain, self.key.clone_key())?;
        config.alpn_protocols = vec![self.alpn.to_vec()];
        Ok(config)
    }
}

/// The state directory, made private (0700) if it is new.
fn create_dir(dir: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| IdentityError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// The X25519 key for proofs, created on first start.
fn load_static_key(dir: &Path, files: &IdentityFiles) -> Result<StaticSecret, IdentityError> {
    let static_path = dir.join(files.static_key);
    match read(&static_path)? {
        Some(b) => {
            let bytes: [u8; 32] = b.try_into().map_err(|_| IdentityError::Malformed {
                path: static_path.clone(),
                what: "32 bytes of X25519 private key",
            })?;
            Ok(StaticSecret::from(bytes))
        }
        None => {
            let mut bytes = [0u8; 32];
            rand::rng().fill_bytes(&mut bytes);
            write_new(&static_path, &bytes)?;
            Ok(StaticSecret::from(bytes))
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}
