//! The relay protocol's frame decoder (`proto::relay::Decoder`), as relays
//! and clients run it on every byte from the network: arbitrary bytes, fed
//! in pieces whose sizes the input chooses.
//!
//! Fails when the decoder panics, or when
//! - how the stream is cut up changes what is decoded;
//! - a decoded frame does not encode back to the bytes it came from;
//! - the decoder holds more than one maximal frame and one input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd_proto::relay::{split_frame, Decoder, HEADER_LEN, MAX_BODY};

/// Decodes `stream` fed in pieces of `sizes` (cycled); returns the frames'
/// encodings and the error, if any.
fn decode(stream: &[u8], sizes: &[u8]) -> (Vec<Vec<u8>>, Option<String>) {
    let mut d = Decoder::new();
    let mut frames = Vec::new();
    let mut rest = stream;
    let mut sizes = sizes.iter().map(|&s| usize::from(s).max(1)).cycle();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(rest.len()).min(rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        d.feed(piece);
        assert!(
            d.buffered() <= HEADER_LEN + MAX_BODY + n,
            "decoder holds too much"
        );
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    let mut bytes = Vec::new();
                    f.encode(&mut bytes).expect("a decoded frame encodes");
                    frames.push(bytes);
                }
                Ok(None) => break,
                Err(e) => return (frames, Some(e.to_string())),
            }
        }
    }
    (frames, d.finish().err().map(|e| e.to_string()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (sizes, stream) = rest.split_at(usize::from(n % 8).min(rest.len()));
    let pieces = decode(stream, sizes);
    let whole = decode(stream, &[255]);
    assert_eq!(pieces, whole, "cutting the stream changed what was decoded");
    // Each frame decoded is the bytes it came from (skipped frames aside).
    let mut at = stream;
    for f in &whole.0 {
        loop {
            let (ty, _, tail) = split_frame(at).expect("a decoded frame was whole");
            let len = at.len() - tail.len();
            let raw = &at[..len];
            at = tail;
            // Unknown frames of ignorable types were skipped.
            if ty < 0x80 {
                assert_eq!(raw, &f[..], "a frame re-encoded differently");
                break;
            }
        }
    }
});
