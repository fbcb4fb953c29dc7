//! One peer's paths: its candidates, the pings in flight, and the decision
//! which path WireGuard uses.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use meshd_proto::disco::{self, DiscoError, DiscoKeys, Message, TxId};
use meshd_proto::NodeKey;
use rand::Rng;

use super::{Action, Endpoint, Out, Path, PathConfig, PathEvent, PeerStatus, RelayId, Transmit};

/// RTT samples kept per candidate.
const RTT_SAMPLES: usize = 5;
/// Transaction ids of received pings remembered, so a replayed ping is not
/// answered again.
const SEEN_PINGS: usize = 32;
/// Contenders (candidates that beat the active path once) pinged with each
/// heartbeat until they win or lose.
const MAX_CONTENDERS: usize = 2;
/// A learned candidate (seen only as a ping's source) that has not answered
/// for this long is forgotten.
const LEARNED_TTL: Duration = Duration::from_secs(120);
/// Pings answered to an address at most this often with a ping of our own.
const PINGBACK_GAP: Duration = Duration::from_secs(1);
/// A call-me-maybe makes us ping its candidates at most this often.
const CALL_GAP: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Candidate {
    /// Listed by the coordinator.
    from_coordinator: bool,
    /// Listed in the peer's last call-me-maybe.
    from_call: bool,
    /// Seen as the source of a ping or pong.
    learned: Option<Instant>,
    last_pong: Option<Instant>,
    last_pingback: Option<Instant>,
    /// The first ping sent since the last pong: the path is silent since.
    unanswered_since: Option<Instant>,
    rtts: VecDeque<Duration>,
    /// Pongs in a row that beat the active path by the margin.
    wins: u32,
}

impl Candidate {
    fn rtt(&self) -> Option<Duration> {
        let mut v: Vec<Duration> = self.rtts.iter().copied().collect();
        v.sort();
        v.get(v.len().saturating_sub(1) / 2).copied()
    }

    fn has_source(&self) -> bool {
        self.from_coordinator || self.from_call || self.learned.is_some()
    }

    fn suspect(&self, config: &PathConfig, now: Instant) -> bool {
        self.unanswered_since
            .is_some_and(|u| u + config.suspect_after <= now)
    }

    /// Answered recently and not silent since: usable at once.
    fn alive(&self, config: &PathConfig, now: Instant) -> bool {
        self.last_pong
            .is_some_and(|t| now.saturating_duration_since(t) <= config.alive_for)
            && !self.suspect(config, now)
    }
}

#[derive(Debug)]
struct Sent {
    to: Endpoint,
    at: Instant,
    /// The id of a ping the operator asked for.
    user: Option<u64>,
}

#[derive(Debug)]
pub(super) struct Peer {
    keys: DiscoKeys,
    relay: Option<RelayId>,
    candidates: BTreeMap<SocketAddr, Candidate>,
    path: Path,
    path_since: Instant,
    /// When the current stretch without a direct path began.
    relayed_since: Instant,
    outstanding: BTreeMap<TxId, Sent>,
    seen_pings: VecDeque<TxId>,
    last_activity: Instant,
    last_heartbeat: Instant,
    next_probe: Option<Instant>,
    /// The wait after the next probe while not direct.
    probe_backoff: Duration,
    last_probe: Option<Instant>,
    last_call: Option<Instant>,
    relay_rtt: Option<Duration>,
}

impl Peer {
    pub(super) fn new(
        config: &PathConfig,
        keys: DiscoKeys,
        candidates: &[SocketAddr],
        relay: Option<RelayId>,
        out: &mut Out,
        now: Instant,
    ) -> Peer {
        let mut p = Peer {
            keys,
            relay: None,
            candidates: BTreeMap::new(),
            path: Path::None,
            path_since: now,
            relayed_since: now,
            outstanding: BTreeMap::new(),
            seen_pings: VecDeque::new(),
            last_activity: now,
            last_heartbeat: now,
            next_probe: Some(now),
            probe_backoff: config.reprobe_min,
            last_probe: None,
            last_call: None,
            relay_rtt: None,
        };
        tracing::debug!(peer = %p.key(), ?candidates, ?relay, "peer added");
        p.update(config, candidates, relay, out, now);
        p
    }

    pub(super) fn key(&self) -> NodeKey {
        self.keys.peer()
    }

    pub(super) fn open(&self, packet: &[u8]) -> Result<Message, DiscoError> {
        self.keys.open(packet)
    }

    /// The node's own key changed: packets are sealed with the new one.
    pub(super) fn set_keys(&mut self, keys: DiscoKeys) {
        self.keys = keys;
    }

    /// What the coordinator says now: the relay, and the candidates (which
    /// replace its earlier list; new ones are probed).
    pub(super) fn update(
        &mut self,
        config: &PathConfig,
        candidates: &[SocketAddr],
        relay: Option<RelayId>,
        out: &mut Out,
        now: Instant,
    ) {
        if relay != self.relay {
            self.relay = relay;
            if let (Path::Relay(_) | Path::None, Some(r)) = (self.path, relay) {
                self.set_path(Path::Relay(r), out, now);
            }
        }
        for c in self.candidates.values_mut() {
            c.from_coordinator = false;
        }
        let mut fresh = Vec::new();
        for &a in candidates.iter().take(disco::MAX_CANDIDATES) {
            let known = self.candidates.contains_key(&a);
            if let Some(c) = self.candidate(config, a) {
                c.from_coordinator = true;
                if !known {
                    fresh.push(a);
                }
            }
        }
        self.prune(now);
        if fresh.is_empty() || self.last_probe.is_none() {
            return;
        }
        tracing::debug!(peer = %self.key(), candidates = ?fresh, "new candidates");
        if matches!(self.path, Path::Direct(_)) {
            for a in fresh {
                self.send_ping(config, Endpoint::Udp(a), None, out, now);
            }
        } else {
            self.reprobe_soon(config, now);
        }
    }

    /// The candidate at `addr`, added if there is room (evicting the oldest
    /// learned one that is not in use if need be).
    fn candidate(&mut self, config: &PathConfig, addr: SocketAddr) -> Option<&mut Candidate> {
        if !self.candidates.contains_key(&addr) && self.candidates.len() >= config.max_candidates {
            let active = self.direct();
            let victim = self
                .candidates
                .iter()
                .filter(|(a, c)| Some(**a) != active && !c.from_coordinator && !c.from_call)
                .min_by_key(|(_, c)| c.last_pong.or(c.learned))
                .map(|(a, _)| *a)?;
            self.candidates.remove(&victim);
        }
        Some(self.candidates.entry(addr).or_default())
    }

    /// Drops candidates nobody lists any more, and learned ones that have
    /// long stopped answering; never the active path.
    fn prune(&mut self, now: Instant) {
        let active = self.direct();
        self.candidates.retain(|a, c| {
            if Some(*a) == active {
                return true;
            }
            if let Some(learned) = c.learned {
                let heard = c.last_pong.map_or(learned, |p| p.max(learned));
                if now.saturating_duration_since(heard) > LEARNED_TTL {
                    c.learned = None;
                }
            }
            c.has_source()
        });
    }

    fn direct(&self) -> Option<SocketAddr> {
        match self.path {
            Path::Direct(a) => Some(a),
            _ => None,
        }
    }

    fn in_use(&self, config: &PathConfig, now: Instant) -> bool {
        self.last_activity + config.idle_after > now
    }

    pub(super) fn note_activity(&mut self, config: &PathConfig, now: Instant) {
        let was_idle = !self.in_use(config, now);
        self.last_activity = now;
        if was_idle {
            self.reprobe_soon(config, now);
        }
    }

    /// Probes again soon if the peer is in use and not direct: something
    /// changed that may open a path (or the peer became busy).
    pub(super) fn reprobe_soon(&mut self, config: &PathConfig, now: Instant) {
        if !self.in_use(config, now) || self.direct().is_some() {
            return;
        }
        self.probe_backoff = config.reprobe_min;
        let earliest = self.last_probe.map_or(now, |t| t + config.reprobe_min);
        self.next_probe = Some(earliest.max(now));
    }

    pub(super) fn status(&self) -> PeerStatus {
        let rtt = match self.path {
            Path::Direct(a) => self.candidates.get(&a).and_then(Candidate::rtt),
            Path::Relay(_) => self.relay_rtt,
            Path::None => None,
        };
        PeerStatus {
            path: self.path,
            rtt,
            since: self.path_since,
            candidates: self.candidates.keys().copied().collect(),
        }
    }

    /// Sends an operator's ping on the current path; `false` if there is none.
    pub(super) fn user_ping(
        &mut self,
        config: &PathConfig,
        id: u64,
        out: &mut Out,
        now: Instant,
    ) -> bool {
        self.note_activity(config, now);
        let to = match (self.path, self.relay) {
            (Path::Direct(a), _) => Endpoint::Udp(a),
            (_, Some(relay)) => Endpoint::Relay {
                relay,
                peer: self.key(),
            },
            (_, None) => return false,
        };
        self.send_ping(config, to, Some(id), out, now);
        self.reprobe_soon(config, now);
        true
    }

    pub(super) fn handle(
        &mut self,
        config: &PathConfig,
        msg: Message,
        from: Endpoint,
        out: &mut Out,
        own: &[SocketAddr],
        now: Instant,
    ) {
        match msg {
            Message::Ping { txid } => self.handle_ping(config, txid, from, out, now),
            Message::Pong { txid, .. } => self.handle_pong(config, txid, from, out, now),
            Message::CallMeMaybe { candidates } => {
                self.handle_call(config, &candidates, out, own, now)
            }
        }
    }

    fn handle_ping(
        &mut self,
        config: &PathConfig,
        txid: TxId,
        from: Endpoint,
        out: &mut Out,
        now: Instant,
    ) {
        if self.seen_pings.contains(&txid) {
            tracing::trace!(peer = %self.key(), ?txid, "replayed ping dropped");
            return;
        }
        if self.seen_pings.len() == SEEN_PINGS {
            self.seen_pings.pop_front();
        }
        self.seen_pings.push_back(txid);
        let observed = match from {
            Endpoint::Udp(a) => a,
            Endpoint::Relay { .. } => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        };
        self.send(out, from, &Message::Pong { txid, observed });
        let Endpoint::Udp(src) = from else {
            return;
        };
        let active = self.direct();
        // A ping from a new address is how a peer behind a filtering NAT
        // shows the mapping it opened towards us: it becomes a candidate,
        // and our own ping through it proves the path for our side.
        let Some(c) = self.candidate(config, src) else {
            return;
        };
        if !c.has_source() {
            c.learned = Some(now);
        }
        let pingback = !c.alive(config, now)
            && active != Some(src)
            && c.last_pingback
                .is_none_or(|t| now.saturating_duration_since(t) >= PINGBACK_GAP);
        if pingback {
            c.last_pingback = Some(now);
            self.send_ping(config, from, None, out, now);
        }
        // The peer reaching us from elsewhere may mean our active path is
        // gone (its NAT rebound): check it now rather than at the next
        // keepalive.
        if let Some(active) = active.filter(|a| *a != src) {
            if now.saturating_duration_since(self.last_heartbeat) >= config.suspect_interval {
                self.last_heartbeat = now;
                self.send_ping(config, Endpoint::Udp(active), None, out, now);
            }
        }
    }

    fn handle_pong(
        &mut self,
        config: &PathConfig,
        txid: TxId,
        from: Endpoint,
        out: &mut Out,
        now: Instant,
    ) {
        let Some(sent) = self.outstanding.remove(&txid) else {
            tracing::trace!(peer = %self.key(), ?txid, "pong for no ping in flight");
            return;
        };
        let rtt = now.saturating_duration_since(sent.at);
        match (sent.to, from) {
            (Endpoint::Relay { relay, .. }, Endpoint::Relay { .. }) => {
                self.relay_rtt = Some(rtt);
                if let Some(id) = sent.user {
                    let peer = self.key();
                    let via = Path::Relay(relay);
                    out.events
                        .push_back(PathEvent::PingReply { peer, id, via, rtt });
                }
            }
            (Endpoint::Udp(to), Endpoint::Udp(src)) if to == src => {
                if let Some(id) = sent.user {
                    let peer = self.key();
                    let via = Path::Direct(src);
                    out.events
                        .push_back(PathEvent::PingReply { peer, id, via, rtt });
                }
                self.proven(config, src, rtt, out, now);
            }
            (Endpoint::Udp(to), Endpoint::Udp(src)) => {
                // The peer's NAT answers from another mapping than the one
                // we pinged: that one is the path, if anything is.
                tracing::debug!(peer = %self.key(), %to, %src, "pong from another address");
                if let Some(c) = self.candidate(config, src) {
                    c.learned.get_or_insert(now);
                    self.send_ping(config, from, None, out, now);
                }
            }
            (to, from) => {
                tracing::debug!(peer = %self.key(), ?to, ?from, "pong came another way than its ping");
            }
        }
    }

    /// A pong from `addr` answered our ping there: the direct path works.
    fn proven(
        &mut self,
        config: &PathConfig,
        addr: SocketAddr,
        rtt: Duration,
        out: &mut Out,
        now: Instant,
    ) {
        let Some(c) = self.candidates.get_mut(&addr) else {
            return;
        };
        c.last_pong = Some(now);
        c.unanswered_since = None;
        if c.rtts.len() == RTT_SAMPLES {
            c.rtts.pop_front();
        }
        c.rtts.push_back(rtt);
        let peer = self.key();
        let Some(active) = self.direct() else {
            self.probe_backoff = config.reprobe_min;
            self.next_probe = Some(now + config.reprobe_direct);
            self.last_heartbeat = now;
            let after = now.saturating_duration_since(self.relayed_since);
            tracing::info!(%peer, %addr, ?after, ?rtt, "path upgraded to direct");
            out.events.push_back(PathEvent::Upgraded {
                peer,
                addr,
                after,
                rtt,
            });
            self.set_path(Path::Direct(addr), out, now);
            return;
        };
        if active == addr {
            return;
        }
        let (current, suspect) = match self.candidates.get(&active) {
            Some(a) => (a.rtt(), a.suspect(config, now)),
            None => (None, true),
        };
        let wins = {
            let margin = current.map(|cur| {
                (cur.saturating_mul(config.switch_percent) / 100).max(config.switch_margin)
            });
            let Some(c) = self.candidates.get_mut(&addr) else {
                return;
            };
            match (current, margin) {
                (Some(cur), Some(m)) if rtt + m <= cur => c.wins += 1,
                _ => c.wins = 0,
            }
            c.wins
        };
        if suspect || wins >= config.switch_samples {
            self.switch(config, active, addr, out, now);
        }
    }

    fn switch(
        &mut self,
        config: &PathConfig,
        from: SocketAddr,
        to: SocketAddr,
        out: &mut Out,
        now: Instant,
    ) {
        let Some(c) = self.candidates.get_mut(&to) else {
            return;
        };
        c.wins = 0;
        let rtt = c.rtt().unwrap_or_default();
        let peer = self.key();
        tracing::info!(%peer, %from, %to, ?rtt, "direct path switched");
        out.events.push_back(PathEvent::Switched {
            peer,
            from,
            to,
            rtt,
        });
        self.last_heartbeat = now;
        self.next_probe = Some(now + config.reprobe_direct);
        self.set_path(Path::Direct(to), out, now);
    }

    fn handle_call(
        &mut self,
        config: &PathConfig,
        candidates: &[SocketAddr],
        out: &mut Out,
        own: &[SocketAddr],
        now: Instant,
    ) {
        for c in self.candidates.values_mut() {
            c.from_call = false;
        }
        for &a in candidates.iter().take(disco::MAX_CANDIDATES) {
            if let Some(c) = self.candidate(config, a) {
                c.from_call = true;
            }
        }
        self.prune(now);
        if self
            .last_call
            .is_some_and(|t| now.saturating_duration_since(t) < CALL_GAP)
        {
            return;
        }
        self.last_call = Some(now);
        tracing::debug!(peer = %self.key(), ?candidates, ?own, "call-me-maybe: pinging its candidates");
        // Our ping towards each candidate opens our NAT for its pings while
        // its pings towards us open its own: both at once.
        for &a in candidates.iter().take(disco::MAX_CANDIDATES) {
            if self.candidates.contains_key(&a) {
                self.send_ping(config, Endpoint::Udp(a), None, out, now);
            }
        }
    }

    /// Pings every candidate and, through the relay, sends our candidates
    /// and a ping (for the relay's RTT).
    fn probe(&mut self, config: &PathConfig, out: &mut Out, own: &[SocketAddr], now: Instant) {
        self.last_probe = Some(now);
        self.prune(now);
        let targets: Vec<SocketAddr> = self.candidates.keys().copied().collect();
        tracing::debug!(peer = %self.key(), candidates = ?targets, "probing");
        for a in targets {
            self.send_ping(config, Endpoint::Udp(a), None, out, now);
        }
        if let Some(relay) = self.relay {
            let via = Endpoint::Relay {
                relay,
                peer: self.key(),
            };
            if !own.is_empty() {
                let candidates = own.to_vec();
                self.send(out, via, &Message::CallMeMaybe { candidates });
            }
            self.send_ping(config, via, None, out, now);
        }
    }

    fn send_ping(
        &mut self,
        config: &PathConfig,
        to: Endpoint,
        user: Option<u64>,
        out: &mut Out,
        now: Instant,
    ) {
        if self.outstanding.len() >= config.max_outstanding {
            if let Some(oldest) = self
                .outstanding
                .iter()
                .min_by_key(|(_, s)| s.at)
                .map(|(t, _)| *t)
            {
                self.outstanding.remove(&oldest);
            }
        }
        let txid = TxId(out.rng.random());
        self.outstanding.insert(txid, Sent { to, at: now, user });
        if let Endpoint::Udp(a) = to {
            if let Some(c) = self.candidates.get_mut(&a) {
                c.unanswered_since.get_or_insert(now);
            }
        }
        self.send(out, to, &Message::Ping { txid });
    }

    fn send(&self, out: &mut Out, to: Endpoint, msg: &Message) {
        match self.keys.seal(msg, out.rng.random()) {
            Ok(packet) => {
                tracing::trace!(peer = %self.key(), ?to, ?msg, "disco packet out");
                out.transmits.push_back(Transmit { to, packet });
            }
            Err(e) => tracing::warn!(peer = %self.key(), error = %e, "disco message not sent"),
        }
    }

    fn set_path(&mut self, path: Path, out: &mut Out, now: Instant) {
        if self.path == path {
            return;
        }
        if matches!(path, Path::Relay(_) | Path::None) && self.direct().is_some() {
            self.relayed_since = now;
        }
        self.path = path;
        self.path_since = now;
        let peer = self.key();
        let endpoint = match path {
            Path::Direct(a) => Endpoint::Udp(a),
            Path::Relay(relay) => Endpoint::Relay { relay, peer },
            // The engine keeps its old endpoint: sending into a dead path
            // loses nothing more than holding packets would.
            Path::None => return,
        };
        out.actions
            .push_back(Action::SetEndpoint { peer, endpoint });
    }

    /// The active direct path went silent: another live direct path if
    /// there is one, else the relay, and probe again at once.
    fn fall_back(&mut self, config: &PathConfig, from: SocketAddr, out: &mut Out, now: Instant) {
        let silent_since = self
            .candidates
            .get(&from)
            .and_then(|c| c.unanswered_since)
            .unwrap_or(now);
        if let Some(alt) = self.best_alive(config, from, silent_since, now) {
            self.switch(config, from, alt, out, now);
            return;
        }
        let to = self.relay.map_or(Path::None, Path::Relay);
        let peer = self.key();
        let silent_for = now.saturating_duration_since(silent_since);
        tracing::info!(%peer, %from, %to, ?silent_for, "direct path lost: falling back");
        out.events.push_back(PathEvent::FellBack {
            peer,
            from,
            to,
            silent_for,
        });
        self.set_path(to, out, now);
        self.probe_backoff = config.reprobe_min;
        self.next_probe = Some(now);
    }

    /// The fastest other candidate that answered after `after`.
    fn best_alive(
        &self,
        config: &PathConfig,
        except: SocketAddr,
        after: Instant,
        now: Instant,
    ) -> Option<SocketAddr> {
        self.candidates
            .iter()
            .filter(|(a, c)| {
                **a != except && c.alive(config, now) && c.last_pong.is_some_and(|t| t >= after)
            })
            .min_by_key(|(a, c)| (c.rtt(), **a))
            .map(|(a, _)| *a)
    }

    /// When the active direct path is pinged next: every `heartbeat` while
    /// in use, every `keepalive` while idle, every `suspect_interval` once a
    /// ping went unanswered for `suspect_after`.
    fn heartbeat_at(&self, config: &PathConfig) -> Option<Instant> {
        let active = self.direct()?;
        let busy = self.last_activity + config.idle_after > self.last_heartbeat + config.heartbeat;
        let interval = if busy {
            config.heartbeat
        } else {
            config.keepalive
        };
        let mut at = self.last_heartbeat + interval;
        if let Some(u) = self
            .candidates
            .get(&active)
            .and_then(|c| c.unanswered_since)
        {
            at = at
                .min((u + config.suspect_after).max(self.last_heartbeat + config.suspect_interval));
        }
        Some(at)
    }

    fn dead_at(&self, config: &PathConfig) -> Option<Instant> {
        let active = self.direct()?;
        let u = self.candidates.get(&active)?.unanswered_since?;
        Some(u + config.dead_after)
    }

    pub(super) fn next_wake(&self, config: &PathConfig) -> Option<Instant> {
        let expiry = self
            .outstanding
            .values()
            .map(|s| s.at + config.ping_timeout)
            .min();
        [
            self.next_probe,
            self.heartbeat_at(config),
            self.dead_at(config),
            expiry,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub(super) fn tick(
        &mut self,
        config: &PathConfig,
        out: &mut Out,
        own: &[SocketAddr],
        now: Instant,
    ) {
        let peer = self.key();
        self.outstanding.retain(|_, s| {
            let live = s.at + config.ping_timeout > now;
            if let (false, Some(id)) = (live, s.user) {
                out.events.push_back(PathEvent::PingTimedOut { peer, id });
            }
            live
        });
        if let Some(active) = self.direct() {
            if self.dead_at(config).is_some_and(|t| t <= now) {
                self.fall_back(config, active, out, now);
            } else if let Some(alt) = self
                .candidates
                .get(&active)
                .filter(|c| c.suspect(config, now))
                .and_then(|c| c.unanswered_since)
                .and_then(|u| self.best_alive(config, active, u, now))
            {
                self.switch(config, active, alt, out, now);
            }
        }
        if let Some(active) = self.direct() {
            if self.heartbeat_at(config).is_some_and(|t| t <= now) {
                self.last_heartbeat = now;
                self.send_ping(config, Endpoint::Udp(active), None, out, now);
                let contenders: Vec<SocketAddr> = self
                    .candidates
                    .iter()
                    .filter(|(a, c)| **a != active && c.wins > 0)
                    .map(|(a, _)| *a)
                    .take(MAX_CONTENDERS)
                    .collect();
                for a in contenders {
                    self.send_ping(config, Endpoint::Udp(a), None, out, now);
                }
            }
        }
        if self.next_probe.is_some_and(|t| t <= now) {
            if !self.in_use(config, now) {
                // Idle: probing waits for the next activity.
                self.next_probe = None;
            } else {
                self.probe(config, out, own, now);
                self.next_probe = Some(if self.direct().is_some() {
                    now + config.reprobe_direct
                } else {
                    let wait = self.probe_backoff;
                    self.probe_backoff = wait.saturating_mul(2).min(config.reprobe_relayed);
                    now + wait
                });
            }
        }
    }
}
