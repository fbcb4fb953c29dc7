//! Peer configuration and the difference between two peer sets, which is how
//! configuration reaches a running engine: the engine applies a [`PeerDiff`]
//! instead of rebuilding everything, so the sessions of untouched peers are
//! never disturbed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use ipnet::IpNet;

use crate::keys::{PresharedKey, PublicKey};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: Option<SocketAddr>,
    /// Seconds between keepalives; `None` and `Some(0)` both mean off.
    pub persistent_keepalive: Option<u16>,
}

impl PeerConfig {
    /// The allowed IPs with host bits cleared, without duplicates.
    pub(crate) fn prefixes(&self) -> BTreeSet<IpNet> {
        self.allowed_ips.iter().map(IpNet::trunc).collect()
    }

    fn keepalive(&self) -> Option<u16> {
        self.persistent_keepalive.filter(|&s| s != 0)
    }
}

/// What to do to go from one peer set to another. Every list is sorted by
/// public key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerDiff {
    pub added: Vec<PeerConfig>,
    pub removed: Vec<PublicKey>,
    pub changed: Vec<PeerChange>,
}

impl PeerDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The changes to one peer that exists in both sets, in the order of the
/// [`Change`] variants; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerChange {
    pub public_key: PublicKey,
    pub changes: Vec<Change>,
}

impl PeerChange {
    /// A new preshared key changes the handshake, so the peer's session must
    /// be dropped and renegotiated; every other change applies to the live
    /// session.
    pub fn resets_session(&self) -> bool {
        self.changes
            .iter()
            .any(|c| matches!(c, Change::PresharedKey(_)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The new configured endpoint. `None` means the configuration no longer
    /// names one; it is the engine's choice whether to forget a learned one.
    Endpoint(Option<SocketAddr>),
    /// Prefixes to add to and remove from this peer's routes, host bits
    /// cleared, each sorted.
    AllowedIps {
        added: Vec<IpNet>,
        removed: Vec<IpNet>,
    },
    /// The new keepalive interval in seconds, `None` for off.
    PersistentKeepalive(Option<u16>),
    PresharedKey(Option<PresharedKey>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("peer {0} is configured more than once; each public key may appear once")]
    DuplicatePeer(PublicKey),
    #[error("allowed IP {prefix} is claimed by two peers, {first} and {second}; a prefix may route to one peer only")]
    AllowedIpConflict {
        prefix: IpNet,
        first: PublicKey,
        second: PublicKey,
    },
}

/// Checks that `peers` can be applied: each public key appears once and no
/// prefix is claimed by two peers (the same prefix twice in one peer is
/// harmless and allowed).
pub fn validate(peers: &[PeerConfig]) -> Result<(), PeerError> {
    index(peers).map(|_| ())
}

fn index(peers: &[PeerConfig]) -> Result<BTreeMap<PublicKey, &PeerConfig>, PeerError> {
    let mut by_key = BTreeMap::new();
    let mut owners: BTreeMap<IpNet, PublicKey> = BTreeMap::new();
    for peer in peers {
        if by_key.insert(peer.public_key, peer).is_some() {
            return Err(PeerError::DuplicatePeer(peer.public_key));
        }
        for prefix in peer.prefixes() {
            if let Some(&first) = owners.get(&prefix) {
                return Err(PeerError::AllowedIpConflict {
                    prefix,
                    first,
                    second: peer.public_key,
                });
            }
            owners.insert(prefix, peer.public_key);
        }
    }
    Ok(by_key)
}

/// The diff from `old` (the applied set, assumed valid) to `new`, which is
/// validated as by [`validate`].
pub fn diff(old: &[PeerConfig], new: &[PeerConfig]) -> Result<PeerDiff, PeerError> {
    let new = index(new)?;
    let old: BTreeMap<PublicKey, &PeerConfig> = old.iter().map(|p| (p.public_key, p)).collect();

    let mut result = PeerDiff::default();
    for (key, before) in &old {
        let Some(after) = new.get(key) else {
            result.removed.push(*key);
            continue;
        };
        let changes = changes(before, after);
        if !changes.is_empty() {
            result.changed.push(PeerChange {
                public_key: *key,
                changes,
            });
        }
    }
    result.added = new
        .iter()
        .filter(|(key, _)| !old.contains_key(key))
        .map(|(_, peer)| (*peer).clone())
        .collect();
    Ok(result)
}

fn changes(before: &PeerConfig, after: &PeerConfig) -> Vec<Change> {
    let mut changes = Vec::new();
    if before.endpoint != after.endpoint {
        changes.push(Change::Endpoint(after.endpoint));
    }
    let (old_ips, new_ips) = (before.prefixes(), after.prefixes());
    if old_ips != new_ips {
        changes.push(Change::AllowedIps {
            added: new_ips.difference(&old_ips).copied().collect(),
            removed: old_ips.difference(&new_ips).copied().collect(),
        });
    }
    if before.keepalive() != after.keepalive() {
        changes.push(Change::PersistentKeepalive(after.keepalive()));
    }
    if before.preshared_key != after.preshared_key {
        changes.push(Change::PresharedKey(after.preshared_key.clone()));
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    fn psk(n: u8) -> PresharedKey {
        PresharedKey::from_bytes([n; 32])
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn peer(n: u8, ips: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: key(n),
            preshared_key: None,
            allowed_ips: nets(ips),
            endpoint: None,
            persistent_keepalive: None,
        }
    }

    fn with(mut p: PeerConfig, f: impl FnOnce(&mut PeerConfig)) -> PeerConfig {
        f(&mut p);
        p
    }

    fn endpoint(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    fn changed(n: u8, changes: Vec<Change>) -> PeerChange {
        PeerChange {
            public_key: key(n),
            changes,
        }
    }

    #[test]
    fn diffs() {
        let a = peer(1, &["10.0.0.1/32"]);
        let b = peer(2, &["10.0.0.2/32", "fd00::2/128"]);
        let c = peer(3, &["10.0.0.3/32"]);
        struct Case {
            name: &'static str,
            old: Vec<PeerConfig>,
            new: Vec<PeerConfig>,
            want: PeerDiff,
        }
        let cases = [
            Case {
                name: "identical sets",
                old: vec![a.clone(), b.clone()],
                new: vec![b.clone(), a.clone()],
                want: PeerDiff::default(),
            },
            Case {
                name: "add and remove, sorted by key",
                old: vec![b.clone()],
                new: vec![c.clone(), a.clone()],
                want: PeerDiff {
                    added: vec![a.clone(), c.clone()],
                    removed: vec![key(2)],
                    changed: vec![],
                },
            },
            Case {
                name: "endpoint only",
                old: vec![a.clone(), b.clone()],
                new: vec![
                    with(a.clone(), |p| p.endpoint = endpoint("[2001:db8::1]:51820")),
                    b.clone(),
                ],
                want: PeerDiff {
                    changed: vec![changed(
                        1,
                        vec![Change::Endpoint(endpoint("[2001:db8::1]:51820"))],
                    )],
                    ..PeerDiff::default()
                },
            },
            Case {
                name: "endpoint dropped",
                old: vec![with(a.clone(), |p| p.endpoint = endpoint("192.0.2.1:1"))],
                new: vec![a.clone()],
                want: PeerDiff {
                    changed: vec![changed(1, vec![Change::Endpoint(None)])],
                    ..PeerDiff::default()
                },
            },
            Case {
                name: "allowed IPs added and removed",
                old: vec![b.clone()],
                new: vec![peer(2, &["10.0.0.2/32", "10.2.0.0/16", "10.1.0.0/16"])],
                want: PeerDiff {
                    changed: vec![changed(
                        2,
                        vec![Change::AllowedIps {
                            added: nets(&["10.1.0.0/16", "10.2.0.0/16"]),
                            removed: nets(&["fd00::2/128"]),
                        }],
                    )],
                    ..PeerDiff::default()
                },
            },
            Case {
                name: "allowed IPs reordered, host bits, duplicates: no change",
                old: vec![peer(2, &["10.1.0.0/16", "fd00::2/128"])],
                new: vec![peer(2, &["fd00::2/128", "10.1.2.3/16", "10.1.0.0/16"])],
                want: PeerDiff::default(),
            },
            Case {
                name: "keepalive on, and zero is the same as off",
                old: vec![
                    a.clone(),
                    with(c.clone(), |p| p.persistent_keepalive = Some(0)),
                ],
                new: vec![
                    with(a.clone(), |p| p.persistent_keepalive = Some(25)),
                    c.clone(),
                ],
                want: PeerDiff {
                    changed: vec![changed(1, vec![Change::PersistentKeepalive(Some(25))])],
                    ..PeerDiff::default()
                },
            },
            Case {
                name: "keepalive off",
                old: vec![with(a.clone(), |p| p.persistent_keepalive = Some(25))],
                new: vec![with(a.clone(), |p| p.persistent_keepalive = Some(0))],
                want: PeerDiff {
                    changed: vec![changed(1, vec![Change::PersistentKeepalive(None)])],
                    ..PeerDiff::default()
                },
            },
            Case {
                name: "psk added, changed, removed",
                old: vec![
                    a.clone(),
                    with(b.clone(), |p| p.preshared_key = Some(psk(1))),
                    with(c.clone(), |p| p.preshared_key = Some(psk(1))),
                ],
                new: vec![
                    with(a.clone(), |p| p.preshared_key = Some(psk(9))),
                    with(b.clone(), |p| p.preshared_key = Some(psk(2))),
                    c.clone(),
                ],
                want: PeerDiff {
                    changed: vec![
                        changed(1, vec![Change::PresharedKey(Some(psk(9)))]),
                        changed(2, vec![Change::PresharedKey(Some(psk(2)))]),
                        changed(3, vec![Change::PresharedKey(None)]),
                    ],
                    ..PeerDiff::default()
                },
            },
            Case {
                name: "everything at once",
                old: vec![a.clone()],
                new: vec![with(peer(1, &["10.9.0.0/16"]), |p| {
                    p.endpoint = endpoint("192.0.2.7:51820");
                    p.persistent_keepalive = Some(10);
                    p.preshared_key = Some(psk(3));
                })],
                want: PeerDiff {
                    changed: vec![changed(
                        1,
                        vec![
                            Change::Endpoint(endpoint("192.0.2.7:51820")),
                            Change::AllowedIps {
                                added: nets(&["10.9.0.0/16"]),
                                removed: nets(&["10.0.0.1/32"]),
                            },
                            Change::PersistentKeepalive(Some(10)),
                            Change::PresharedKey(Some(psk(3))),
                        ],
                    )],
                    ..PeerDiff::default()
                },
            },
            Case {
                name: "a prefix moves from one peer to another",
                old: vec![peer(1, &["10.5.0.0/16"]), peer(2, &[])],
                new: vec![peer(1, &[]), peer(2, &["10.5.0.0/16"])],
                want: PeerDiff {
                    changed: vec![
                        changed(
                            1,
                            vec![Change::AllowedIps {
                                added: vec![],
                                removed: nets(&["10.5.0.0/16"]),
                            }],
                        ),
                        changed(
                            2,
                            vec![Change::AllowedIps {
                                added: nets(&["10.5.0.0/16"]),
                                removed: vec![],
                            }],
                        ),
                    ],
                    ..PeerDiff::default()
                },
            },
        ];
        for case in cases {
            let got = diff(&case.old, &case.new).unwrap();
            assert_eq!(got, case.want, "{}", case.name);
            assert_eq!(
                got.is_empty(),
                case.want == PeerDiff::default(),
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn only_psk_changes_reset_the_session() {
        let endpoint_only = changed(1, vec![Change::Endpoint(None)]);
        assert!(!endpoint_only.resets_session());
        let all_but_psk = changed(
            1,
            vec![
                Change::Endpoint(None),
                Change::AllowedIps {
                    added: vec![],
                    removed: vec![],
                },
                Change::PersistentKeepalive(Some(1)),
            ],
        );
        assert!(!all_but_psk.resets_session());
        assert!(changed(1, vec![Change::PresharedKey(None)]).resets_session());
    }

    #[test]
    fn invalid_new_sets() {
        let cases: [(Vec<PeerConfig>, PeerError, &str); 4] = [
            (
                vec![
                    peer(1, &["10.0.0.1/32"]),
                    peer(2, &[]),
                    peer(1, &["10.0.0.2/32"]),
                ],
                PeerError::DuplicatePeer(key(1)),
                "is configured more than once",
            ),
            (
                vec![peer(1, &["10.0.0.0/24"]), peer(2, &["10.0.0.0/24"])],
                PeerError::AllowedIpConflict {
                    prefix: "10.0.0.0/24".parse().unwrap(),
                    first: key(1),
                    second: key(2),
                },
                "allowed IP 10.0.0.0/24 is claimed by two peers",
            ),
            (
                // Same prefix once host bits are cleared.
                vec![peer(1, &["fd00::/64"]), peer(2, &["fd00::1/64"])],
                PeerError::AllowedIpConflict {
                    prefix: "fd00::/64".parse().unwrap(),
                    first: key(1),
                    second: key(2),
                },
                "allowed IP fd00::/64 is claimed by two peers",
            ),
            (
                vec![
                    peer(3, &["0.0.0.0/0"]),
                    peer(1, &["::/0"]),
                    peer(2, &["0.0.0.0/0"]),
                ],
                PeerError::AllowedIpConflict {
                    prefix: "0.0.0.0/0".parse().unwrap(),
                    first: key(3),
                    second: key(2),
                },
                "0.0.0.0/0 is claimed by two peers",
            ),
        ];
        for (new, want, message) in cases {
            assert_eq!(validate(&new), Err(want.clone()));
            let err = diff(&[], &new).unwrap_err();
            assert_eq!(err, want);
            assert!(err.to_string().contains(message), "{err}");
        }
        // Overlapping but different prefixes are fine: the longest match wins.
        validate(&[peer(1, &["10.0.0.0/8"]), peer(2, &["10.1.0.0/16"])]).unwrap();
        // The same prefix twice in one peer is harmless.
        validate(&[peer(1, &["10.0.0.0/8", "10.0.0.0/8"])]).unwrap();
    }
}
