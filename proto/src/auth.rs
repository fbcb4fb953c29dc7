//! Proof of possession of a node's private key (docs/control-protocol.md,
//! "Proofs").
//!
//! A proof is an HMAC-SHA256 keyed by the X25519 shared secret of the node's
//! static key and the coordinator's static key. Only the holder of the node's
//! private key or of the coordinator's private key can compute that secret, and
//! the coordinator does not forge proofs to itself, so a valid proof shows the
//! coordinator that the sender holds the node's private key. The MAC covers a
//! fresh coordinator nonce and the TLS channel binding (no replay into another
//! session), both public keys (no reuse against another coordinator or for
//! another node) and the purpose (a login proof is not a key-rotation proof).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::message::NodeKey;

type HmacSha256 = Hmac<Sha256>;

const KEY_LABEL: &[u8] = b"meshd control v1 proof key";

/// What a proof is for; each has its own label in the MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Register,
    Login,
    RotateKey,
    /// A node or relay authenticating to a relay (docs/relay-protocol.md);
    /// `coordinator_key` is then the relay's key.
    Relay,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Register => b"meshd-control-v1 register",
            Purpose::Login => b"meshd-control-v1 login",
            Purpose::RotateKey => b"meshd-control-v1 rotate-key",
            Purpose::Relay => b"meshd-relay-v1 client-auth",
        }
    }
}

/// Everything a proof covers besides the shared secret.
#[derive(Debug, Clone, Copy)]
pub struct ProofInput<'a> {
    pub purpose: Purpose,
    /// The verifier's key: the coordinator's, or the relay's for `Relay`.
    pub coordinator_key: NodeKey,
    /// The key whose possession is proven (for `RotateKey`, the new key).
    pub node_key: NodeKey,
    /// The nonce of this session's `Challenge` (a relay's `ServerHello`).
    pub nonce: &'a [u8; 32],
    /// TLS exporter output for this connection (at most 255 bytes); both
    /// sides compute it from the same handshake, so a proof is bound to it.
    pub channel_binding: &'a [u8],
    /// `RotateKey`: the old key; otherwise empty.
    pub extra: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A low-order public key makes the shared secret a constant that anyone
    /// can compute, so a proof with it would prove nothing.
    #[error("key {0} is a low-order point and cannot be used")]
    LowOrderKey(NodeKey),
    #[error("proof of key possession does not verify")]
    BadProof,
    #[error("channel binding of {0} bytes is longer than 255")]
    BindingTooLong(usize),
}

fn shared_key(secret: &StaticSecret, public: NodeKey) -> Result<HmacSha256, AuthError> {
    let shared = secret.diffie_hellman(&PublicKey::from(public.0));
    if !shared.was_contributory() {
        return Err(AuthError::LowOrderKey(public));
    }
    let mut kdf = HmacSha256::new_from_slice(shared.as_bytes()).map_err(|_| AuthError::BadProof)?;
    kdf.update(KEY_LABEL);
    let mac_key = kdf.finalize().into_bytes();
    HmacSha256::new_from_slice(&mac_key).map_err(|_| AuthError::BadProof)
}

fn transcript(mac: &mut HmacSha256, input: &ProofInput<'_>) -> Result<(), AuthError> {
    let binding_len = u8::try_from(input.channel_binding.len())
        .map_err(|_| AuthError::BindingTooLong(input.channel_binding.len()))?;
    mac.update(input.purpose.label());
    mac.update(&[0]);
    mac.update(&input.coordinator_key.0);
    mac.update(&input.node_key.0);
    mac.update(input.nonce);
    mac.update(&[binding_len]);
    mac.update(input.channel_binding);
    mac.update(input.extra);
    Ok(())
}

/// The node's side: proves it holds `node_secret`. `input.node_key` must be
/// the public key of `node_secret`, or the coordinator will reject the proof.
pub fn prove(input: &ProofInput<'_>, node_secret: &StaticSecret) -> Result<[u8; 32], AuthError> {
    let mut mac = shared_key(node_secret, input.coordinator_key)?;
    transcript(&mut mac, input)?;
    Ok(mac.finalize().into_bytes().into())
}

/// The coordinator's side. The comparison is constant-time.
pub fn verify(
    input: &ProofInput<'_>,
    coordinator_secret: &StaticSecret,
    proof: &[u8; 32],
) -> Result<(), AuthError> {
    let mut mac = shared_key(coordinator_secret, input.node_key)?;
    transcript(&mut mac, input)?;
    mac.verify_slice(proof).map_err(|_| AuthError::BadProof)
}

/// The public key of a static secret, as a [`NodeKey`].
pub fn public_key(secret: &StaticSecret) -> NodeKey {
    NodeKey(PublicKey::from(secret).to_bytes())
}
