#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd_dataplane::wgconf;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let lines = text.lines().count().max(1);
    match wgconf::parse(&text) {
        Ok(config) => {
            meshd_dataplane::peers::validate(&config.peers).expect("parsed peers are valid");
            for (line, _) in &config.warnings {
                assert!(
                    (1..=lines).contains(line),
                    "warning on line {line} of {lines}"
                );
            }
        }
        Err(e) => assert!(
            (1..=lines).contains(&e.line),
            "error on line {} of {lines}",
            e.line
        ),
    }
});
