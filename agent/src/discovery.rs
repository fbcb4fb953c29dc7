//! Endpoint discovery, sans-IO: where peers can reach this node. The local
//! interface addresses, plus the public (reflexive) address the relays' STUN
//! responders see for the WireGuard socket — probed from that socket, so the
//! mapping learned is the one peers' datagrams meet. Each relay is probed on
//! two ports: a NAT that maps the two probes to different public ports maps
//! by destination (symmetric), and peers cannot use its address.
//!
//! Fed STUN answers and `now`; returns STUN requests to send and, through
//! [`Discovery::endpoints`], the set to report to the coordinator.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshd_proto::stun::{self, TransactionId};
use meshd_proto::MAX_ENDPOINTS;

/// How often the reflexive address is checked again when nothing changed:
/// a NAT that rebinds is noticed within this.
pub const ROUND_INTERVAL: Duration = Duration::from_secs(20);
/// A probe without an answer after this is lost.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Probes per destination in one round (the first and the retries).
const TRIES: u32 = 3;

/// A relay's STUN responder, as the relay map gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StunTarget {
    /// The relay's region.
    pub region: String,
    /// Its STUN address (`addr:stun_port`); `stun_port + 1` is the second.
    pub addr: SocketAddr,
}

/// What one round of probes found, for `meshd netcheck`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NetcheckReport {
    /// Some relay answered over UDP.
    pub udp: bool,
    /// The public address the relays saw, when they agree.
    pub public: Option<SocketAddr>,
    /// The NAT gave different public ports to different destinations.
    pub mapping_varies: Option<bool>,
    /// The public IP the relays saw, when they agree (also when the ports
    /// differ: the birthday technique probes ports of this IP).
    pub public_ip: Option<std::net::IpAddr>,
    /// Round-trip time to each relay's STUN responder (region, ms), best first.
    pub latency: Vec<(String, f64)>,
}

impl NetcheckReport {
    /// The relay with the lowest latency.
    pub fn preferred(&self) -> Option<&str> {
        self.latency.first().map(|(r, _)| r.as_str())
    }
}

#[derive(Debug)]
struct Probe {
    target: usize,
    /// 0: the relay's STUN port, 1: the port after it.
    port: u8,
    to: SocketAddr,
    sent: Instant,
    tries: u32,
}

#[derive(Debug, Default)]
struct Answers {
    mapped: [Option<SocketAddr>; 2],
    rtt: Option<Duration>,
}

#[derive(Debug)]
pub struct Discovery {
    targets: Vec<StunTarget>,
    local: Vec<SocketAddr>,
    probes: BTreeMap<[u8; 12], Probe>,
    /// This round's answers, per target.
    round: Vec<Answers>,
    /// The last complete round's findings.
    report: NetcheckReport,
    next_round: Instant,
    round_ends: Option<Instant>,
    out: Vec<(SocketAddr, Vec<u8>)>,
    rng: u64,
    rounds: u64,
}

impl Discovery {
    /// `seed` makes transaction ids (tests pass a constant; the agent random bits).
    pub fn new(seed: u64, now: Instant) -> Self {
        Discovery {
            targets: Vec::new(),
            local: Vec::new(),
            probes: BTreeMap::new(),
            round: Vec::new(),
            report: NetcheckReport::default(),
            next_round: now,
            round_ends: None,
            out: Vec::new(),
            rng: seed | 1,
            rounds: 0,
        }
    }

    /// The relays to probe; a change starts a round at once.
    pub fn set_targets(&mut self, targets: Vec<StunTarget>, now: Instant) {
        if targets != self.targets {
            self.targets = targets;
            self.next_round = now;
            self.round_ends = None;
            self.probes.clear();
        }
    }

    /// The node's local endpoints (its interface addresses with the
    /// WireGuard port); a change starts a round at once, since the public
    /// address may have moved with them.
    pub fn set_local(&mut self, local: Vec<SocketAddr>, now: Instant) {
        if local != self.local {
            self.local = local;
            self.next_round = now;
        }
    }

    /// Checks the public address again at once (unless a round is running):
    /// a direct path that died may mean the NAT gave this node a new mapping.
    pub fn probe_soon(&mut self, now: Instant) {
        if self.round_ends.is_none() {
            self.next_round = self.next_round.min(now);
        }
    }

    /// Every endpoint to report: the public address first (what remote
    /// peers need), then the local ones, at most [`MAX_ENDPOINTS`].
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        let mut all: Vec<SocketAddr> = Vec::new();
        if self.report.mapping_varies != Some(true) {
            all.extend(self.report.public);
        }
        for a in &self.local {
            if !all.contains(a) {
                all.push(*a);
            }
        }
        all.truncate(MAX_ENDPOINTS);
        all
    }

    pub fn report(&self) -> &NetcheckReport {
        &self.report
    }

    /// A STUN answer that came to the WireGuard socket from `from`; `false`
    /// when it answers no probe of ours (ignored).
    pub fn handle_stun(&mut self, from: SocketAddr, packet: &[u8], now: Instant) -> bool {
        let Some(txid) = packet.get(8..20).and_then(|t| <[u8; 12]>::try_from(t).ok()) else {
            return false;
        };
        let Some(probe) = self.probes.get(&txid) else {
            return false;
        };
        if probe.to != from {
            return false;
        }
        let mapped = match stun::parse_binding_response(packet, TransactionId(txid)) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(%from, error = %e, "STUN answer refused");
                return false;
            }
        };
        let Some(probe) = self.probes.remove(&txid) else {
            return false;
        };
        if let Some(a) = self.round.get_mut(probe.target) {
            a.mapped[usize::from(probe.port)] = Some(mapped);
            let rtt = now.saturating_duration_since(probe.sent);
            a.rtt = Some(a.rtt.map_or(rtt, |r| r.min(rtt)));
        }
        if self.probes.is_empty() {
            self.finish_round(now);
        }
        true
    }

    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.out.pop()
    }

    pub fn poll_timeout(&self) -> Instant {
        let retry = self.probes.values().map(|p| p.sent + PROBE_TIMEOUT).min();
        match retry {
            Some(r) => r.min(self.next_round),
            None => self.next_round,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_round && self.round_ends.is_none() {
            self.start_round(now);
        }
        let due: Vec<[u8; 12]> = self
            .probes
            .iter()
            .filter(|(_, p)| now >= p.sent + PROBE_TIMEOUT)
            .map(|(t, _)| *t)
            .collect();
        for old in due {
            let Some(mut p) = self.probes.remove(&old) else {
                continue;
            };
            if p.tries < TRIES {
                p.tries += 1;
                p.sent = now;
                self.send(p);
            }
        }
        if self.round_ends.is_some() && self.probes.is_empty() {
            self.finish_round(now);
        }
    }

    fn start_round(&mut self, now: Instant) {
        self.round = self.targets.iter().map(|_| Answers::default()).collect();
        self.probes.clear();
        for (i, t) in self.targets.clone().iter().enumerate() {
            for port in 0..2u8 {
                let mut to = t.addr;
                to.set_port(to.port().wrapping_add(u16::from(port)));
                self.send(Probe {
                    target: i,
                    port,
                    to,
                    sent: now,
                    tries: 1,
                });
            }
        }
        self.round_ends = Some(now);
        self.next_round = now + ROUND_INTERVAL;
        if self.targets.is_empty() {
            self.finish_round(now);
        }
    }

    fn send(&mut self, probe: Probe) {
        let txid = self.txid();
        let mut bytes = Vec::with_capacity(stun::HEADER_LEN);
        stun::write_binding_request(TransactionId(txid), &mut bytes);
        self.out.push((probe.to, bytes));
        self.probes.insert(txid, probe);
    }

    fn txid(&mut self) -> [u8; 12] {
        // xorshift64*: ids need only be unpredictable enough not to collide
        // with another client's; the answer must also come from the address
        // asked.
        let mut id = [0u8; 12];
        for chunk in id.chunks_mut(8) {
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            let v = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        id
    }

    /// Rounds finished so far: a report newer than a given moment comes
    /// from a later count.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    fn finish_round(&mut self, _now: Instant) {
        self.round_ends = None;
        self.rounds += 1;
        let mut latency: Vec<(String, f64)> = self
            .targets
            .iter()
            .zip(&self.round)
            .filter_map(|(t, a)| Some((t.region.clone(), a.rtt?.as_secs_f64() * 1000.0)))
            .collect();
        latency.sort_by(|a, b| a.1.total_cmp(&b.1));
        let mapped: Vec<SocketAddr> = self
            .round
            .iter()
            .flat_map(|a| a.mapped.iter().flatten().copied())
            .collect();
        let varies = match mapped.as_slice() {
            [] | [_] => None,
            [first, rest @ ..] => Some(rest.iter().any(|m| m != first)),
        };
        let public_ip = mapped
            .first()
            .map(|m| m.ip())
            .filter(|ip| mapped.iter().all(|m| m.ip() == *ip));
        let report = NetcheckReport {
            public_ip,
            udp: !mapped.is_empty(),
            public: mapped.first().copied().filter(|_| varies != Some(true)),
            mapping_varies: varies,
            latency,
        };
        if report.public != self.report.public
            || report.mapping_varies != self.report.mapping_varies
        {
            tracing::info!(public = ?report.public, mapping_varies = ?report.mapping_varies, udp = report.udp, "public address checked");
        }
        self.report = report;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(d: &mut Discovery, to: SocketAddr, req: &[u8], mapped: &str, now: Instant) -> bool {
        let txid = TransactionId(req[8..20].try_into().unwrap());
        let mut resp = Vec::new();
        stun::write_binding_response(txid, mapped.parse().unwrap(), &mut resp);
        d.handle_stun(to, &resp, now)
    }

    fn sent(d: &mut Discovery) -> Vec<(SocketAddr, Vec<u8>)> {
        std::iter::from_fn(|| d.poll_transmit()).collect()
    }

    fn target() -> StunTarget {
        StunTarget {
            region: "eu".into(),
            addr: "198.18.2.2:3478".parse().unwrap(),
        }
    }

    #[test]
    fn an_endpoint_independent_mapping_is_reported_before_local_addresses() {
        let t0 = Instant::now();
        let mut d = Discovery::new(7, t0);
        d.set_local(vec!["192.168.1.5:41641".parse().unwrap()], t0);
        d.set_targets(vec![target()], t0);
        d.handle_timeout(t0);
        let reqs = sent(&mut d);
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[1].0.port() + reqs[0].0.port(), 3478 + 3479);
        let later = t0 + Duration::from_millis(20);
        for (to, req) in &reqs {
            assert!(answer(&mut d, *to, req, "203.0.113.4:60000", later));
        }
        let r = d.report();
        assert!(r.udp);
        assert_eq!(r.mapping_varies, Some(false));
        assert_eq!(r.preferred(), Some("eu"));
        assert!((r.latency[0].1 - 20.0).abs() < 0.01);
        assert_eq!(
            d.endpoints(),
            [
                "203.0.113.4:60000".parse().unwrap(),
                "192.168.1.5:41641".parse().unwrap()
            ]
        );
        // Nothing more until the next round.
        assert_eq!(d.poll_timeout(), t0 + ROUND_INTERVAL);
    }

    #[test]
    fn a_rebound_mapping_is_found_by_an_early_round() {
        let t0 = Instant::now();
        let mut d = Discovery::new(7, t0);
        d.set_targets(vec![target()], t0);
        d.handle_timeout(t0);
        for (to, req) in sent(&mut d) {
            assert!(answer(&mut d, to, &req, "203.0.113.4:60000", t0));
        }
        // The NAT rebinds; a lost direct path asks for a round now.
        let t1 = t0 + Duration::from_secs(3);
        d.probe_soon(t1);
        assert_eq!(d.poll_timeout(), t1);
        d.handle_timeout(t1);
        for (to, req) in sent(&mut d) {
            assert!(answer(&mut d, to, &req, "203.0.113.4:61000", t1));
        }
        assert_eq!(d.endpoints(), ["203.0.113.4:61000".parse().unwrap()]);
    }

    #[test]
    fn a_symmetric_nat_is_detected_and_its_address_not_reported() {
        let t0 = Instant::now();
        let mut d = Discovery::new(7, t0);
        d.set_local(vec!["10.0.0.5:41641".parse().unwrap()], t0);
        d.set_targets(vec![target()], t0);
        d.handle_timeout(t0);
        let reqs = sent(&mut d);
        assert!(answer(
            &mut d,
            reqs[0].0,
            &reqs[0].1,
            "203.0.113.4:1111",
            t0
        ));
        assert!(answer(
            &mut d,
            reqs[1].0,
            &reqs[1].1,
            "203.0.113.4:2222",
            t0
        ));
        assert_eq!(d.report().mapping_varies, Some(true));
        assert_eq!(d.report().public_ip, Some("203.0.113.4".parse().unwrap()));
        assert_eq!(d.endpoints(), ["10.0.0.5:41641".parse().unwrap()]);
    }

    #[test]
    fn lost_probes_are_retried_then_udp_is_reported_blocked() {
        let t0 = Instant::now();
        let mut d = Discovery::new(7, t0);
        d.set_targets(vec![target()], t0);
        d.handle_timeout(t0);
        let mut total = sent(&mut d).len();
        let mut now = t0;
        for _ in 0..TRIES {
            now = d.poll_timeout();
            d.handle_timeout(now);
            total += sent(&mut d).len();
        }
        assert_eq!(total, 2 * TRIES as usize);
        assert!(!d.report().udp);
        assert_eq!(d.report().preferred(), None);
        assert!(d.poll_timeout() > now);
        // Answers that match nothing, or come from elsewhere, are ignored.
        let mut junk = Vec::new();
        stun::write_binding_response(
            TransactionId([9; 12]),
            "1.2.3.4:5".parse().unwrap(),
            &mut junk,
        );
        assert!(!d.handle_stun(target().addr, &junk, now));
        assert!(!d.handle_stun(target().addr, b"short", now));
    }
}
