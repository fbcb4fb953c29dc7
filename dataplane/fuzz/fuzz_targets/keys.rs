#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd_dataplane::keys::PublicKey;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Every accepted key formats back to exactly the text it came from.
    if let Ok(key) = text.parse::<PublicKey>() {
        assert_eq!(key.to_string(), text);
    }
});
