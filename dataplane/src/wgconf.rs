//! The parser for standard wg-quick configuration files, for `meshd wg up`.
//!
//! It follows `wg setconf` and `wg-quick` in syntax (sections and keys are
//! case-insensitive, `#` starts a comment anywhere, whitespace around `=` and
//! list commas is ignored) but is stricter about meaning: a setting meshd
//! cannot honour is an error (or, for `DNS` only, a warning), never silently
//! dropped. docs/wg-config.md lists exactly what is accepted.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;

use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use crate::peers::PeerConfig;

/// The smallest MTU accepted: every IPv4 host must handle 576-byte datagrams.
const MIN_MTU: u16 = 576;
/// IPv6 requires every link to carry 1280-byte packets.
const MIN_MTU_IPV6: u16 = 1280;

#[derive(Debug, Clone)]
pub struct WgConfig {
    pub interface: InterfaceConfig,
    pub peers: Vec<PeerConfig>,
    /// Lines that were accepted but not acted on, with the 1-based line
    /// number, for the caller to show the user.
    pub warnings: Vec<(usize, String)>,
}

#[derive(Debug, Clone)]
pub struct InterfaceConfig {
    pub private_key: PrivateKey,
    /// The interface's own addresses, host bits kept (`10.0.0.1/24`).
    pub addresses: Vec<IpNet>,
    /// `None` when absent or 0: the engine picks a free port.
    pub listen_port: Option<u16>,
    pub mtu: Option<u16>,
    /// `SO_MARK` of the tunnel's datagrams; `None` when absent or `off`.
    pub fwmark: Option<u32>,
}

/// Why a file was rejected. `line` is 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ConfigError {
    pub line: usize,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Field {
    PrivateKey,
    Address,
    ListenPort,
    Mtu,
    Dns,
    Table,
    PreUp,
    PostUp,
    PreDown,
    PostDown,
    SaveConfig,
    FwMark,
    PublicKey,
    PresharedKey,
    AllowedIps,
    Endpoint,
    PersistentKeepalive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SectionKind {
    Interface,
    Peer,
}

impl SectionKind {
    fn header(self) -> &'static str {
        match self {
            SectionKind::Interface => "[Interface]",
            SectionKind::Peer => "[Peer]",
        }
    }
}

impl Field {
    const ALL: [Field; 17] = [
        Field::PrivateKey,
        Field::Address,
        Field::ListenPort,
        Field::Mtu,
        Field::Dns,
        Field::Table,
        Field::PreUp,
        Field::PostUp,
        Field::PreDown,
        Field::PostDown,
        Field::SaveConfig,
        Field::FwMark,
        Field::PublicKey,
        Field::PresharedKey,
        Field::AllowedIps,
        Field::Endpoint,
        Field::PersistentKeepalive,
    ];

    /// The spelling used in documentation and messages.
    fn name(self) -> &'static str {
        match self {
            Field::PrivateKey => "PrivateKey",
            Field::Address => "Address",
            Field::ListenPort => "ListenPort",
            Field::Mtu => "MTU",
            Field::Dns => "DNS",
            Field::Table => "Table",
            Field::PreUp => "PreUp",
            Field::PostUp => "PostUp",
            Field::PreDown => "PreDown",
            Field::PostDown => "PostDown",
            Field::SaveConfig => "SaveConfig",
            Field::FwMark => "FwMark",
            Field::PublicKey => "PublicKey",
            Field::PresharedKey => "PresharedKey",
            Field::AllowedIps => "AllowedIPs",
            Field::Endpoint => "Endpoint",
            Field::PersistentKeepalive => "PersistentKeepalive",
        }
    }

    fn lookup(name: &str) -> Option<Field> {
        Field::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(name))
    }

    fn section(self) -> SectionKind {
        match self {
            Field::PublicKey
            | Field::PresharedKey
            | Field::AllowedIps
            | Field::Endpoint
            | Field::PersistentKeepalive => SectionKind::Peer,
            _ => SectionKind::Interface,
        }
    }

    /// Lists that wg and wg-quick let a file spread over several lines.
    fn repeatable(self) -> bool {
        matches!(self, Field::Address | Field::Dns | Field::AllowedIps)
    }
}

fn expected_keys(section: SectionKind) -> String {
    Field::ALL
        .into_iter()
        .filter(|k| k.section() == section)
        .map(Field::name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses the text of a wg-quick file.
pub fn parse(text: &str) -> Result<WgConfig, ConfigError> {
    let mut parser = Parser::default();
    for (index, raw) in text.lines().enumerate() {
        parser.line(index + 1, raw)?;
    }
    parser.finish()
}

fn err(line: usize, message: impl Into<String>) -> ConfigError {
    ConfigError {
        line,
        message: message.into(),
    }
}

#[derive(Default)]
struct Parser {
    /// The section being read; moved to `interface` or `peers` when the
    /// next header starts.
    open: Option<Section>,
    interface: Option<InterfaceDraft>,
    peers: Vec<PeerDraft>,
    warnings: Vec<(usize, String)>,
}

enum Section {
    Interface(InterfaceDraft),
    Peer(PeerDraft),
}

#[derive(Default)]
struct InterfaceDraft {
    line: usize,
    seen: BTreeMap<Field, usize>,
    private_key: Option<PrivateKey>,
    addresses: Vec<IpNet>,
    listen_port: Option<u16>,
    mtu: Option<(usize, u16)>,
    fwmark: Option<u32>,
}

#[derive(Default)]
struct PeerDraft {
    line: usize,
    seen: BTreeMap<Field, usize>,
    public_key: Option<(usize, PublicKey)>,
    preshared_key: Option<PresharedKey>,
    /// Each prefix with its line, to point at the right line on a conflict.
    allowed_ips: Vec<(usize, IpNet)>,
    endpoint: Option<SocketAddr>,
    persistent_keepalive: Option<u16>,
}

/// Quotes user text for a message, hiding anything that looks like a key: a
/// run of 40 or more base64 characters, which no address, port or key name
/// has (a key is 44). A private key pasted in the wrong place is then never
/// printed back.
fn shown(text: &str) -> String {
    const KEY_LIKE_RUN: usize = 40;
    let is_b64 = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=');
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= KEY_LIKE_RUN {
            out.push_str("<key-like text hidden>");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if is_b64(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    format!("{out:?}")
}

fn wrong_section(n: usize, key: Field, section: SectionKind) -> ConfigError {
    err(
        n,
        format!(
            "{} belongs in a {} section, not {}",
            key.name(),
            key.section().header(),
            section.header()
        ),
    )
}

impl Parser {
    fn line(&mut self, n: usize, raw: &str) -> Result<(), ConfigError> {
        let content = raw.split_once('#').map_or(raw, |(before, _)| before);
        let content = content.trim();
        if content.is_empty() {
            return Ok(());
        }
        if content.starts_with('[') {
            return self.header(n, content);
        }
        // The message never quotes the line: it could be a pasted secret.
        let Some((key, value)) = content.split_once('=') else {
            return Err(err(
                n,
                "expected `Key = Value`, a [Interface] or [Peer] header, or a # comment",
            ));
        };
        let (key_text, value) = (key.trim(), value.trim());
        if key_text.is_empty() {
            return Err(err(n, "missing key before `=`"));
        }
        let Some(open) = &mut self.open else {
            return Err(err(
                n,
                format!(
                    "{} is outside any section: put it under [Interface] or [Peer]",
                    shown(key_text)
                ),
            ));
        };
        let section = match open {
            Section::Interface(_) => SectionKind::Interface,
            Section::Peer(_) => SectionKind::Peer,
        };
        let Some(key) = Field::lookup(key_text) else {
            return Err(err(
                n,
                format!(
                    "unknown key {} in {}; expected one of: {}",
                    shown(key_text),
                    section.header(),
                    expected_keys(section)
                ),
            ));
        };
        match open {
            Section::Interface(draft) => draft.set(n, key, value, &mut self.warnings),
            Section::Peer(draft) => draft.set(n, key, value, &mut self.warnings),
        }
    }

    fn header(&mut self, n: usize, content: &str) -> Result<(), ConfigError> {
        let Some(name) = content
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
        else {
            return Err(err(
                n,
                "malformed section header: expected [Interface] or [Peer] alone on the line",
            ));
        };
        let name = name.trim();
        self.close();
        if name.eq_ignore_ascii_case("Interface") {
            if let Some(first) = &self.interface {
                return Err(err(
                    n,
                    format!(
                        "second [Interface] section (the first is on line {}); a file has one",
                        first.line
                    ),
                ));
            }
            self.open = Some(Section::Interface(InterfaceDraft {
                line: n,
                ..InterfaceDraft::default()
            }));
        } else if name.eq_ignore_ascii_case("Peer") {
            self.open = Some(Section::Peer(PeerDraft {
                line: n,
                ..PeerDraft::default()
            }));
        } else {
            return Err(err(
                n,
                format!("unknown section [{name}]: expected [Interface] or [Peer]"),
            ));
        }
        Ok(())
    }

    fn close(&mut self) {
        match self.open.take() {
            Some(Section::Interface(draft)) => self.interface = Some(draft),
            Some(Section::Peer(draft)) => self.peers.push(draft),
            None => {}
        }
    }

    fn finish(mut self) -> Result<WgConfig, ConfigError> {
        self.close();
        let Some(iface) = self.interface else {
            return Err(err(
                1,
                "no [Interface] section: the file needs one, with a PrivateKey",
            ));
        };
        let Some(private_key) = iface.private_key else {
            return Err(err(iface.line, "[Interface] has no PrivateKey"));
        };
        if let Some((line, mtu)) = iface.mtu {
            if mtu < MIN_MTU_IPV6 && iface.addresses.iter().any(|a| a.addr().is_ipv6()) {
                return Err(err(line, format!("MTU {mtu} is below {MIN_MTU_IPV6}, the minimum for IPv6, and the interface has an IPv6 Address")));
            }
        }
        let own_key = private_key.public_key();

        let mut peers = Vec::with_capacity(self.peers.len());
        let mut peer_lines: BTreeMap<PublicKey, usize> = BTreeMap::new();
        let mut prefix_owners: BTreeMap<IpNet, usize> = BTreeMap::new();
        for draft in self.peers {
            let Some((key_line, public_key)) = draft.public_key else {
                return Err(err(draft.line, "[Peer] has no PublicKey"));
            };
            if public_key == own_key {
                return Err(err(key_line, "this PublicKey is the interface's own key (from its PrivateKey): a peer must be another node"));
            }
            if let Some(first) = peer_lines.insert(public_key, draft.line) {
                return Err(err(
                    key_line,
                    format!(
                        "peer {public_key} is already configured by the [Peer] on line {first}"
                    ),
                ));
            }
            let mut allowed_ips = Vec::with_capacity(draft.allowed_ips.len());
            for (line, net) in draft.allowed_ips {
                match prefix_owners.get(&net) {
                    Some(&owner) if owner == draft.line => {}
                    Some(&owner) => {
                        return Err(err(line, format!("AllowedIPs {net} is already claimed by the [Peer] on line {owner}; a prefix can route to one peer only")));
                    }
                    None => {
                        prefix_owners.insert(net, draft.line);
                        allowed_ips.push(net);
                    }
                }
            }
            peers.push(PeerConfig {
                public_key,
                preshared_key: draft.preshared_key,
                allowed_ips,
                endpoint: draft.endpoint,
                persistent_keepalive: draft.persistent_keepalive,
            });
        }

        Ok(WgConfig {
            interface: InterfaceConfig {
                private_key,
                addresses: iface.addresses,
                listen_port: iface.listen_port,
                mtu: iface.mtu.map(|(_, mtu)| mtu),
                fwmark: iface.fwmark,
            },
            peers,
            warnings: self.warnings,
        })
    }
}

impl InterfaceDraft {
    fn set(
        &mut self,
        n: usize,
        key: Field,
        value: &str,
        warnings: &mut Vec<(usize, String)>,
    ) -> Result<(), ConfigError> {
        mark_seen(&mut self.seen, n, key)?;
        match key {
            Field::PrivateKey => {
                let parsed = value.parse().map_err(|_| {
                    err(
                        n,
                        "PrivateKey is not a valid key: expected 44 characters of base64, as printed by `wg genkey`",
                    )
                })?;
                self.private_key = Some(parsed);
            }
            Field::Address => {
                for item in list(n, key, value)? {
                    let address = parse_address(item).ok_or_else(|| {
                        err(n, format!("Address {item} is not an IP address with an optional /prefix, like 10.0.0.1/24 or fd00::1/64", item = shown(item)))
                    })?;
                    self.addresses.push(address);
                }
            }
            Field::ListenPort => {
                let port: u16 = decimal(value).ok_or_else(|| {
                    err(
                        n,
                        format!(
                            "ListenPort {value} is not a port number: expected 0 to 65535",
                            value = shown(value)
                        ),
                    )
                })?;
                self.listen_port = Some(port).filter(|&p| p != 0);
            }
            Field::Mtu => {
                let mtu = decimal(value).filter(|&m| m >= MIN_MTU).ok_or_else(|| {
                    err(
                        n,
                        format!(
                            "MTU {value} is not valid: expected a number from {MIN_MTU} to 65535",
                            value = shown(value)
                        ),
                    )
                })?;
                self.mtu = Some((n, mtu));
            }
            Field::Dns => warnings.push((
                n,
                "DNS is ignored: `meshd wg up` does not change the system's resolver".to_string(),
            )),
            Field::Table => {
                if !value.eq_ignore_ascii_case("auto") {
                    return Err(err(n, format!("Table = {value} is not supported: meshd adds a route to the main table for each peer's AllowedIPs (only `auto` is accepted)", value = shown(value))));
                }
            }
            Field::PreUp | Field::PostUp | Field::PreDown | Field::PostDown => {
                return Err(err(n, format!("{} is not supported: `meshd wg up` runs no hook commands; remove the line and run the command yourself", key.name())));
            }
            Field::SaveConfig => {
                if value.eq_ignore_ascii_case("true") {
                    return Err(err(n, "SaveConfig = true is not supported: meshd never writes the configuration file back (only `false` is accepted)"));
                }
                if !value.eq_ignore_ascii_case("false") {
                    return Err(err(
                        n,
                        format!(
                            "SaveConfig {value} is not valid: expected true or false",
                            value = shown(value)
                        ),
                    ));
                }
            }
            Field::FwMark => {
                // As wg: decimal, 0x-hexadecimal, or `off`.
                let mark = if value.eq_ignore_ascii_case("off") {
                    Some(0)
                } else if let Some(hex) = value
                    .strip_prefix("0x")
                    .or_else(|| value.strip_prefix("0X"))
                {
                    u32::from_str_radix(hex, 16)
                        .ok()
                        .filter(|_| hex.bytes().all(|b| b.is_ascii_hexdigit()))
                } else {
                    decimal(value)
                };
                let mark = mark.ok_or_else(|| {
                    err(n, format!("FwMark {value} is not valid: expected off, a number or 0x and hexadecimal digits", value = shown(value)))
                })?;
                self.fwmark = Some(mark).filter(|&m| m != 0);
            }
            Field::PublicKey
            | Field::PresharedKey
            | Field::AllowedIps
            | Field::Endpoint
            | Field::PersistentKeepalive => {
                return Err(wrong_section(n, key, SectionKind::Interface))
            }
        }
        Ok(())
    }
}

impl PeerDraft {
    fn set(
        &mut self,
        n: usize,
        key: Field,
        value: &str,
        warnings: &mut Vec<(usize, String)>,
    ) -> Result<(), ConfigError> {
        mark_seen(&mut self.seen, n, key)?;
        match key {
            Field::PublicKey => {
                let parsed = value.parse().map_err(|_| {
                    err(n, format!("PublicKey {value} is not a valid key: expected 44 characters of base64, as printed by `wg pubkey`", value = shown(value)))
                })?;
                self.public_key = Some((n, parsed));
            }
            Field::PresharedKey => {
                let parsed = value.parse().map_err(|_| {
                    err(
                        n,
                        "PresharedKey is not a valid key: expected 44 characters of base64, as printed by `wg genpsk`",
                    )
                })?;
                self.preshared_key = Some(parsed);
            }
            // An empty value is a peer with no allowed IPs, as in wg.
            Field::AllowedIps if value.is_empty() => {}
            Field::AllowedIps => {
                for item in list(n, key, value)? {
                    let net = parse_address(item).ok_or_else(|| {
                        err(n, format!("AllowedIPs {item} is not an IP prefix, like 10.0.0.0/24, fd00::/64 or 10.0.0.7", item = shown(item)))
                    })?;
                    let trunc = net.trunc();
                    if trunc != net {
                        warnings.push((
                            n,
                            format!("AllowedIPs {net} has host bits set; using {trunc}"),
                        ));
                    }
                    self.allowed_ips.push((n, trunc));
                }
            }
            Field::Endpoint => {
                self.endpoint = Some(parse_endpoint(value).map_err(|m| err(n, m))?);
            }
            Field::PersistentKeepalive => {
                let seconds = if value.eq_ignore_ascii_case("off") {
                    0
                } else {
                    decimal(value).ok_or_else(|| {
                        err(n, format!("PersistentKeepalive {value} is not valid: expected `off` or a number of seconds from 0 to 65535", value = shown(value)))
                    })?
                };
                self.persistent_keepalive = Some(seconds).filter(|&s| s != 0);
            }
            Field::PrivateKey
            | Field::Address
            | Field::ListenPort
            | Field::Mtu
            | Field::Dns
            | Field::Table
            | Field::PreUp
            | Field::PostUp
            | Field::PreDown
            | Field::PostDown
            | Field::SaveConfig
            | Field::FwMark => return Err(wrong_section(n, key, SectionKind::Peer)),
        }
        Ok(())
    }
}

fn mark_seen(seen: &mut BTreeMap<Field, usize>, n: usize, key: Field) -> Result<(), ConfigError> {
    match seen.get(&key) {
        Some(&first) if !key.repeatable() => Err(err(
            n,
            format!(
                "duplicate {}: it is already set on line {first}",
                key.name()
            ),
        )),
        Some(_) => Ok(()),
        None => {
            seen.insert(key, n);
            Ok(())
        }
    }
}

/// Splits a comma-separated value, refusing empty entries.
fn list(n: usize, key: Field, value: &str) -> Result<Vec<&str>, ConfigError> {
    let items: Vec<&str> = value.split(',').map(str::trim).collect();
    if items.iter().any(|i| i.is_empty()) {
        return Err(err(
            n,
            format!(
                "{} has an empty entry: expected a comma-separated list of addresses",
                key.name()
            ),
        ));
    }
    Ok(items)
}

/// A plain decimal number: digits only, unlike `u16::from_str`, which also
/// takes a leading `+`.
fn decimal<T: FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `ADDR` or `ADDR/LEN`; without a length the address is a host (/32, /128),
/// as in wg and `ip address add`.
fn parse_address(s: &str) -> Option<IpNet> {
    match s.split_once('/') {
        Some((addr, len)) => IpNet::new(addr.parse().ok()?, decimal(len)?).ok(),
        None => Some(IpNet::from(s.parse::<IpAddr>().ok()?)),
    }
}

fn parse_endpoint(s: &str) -> Result<SocketAddr, String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!(
            "Endpoint {s} has no port: expected IP:port, like 192.0.2.1:51820 or [2001:db8::1]:51820", s = shown(s)
        ));
    };
    let ip = if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(|| {
            format!(
                "Endpoint {s} is malformed: expected [IPv6]:port, like [2001:db8::1]:51820",
                s = shown(s)
            )
        })?;
        IpAddr::V6(inner.parse::<Ipv6Addr>().map_err(|_| {
            format!(
                "Endpoint {s}: {inner} is not an IPv6 address",
                s = shown(s),
                inner = shown(inner)
            )
        })?)
    } else if let Ok(v4) = host.parse::<Ipv4Addr>() {
        IpAddr::V4(v4)
    } else if host.contains(':') {
        return Err(format!(
            "Endpoint {s}: an IPv6 endpoint must be written in brackets, like [2001:db8::1]:51820",
            s = shown(s)
        ));
    } else {
        return Err(format!(
            "Endpoint {s}: hostname endpoints are not supported, use an IP address",
            s = shown(s)
        ));
    };
    let port = decimal(port).filter(|&p: &u16| p != 0).ok_or_else(|| {
        format!(
            "Endpoint {s}: the port must be a number from 1 to 65535",
            s = shown(s)
        )
    })?;
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PRIV: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PUB_A: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const PUB_B: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";
    const PSK: &str = "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE=";

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn fwmark_as_wg_reads_it() {
        for (value, want) in [
            ("off", None),
            ("0", None),
            ("51820", Some(51820)),
            ("0xca6c", Some(0xca6c)),
            ("0XFFFFFFFF", Some(u32::MAX)),
        ] {
            let text = format!("[Interface]\nPrivateKey = {PRIV}\nFwMark = {value}\n");
            assert_eq!(parse(&text).unwrap().interface.fwmark, want, "{value}");
        }
        for value in ["0x", "-1", "0x1ffffffff", "mark"] {
            let text = format!("[Interface]\nPrivateKey = {PRIV}\nFwMark = {value}\n");
            assert!(parse(&text).is_err(), "{value}");
        }
    }

    #[test]
    fn full_config() {
        let text = format!(
            "# a comment line
[Interface]
PrivateKey = {PRIV}
Address = 10.0.0.1/24, fd00::1/64   # trailing comment
Address=10.9.0.1
ListenPort = 51820
MTU = 1380
DNS = 1.1.1.1
table = auto
SaveConfig = false
FwMark = off

[Peer]
PublicKey = {PUB_A}
PresharedKey = {PSK}
AllowedIPs = 10.0.0.2/32, fd00::2/128
AllowedIPs = 192.168.1.7/24
Endpoint = 192.0.2.1:51820
PersistentKeepalive = 25

  [peer]
  publickey={PUB_B}
  ENDPOINT = [2001:db8::1]:4500
  persistentkeepalive = off
  allowedips =
"
        );
        let config = parse(&text).unwrap();
        let iface = &config.interface;
        assert_eq!(*iface.private_key.to_base64(), PRIV);
        assert_eq!(
            iface.addresses,
            vec![net("10.0.0.1/24"), net("fd00::1/64"), net("10.9.0.1/32")]
        );
        assert_eq!(iface.listen_port, Some(51820));
        assert_eq!(iface.mtu, Some(1380));
        assert_eq!(iface.fwmark, None);
        assert_eq!(
            config.peers,
            vec![
                PeerConfig {
                    public_key: PUB_A.parse().unwrap(),
                    preshared_key: Some(PSK.parse().unwrap()),
                    allowed_ips: vec![
                        net("10.0.0.2/32"),
                        net("fd00::2/128"),
                        net("192.168.1.0/24")
                    ],
                    endpoint: Some("192.0.2.1:51820".parse().unwrap()),
                    persistent_keepalive: Some(25),
                },
                PeerConfig {
                    public_key: PUB_B.parse().unwrap(),
                    preshared_key: None,
                    allowed_ips: vec![],
                    endpoint: Some("[2001:db8::1]:4500".parse().unwrap()),
                    persistent_keepalive: None,
                },
            ]
        );
        assert_eq!(
            config.warnings,
            vec![
                (
                    8,
                    "DNS is ignored: `meshd wg up` does not change the system's resolver"
                        .to_string()
                ),
                (
                    17,
                    "AllowedIPs 192.168.1.7/24 has host bits set; using 192.168.1.0/24".to_string()
                ),
            ]
        );
    }

    #[test]
    fn minimal_config_and_defaults() {
        let config = parse(&format!("[Interface]\r\nPrivateKey={PRIV}\r\n")).unwrap();
        assert!(config.interface.addresses.is_empty());
        assert_eq!(config.interface.listen_port, None);
        assert_eq!(config.interface.mtu, None);
        assert!(config.peers.is_empty());
        assert!(config.warnings.is_empty());

        let config = parse(&format!(
            "[Interface]\nPrivateKey={PRIV}\nListenPort=0\n[Peer]\nPublicKey={PUB_A}\nPersistentKeepalive=0\n"
        ))
        .unwrap();
        assert_eq!(config.interface.listen_port, None);
        assert_eq!(config.peers[0].persistent_keepalive, None);
        assert_eq!(config.peers[0].endpoint, None);
        assert!(config.peers[0].allowed_ips.is_empty());
    }

    #[test]
    fn secrets_are_not_printed() {
        let config = parse(&format!(
            "[Interface]\nPrivateKey={PRIV}\n[Peer]\nPublicKey={PUB_A}\nPresharedKey={PSK}\n"
        ))
        .unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains(PRIV) && !debug.contains(PSK), "{debug}");
        assert!(debug.contains(PUB_A));
    }

    /// Each case is a file body (after a valid `[Interface]` + `PrivateKey`
    /// on lines 1 and 2, unless it starts with `!`) and the expected error.
    #[test]
    fn bad_inputs() {
        let cases: &[(&str, usize, &str)] = &[
            // Structure.
            ("!", 1, "no [Interface] section: the file needs one, with a PrivateKey"),
            ("!# only a comment\n\n", 1, "no [Interface] section: the file needs one, with a PrivateKey"),
            ("!PrivateKey = x", 1, "\"PrivateKey\" is outside any section: put it under [Interface] or [Peer]"),
            ("!\n[Interface]\nListenPort = 1", 2, "[Interface] has no PrivateKey"),
            ("[Interface]", 3, "second [Interface] section (the first is on line 1); a file has one"),
            ("[Interfaces]", 3, "unknown section [Interfaces]: expected [Interface] or [Peer]"),
            ("[Peer", 3, "malformed section header: expected [Interface] or [Peer] alone on the line"),
            ("[Peer] x", 3, "malformed section header: expected [Interface] or [Peer] alone on the line"),
            ("just words", 3, "expected `Key = Value`, a [Interface] or [Peer] header, or a # comment"),
            ("PRIV", 3, "unknown key \"<key-like text hidden>\" in [Interface]; expected one of: PrivateKey, Address, ListenPort, MTU, DNS, Table, PreUp, PostUp, PreDown, PostDown, SaveConfig, FwMark"),
            ("!PRIV", 1, "\"<key-like text hidden>\" is outside any section: put it under [Interface] or [Peer]"),
            ("= 5", 3, "missing key before `=`"),
            ("Foo = 1", 3, "unknown key \"Foo\" in [Interface]; expected one of: PrivateKey, Address, ListenPort, MTU, DNS, Table, PreUp, PostUp, PreDown, PostDown, SaveConfig, FwMark"),
            ("[Peer]\nPublicKey = PUB_A\nBar = 1", 5, "unknown key \"Bar\" in [Peer]; expected one of: PublicKey, PresharedKey, AllowedIPs, Endpoint, PersistentKeepalive"),
            ("PublicKey = PUB_A", 3, "PublicKey belongs in a [Peer] section, not [Interface]"),
            ("[Peer]\nListenPort = 5", 4, "ListenPort belongs in a [Interface] section, not [Peer]"),
            // Duplicates.
            ("PrivateKey = PRIV", 3, "duplicate PrivateKey: it is already set on line 2"),
            ("ListenPort = 1\nlistenport = 2", 4, "duplicate ListenPort: it is already set on line 3"),
            ("MTU = 1400\n\nMTU = 1400", 5, "duplicate MTU: it is already set on line 3"),
            ("[Peer]\nPublicKey = PUB_A\nEndpoint = 192.0.2.1:1\nEndpoint = 192.0.2.1:2", 6, "duplicate Endpoint: it is already set on line 5"),
            ("[Peer]\nPublicKey = PUB_A\nPublicKey = PUB_B", 5, "duplicate PublicKey: it is already set on line 4"),
            ("[Peer]\nPublicKey = PUB_A\nPresharedKey = PSK\nPresharedKey = PSK", 6, "duplicate PresharedKey: it is already set on line 5"),
            ("[Peer]\nPublicKey = PUB_A\nPersistentKeepalive = 1\nPersistentKeepalive = 1", 6, "duplicate PersistentKeepalive: it is already set on line 5"),
            // Interface values.
            ("!\n[Interface]\nPrivateKey = abc", 3, "PrivateKey is not a valid key: expected 44 characters of base64, as printed by `wg genkey`"),
            ("!\n[Interface]\nPrivateKey =", 3, "PrivateKey is not a valid key: expected 44 characters of base64, as printed by `wg genkey`"),
            ("Address = 10.0.0.1/33", 3, "Address \"10.0.0.1/33\" is not an IP address with an optional /prefix, like 10.0.0.1/24 or fd00::1/64"),
            ("Address = 10.0.0.1/", 3, "Address \"10.0.0.1/\" is not an IP address with an optional /prefix, like 10.0.0.1/24 or fd00::1/64"),
            ("Address = 10.0.0.1/+8", 3, "Address \"10.0.0.1/+8\" is not an IP address with an optional /prefix, like 10.0.0.1/24 or fd00::1/64"),
            ("Address = 10.0.0.1/24 PRIV", 3, "Address \"10.0.0.1/24 <key-like text hidden>\" is not an IP address with an optional /prefix, like 10.0.0.1/24 or fd00::1/64"),
            ("[Peer]\nPublicKey = PUB_A\nEndpoint = PRIV:1", 5, "Endpoint \"<key-like text hidden>:1\": hostname endpoints are not supported, use an IP address"),
            ("Address = fd00::1/129", 3, "Address \"fd00::1/129\" is not an IP address with an optional /prefix, like 10.0.0.1/24 or fd00::1/64"),
            ("Address = host.example", 3, "Address \"host.example\" is not an IP address with an optional /prefix, like 10.0.0.1/24 or fd00::1/64"),
            ("Address = 10.0.0.1/24 fd00::1/64", 3, "Address \"10.0.0.1/24 fd00::1/64\" is not an IP address with an optional /prefix, like 10.0.0.1/24 or fd00::1/64"),
            ("Address = 10.0.0.1/24,,fd00::1/64", 3, "Address has an empty entry: expected a comma-separated list of addresses"),
            ("Address =", 3, "Address has an empty entry: expected a comma-separated list of addresses"),
            ("ListenPort = 65536", 3, "ListenPort \"65536\" is not a port number: expected 0 to 65535"),
            ("ListenPort = -1", 3, "ListenPort \"-1\" is not a port number: expected 0 to 65535"),
            ("ListenPort = +1", 3, "ListenPort \"+1\" is not a port number: expected 0 to 65535"),
            ("ListenPort = domain", 3, "ListenPort \"domain\" is not a port number: expected 0 to 65535"),
            ("ListenPort =", 3, "ListenPort \"\" is not a port number: expected 0 to 65535"),
            ("MTU = 575", 3, "MTU \"575\" is not valid: expected a number from 576 to 65535"),
            ("MTU = 70000", 3, "MTU \"70000\" is not valid: expected a number from 576 to 65535"),
            ("MTU = 1280.5", 3, "MTU \"1280.5\" is not valid: expected a number from 576 to 65535"),
            ("MTU = 1200\nAddress = fd00::1/64", 3, "MTU 1200 is below 1280, the minimum for IPv6, and the interface has an IPv6 Address"),
            ("Table = off", 3, "Table = \"off\" is not supported: meshd adds a route to the main table for each peer's AllowedIPs (only `auto` is accepted)"),
            ("Table = 1234", 3, "Table = \"1234\" is not supported: meshd adds a route to the main table for each peer's AllowedIPs (only `auto` is accepted)"),
            ("PreUp = echo hi", 3, "PreUp is not supported: `meshd wg up` runs no hook commands; remove the line and run the command yourself"),
            ("PostUp = iptables -A FORWARD -i %i -j ACCEPT", 3, "PostUp is not supported: `meshd wg up` runs no hook commands; remove the line and run the command yourself"),
            ("predown = x", 3, "PreDown is not supported: `meshd wg up` runs no hook commands; remove the line and run the command yourself"),
            ("PostDown = x", 3, "PostDown is not supported: `meshd wg up` runs no hook commands; remove the line and run the command yourself"),
            ("SaveConfig = true", 3, "SaveConfig = true is not supported: meshd never writes the configuration file back (only `false` is accepted)"),
            ("SaveConfig = yes", 3, "SaveConfig \"yes\" is not valid: expected true or false"),
            ("FwMark = 0xzz", 3, "FwMark \"0xzz\" is not valid: expected off, a number or 0x and hexadecimal digits"),
            // Peer values.
            ("[Peer]\nAllowedIPs = 10.0.0.0/8", 3, "[Peer] has no PublicKey"),
            ("[Peer]\nPublicKey = PUB_A\n[Peer]\n", 5, "[Peer] has no PublicKey"),
            ("[Peer]\nPublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg", 4, "PublicKey \"<key-like text hidden>\" is not a valid key: expected 44 characters of base64, as printed by `wg pubkey`"),
            ("[Peer]\nPublicKey = PUB_A\nPresharedKey = nope", 5, "PresharedKey is not a valid key: expected 44 characters of base64, as printed by `wg genpsk`"),
            ("[Peer]\nPublicKey = PUB_A\nAllowedIPs = 10.0.0.0/8, 300.0.0.0/8", 5, "AllowedIPs \"300.0.0.0/8\" is not an IP prefix, like 10.0.0.0/24, fd00::/64 or 10.0.0.7"),
            ("[Peer]\nPublicKey = PUB_A\nallowedips=PRIV", 5, "AllowedIPs \"<key-like text hidden>\" is not an IP prefix, like 10.0.0.0/24, fd00::/64 or 10.0.0.7"),
            ("[Peer]\nPublicKey = PUB_A\nAllowedIPs = +10.0.0.0/8", 5, "AllowedIPs \"+10.0.0.0/8\" is not an IP prefix, like 10.0.0.0/24, fd00::/64 or 10.0.0.7"),
            ("[Peer]\nPublicKey = PUB_A\nAllowedIPs = 10.0.0.0/8,", 5, "AllowedIPs has an empty entry: expected a comma-separated list of addresses"),
            ("[Peer]\nPublicKey = PUB_A\nEndpoint = 192.0.2.1", 5, "Endpoint \"192.0.2.1\" has no port: expected IP:port, like 192.0.2.1:51820 or [2001:db8::1]:51820"),
            ("[Peer]\nPublicKey = PUB_A\nEndpoint =", 5, "Endpoint \"\" has no port: expected IP:port, like 192.0.2.1:51820 or [2001:db8::1]:51820"),
            ("[Peer]\nPublicKey = PUB_A\nEndpoint = vpn.example.com:51820", 5, "Endpoint \"vpn.example.com:51820\": hostname endpoints are not supported, use an IP address"),
            ("[Peer]\nPublicKey = PUB_A\nEndpoint = localhost:51820", 5, "Endpoint \"localhost:51820\": hostname endpoints are not supported, use an IP address"),
            ("[Peer]\nPublicKey = PUB_A\nEndpoint = 2001:db8::1:51820", 5, "Endpoint \"2001:db8::1:51820\": an IPv6 endpoint must be written in brackets, like [2001:db8::1]:51820"),
            ("[Peer]\nPublicKey = PUB_A\nEndpoint = [2001:db8::1:51820", 5, "Endpoint \"[2001:db8::1:51820\" is malformed: expected [IPv6]:port, like [2001:db8::1]:51820"),
            ("[Peer]\nPublicKey = PUB_A\nEndpoint = [192.0.2.1]:51820", 5, "Endpoint \"[192.0.2.1]:51820\": \"192.0.2.1\" is not an IPv6 address"),
            ("[Peer]\nPublicKey = PUB_A\nEndpoint = 192.0.2.1:0", 5, "Endpoint \"192.0.2.1:0\": the port must be a number from 1 to 65535"),
            ("[Peer]\nPublicKey = PUB_A\nEndpoint = 192.0.2.1:65536", 5, "Endpoint \"192.0.2.1:65536\": the port must be a number from 1 to 65535"),
            ("[Peer]\nPublicKey = PUB_A\nEndpoint = [::1]:", 5, "Endpoint \"[::1]:\": the port must be a number from 1 to 65535"),
            ("[Peer]\nPublicKey = PUB_A\nPersistentKeepalive = 65536", 5, "PersistentKeepalive \"65536\" is not valid: expected `off` or a number of seconds from 0 to 65535"),
            ("[Peer]\nPublicKey = PUB_A\nPersistentKeepalive = never", 5, "PersistentKeepalive \"never\" is not valid: expected `off` or a number of seconds from 0 to 65535"),
            // Across peers.
            ("[Peer]\nPublicKey = PUB_A\n[Peer]\n# again\npublickey = PUB_A", 7, "peer xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg= is already configured by the [Peer] on line 3"),
            ("[Peer]\nPublicKey = OWN", 4, "this PublicKey is the interface's own key (from its PrivateKey): a peer must be another node"),
            ("[Peer]\nPublicKey = PUB_A\nAllowedIPs = 10.0.0.0/24\n[Peer]\nPublicKey = PUB_B\nAllowedIPs = fd00::/64\nAllowedIPs = 10.0.0.9/24", 9, "AllowedIPs 10.0.0.0/24 is already claimed by the [Peer] on line 3; a prefix can route to one peer only"),
        ];
        let own = PrivateKey::from_str(PRIV).unwrap().public_key().to_string();
        for &(body, line, message) in cases {
            let body = body
                .replace("PUB_A", PUB_A)
                .replace("PUB_B", PUB_B)
                .replace("PRIV", PRIV)
                .replace("PSK", PSK)
                .replace("OWN", &own);
            let text = match body.strip_prefix('!') {
                Some(raw) => raw.to_string(),
                None => format!("[Interface]\nPrivateKey = {PRIV}\n{body}\n"),
            };
            let got = parse(&text).map(|_| ()).unwrap_err();
            assert_eq!(
                got,
                ConfigError {
                    line,
                    message: message.to_string()
                },
                "input:\n{text}"
            );
            assert_eq!(got.to_string(), format!("line {line}: {message}"));
            for secret in [PRIV, PSK] {
                let secret = secret.trim_end_matches('=');
                assert!(!got.message.contains(secret), "{got} leaks a secret");
            }
        }
    }

    #[test]
    fn same_prefix_twice_in_one_peer_is_merged() {
        let config = parse(&format!(
            "[Interface]\nPrivateKey={PRIV}\n[Peer]\nPublicKey={PUB_A}\nAllowedIPs=10.0.0.0/8,10.1.2.3/8\n"
        ))
        .unwrap();
        assert_eq!(config.peers[0].allowed_ips, vec![net("10.0.0.0/8")]);
        crate::peers::validate(&config.peers).unwrap();
    }

    /// What must hold for any input: no panic, an error on an existing
    /// line, warnings on existing lines, and peers the engine can apply.
    fn check_invariants(text: &str) -> Result<(), TestCaseError> {
        let lines = text.lines().count().max(1);
        match parse(text) {
            Ok(config) => {
                prop_assert!(crate::peers::validate(&config.peers).is_ok());
                for (line, _) in &config.warnings {
                    prop_assert!((1..=lines).contains(line), "warning on line {}", line);
                }
            }
            Err(e) => {
                prop_assert!((1..=lines).contains(&e.line), "{}", e);
                prop_assert!(!e.message.contains(PRIV.trim_end_matches('=')), "{}", e);
            }
        }
        Ok(())
    }

    /// Lines built from the grammar's own pieces, so that random files get
    /// past the header and key checks into the value parsers.
    fn config_line() -> impl Strategy<Value = String> {
        let names = Field::ALL.map(Field::name).to_vec();
        let key = prop_oneof![
            prop::sample::select(names.clone()).prop_map(str::to_string),
            prop::sample::select(names).prop_map(|n| n.to_ascii_lowercase()),
            "[A-Za-z ]{0,8}",
        ];
        let value = prop_oneof![
            prop::sample::select(vec![
                PRIV, PUB_A, PUB_B, PSK, "off", "auto", "true", "false", ""
            ])
            .prop_map(str::to_string),
            "[0-9]{1,6}",
            "[0-9a-f:.,/ \\[\\]]{0,40}",
            any::<String>(),
        ];
        prop_oneof![
            3 => prop::sample::select(vec!["[Interface]", "[Peer]", "[ peer ]", "[Interface", ""])
                .prop_map(str::to_string),
            10 => (key, "[ \t]{0,2}", value, "( *#.*)?")
                .prop_map(|(k, space, v, comment)| format!("{k}{space}={space}{v}{comment}")),
            1 => any::<String>(),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in any::<String>()) {
            check_invariants(&text)?;
        }

        #[test]
        fn config_like_text_never_panics(
            lines in prop::collection::vec(config_line(), 0..24),
            crlf in any::<bool>(),
        ) {
            let text = lines.join(if crlf { "\r\n" } else { "\n" });
            check_invariants(&text)?;
            // The same file with a valid interface in front must get at least
            // as far: it can fail only on a line of the original.
            let prefixed = format!("[Interface]\nPrivateKey = {PRIV}\n[Peer]\n{text}");
            check_invariants(&prefixed)?;
        }
    }

    #[test]
    fn parses_what_wg_showconf_prints() {
        // `wg showconf` output from a running interface, with its spacing.
        let text = format!(
            "[Interface]\nListenPort = 51820\nPrivateKey = {PRIV}\n\n[Peer]\nPublicKey = {PUB_A}\nPresharedKey = {PSK}\nAllowedIPs = 10.0.0.2/32, fd00::2/128\nEndpoint = [fe80::1]:51820\nPersistentKeepalive = 25\n"
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.peers.len(), 1);
        assert_eq!(
            config.peers[0].endpoint,
            Some("[fe80::1]:51820".parse().unwrap())
        );
    }
}
