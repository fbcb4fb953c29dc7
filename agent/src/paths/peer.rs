//! One peer's paths: its candidates, the pings in flight, and the decision
//! which path WireGuard uses.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use meshd_proto::disco::{self, BirthdayStep, DiscoError, DiscoKeys, Message, TxId};
use meshd_proto::NodeKey;
use rand::Rng;

use super::{
    Action, Endpoint, Out, Own, Path, PathConfig, PathEvent, PeerStatus, RelayId, SocketId,
    Transmit,
};

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
    /// The local socket whose NAT mapping reaches this address: an extra
    /// socket once a birthday probe came through it, else the main one.
    socket: SocketId,
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

/// Where the peer stands in the birthday technique (docs/disco-protocol.md).
#[derive(Debug, Default)]
enum Birthday {
    #[default]
    Idle,
    /// Hard side: offered, waiting for the peer's accept.
    Offered { until: Instant },
    /// Hard side: extra sockets open, each having sent to the peer's public
    /// address; waiting for a probe to come through one of them.
    Holding {
        sockets: Vec<SocketId>,
        until: Instant,
    },
    /// Easy side: accepted, waiting for the hard side's go; holds the
    /// node's probing slot.
    Accepted {
        ip: std::net::IpAddr,
        until: Instant,
    },
    /// Easy side: probing random ports of the peer's public IP.
    Probing {
        ip: std::net::IpAddr,
        start: Instant,
        sent: u32,
        until: Instant,
    },
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
    birthday: Birthday,
    /// When the last birthday attempt with this peer began.
    birthday_last: Option<Instant>,
    /// The extra socket that won a birthday attempt and carries the path.
    won: Option<SocketId>,
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
            birthday: Birthday::Idle,
            birthday_last: None,
            won: None,
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
        own: &Own,
        now: Instant,
    ) {
        match msg {
            Message::Ping { txid } => self.handle_ping(config, txid, from, out, now),
            Message::Pong { txid, .. } => self.handle_pong(config, txid, from, out, now),
            Message::CallMeMaybe { candidates } => {
                self.handle_call(config, &candidates, out, &own.candidates, now)
            }
            Message::Birthday { step, addr } => match from {
                // Only through the relay: it proves the sender, and a replay
                // over UDP must not make us open sockets or probe.
                Endpoint::Relay { .. } => {
                    self.handle_birthday(config, (step, addr), from, out, own, now)
                }
                Endpoint::Udp(_) => {
                    tracing::debug!(peer = %self.key(), "birthday message over UDP ignored");
                }
            },
        }
    }

    /// A packet from the peer came through extra socket `socket` from
    /// `src`: a birthday hit. That socket's mapping reaches `src`, so
    /// everything to `src` leaves from it from now on.
    /// Returns whether the socket is ours: a packet that came on another
    /// extra socket is dropped.
    pub(super) fn hit(
        &mut self,
        config: &PathConfig,
        socket: SocketId,
        src: SocketAddr,
        now: Instant,
    ) -> bool {
        let ours = match &self.birthday {
            Birthday::Holding { sockets, .. } => sockets.contains(&socket),
            _ => self.won == Some(socket),
        };
        if !ours {
            return false;
        }
        let peer = self.key();
        let Some(c) = self.candidate(config, src) else {
            return false;
        };
        if c.socket != socket {
            tracing::info!(%peer, ?socket, %src, "birthday hit");
            c.socket = socket;
            c.unanswered_since = None;
        }
        if !c.has_source() {
            c.learned = Some(now);
        }
        true
    }

    fn handle_birthday(
        &mut self,
        config: &PathConfig,
        (step, addr): (BirthdayStep, SocketAddr),
        via: Endpoint,
        out: &mut Out,
        own: &Own,
        now: Instant,
    ) {
        let b = &config.birthday;
        tracing::debug!(peer = %self.key(), ?step, %addr, "birthday message");
        match step {
            BirthdayStep::Offer => {
                let Some(public) = own.public else {
                    return;
                };
                let busy = !matches!(self.birthday, Birthday::Idle) || out.probing;
                let recent = self
                    .birthday_last
                    .is_some_and(|t| now.saturating_duration_since(t) < b.retry_after);
                // Two hard sides cannot meet this way; and one attempt per
                // `retry_after` bounds what a peer can make us send.
                if !b.enabled || own.mapping_varies || busy || recent || self.direct().is_some() {
                    return;
                }
                // The probing slot is ours from now on, so that the Go
                // cannot find it taken by another peer's attempt.
                out.probing = true;
                self.birthday_last = Some(now);
                self.birthday = Birthday::Accepted {
                    ip: addr.ip(),
                    until: now + b.timeout,
                };
                self.send(
                    out,
                    via,
                    &Message::Birthday {
                        step: BirthdayStep::Accept,
                        addr: public,
                    },
                );
            }
            BirthdayStep::Accept => {
                if !matches!(self.birthday, Birthday::Offered { .. }) {
                    return;
                }
                let count = b.sockets.saturating_sub(out.sockets_open);
                // Without our public IP (STUN lost it meanwhile) the peer
                // would not know where to probe.
                let Some(public) = own.public.filter(|_| count > 0) else {
                    self.birthday = Birthday::Idle;
                    return;
                };
                self.birthday_last = Some(now);
                let mut sockets = Vec::new();
                for _ in 0..count {
                    sockets.push(out.open_socket());
                }
                // Each socket's packet opens a mapping on our NAT (with its
                // own public port) that lets the peer's address in.
                for &s in &sockets {
                    let ping = Message::Ping {
                        txid: TxId(out.rng.random()),
                    };
                    self.send_from(out, s, Endpoint::Udp(addr), &ping);
                }
                self.send(
                    out,
                    via,
                    &Message::Birthday {
                        step: BirthdayStep::Go,
                        addr: public,
                    },
                );
                tracing::info!(peer = %self.key(), sockets = count, target = %addr, "birthday: sockets open");
                self.birthday = Birthday::Holding {
                    sockets,
                    until: now + b.timeout,
                };
            }
            BirthdayStep::Go => {
                let Birthday::Accepted { ip, until } = self.birthday else {
                    return;
                };
                tracing::info!(peer = %self.key(), %ip, probes = b.probes, "birthday: probing");
                self.birthday = Birthday::Probing {
                    ip,
                    start: now,
                    sent: 0,
                    until,
                };
                self.birthday_tick(config, out, now);
            }
        }
    }

    /// The hard side offers an attempt with each probe once ordinary
    /// probing has not found a path for `after`, and no attempt ran within
    /// `retry_after`.
    fn maybe_offer(&mut self, config: &PathConfig, out: &mut Out, own: &Own, now: Instant) {
        let b = &config.birthday;
        let (Some(public), Some(relay)) = (own.public, self.relay) else {
            return;
        };
        let due = now.saturating_duration_since(self.relayed_since) >= b.after
            && self
                .birthday_last
                .is_none_or(|t| now.saturating_duration_since(t) >= b.retry_after);
        if !b.enabled
            || !own.mapping_varies
            || !due
            || !matches!(self.birthday, Birthday::Idle)
            || self.direct().is_some()
            || out.sockets_open >= b.sockets
        {
            return;
        }
        // An offer costs one relayed packet, so it goes with every probe
        // until one is accepted (the peer may be busy with another
        // attempt); only the sockets are limited to one attempt per
        // `retry_after`.
        self.birthday = Birthday::Offered {
            until: now + b.timeout,
        };
        let via = Endpoint::Relay {
            relay,
            peer: self.key(),
        };
        tracing::debug!(peer = %self.key(), %public, "birthday: offering");
        self.send(
            out,
            via,
            &Message::Birthday {
                step: BirthdayStep::Offer,
                addr: public,
            },
        );
    }

    /// Sends the probes that are due, and ends attempts that ran out.
    fn birthday_tick(&mut self, config: &PathConfig, out: &mut Out, now: Instant) {
        let b = &config.birthday;
        match self.birthday {
            Birthday::Offered { until } if until <= now => {
                self.birthday = Birthday::Idle;
            }
            Birthday::Accepted { until, .. } if until <= now => {
                out.probing = false;
                self.birthday = Birthday::Idle;
            }
            Birthday::Holding { until, .. } if until <= now || self.won.is_some() => {
                self.end_holding(out);
            }
            Birthday::Probing {
                ip,
                start,
                sent,
                until,
            } => {
                let elapsed = now.saturating_duration_since(start);
                let due = u64::try_from(elapsed.as_micros() * u128::from(b.probe_rate) / 1_000_000)
                    .unwrap_or(u64::MAX)
                    .saturating_add(1)
                    .min(u64::from(b.probes));
                let due = u32::try_from(due).unwrap_or(b.probes);
                for _ in sent..due {
                    let port = out.rng.random_range(1024..=65535);
                    let ping = Message::Ping {
                        txid: TxId(out.rng.random()),
                    };
                    self.send_from(
                        out,
                        SocketId::MAIN,
                        Endpoint::Udp(SocketAddr::new(ip, port)),
                        &ping,
                    );
                }
                let done = due >= b.probes || until <= now || self.direct().is_some();
                if done {
                    tracing::info!(peer = %self.key(), probes = due, direct = self.direct().is_some(), "birthday: probing ended");
                    out.probing = false;
                    self.birthday = Birthday::Idle;
                } else {
                    self.birthday = Birthday::Probing {
                        ip,
                        start,
                        sent: due,
                        until,
                    };
                }
            }
            _ => {}
        }
    }

    /// The hard side's attempt ends: every extra socket but the winner is
    /// closed.
    fn end_holding(&mut self, out: &mut Out) {
        if !matches!(self.birthday, Birthday::Holding { .. }) {
            return;
        }
        if let Birthday::Holding { sockets, .. } = std::mem::take(&mut self.birthday) {
            let mut closed = 0;
            for s in sockets {
                if Some(s) != self.won {
                    self.close_socket(s, out);
                    closed += 1;
                }
            }
            tracing::info!(peer = %self.key(), won = ?self.won, closed, "birthday: attempt over");
        }
    }

    fn birthday_wake(&self, config: &PathConfig) -> Option<Instant> {
        match self.birthday {
            Birthday::Idle => None,
            Birthday::Offered { until }
            | Birthday::Accepted { until, .. }
            | Birthday::Holding { until, .. } => Some(until),
            Birthday::Probing {
                start, sent, until, ..
            } => {
                // Rounded up, so the wake comes after the probe is due and
                // never at the same instant again.
                let rate = u64::from(config.birthday.probe_rate.max(1));
                let next = start
                    + Duration::from_micros(
                        u64::from(sent).saturating_mul(1_000_000).div_ceil(rate),
                    );
                Some(next.min(until))
            }
        }
    }

    /// Closes every extra socket of this peer (it is removed).
    pub(super) fn close_sockets(&mut self, out: &mut Out) {
        if let Birthday::Accepted { .. } | Birthday::Probing { .. } = self.birthday {
            out.probing = false;
        }
        self.end_holding(out);
        self.birthday = Birthday::Idle;
        if let Some(s) = self.won.take() {
            self.close_socket(s, out);
        }
    }

    /// Closes an extra socket; addresses reached through it go back to the
    /// main socket, so nothing is ever sent from a closed one.
    fn close_socket(&mut self, socket: SocketId, out: &mut Out) {
        out.close_socket(socket);
        for c in self.candidates.values_mut() {
            if c.socket == socket {
                c.socket = SocketId::MAIN;
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
    fn probe(&mut self, config: &PathConfig, out: &mut Out, own: &Own, now: Instant) {
        self.maybe_offer(config, out, own, now);
        let own = &own.candidates;
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

    /// Sends from the socket whose mapping reaches `to`.
    fn send(&self, out: &mut Out, to: Endpoint, msg: &Message) {
        let from = match to {
            Endpoint::Udp(a) => self.candidates.get(&a).map_or(SocketId::MAIN, |c| c.socket),
            Endpoint::Relay { .. } => SocketId::MAIN,
        };
        self.send_from(out, from, to, msg);
    }

    fn send_from(&self, out: &mut Out, from: SocketId, to: Endpoint, msg: &Message) {
        match self.keys.seal(msg, out.rng.random()) {
            Ok(packet) => {
                tracing::trace!(peer = %self.key(), ?from, ?to, ?msg, "disco packet out");
                out.transmits.push_back(Transmit { from, to, packet });
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
        let (endpoint, from) = match path {
            Path::Direct(a) => {
                let from = self.candidates.get(&a).map_or(SocketId::MAIN, |c| c.socket);
                (Some(Endpoint::Udp(a)), from)
            }
            Path::Relay(relay) => (Some(Endpoint::Relay { relay, peer }), SocketId::MAIN),
            // The engine keeps its old endpoint: sending into a dead path
            // loses nothing more than holding packets would.
            Path::None => (None, SocketId::MAIN),
        };
        // The winning socket is kept while a path uses it; the attempt's
        // other sockets close as soon as one wins, and a winner whose path
        // is gone closes too (its mapping may be stale by the next attempt).
        let winner = (from != SocketId::MAIN).then_some(from);
        if winner != self.won {
            if let Some(old) = self.won.take() {
                if matches!(&self.birthday, Birthday::Holding { sockets, .. } if sockets.contains(&old))
                {
                    // Closed with the attempt's others.
                    for c in self.candidates.values_mut() {
                        if c.socket == old {
                            c.socket = SocketId::MAIN;
                        }
                    }
                } else {
                    self.close_socket(old, out);
                }
            }
            self.won = winner;
            if winner.is_some() {
                self.end_holding(out);
            }
        }
        if let Some(endpoint) = endpoint {
            out.actions.push_back(Action::SetEndpoint {
                peer,
                endpoint,
                from,
            });
        }
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
        let birthday = self.birthday_wake(config);
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
            birthday,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub(super) fn tick(&mut self, config: &PathConfig, out: &mut Out, own: &Own, now: Instant) {
        self.birthday_tick(config, out, now);
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
