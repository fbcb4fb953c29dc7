//! The decisions of a node's control connection, sans-IO: which coordinator
//! address to try next and how long to wait first, whether to register or log
//! in and with which key, when to rotate the key and when to report
//! endpoints. The driver ([`crate::node_runtime`]) feeds it what happened
//! ([`Supervisor::handle`], [`Supervisor::handle_timeout`]) with the time,
//! and carries out its [`Command`]s; it never reads a clock or a socket.
//!
//! Calling order: after every `handle*`, drain [`Supervisor::poll_command`];
//! call [`Supervisor::handle_timeout`] when [`Supervisor::poll_timeout`] is
//! due. `now` must not go backwards.
//!
//! Reconnecting: the addresses of the join token are tried in order. A round
//! of attempts starts with the address of the last synchronised session or,
//! when a session on an address ended, with the next one (the one that just
//! failed is likely dead); a failed address moves on to the next at once,
//! and when every address has failed the supervisor waits an exponential
//! backoff (doubling from `backoff_min` to `backoff_max`) with jitter (a
//! uniform draw from the upper half of the interval), so nodes that lost the
//! same coordinator do not return in lockstep. A session that was fully
//! synchronised resets the backoff, and when it ends the next attempt comes
//! within `reconnect_jitter`. An address not reached yet in this
//! process gets a short handshake timeout (doubling with each failed round),
//! so a dead one does not hold up the others.
//!
//! Going home: the token's first address is the node's home. While
//! connected elsewhere, the supervisor asks for a probe of an earlier
//! address every `return_check` to twice that (random), and moves there when
//! it answers; a move that does not end synchronised there doubles the
//! interval, up to `return_check_max`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshd_proto::ErrorCode;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Immediate re-joins (register → log in → register …) before the
/// supervisor backs off instead.
const MAX_QUICK_RETRIES: u32 = 3;

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// How many coordinator addresses the join token lists (at least 1).
    pub addresses: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// After a synchronised session ends, the next attempt comes after a
    /// random wait up to this (the backoff applies from the next failure).
    pub reconnect_jitter: Duration,
    /// A session that is not synchronised this long after the transport came
    /// up is abandoned.
    pub join_timeout: Duration,
    /// Rotate the key this often; `None`: only when asked.
    pub rotate_every: Option<Duration>,
    /// A rotation not confirmed this long after it was sent ends the session
    /// (the next login settles which key counts).
    pub rotation_timeout: Duration,
    /// The handshake timeout for an address reached before in this process.
    pub handshake_timeout: Duration,
    /// The handshake timeout for an address not reached yet, and for probes,
    /// in the first round; it doubles with every failed round, up to
    /// `handshake_timeout`.
    pub first_handshake_timeout: Duration,
    /// While connected to an address other than the first, how often (at
    /// least; at most twice as often) an earlier one is probed.
    pub return_check: Duration,
    pub return_check_max: Duration,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            addresses: 1,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            reconnect_jitter: Duration::from_millis(250),
            join_timeout: Duration::from_secs(20),
            rotate_every: None,
            rotation_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            first_handshake_timeout: Duration::from_secs(2),
            return_check: Duration::from_secs(10),
            return_check_max: Duration::from_secs(300),
        }
    }
}

/// What the node knows about its registration when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The coordinator accepted this node's key before (a login will do).
    pub registered: bool,
    /// A join token was given: the node may register.
    pub can_register: bool,
    /// A key from a rotation whose outcome is unknown is on disk.
    pub pending_key: bool,
}

/// Which key a login proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChoice {
    /// The node's key.
    Current,
    /// The key of an unconfirmed rotation.
    Pending,
}

/// How the next session authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    Register,
    Login(KeyChoice),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The transport to the address of the last `Connect` is up.
    Connected,
    /// The transport to that address could not be set up.
    ConnectFailed { error: String },
    /// The coordinator accepted the node (RegisterOk / LoginOk).
    Joined,
    /// The full peer map has been applied to the data plane.
    Synced,
    /// The coordinator refused and closed the session.
    Rejected { code: ErrorCode, message: String },
    /// The session ended in any other way.
    Lost { error: String },
    /// The operator asked for a new key.
    RotateRequested,
    /// The coordinator confirmed the new key (RotateKeyOk).
    RotationDone,
    /// The node's underlay endpoints, as found now.
    Endpoints(Vec<SocketAddr>),
    /// The outcome of a [`Command::Probe`].
    Probed { address: usize, reachable: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Set up the transport to address `address` of the token, giving its
    /// handshake `handshake_timeout`, and authenticate as `join` says.
    Connect {
        address: usize,
        join: JoinKind,
        handshake_timeout: Duration,
    },
    /// Find out whether address `address` answers (a transport handshake,
    /// then close), beside the current session; report [`Input::Probed`].
    Probe {
        address: usize,
        handshake_timeout: Duration,
    },
    /// Close the current session (a timeout decided it is no good).
    Disconnect,
    ReportEndpoints(Vec<SocketAddr>),
    /// Make a new key pair, keep it as the pending key, and ask the
    /// coordinator to switch to it.
    RotateKey,
    /// The pending key is the node's key now (on disk and in the engine).
    PromotePendingKey,
    /// The pending key never took effect: delete it.
    DiscardPendingKey,
    /// Nothing more will work without the operator (a refused token, a node
    /// the coordinator no longer knows). The session is over for good.
    Fatal(String),
}

/// Where the control connection stands, for `meshd status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlState {
    Connecting {
        address: usize,
    },
    /// Transport up, waiting for the welcome and the peer map.
    Joining {
        address: usize,
    },
    Connected {
        address: usize,
        since: Instant,
    },
    /// Waiting before the next round of attempts.
    Backoff {
        until: Instant,
    },
    /// Given up; see the `Fatal` command's reason.
    Stopped {
        reason: String,
    },
}

#[derive(Debug)]
pub struct Supervisor {
    config: SupervisorConfig,
    identity: Identity,
    rng: SmallRng,
    state: ControlState,
    /// The join of the session being set up or running.
    join: JoinKind,
    /// Where the next round of attempts starts.
    round_start: usize,
    /// By address: a transport to it came up in this process.
    reached: Vec<bool>,
    /// When to probe an earlier address (connected elsewhere than home).
    return_at: Option<Instant>,
    /// The interval `return_at` is drawn from (from it to twice it).
    return_wait: Duration,
    /// The address a probe in flight checks.
    probing: Option<usize>,
    /// Probes cycle through the addresses before the current one.
    probes: usize,
    /// Moving to this address after a probe: it counts as a return only if
    /// the session synchronises there.
    returning: Option<usize>,
    /// Addresses tried in this round.
    tried: usize,
    /// Rounds failed since the last synchronised session.
    failures: u32,
    /// A Register was sent and its answer not seen: it may have succeeded.
    register_unsure: bool,
    /// Immediate retries with another join since the last welcome; bounded,
    /// so a coordinator that contradicts itself cannot make a busy loop.
    quick_retries: u32,
    /// Set when the current session's Login uses the pending key.
    join_deadline: Option<Instant>,
    want_rotation: bool,
    rotation_sent: Option<Instant>,
    next_rotation: Option<Instant>,
    endpoints: Option<Vec<SocketAddr>>,
    reported: Option<Vec<SocketAddr>>,
    last_error: Option<String>,
    commands: VecDeque<Command>,
}

impl Supervisor {
    /// Starts connecting at once. `seed` feeds the backoff jitter.
    pub fn new(config: SupervisorConfig, identity: Identity, seed: u64, now: Instant) -> Self {
        let mut s = Supervisor {
            next_rotation: config.rotate_every.map(|d| now + d),
            return_wait: config.return_check,
            config,
            identity,
            rng: SmallRng::seed_from_u64(seed),
            state: ControlState::Backoff { until: now },
            join: JoinKind::Register,
            round_start: 0,
            reached: Vec::new(),
            return_at: None,
            probing: None,
            probes: 0,
            returning: None,
            tried: 0,
            failures: 0,
            register_unsure: false,
            quick_retries: 0,
            join_deadline: None,
            want_rotation: false,
            rotation_sent: None,
            endpoints: None,
            reported: None,
            last_error: None,
            commands: VecDeque::new(),
        };
        s.config.addresses = s.config.addresses.max(1);
        s.reached = vec![false; s.config.addresses];
        s.start_round(now);
        s
    }

    pub fn state(&self) -> &ControlState {
        &self.state
    }

    /// Why the last attempt or session failed, if one did.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// The node has been registered (now or before this process started).
    pub fn is_registered(&self) -> bool {
        self.identity.registered
    }

    /// The join of the current or next session.
    pub fn join(&self) -> JoinKind {
        self.join
    }

    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let backoff = match self.state {
            ControlState::Backoff { until } => Some(until),
            _ => None,
        };
        let rotation_deadline = self.rotation_sent.map(|t| t + self.config.rotation_timeout);
        [
            backoff,
            self.join_deadline,
            self.next_rotation,
            rotation_deadline,
            self.return_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.state, ControlState::Backoff { until } if until <= now) {
            self.start_round(now);
        }
        if self.join_deadline.is_some_and(|t| t <= now) {
            self.commands.push_back(Command::Disconnect);
            self.session_failed("no peer map within the join timeout".into(), now);
        }
        if self
            .rotation_sent
            .is_some_and(|t| t + self.config.rotation_timeout <= now)
        {
            self.commands.push_back(Command::Disconnect);
            self.session_failed(
                "the coordinator did not confirm the key rotation".into(),
                now,
            );
        }
        if self.next_rotation.is_some_and(|t| t <= now) {
            self.next_rotation = None;
            self.want_rotation = true;
            self.maybe_rotate(now);
        }
        if self.return_at.is_some_and(|t| t <= now) {
            self.return_at = None;
            if let ControlState::Connected { address, .. } = self.state {
                if address > 0 && self.probing.is_none() {
                    let target = self.probes % address;
                    self.probes += 1;
                    self.probing = Some(target);
                    self.commands.push_back(Command::Probe {
                        address: target,
                        handshake_timeout: self.config.first_handshake_timeout,
                    });
                }
            }
        }
    }

    pub fn handle(&mut self, input: Input, now: Instant) {
        if matches!(self.state, ControlState::Stopped { .. }) {
            return;
        }
        match input {
            Input::Connected => {
                if let ControlState::Connecting { address } = self.state {
                    self.reached[address] = true;
                    self.state = ControlState::Joining { address };
                    self.join_deadline = Some(now + self.config.join_timeout);
                    if self.join == JoinKind::Register {
                        self.register_unsure = true;
                    }
                }
            }
            Input::ConnectFailed { error } => {
                if let ControlState::Connecting { address } = self.state {
                    self.last_error = Some(error);
                    self.tried += 1;
                    if self.tried < self.config.addresses {
                        self.connect((address + 1) % self.config.addresses);
                    } else if !self.identity.registered && !self.register_unsure {
                        // A first join that reaches no coordinator at all is
                        // most likely a wrong or unreachable address: say so
                        // instead of retrying forever.
                        let why = self.last_error.clone().unwrap_or_default();
                        self.stop(format!("cannot reach the coordinator: {why}"));
                    } else {
                        self.backoff(now);
                    }
                }
            }
            Input::Joined => {
                if !matches!(self.state, ControlState::Joining { .. }) {
                    return;
                }
                match self.join {
                    JoinKind::Register => {
                        self.register_unsure = false;
                        self.identity.registered = true;
                    }
                    JoinKind::Login(KeyChoice::Pending) => {
                        self.identity.pending_key = false;
                        self.commands.push_back(Command::PromotePendingKey);
                    }
                    JoinKind::Login(KeyChoice::Current) => {
                        if self.identity.pending_key {
                            // The coordinator still knows the old key: the
                            // rotation never committed. It is asked again.
                            self.identity.pending_key = false;
                            self.want_rotation = true;
                            self.commands.push_back(Command::DiscardPendingKey);
                        }
                    }
                }
                self.register_unsure = false;
                self.quick_retries = 0;
            }
            Input::Synced => {
                let address = match self.state {
                    ControlState::Joining { address } => address,
                    // A later full map (resync) in a running session.
                    ControlState::Connected { .. } => return,
                    _ => return,
                };
                self.state = ControlState::Connected {
                    address,
                    since: now,
                };
                self.join_deadline = None;
                self.round_start = address;
                self.failures = 0;
                self.last_error = None;
                if let Some(target) = self.returning.take() {
                    self.return_wait = if target == address {
                        self.config.return_check
                    } else {
                        (self.return_wait * 2).min(self.config.return_check_max)
                    };
                }
                if address > 0 {
                    self.schedule_return(now);
                }
                self.reported = None;
                self.maybe_report();
                self.maybe_rotate(now);
            }
            Input::Rejected { code, message } => self.rejected(code, message, now),
            Input::Lost { error } => {
                if matches!(
                    self.state,
                    ControlState::Joining { .. } | ControlState::Connected { .. }
                ) {
                    self.session_failed(error, now);
                }
            }
            Input::RotateRequested => {
                self.want_rotation = true;
                self.maybe_rotate(now);
            }
            Input::RotationDone => {
                if self.rotation_sent.take().is_some() {
                    self.identity.pending_key = false;
                    self.commands.push_back(Command::PromotePendingKey);
                    self.next_rotation = self.config.rotate_every.map(|d| now + d);
                }
            }
            Input::Endpoints(list) => {
                self.endpoints = Some(list);
                self.maybe_report();
            }
            Input::Probed { address, reachable } => {
                if self.probing != Some(address) {
                    return;
                }
                self.probing = None;
                let ControlState::Connected {
                    address: current, ..
                } = self.state
                else {
                    return;
                };
                if address >= current {
                    return;
                }
                if !reachable {
                    self.schedule_return(now);
                    return;
                }
                // Break before make: the probe showed it answers, and if the
                // move fails the round goes on to the next addresses.
                self.commands.push_back(Command::Disconnect);
                self.returning = Some(address);
                self.tried = 0;
                self.join = self.next_join();
                self.connect(address);
            }
        }
    }

    fn schedule_return(&mut self, now: Instant) {
        let wait = self.return_wait;
        self.return_at = Some(now + self.rng.random_range(wait..=wait * 2));
    }

    fn rejected(&mut self, code: ErrorCode, message: String, now: Instant) {
        if !matches!(
            self.state,
            ControlState::Joining { .. } | ControlState::Connected { .. }
        ) {
            return;
        }
        let refused = format!("the coordinator refused: {message}");
        match (code, self.join) {
            // Our own earlier Register went through after all.
            (ErrorCode::KeyInUse, JoinKind::Register) => {
                self.register_unsure = false;
                self.identity.registered = true;
                self.retry_now(JoinKind::Login(KeyChoice::Current), refused, now);
            }
            (ErrorCode::UnknownNode, JoinKind::Login(KeyChoice::Current))
                if self.identity.pending_key =>
            {
                self.retry_now(JoinKind::Login(KeyChoice::Pending), refused, now);
            }
            (ErrorCode::UnknownNode | ErrorCode::NodeExpired, JoinKind::Login(choice)) => {
                if choice == KeyChoice::Pending {
                    // Neither key is known: the rotation key is useless.
                    self.identity.pending_key = false;
                    self.commands.push_back(Command::DiscardPendingKey);
                }
                if self.register_unsure || self.identity.can_register {
                    // The unsure Register did not happen, or the node was
                    // deleted or expired and a token is at hand.
                    self.register_unsure = false;
                    self.identity.registered = false;
                    if self.identity.can_register {
                        self.retry_now(JoinKind::Register, refused, now);
                        return;
                    }
                }
                let what = if code == ErrorCode::NodeExpired {
                    "this node's registration has expired"
                } else {
                    "the coordinator no longer knows this node (deleted, or never registered)"
                };
                self.stop(format!(
                    "{what}; join again with `meshd up --token TOKEN` ({message})"
                ));
            }
            // A first join the coordinator cannot record (its database is
            // down): the other addresses are asked, then `meshd up` ends
            // with the reason instead of retrying unseen.
            (ErrorCode::Unavailable, JoinKind::Register) if !self.identity.registered => {
                self.register_unsure = false;
                self.join_deadline = None;
                self.last_error = Some(refused);
                self.tried += 1;
                let address = match self.state {
                    ControlState::Joining { address } | ControlState::Connected { address, .. } => {
                        address
                    }
                    _ => self.round_start,
                };
                if self.tried < self.config.addresses {
                    self.connect((address + 1) % self.config.addresses);
                } else {
                    self.stop(format!("cannot join: {message}"));
                }
            }
            // Another process logged in with this node's key (a copy of its
            // state directory) and took the session over. Logging in again
            // would take it back, and the two would take turns for ever; the
            // newer one keeps the node, this one stops (tunnels stay up).
            // A session this node gave up itself is never told: it has
            // already closed it before its next login.
            (ErrorCode::Replaced, _) => self.stop(format!(
                "another meshd logged in as this node (with its key: a copy of this state \
                 directory?) and replaced this session; stopped so the two do not take turns \
                 ({message})"
            )),
            (
                ErrorCode::TokenInvalid
                | ErrorCode::TokenExpired
                | ErrorCode::TokenRevoked
                | ErrorCode::TokenUsed
                | ErrorCode::InvalidName
                | ErrorCode::InvalidKey,
                _,
            ) => {
                self.register_unsure = false;
                self.stop(format!("cannot join: {message}"));
            }
            _ => self.session_failed(refused, now),
        }
    }

    fn stop(&mut self, reason: String) {
        self.last_error = Some(reason.clone());
        self.join_deadline = None;
        self.rotation_sent = None;
        self.commands.push_back(Command::Fatal(reason.clone()));
        self.state = ControlState::Stopped { reason };
    }

    /// Ends the current session and tries again at once with `join`
    /// (a decision, not a failure of the coordinator).
    fn retry_now(&mut self, join: JoinKind, why: String, now: Instant) {
        self.quick_retries += 1;
        if self.quick_retries > MAX_QUICK_RETRIES {
            self.join = join;
            self.session_failed(why, now);
            return;
        }
        self.last_error = Some(why);
        self.join_deadline = None;
        self.rotation_sent = None;
        let address = match self.state {
            ControlState::Joining { address } | ControlState::Connected { address, .. } => address,
            _ => self.round_start,
        };
        self.tried = 0;
        self.join = join;
        self.connect(address);
    }

    fn session_failed(&mut self, error: String, now: Instant) {
        self.last_error = Some(error);
        self.join_deadline = None;
        // A rotation in flight may or may not have committed; the pending
        // key stays and the next login settles it.
        self.rotation_sent = None;
        self.return_at = None;
        self.probing = None;
        if let ControlState::Joining { address } | ControlState::Connected { address, .. } =
            self.state
        {
            self.round_start = (address + 1) % self.config.addresses;
        }
        if matches!(self.state, ControlState::Connected { .. }) {
            // A working session ended: the next address at once, after a
            // short random wait so the nodes of a dead replica spread out.
            self.failures = 1;
            let wait = self
                .rng
                .random_range(Duration::ZERO..=self.config.reconnect_jitter);
            self.state = ControlState::Backoff { until: now + wait };
        } else {
            self.backoff(now);
        }
    }

    fn backoff(&mut self, now: Instant) {
        if let ControlState::Backoff { .. } = self.state {
            return;
        }
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.saturating_sub(1).min(20);
        let ceiling = self
            .config
            .backoff_min
            .saturating_mul(1 << exp)
            .min(self.config.backoff_max);
        let wait = self.rng.random_range(ceiling / 2..=ceiling);
        self.state = ControlState::Backoff { until: now + wait };
    }

    fn start_round(&mut self, _now: Instant) {
        self.tried = 0;
        self.join = if self.quick_retries > MAX_QUICK_RETRIES {
            // Keep the join the retries settled on.
            self.quick_retries = 0;
            self.join
        } else {
            self.next_join()
        };
        self.connect(self.round_start);
    }

    fn next_join(&self) -> JoinKind {
        if self.identity.registered || self.register_unsure {
            JoinKind::Login(KeyChoice::Current)
        } else {
            JoinKind::Register
        }
    }

    fn connect(&mut self, address: usize) {
        self.state = ControlState::Connecting { address };
        let handshake_timeout = if self.reached[address] {
            self.config.handshake_timeout
        } else {
            self.config
                .first_handshake_timeout
                // The backoff after a lost session counts as a failure, the
                // round after it is still a first one.
                .saturating_mul(1 << self.failures.saturating_sub(1).min(16))
                .min(self.config.handshake_timeout)
        };
        self.commands.push_back(Command::Connect {
            address,
            join: self.join,
            handshake_timeout,
        });
    }

    fn maybe_report(&mut self) {
        if !matches!(self.state, ControlState::Connected { .. }) {
            return;
        }
        if let Some(list) = &self.endpoints {
            if self.reported.as_ref() != Some(list) {
                self.reported = Some(list.clone());
                self.commands
                    .push_back(Command::ReportEndpoints(list.clone()));
            }
        }
    }

    fn maybe_rotate(&mut self, now: Instant) {
        if self.want_rotation
            && self.rotation_sent.is_none()
            && !self.identity.pending_key
            && matches!(self.state, ControlState::Connected { .. })
        {
            self.want_rotation = false;
            self.rotation_sent = Some(now);
            self.identity.pending_key = true;
            self.commands.push_back(Command::RotateKey);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    /// A node the coordinator accepted before, without a token.
    const REGISTERED: Identity = Identity {
        registered: true,
        can_register: false,
        pending_key: false,
    };

    /// A first start with a join token.
    const JOINING: Identity = Identity {
        registered: false,
        can_register: true,
        pending_key: false,
    };

    struct T {
        s: Supervisor,
        now: Instant,
    }

    impl T {
        fn new(addresses: usize, identity: Identity) -> T {
            let now = Instant::now();
            let config = SupervisorConfig {
                addresses,
                rotate_every: None,
                ..SupervisorConfig::default()
            };
            T {
                s: Supervisor::new(config, identity, 7, now),
                now,
            }
        }

        fn registered() -> T {
            T::new(1, REGISTERED)
        }

        /// The commands, with handshake timeouts left out (see `raw`).
        fn cmds(&mut self) -> Vec<Command> {
            self.raw()
                .into_iter()
                .map(|c| match c {
                    Command::Connect { address, join, .. } => connect(address, join),
                    Command::Probe { address, .. } => Command::Probe {
                        address,
                        handshake_timeout: Duration::ZERO,
                    },
                    c => c,
                })
                .collect()
        }

        fn raw(&mut self) -> Vec<Command> {
            std::iter::from_fn(|| self.s.poll_command()).collect()
        }

        fn input(&mut self, i: Input) -> Vec<Command> {
            self.s.handle(i, self.now);
            self.cmds()
        }

        fn advance(&mut self, d: Duration) -> Vec<Command> {
            self.now += d;
            self.s.handle_timeout(self.now);
            self.cmds()
        }

        fn raw_after(&mut self, i: Input) -> Vec<Command> {
            self.s.handle(i, self.now);
            self.raw()
        }

        fn next_timeout_raw(&mut self) -> (Duration, Vec<Command>) {
            let t = self.s.poll_timeout().expect("a timer");
            let d = t.saturating_duration_since(self.now);
            self.now += d;
            self.s.handle_timeout(self.now);
            (d, self.raw())
        }

        /// Advances to the next timeout and returns what it brought.
        fn next_timeout(&mut self) -> (Duration, Vec<Command>) {
            let t = self.s.poll_timeout().expect("a timer");
            let d = t.saturating_duration_since(self.now);
            (d, self.advance(d))
        }

        fn session_up(&mut self) -> Vec<Command> {
            let mut c = self.input(Input::Connected);
            c.extend(self.input(Input::Joined));
            c.extend(self.input(Input::Synced));
            c
        }
    }

    fn connect(address: usize, join: JoinKind) -> Command {
        Command::Connect {
            address,
            join,
            handshake_timeout: Duration::ZERO,
        }
    }

    fn probe(address: usize) -> Command {
        Command::Probe {
            address,
            handshake_timeout: Duration::ZERO,
        }
    }

    const LOGIN: JoinKind = JoinKind::Login(KeyChoice::Current);

    fn rejected(code: ErrorCode) -> Input {
        Input::Rejected {
            code,
            message: format!("{code:?}"),
        }
    }

    fn failed() -> Input {
        Input::ConnectFailed {
            error: "connection refused".into(),
        }
    }

    #[test]
    fn a_registered_node_logs_in_at_once_and_reports_endpoints_when_synced() {
        let mut t = T::registered();
        assert_eq!(t.cmds(), [connect(0, LOGIN)]);
        let ep: Vec<SocketAddr> = vec!["192.0.2.1:41641".parse().unwrap()];
        // Endpoints known before the session is up wait for it.
        assert_eq!(t.input(Input::Endpoints(ep.clone())), []);
        assert_eq!(t.session_up(), [Command::ReportEndpoints(ep.clone())]);
        assert!(matches!(t.s.state(), ControlState::Connected { .. }));
        // Unchanged endpoints are not sent again; changed ones are.
        assert_eq!(t.input(Input::Endpoints(ep.clone())), []);
        let ep2: Vec<SocketAddr> = vec!["192.0.2.9:41641".parse().unwrap()];
        assert_eq!(
            t.input(Input::Endpoints(ep2.clone())),
            [Command::ReportEndpoints(ep2)]
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets_after_a_sync() {
        let mut t = T::registered();
        t.cmds();
        let mut waits = Vec::new();
        for _ in 0..10 {
            assert_eq!(t.input(failed()), []);
            let (wait, cmds) = t.next_timeout();
            assert_eq!(cmds, [connect(0, LOGIN)]);
            waits.push(wait);
        }
        // Each wait lies in the upper half of min·2^k, capped at 30 s.
        for (k, w) in waits.iter().enumerate() {
            let ceiling = (Duration::from_millis(500) * (1 << k)).min(30 * SEC);
            assert!(*w >= ceiling / 2 && *w <= ceiling, "attempt {k}: {w:?}");
        }
        assert!(waits[9] >= 15 * SEC);
        // A synchronised session resets it; losing it retries within 250 ms.
        t.session_up();
        t.input(Input::Lost {
            error: "closed".into(),
        });
        let (wait, cmds) = t.next_timeout();
        assert!(wait <= Duration::from_millis(250), "{wait:?}");
        assert_eq!(cmds, [connect(0, LOGIN)]);
        assert_eq!(t.s.last_error(), Some("closed"));
    }

    #[test]
    fn jitter_spreads_nodes_apart() {
        let waits: Vec<Duration> = (0..20)
            .map(|seed| {
                let now = Instant::now();
                let mut s = Supervisor::new(SupervisorConfig::default(), REGISTERED, seed, now);
                for _ in 0..4 {
                    s.handle(failed(), now);
                    let t = s.poll_timeout().unwrap();
                    s.handle_timeout(t);
                }
                s.handle(failed(), now);
                s.poll_timeout().unwrap() - now
            })
            .collect();
        let distinct: std::collections::BTreeSet<_> = waits.iter().collect();
        assert!(distinct.len() > 15, "{waits:?}");
    }

    #[test]
    fn addresses_fail_over_in_order_and_a_lost_session_resumes_on_the_next() {
        let mut t = T::new(3, REGISTERED);
        assert_eq!(t.cmds(), [connect(0, LOGIN)]);
        assert_eq!(t.input(failed()), [connect(1, LOGIN)]);
        assert_eq!(t.input(Input::Connected), []);
        t.input(Input::Joined);
        t.input(Input::Synced);
        assert!(matches!(
            t.s.state(),
            ControlState::Connected { address: 1, .. }
        ));
        // The one that just failed is likely dead: the next one first.
        t.input(Input::Lost {
            error: "reset".into(),
        });
        let (wait, cmds) = t.next_timeout();
        assert!(wait <= Duration::from_millis(500), "{wait:?}");
        assert_eq!(cmds, [connect(2, LOGIN)]);
        assert_eq!(t.input(failed()), [connect(0, LOGIN)]);
        assert_eq!(t.input(failed()), [connect(1, LOGIN)]);
        // A whole round failed: now it waits, then starts where it started.
        assert_eq!(t.input(failed()), []);
        assert!(matches!(t.s.state(), ControlState::Backoff { .. }));
        let (_, cmds) = t.next_timeout();
        assert_eq!(cmds, [connect(2, LOGIN)]);
    }

    #[test]
    fn addresses_not_reached_yet_get_a_short_handshake_timeout_that_grows() {
        let timeouts = |cmds: Vec<Command>| -> Vec<(usize, Duration)> {
            cmds.into_iter()
                .filter_map(|c| match c {
                    Command::Connect {
                        address,
                        handshake_timeout,
                        ..
                    } => Some((address, handshake_timeout)),
                    _ => None,
                })
                .collect()
        };
        let mut t = T::new(2, REGISTERED);
        assert_eq!(timeouts(t.raw()), [(0, 2 * SEC)]);
        t.s.handle(Input::Connected, t.now);
        t.s.handle(Input::Joined, t.now);
        t.s.handle(Input::Synced, t.now);
        t.raw();
        t.s.handle(Input::Lost { error: "x".into() }, t.now);
        // Each round: address 1, never reached, with a timeout doubling from
        // the short one as rounds fail; then address 0, reached, with 10 s.
        let mut rounds = Vec::new();
        for _ in 0..4 {
            let (_, first) = t.next_timeout_raw();
            let second = t.raw_after(failed());
            rounds.push([timeouts(first), timeouts(second)].concat());
            assert_eq!(t.raw_after(failed()), []);
        }
        assert_eq!(
            rounds,
            [
                [(1, 2 * SEC), (0, 10 * SEC)],
                [(1, 4 * SEC), (0, 10 * SEC)],
                [(1, 8 * SEC), (0, 10 * SEC)],
                [(1, 10 * SEC), (0, 10 * SEC)],
            ]
        );
    }

    #[test]
    fn a_node_goes_home_when_the_first_address_answers_again() {
        let mut t = T::new(2, REGISTERED);
        assert_eq!(t.cmds(), [connect(0, LOGIN)]);
        assert_eq!(t.input(failed()), [connect(1, LOGIN)]);
        t.session_up();
        // Checked every 10-20 s while away from home.
        let (wait, cmds) = t.next_timeout();
        assert!((10 * SEC..=20 * SEC).contains(&wait), "{wait:?}");
        assert_eq!(cmds, [probe(0)]);
        assert_eq!(
            t.input(Input::Probed {
                address: 0,
                reachable: false
            }),
            []
        );
        let (wait, cmds) = t.next_timeout();
        assert!((10 * SEC..=20 * SEC).contains(&wait), "{wait:?}");
        assert_eq!(cmds, [probe(0)]);
        // It answers: the node moves, but the move fails and it ends up on
        // address 1 again; the checks slow down.
        assert_eq!(
            t.input(Input::Probed {
                address: 0,
                reachable: true
            }),
            [Command::Disconnect, connect(0, LOGIN)]
        );
        assert_eq!(t.input(failed()), [connect(1, LOGIN)]);
        t.session_up();
        let (wait, cmds) = t.next_timeout();
        assert!((20 * SEC..=40 * SEC).contains(&wait), "{wait:?}");
        assert_eq!(cmds, [probe(0)]);
        // This time it stays home, and checks nothing more.
        t.input(Input::Probed {
            address: 0,
            reachable: true,
        });
        t.session_up();
        assert!(matches!(
            t.s.state(),
            ControlState::Connected { address: 0, .. }
        ));
        assert_eq!(t.s.poll_timeout(), None);
        // A probe's answer after the session changed is ignored.
        assert_eq!(
            t.input(Input::Probed {
                address: 0,
                reachable: true
            }),
            []
        );
    }

    #[test]
    fn a_first_join_the_coordinator_cannot_record_ends_with_the_reason() {
        let mut t = T::new(2, JOINING);
        assert_eq!(t.cmds(), [connect(0, JoinKind::Register)]);
        t.input(Input::Connected);
        // Another replica may have its database.
        assert_eq!(
            t.input(rejected(ErrorCode::Unavailable)),
            [connect(1, JoinKind::Register)]
        );
        t.input(Input::Connected);
        let cmds = t.input(Input::Rejected {
            code: ErrorCode::Unavailable,
            message:
                "the coordinator cannot save state: its database is unavailable; try again later"
                    .into(),
        });
        assert_eq!(
            cmds,
            [Command::Fatal(
                "cannot join: the coordinator cannot save state: its database is unavailable; try again later".into()
            )]
        );
        assert_eq!(t.s.poll_timeout(), None);
    }

    #[test]
    fn the_last_error_is_cleared_by_a_synchronised_session() {
        let mut t = T::registered();
        t.cmds();
        t.input(failed());
        assert_eq!(t.s.last_error(), Some("connection refused"));
        t.next_timeout();
        t.session_up();
        assert_eq!(t.s.last_error(), None);
    }

    #[test]
    fn first_registration_fails_fast_when_no_coordinator_answers() {
        let mut t = T::new(2, JOINING);
        assert_eq!(t.cmds(), [connect(0, JoinKind::Register)]);
        assert_eq!(t.input(failed()), [connect(1, JoinKind::Register)]);
        let cmds = t.input(failed());
        assert!(
            matches!(&cmds[..], [Command::Fatal(m)] if m.contains("cannot reach the coordinator") && m.contains("refused")),
            "{cmds:?}"
        );
        // Stopped is final.
        assert_eq!(t.input(Input::Connected), []);
        assert_eq!(t.s.poll_timeout(), None);
    }

    #[test]
    fn refused_tokens_are_final_with_the_coordinators_words() {
        for code in [
            ErrorCode::TokenRevoked,
            ErrorCode::TokenExpired,
            ErrorCode::TokenInvalid,
            ErrorCode::TokenUsed,
            ErrorCode::InvalidName,
        ] {
            let mut t = T::new(1, JOINING);
            t.cmds();
            t.input(Input::Connected);
            let cmds = t.input(rejected(code));
            assert_eq!(
                cmds,
                [Command::Fatal(format!("cannot join: {code:?}"))],
                "{code:?}"
            );
            assert!(matches!(t.s.state(), ControlState::Stopped { .. }));
        }
    }

    /// Two processes with one key would replace each other's session for
    /// ever if each logged in again: the replaced one stops instead.
    #[test]
    fn a_replaced_session_stops_instead_of_taking_the_node_back() {
        let mut t = T::registered();
        t.cmds();
        t.session_up();
        let cmds = t.input(rejected(ErrorCode::Replaced));
        assert!(
            matches!(&cmds[..], [Command::Fatal(why)] if why.contains("another meshd")),
            "{cmds:?}"
        );
        assert!(matches!(t.s.state(), ControlState::Stopped { .. }));
        assert_eq!(t.s.poll_timeout(), None);
    }

    #[test]
    fn transient_refusals_back_off_and_retry() {
        for code in [
            ErrorCode::Unavailable,
            ErrorCode::Internal,
            ErrorCode::HandshakeTimeout,
            ErrorCode::Malformed,
        ] {
            let mut t = T::registered();
            t.cmds();
            t.input(Input::Connected);
            assert_eq!(t.input(rejected(code)), [], "{code:?}");
            let (_, cmds) = t.next_timeout();
            assert_eq!(cmds, [connect(0, LOGIN)], "{code:?}");
        }
    }

    #[test]
    fn a_register_whose_answer_was_lost_is_settled_by_logging_in() {
        let mut t = T::new(1, JOINING);
        assert_eq!(t.cmds(), [connect(0, JoinKind::Register)]);
        t.input(Input::Connected);
        t.input(Input::Lost {
            error: "reset before RegisterOk".into(),
        });
        // It may have registered: log in first ...
        let (_, cmds) = t.next_timeout();
        assert_eq!(cmds, [connect(0, LOGIN)]);
        t.input(Input::Connected);
        // ... and register if it did not.
        assert_eq!(
            t.input(rejected(ErrorCode::UnknownNode)),
            [connect(0, JoinKind::Register)]
        );
        t.input(Input::Connected);
        t.input(Input::Joined);
        assert!(t.s.is_registered());
        t.input(Input::Synced);
        t.input(Input::Lost {
            error: "gone".into(),
        });
        let (_, cmds) = t.next_timeout();
        assert_eq!(cmds, [connect(0, LOGIN)]);
    }

    #[test]
    fn registering_a_key_already_registered_logs_in() {
        let mut t = T::new(1, JOINING);
        t.cmds();
        t.input(Input::Connected);
        assert_eq!(t.input(rejected(ErrorCode::KeyInUse)), [connect(0, LOGIN)]);
    }

    #[test]
    fn a_deleted_node_without_a_token_stops_and_says_how_to_rejoin() {
        let mut t = T::registered();
        t.cmds();
        t.input(Input::Connected);
        let cmds = t.input(rejected(ErrorCode::UnknownNode));
        assert!(
            matches!(&cmds[..], [Command::Fatal(m)] if m.contains("meshd up --token")),
            "{cmds:?}"
        );
        // With a token it registers again instead.
        let mut t = T::new(
            1,
            Identity {
                registered: true,
                can_register: true,
                pending_key: false,
            },
        );
        t.cmds();
        t.input(Input::Connected);
        assert_eq!(
            t.input(rejected(ErrorCode::NodeExpired)),
            [connect(0, JoinKind::Register)]
        );
    }

    #[test]
    fn a_contradicting_coordinator_cannot_cause_a_busy_loop() {
        let mut t = T::new(1, JOINING);
        t.cmds();
        let mut immediate = 0;
        for _ in 0..10 {
            t.input(Input::Connected);
            // "Already registered" to a Register, "unknown" to a Login.
            let code = if t.s.join() == JoinKind::Register {
                ErrorCode::KeyInUse
            } else {
                ErrorCode::UnknownNode
            };
            if t.input(rejected(code)).is_empty() {
                break;
            }
            immediate += 1;
        }
        assert_eq!(immediate, MAX_QUICK_RETRIES);
        assert!(matches!(t.s.state(), ControlState::Backoff { .. }));
    }

    #[test]
    fn join_timeout_abandons_a_silent_session() {
        let mut t = T::registered();
        t.cmds();
        t.input(Input::Connected);
        let (wait, cmds) = t.next_timeout();
        assert_eq!(wait, 20 * SEC);
        assert_eq!(cmds, [Command::Disconnect]);
        assert!(matches!(t.s.state(), ControlState::Backoff { .. }));
    }

    #[test]
    fn rotation_waits_for_a_session_and_is_promoted_when_confirmed() {
        let mut t = T::registered();
        t.cmds();
        assert_eq!(t.input(Input::RotateRequested), []);
        assert_eq!(t.session_up(), [Command::RotateKey]);
        // A second request while one is in flight waits for it.
        assert_eq!(t.input(Input::RotateRequested), []);
        assert_eq!(t.input(Input::RotationDone), [Command::PromotePendingKey]);
        // ... and then goes out.
        assert_eq!(t.input(Input::RotateRequested), [Command::RotateKey]);
    }

    #[test]
    fn automatic_rotation_follows_the_interval() {
        let now = Instant::now();
        let config = SupervisorConfig {
            rotate_every: Some(3600 * SEC),
            ..SupervisorConfig::default()
        };
        let mut t = T {
            s: Supervisor::new(config, REGISTERED, 1, now),
            now,
        };
        t.cmds();
        t.session_up();
        let (wait, cmds) = t.next_timeout();
        assert_eq!(wait, 3600 * SEC);
        assert_eq!(cmds, [Command::RotateKey]);
        t.advance(SEC);
        assert_eq!(t.input(Input::RotationDone), [Command::PromotePendingKey]);
        let (wait, cmds) = t.next_timeout();
        assert_eq!(wait, 3600 * SEC);
        assert_eq!(cmds, [Command::RotateKey]);
    }

    #[test]
    fn a_rotation_cut_short_is_settled_at_the_next_login() {
        // The coordinator committed the new key: the old one is unknown.
        let mut t = T::registered();
        t.cmds();
        t.session_up();
        t.input(Input::RotateRequested);
        t.input(Input::Lost {
            error: "reset".into(),
        });
        let (_, cmds) = t.next_timeout();
        assert_eq!(cmds, [connect(0, LOGIN)]);
        t.input(Input::Connected);
        assert_eq!(
            t.input(rejected(ErrorCode::UnknownNode)),
            [connect(0, JoinKind::Login(KeyChoice::Pending))]
        );
        t.input(Input::Connected);
        assert_eq!(t.input(Input::Joined), [Command::PromotePendingKey]);
        assert_eq!(t.input(Input::Synced), []);

        // It did not commit: the old key logs in, the new one is dropped
        // and the rotation asked for again.
        let mut t = T::new(
            1,
            Identity {
                registered: true,
                can_register: false,
                pending_key: true,
            },
        );
        assert_eq!(t.cmds(), [connect(0, LOGIN)]);
        t.input(Input::Connected);
        assert_eq!(t.input(Input::Joined), [Command::DiscardPendingKey]);
        assert_eq!(t.input(Input::Synced), [Command::RotateKey]);
    }

    #[test]
    fn an_unconfirmed_rotation_ends_the_session() {
        let mut t = T::registered();
        t.cmds();
        t.session_up();
        assert_eq!(t.input(Input::RotateRequested), [Command::RotateKey]);
        let (wait, cmds) = t.next_timeout();
        assert_eq!(wait, 20 * SEC);
        assert_eq!(cmds, [Command::Disconnect]);
    }
}
