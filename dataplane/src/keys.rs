//! WireGuard keys: Curve25519 private and public keys and preshared keys.
//!
//! The text form is the one `wg genkey`, `wg pubkey` and `wg genpsk` use: 32
//! bytes in standard base64 with padding, 44 characters. Secrets never print
//! themselves: their `Debug` shows only the type name and they have no
//! `Display`; their bytes are zeroed when they are dropped.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand_core::{OsRng, RngCore};
use zeroize::{Zeroize, Zeroizing};

/// Length in bytes of every WireGuard key.
pub const KEY_LEN: usize = 32;

/// Length of a key in base64 (32 bytes → 43 characters plus one `=`).
const BASE64_LEN: usize = 44;

/// A key file is one line of base64; anything much longer is not a key file.
const MAX_KEY_FILE_LEN: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("invalid key: expected 44 characters of standard base64 encoding 32 bytes (the format of `wg genkey`)")]
    Malformed,
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: private key file is accessible by group or others (mode {mode:03o}); run `chmod 600 {}`", path.display(), path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{}: not a private key file: expected one line of 44 characters of base64, as written by `wg genkey`", path.display())]
    MalformedFile { path: PathBuf },
}

fn decode(s: &str) -> Result<[u8; KEY_LEN], KeyError> {
    if s.len() != BASE64_LEN {
        return Err(KeyError::Malformed);
    }
    let mut out = [0u8; KEY_LEN];
    // The STANDARD engine rejects non-canonical trailing bits, as `wg` does,
    // so every accepted string formats back to itself.
    match STANDARD.decode_slice(s, &mut out) {
        Ok(KEY_LEN) => Ok(out),
        _ => {
            out.zeroize();
            Err(KeyError::Malformed)
        }
    }
}

fn encode(bytes: &[u8; KEY_LEN]) -> Zeroizing<String> {
    Zeroizing::new(STANDARD.encode(bytes))
}

/// A Curve25519 private key. Compare with [`PrivateKey::public_key`] rather
/// than with the secret itself.
pub struct PrivateKey([u8; KEY_LEN]);

impl PrivateKey {
    /// A new key from the operating system's RNG, clamped exactly as
    /// `wg genkey` clamps it so both tools produce keys of the same form.
    pub fn generate() -> Self {
        let secret = x25519_dalek::StaticSecret::random_from_rng(OsRng);
        let mut bytes = secret.to_bytes();
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        PrivateKey(bytes)
    }

    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        PrivateKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.to_static_secret()).to_bytes())
    }

    /// The key in the form the Noise implementation takes.
    pub fn to_static_secret(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(self.0)
    }

    /// The `wg genkey` text form, without a newline.
    pub fn to_base64(&self) -> Zeroizing<String> {
        encode(&self.0)
    }
}

impl FromStr for PrivateKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode(s).map(PrivateKey)
    }
}

impl Clone for PrivateKey {
    fn clone(&self) -> Self {
        PrivateKey(self.0)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(..)")
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// A Curve25519 public key; it identifies a peer. `Display` and `Debug` print
/// the base64 form, as `wg show` does.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        PublicKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub fn to_x25519(&self) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(self.0)
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode(s).map(PublicKey)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A symmetric key mixed into the handshake (`wg genpsk`).
///
/// Equality is not constant-time: it exists to compare configurations, which
/// is not an operation an attacker can time.
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey([u8; KEY_LEN]);

impl PresharedKey {
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        OsRng.fill_bytes(&mut bytes);
        PresharedKey(bytes)
    }

    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        PresharedKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub fn to_base64(&self) -> Zeroizing<String> {
        encode(&self.0)
    }
}

impl FromStr for PresharedKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode(s).map(PresharedKey)
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(..)")
    }
}

impl Drop for PresharedKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Writes `key` to `path` in `wg genkey` form with mode 0600.
///
/// The key goes to a temporary file in the same directory, created with mode
/// 0600 from the start (so the key is never readable by others, even briefly),
/// which then replaces `path` with a rename: a reader sees the old file or the
/// new one, never a partial key.
pub fn save_private_key(path: &Path, key: &PrivateKey) -> Result<(), KeyError> {
    let io_err = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path.file_name().ok_or_else(|| {
        io_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file path",
        ))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{:016x}.tmp", OsRng.next_u64()));
    let tmp = path.with_file_name(tmp_name);

    let write = || -> io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut text = key.to_base64();
        text.push('\n');
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        // Best effort: the temporary file may not exist if creating it failed.
        let _ = fs::remove_file(&tmp);
        io_err(e)
    })
}

/// Reads a private key written by [`save_private_key`] or `wg genkey > file`.
/// Refuses a file that group or others can access, like ssh does.
pub fn load_private_key(path: &Path) -> Result<PrivateKey, KeyError> {
    let io_err = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::open(path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let malformed = || KeyError::MalformedFile {
        path: path.to_path_buf(),
    };
    if !meta.is_file() || meta.len() > MAX_KEY_FILE_LEN {
        return Err(malformed());
    }
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(MAX_KEY_FILE_LEN)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| malformed())?;
    text.trim().parse().map_err(|_| malformed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// Runs a `wg` subcommand. A missing `wg` fails the test: these tests are
    /// the only proof of compatibility and must not pass vacuously.
    fn wg(args: &[&str], stdin: &str) -> String {
        let mut child = Command::new("wg")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the `wg` tool (wireguard-tools) must be installed for these tests");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "wg {args:?} failed");
        String::from_utf8(out.stdout)
            .unwrap()
            .trim_end()
            .to_string()
    }

    #[test]
    fn our_public_key_of_wg_genkey_matches_wg_pubkey() {
        for _ in 0..8 {
            let private = wg(&["genkey"], "");
            let ours: PrivateKey = private.parse().unwrap();
            assert_eq!(*ours.to_base64(), private);
            assert_eq!(ours.public_key().to_string(), wg(&["pubkey"], &private));
        }
    }

    #[test]
    fn wg_pubkey_accepts_our_generated_keys() {
        for _ in 0..8 {
            let ours = PrivateKey::generate();
            let theirs = wg(&["pubkey"], &format!("{}\n", *ours.to_base64()));
            assert_eq!(theirs, ours.public_key().to_string());
        }
    }

    #[test]
    fn wg_genpsk_round_trips() {
        let psk = wg(&["genpsk"], "");
        let ours: PresharedKey = psk.parse().unwrap();
        assert_eq!(*ours.to_base64(), psk);
    }

    #[test]
    fn generated_keys_are_clamped_like_wg_genkey() {
        for _ in 0..64 {
            let key = PrivateKey::generate();
            let b = key.as_bytes();
            assert_eq!(b[0] & 7, 0);
            assert_eq!(b[31] & 0xc0, 0x40);
        }
    }

    #[test]
    fn known_vector() {
        // RFC 7748 section 6.1, Alice's key pair.
        let private = PrivateKey::from_bytes([
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2,
            0x66, 0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5,
            0x1d, 0xb9, 0x2c, 0x2a,
        ]);
        let public = PublicKey::from_bytes([
            0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e,
            0xf7, 0x5a, 0x0d, 0xbf, 0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e,
            0xaa, 0x9b, 0x4e, 0x6a,
        ]);
        assert_eq!(private.public_key(), public);
    }

    #[test]
    fn text_round_trips() {
        let private = PrivateKey::generate();
        let parsed: PrivateKey = private.to_base64().parse().unwrap();
        assert_eq!(parsed.as_bytes(), private.as_bytes());

        let public = private.public_key();
        assert_eq!(public.to_string().len(), 44);
        assert_eq!(public.to_string().parse::<PublicKey>().unwrap(), public);

        let psk = PresharedKey::generate();
        assert_eq!(psk.to_base64().parse::<PresharedKey>().unwrap(), psk);
    }

    #[test]
    fn malformed_text_is_rejected() {
        let good = "UTBee3zIHXsCnY8ifQNbnIUQVqsDpholTCNziwg4hAk=";
        assert!(good.parse::<PublicKey>().is_ok());
        for bad in [
            "",
            "UTBee3zIHXsCnY8ifQNbnIUQVqsDpholTCNziwg4hAk", // no padding
            "UTBee3zIHXsCnY8ifQNbnIUQVqsDpholTCNziwg4hAk==", // too long
            " UTBee3zIHXsCnY8ifQNbnIUQVqsDpholTCNziwg4hAk=", // whitespace
            "UTBee3zIHXsCnY8ifQNbnIUQVqsDpholTCNziwg4hAl=", // non-canonical last bits
            "UTBee3zIHXsCnY8ifQNbnIUQVqsDpholTCNziwg4hA==", // 31 bytes
            "UTBee3zIHXsCnY8ifQNbnIUQVqsDpholTCNziwg4h-k=", // URL-safe alphabet
            "UTBee3zIHXsCnY8ifQNbnIUQVqsDpholTCNziwg4héA=", // non-ASCII
        ] {
            assert!(
                matches!(bad.parse::<PublicKey>(), Err(KeyError::Malformed)),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let private = PrivateKey::generate();
        assert_eq!(format!("{private:?}"), "PrivateKey(..)");
        assert_eq!(
            format!("{:?}", PresharedKey::generate()),
            "PresharedKey(..)"
        );
        let public = private.public_key();
        assert_eq!(format!("{public:?}"), format!("PublicKey({public})"));
    }

    #[test]
    fn save_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        let key = PrivateKey::generate();
        save_private_key(&path, &key).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{}\n", *key.to_base64())
        );
        assert_eq!(load_private_key(&path).unwrap().as_bytes(), key.as_bytes());

        // Overwriting replaces the key and leaves no temporary file behind.
        let other = PrivateKey::generate();
        save_private_key(&path, &other).unwrap();
        assert_eq!(
            load_private_key(&path).unwrap().as_bytes(),
            other.as_bytes()
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn load_accepts_wg_genkey_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wg.key");
        let text = wg(&["genkey"], "");
        write_with_mode(&path, &format!("{text}\n"), 0o600);
        assert_eq!(*load_private_key(&path).unwrap().to_base64(), text);
    }

    fn write_with_mode(path: &Path, contents: &str, mode: u32) {
        fs::write(path, contents).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn load_refuses_open_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let text = PrivateKey::generate().to_base64();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
            write_with_mode(&path, &text, mode);
            let err = load_private_key(&path).unwrap_err();
            assert!(
                matches!(err, KeyError::Permissions { mode: m, .. } if m == mode),
                "{mode:o}: {err}"
            );
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        write_with_mode(&path, &text, 0o400);
        assert!(load_private_key(&path).is_ok());
    }

    #[test]
    fn load_refuses_malformed_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let long = "A".repeat(5000);
        for contents in ["", "\n", "not a key\n", "QUFB\n", &long] {
            write_with_mode(&path, contents, 0o600);
            let err = load_private_key(&path).unwrap_err();
            assert!(matches!(err, KeyError::MalformedFile { .. }), "{err}");
            assert!(err.to_string().contains("not a private key file"), "{err}");
        }
        let missing = load_private_key(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(missing, KeyError::Io { .. }), "{missing}");
    }
}
