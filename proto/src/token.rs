//! Join tokens: `meshd1_` followed by base64url (no padding) of a field
//! sequence (docs/control-protocol.md, "Join tokens").

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::codec::{DecodeError, EncodeError, Fields, Writer};
use crate::message::TokenSecret;

pub const TOKEN_PREFIX: &str = "meshd1_";
/// Longest coordinator address (`host:port`), in bytes.
pub const MAX_ADDRESS_LEN: usize = 255;
/// Most coordinator addresses in one token.
pub const MAX_ADDRESSES: usize = 16;
/// The tag of the checksum field, last in a token. At or above the tags
/// parsers skip, so older meshd still read newer tokens.
const CHECKSUM_TAG: u8 = 128;
const CHECKSUM_LEN: usize = 4;

/// What a node needs to join: where the coordinator is, how to recognise it,
/// and the secret that admits it. `Debug` hides the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub secret: TokenSecret,
    /// SHA-256 of the coordinator's TLS certificate (DER).
    pub cert_pin: [u8; 32],
    /// `host:port` of every coordinator replica, tried in order.
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a meshd join token: it must start with `{TOKEN_PREFIX}`")]
    Prefix,
    #[error("join token is damaged: not valid base64url after `{TOKEN_PREFIX}`")]
    Base64,
    #[error("join token is damaged: {0}")]
    Decode(#[from] DecodeError),
    #[error("join token is damaged (its checksum does not match): copy it again, whole")]
    Checksum,
    #[error("join token names no coordinator address")]
    NoAddress,
    #[error("join token cannot be encoded: {0}")]
    Encode(#[from] EncodeError),
}

impl JoinToken {
    /// The token text. It contains the secret: show it to the operator once,
    /// never log it.
    pub fn encode(&self) -> Result<String, TokenError> {
        if self.addresses.is_empty() {
            return Err(TokenError::NoAddress);
        }
        let mut buf = Vec::new();
        let w = &mut Writer {
            buf: &mut buf,
            ctx: "JoinToken",
        };
        w.bytes(1, &self.secret.0)?;
        w.bytes(2, &self.cert_pin)?;
        w.strs(3, &self.addresses, MAX_ADDRESS_LEN, MAX_ADDRESSES)?;
        let sum = checksum(w.buf);
        w.bytes(CHECKSUM_TAG, &sum)?;
        Ok(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(&buf)))
    }

    /// Parses a token; surrounding whitespace (a pasted newline) is ignored.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let body = text
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::Prefix)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Base64)?;
        // A token whose last field has a tag of 128 or more ends in a
        // checksum, which must match. Tokens from before checksums end in an
        // address (tag 3, and text that is ASCII), so they are taken as
        // they are.
        let field = 3 + CHECKSUM_LEN;
        if let Some(start) = bytes.len().checked_sub(field) {
            let (body, tail) = bytes.split_at(start);
            if tail[0] >= CHECKSUM_TAG
                && (tail[..3] != [CHECKSUM_TAG, 0, CHECKSUM_LEN as u8]
                    || tail[3..] != checksum(body))
            {
                return Err(TokenError::Checksum);
            }
        }
        let mut f = Fields::new(&bytes, "JoinToken");
        let (mut secret, mut pin) = (None, None);
        let mut addresses = Vec::new();
        while let Some((tag, v)) = f.next_field()? {
            match tag {
                1 => f.set(&mut secret, tag, TokenSecret(f.array(tag, v, "32")?))?,
                2 => f.set(&mut pin, tag, f.array(tag, v, "32")?)?,
                3 => f.push(
                    &mut addresses,
                    MAX_ADDRESSES,
                    tag,
                    f.str(tag, v, MAX_ADDRESS_LEN)?,
                )?,
                t => f.unknown(t)?,
            }
        }
        if addresses.is_empty() {
            return Err(TokenError::NoAddress);
        }
        Ok(JoinToken {
            secret: f.need(secret, 1)?,
            cert_pin: f.need(pin, 2)?,
            addresses,
        })
    }
}

/// The first bytes of SHA-256 over a token's other fields: a typo in a
/// pasted token is reported as damage, not as a token for another mesh.
fn checksum(fields: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut h = Sha256::new();
    h.update(b"meshd join token checksum");
    h.update(fields);
    let digest: [u8; 32] = h.finalize().into();
    let mut out = [0; CHECKSUM_LEN];
    out.copy_from_slice(&digest[..CHECKSUM_LEN]);
    out
}

/// What the coordinator stores and looks tokens up by instead of the secret.
/// The secret is 32 random bytes, so a plain hash cannot be reversed and a
/// lookup by hash leaks nothing worth timing.
pub fn secret_hash(secret: &TokenSecret) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"meshd join token v1");
    h.update(secret.0);
    h.finalize().into()
}

/// SHA-256 of a DER certificate: the pin a token carries.
pub fn cert_pin(cert_der: &[u8]) -> [u8; 32] {
    Sha256::digest(cert_der).into()
}

/// Lower-case hex, for showing hashes and pins.
pub struct Hex<'a>(pub &'a [u8]);

impl Hex<'_> {
    /// 64 hex digits (either case) back into 32 bytes, as pins are stored.
    pub fn parse32(s: &str) -> Option<[u8; 32]> {
        let s = s.as_bytes();
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (b, pair) in out.iter_mut().zip(s.chunks(2)) {
            *b = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(out)
    }
}

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}
