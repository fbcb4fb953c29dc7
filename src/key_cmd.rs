//! `meshd genkey`, `meshd pubkey`, `meshd genpsk`: the same base64 keys as `wg genkey`,
//! `wg pubkey` and `wg genpsk`, so the two tools' keys mix freely.
#![allow(clippy::print_stdout)] // printing the key is the command's whole job

use std::io::Read;

use anyhow::{Context, Result};
use meshd_dataplane::keys::{PresharedKey, PrivateKey};

pub fn genkey() -> Result<()> {
    println!("{}", PrivateKey::generate().to_base64().as_str());
    Ok(())
}

pub fn genpsk() -> Result<()> {
    println!("{}", PresharedKey::generate().to_base64().as_str());
    Ok(())
}

/// Reads a private key on stdin and prints its public key.
pub fn pubkey() -> Result<()> {
    let mut input = zeroize::Zeroizing::new(String::new());
    std::io::stdin()
        .take(1024)
        .read_to_string(&mut input)
        .context("reading a private key from standard input")?;
    let key: PrivateKey = input
        .trim()
        .parse()
        .context("standard input is not a private key (expected 44 characters of base64, as `meshd genkey` prints)")?;
    println!("{}", key.public_key());
    Ok(())
}
