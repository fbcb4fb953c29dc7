//! The coordinator's side of control sessions: frames in any order and
//! shape, fed through the drivers' `FrameDecoder` into the `Coordinator`
//! core (with a memory store and a fake clock), beside honest nodes
//! (`proto::client::Client`) that register, log in, report endpoints and
//! rotate keys, operator actions and the passing of time.
//!
//! The input is a program: each byte picks an operation, the bytes after it
//! are its arguments. Fails when the core panics, or when
//! - a frame that did not decode is not answered with an `Error` to that
//!   session (`Malformed`, or `UnsupportedVersion`) followed by its close;
//! - the core closes a session without an `Error` first (unless the node's
//!   own `Error` ended it);
//! - the core sends anything to a session after closing it;
//! - a message the core sends does not encode, or does not decode back equal;
//! - a session's decoder holds more than one maximal frame and one input.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use meshd_coord::{Action, Config, Coordinator, MemStore, SessionId, TokenSpec};
use meshd_proto::client::{Client, Join};
use meshd_proto::{
    decode, encode, ErrorCode, FrameDecoder, Message, NodeId, TokenSecret, MAX_FRAME_LEN,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use x25519_dalek::StaticSecret;

/// The input, read front to back; reading past its end gives zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

struct Session {
    id: SessionId,
    decoder: FrameDecoder,
    /// The honest node on this session.
    client: Client,
    /// The node refused what the core sent: it only sends its `Error` now.
    failed: bool,
    /// The transport is up: the core has not closed it, nor has it ended.
    open: bool,
    /// The node sent an `Error`: the core may close without one.
    node_erred: bool,
}

struct World {
    coord: Coordinator,
    now: SystemTime,
    sessions: Vec<Session>,
    tokens: Vec<TokenSecret>,
}

fn key(n: u8) -> StaticSecret {
    // Four keys: nodes collide, log in again, replace each other.
    StaticSecret::from([n % 4 + 1; 32])
}

const NAMES: [&str; 4] = ["a", "a", "web-2", "Not A Label"];

impl World {
    fn new() -> World {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let config = Config {
            node_expiry: Some(Duration::from_secs(3600)),
            ephemeral_timeout: Duration::from_secs(300),
            ..Config::default()
        };
        let mut coord = Coordinator::new(
            config,
            StaticSecret::from([0xc0; 32]),
            Box::new(MemStore::default()),
            Box::new(StdRng::seed_from_u64(7)),
            now,
        )
        .expect("a memory store opens");
        let specs = [
            TokenSpec {
                reusable: true,
                tags: vec!["tag:edge".into()],
                ..TokenSpec::default()
            },
            TokenSpec {
                ephemeral: true,
                ..TokenSpec::default()
            },
        ];
        let mut tokens: Vec<TokenSecret> = specs
            .into_iter()
            .map(|spec| coord.create_token(spec, now).expect("token").1)
            .collect();
        tokens.push(TokenSecret([0x77; 32]));
        let mut w = World {
            coord,
            now,
            sessions: Vec::new(),
            tokens,
        };
        w.drain();
        w
    }

    fn session(&mut self, pick: u8) -> Option<usize> {
        let open: Vec<usize> = (0..self.sessions.len())
            .filter(|&i| self.sessions[i].open)
            .collect();
        (!open.is_empty()).then(|| open[usize::from(pick) % open.len()])
    }

    /// Bytes from the node, through the decoder, as the drivers do.
    fn feed(&mut self, i: usize, bytes: &[u8]) {
        let s = &mut self.sessions[i];
        s.decoder.feed(bytes);
        // Whole frames are decoded as they come: what stays is less than one.
        assert!(
            s.decoder.buffered() < 4 + MAX_FRAME_LEN + bytes.len(),
            "decoder holds {} bytes",
            s.decoder.buffered()
        );
        loop {
            let s = &mut self.sessions[i];
            if !s.open {
                return;
            }
            match s.decoder.next_message() {
                Ok(Some(msg)) => {
                    if matches!(msg, Message::Error(_)) {
                        s.node_erred = true;
                    }
                    let id = s.id;
                    self.coord.handle_message(id, msg, self.now);
                    self.drain();
                }
                Ok(None) => return,
                Err(e) => return self.malformed(i, &e),
            }
        }
    }

    fn malformed(&mut self, i: usize, e: &meshd_proto::DecodeError) {
        let id = self.sessions[i].id;
        self.coord.handle_decode_error(id, e, self.now);
        let actions = self.drain();
        let answered = actions.iter().position(|a| {
            matches!(a, Action::Send { session, message: Message::Error(m) }
                if *session == id && matches!(m.code, ErrorCode::Malformed | ErrorCode::UnsupportedVersion))
        });
        let closed = actions
            .iter()
            .position(|a| *a == Action::Close { session: id });
        assert!(
            matches!((answered, closed), (Some(a), Some(c)) if a < c),
            "{e} not answered with an Error and a close: {actions:?}"
        );
    }

    /// Carries out the core's actions as the drivers do, checking them,
    /// until there are none.
    fn drain(&mut self) -> Vec<Action> {
        let mut all = Vec::new();
        loop {
            let actions: Vec<Action> = std::iter::from_fn(|| self.coord.poll_action()).collect();
            if actions.is_empty() {
                return all;
            }
            self.carry_out(&actions);
            all.extend(actions);
        }
    }

    fn carry_out(&mut self, actions: &[Action]) {
        for (n, a) in actions.iter().enumerate() {
            let (id, message) = match a {
                Action::Send { session, message } => (*session, Some(message)),
                Action::Close { session } => (*session, None),
            };
            let Some(s) = self.sessions.iter_mut().find(|s| s.id == id) else {
                panic!("action for a session never opened: {a:?}");
            };
            assert!(s.open, "action for a closed session: {a:?}");
            match message {
                Some(m) => {
                    let bytes = encode(m).expect("the core's messages encode");
                    assert_eq!(decode(&bytes).expect("and decode").as_ref(), Some(m));
                    if !s.failed && s.client.handle_message(m.clone()).is_err() {
                        s.failed = true;
                    }
                }
                None => {
                    let told = actions[..n].iter().any(|a| {
                        matches!(a, Action::Send { session, message: Message::Error(_) } if *session == id)
                    });
                    assert!(told || s.node_erred, "closed without an Error: {actions:?}");
                    s.open = false;
                }
            }
        }
        // The drivers report a closed transport when its task ends.
        for a in actions {
            if let Action::Close { session } = a {
                self.coord.close_session(*session, self.now);
            }
        }
    }

    fn open(&mut self, input: &mut Input<'_>) {
        let (k, how) = (input.byte(), input.byte());
        let binding = [self.sessions.len() as u8; 32];
        let id = self.coord.open_session(&binding, self.now);
        let join = match how % 4 {
            0 => Join::Login,
            n => Join::Register {
                token_secret: self.tokens[usize::from(n - 1)].clone(),
                name: NAMES[usize::from(how / 4) % NAMES.len()].into(),
            },
        };
        self.sessions.push(Session {
            id,
            decoder: FrameDecoder::new(),
            client: Client::new(key(k), join, &binding),
            failed: false,
            open: true,
            node_erred: false,
        });
        self.drain();
    }

    /// What the honest node has to send, as frames, possibly cut short or
    /// with one byte changed.
    fn honest(&mut self, i: usize, input: &mut Input<'_>) {
        let (how, at, xor) = (input.byte(), input.byte(), input.byte());
        let c = &mut self.sessions[i].client;
        let mut bytes = Vec::new();
        while let Some(m) = c.poll_transmit() {
            bytes.extend(encode(&m).expect("the client's messages encode"));
        }
        if bytes.is_empty() {
            return;
        }
        let at = usize::from(at) % bytes.len();
        match how % 4 {
            0 => bytes.truncate(at),
            1 => bytes[at] ^= xor,
            _ => {}
        }
        self.feed(i, &bytes);
    }

    fn node_id(&self, pick: u8) -> NodeId {
        let ids: Vec<NodeId> = self.coord.state().nodes.keys().copied().collect();
        if ids.is_empty() {
            return NodeId(u64::from(pick));
        }
        ids[usize::from(pick) % ids.len()]
    }

    fn step(&mut self, input: &mut Input<'_>) {
        match input.byte() % 10 {
            0 => self.open(input),
            1 => {
                let (pick, len) = (input.byte(), input.byte());
                let bytes = input.bytes(usize::from(len)).to_vec();
                if let Some(i) = self.session(pick) {
                    self.feed(i, &bytes);
                }
            }
            2 => {
                if let Some(i) = self.session(input.byte()) {
                    self.honest(i, input);
                }
            }
            3 => {
                // The node ends its stream: inside a frame it is malformed.
                if let Some(i) = self.session(input.byte()) {
                    match self.sessions[i].decoder.finish() {
                        Err(e) => self.malformed(i, &e),
                        Ok(()) => self.lost(i),
                    }
                }
            }
            4 => {
                if let Some(i) = self.session(input.byte()) {
                    self.lost(i);
                }
            }
            5 => {
                self.now += Duration::from_secs(u64::from(input.byte()) * 7);
                self.coord.handle_timeout(self.now);
                self.drain();
            }
            6 => {
                let (what, pick) = (input.byte(), input.byte());
                let id = self.node_id(pick);
                let now = self.now;
                // Refusals (no such node, a name taken) are fine; panics are not.
                let _ = match what % 3 {
                    0 => self.coord.expire_node(id, now),
                    1 => self
                        .coord
                        .rename_node(id, NAMES[usize::from(what / 3) % 3], now),
                    _ => self.coord.delete_node(id, now),
                };
                self.drain();
            }
            7 => {
                let (pick, k) = (input.byte(), input.byte());
                if let Some(i) = self.session(pick) {
                    let _ = self.sessions[i].client.rotate_key(key(k));
                }
            }
            8 => {
                let (pick, n) = (input.byte(), input.byte());
                if let Some(i) = self.session(pick) {
                    let endpoints = (0..n % 17)
                        .map(|p| SocketAddr::from(([192, 0, 2, n], u16::from(p))))
                        .collect();
                    self.sessions[i].client.report_endpoints(endpoints);
                }
            }
            _ => {
                let now = self.now;
                self.coord.poll_store(now).expect("a memory store");
                self.drain();
            }
        }
    }

    /// The transport went away without a word.
    fn lost(&mut self, i: usize) {
        self.sessions[i].open = false;
        let id = self.sessions[i].id;
        self.coord.close_session(id, self.now);
        self.drain();
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut world = World::new();
    while !input.0.is_empty() {
        world.step(&mut input);
    }
});
