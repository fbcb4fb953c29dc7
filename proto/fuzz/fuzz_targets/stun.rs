//! STUN Binding (`proto::stun`), as the relay's responder and a node's
//! client parse whatever arrives on their UDP sockets.
//!
//! Fails when parsing panics, or when
//! - a WireGuard datagram (type 1..=4, then three zero bytes) is taken for
//!   STUN;
//! - the answer to a request that parsed does not carry the address it
//!   was built for back to the client that asked.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use meshd_proto::stun::{self, TransactionId};

fuzz_target!(|data: &[u8]| {
    let mut txid = [0u8; 12];
    let n = data.len().min(12);
    txid[..n].copy_from_slice(&data[..n]);
    let txid = TransactionId(txid);
    let _ = stun::parse_binding_response(data, txid);
    if let [1..=4, 0, 0, 0, ..] = data {
        assert!(!stun::is_stun(data), "a WireGuard datagram taken for STUN");
    }
    if let Ok(asked) = stun::parse_binding_request(data) {
        let ip: IpAddr = if data.len() % 2 == 0 {
            [data[0], data[1], data[2], data[3]].into()
        } else {
            let mut v6 = [0u8; 16];
            v6.copy_from_slice(&data[..16]);
            v6.into()
        };
        let observed = SocketAddr::new(ip, u16::from_be_bytes([data[4], data[5]]));
        let mut answer = Vec::new();
        stun::write_binding_response(asked, observed, &mut answer);
        assert_eq!(stun::parse_binding_response(&answer, asked), Ok(observed));
    }
});
