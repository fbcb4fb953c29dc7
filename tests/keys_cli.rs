//! `meshd genkey | meshd pubkey` agrees with `wg` both ways.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::Write;
use std::process::{Command, Stdio};

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");

fn run(program: &str, args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} must be installed (scripts/install-deps): {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(o: &std::process::Output) -> String {
    assert!(o.status.success(), "{o:?}");
    String::from_utf8(o.stdout.clone())
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn keys_are_interchangeable_with_wg() {
    let ours = text(&run(MESHD, &["genkey"], ""));
    assert_eq!(ours.len(), 44);
    assert_eq!(
        text(&run(MESHD, &["pubkey"], &ours)),
        text(&run("wg", &["pubkey"], &ours))
    );
    let theirs = text(&run("wg", &["genkey"], ""));
    assert_eq!(
        text(&run(MESHD, &["pubkey"], &format!("{theirs}\n"))),
        text(&run("wg", &["pubkey"], &theirs))
    );
    let psk = text(&run(MESHD, &["genpsk"], ""));
    assert_eq!(psk.len(), 44);
    assert_ne!(psk, text(&run(MESHD, &["genpsk"], "")));
}

#[test]
fn pubkey_refuses_garbage_without_echoing_it() {
    let secretish = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2U";
    let o = run(MESHD, &["pubkey"], secretish);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("not a private key"), "{err}");
    assert!(
        !err.contains(secretish),
        "the input must not be echoed: {err}"
    );
}
