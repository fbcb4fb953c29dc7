//! Disco packets (`proto::disco`): arbitrary bytes as a whole packet, as a
//! plaintext, and as the box of a packet from a known peer (so the fuzzer
//! gets past the header checks), and sealed messages with a byte changed.
//!
//! Fails when anything panics, or when
//! - a plaintext that decodes does not encode back to the same bytes (the
//!   encoding is canonical), or a decoded message does not seal and open;
//! - a packet opens after a byte of it was changed;
//! - an accepted packet is longer than `MAX_PACKET_LEN`, or `is_disco`
//!   says no to a packet that opened.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd_proto::disco::{self, DiscoKeys, MAGIC, MAX_PACKET_LEN, NONCE_LEN, VERSION};
use meshd_proto::NodeKey;
use x25519_dalek::{PublicKey, StaticSecret};

fn keys() -> (DiscoKeys, DiscoKeys, NodeKey) {
    let (a, b) = (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]));
    let (ka, kb) = (
        NodeKey(PublicKey::from(&a).to_bytes()),
        NodeKey(PublicKey::from(&b).to_bytes()),
    );
    let sender = DiscoKeys::new(&a, kb).expect("a valid key");
    let receiver = DiscoKeys::new(&b, ka).expect("a valid key");
    (sender, receiver, ka)
}

fuzz_target!(|data: &[u8]| {
    let (sender, receiver, sender_key) = keys();

    // The bytes as a packet off the socket.
    let _ = disco::sender(data);
    if let Ok(msg) = receiver.open(data) {
        assert!(disco::is_disco(data) && data.len() <= MAX_PACKET_LEN, "{msg:?}");
    }

    // The bytes as a plaintext: canonical, and sealable.
    if let Ok(msg) = disco::decode(data) {
        assert_eq!(disco::encode(&msg).as_deref(), Ok(data), "{msg:?}");
        let packet = sender.seal(&msg, [3; NONCE_LEN]).expect("a decoded message seals");
        assert!(packet.len() <= MAX_PACKET_LEN);
        assert_eq!(receiver.open(&packet), Ok(msg));
        // Any one byte changed (the fuzzer picks which) and it must not open.
        if let Some((&at, &flip)) = data.first().zip(data.last()) {
            let mut bad = packet.clone();
            let i = usize::from(at) % bad.len();
            bad[i] ^= flip | 1;
            assert!(receiver.open(&bad).is_err(), "byte {i} changed and it opened");
        }
    }

    // The bytes as the box of a packet from the right sender.
    let mut packet = MAGIC.to_vec();
    packet.push(VERSION);
    packet.extend_from_slice(&sender_key.0);
    packet.extend_from_slice(data);
    let _ = receiver.open(&packet);
});
