//! A coordinator and protocol clients wired together in memory, with a fake
//! clock: what every coordinator test drives.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshd_coord::*;
use meshd_proto::client::{Client, ClientError, Join};
use meshd_proto::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use x25519_dalek::StaticSecret;

pub const T0: u64 = 1_800_000_000;

pub struct Conn {
    pub client: Client,
    /// Every message the coordinator sent, and its bytes on the wire.
    pub got: Vec<Message>,
    pub bytes: usize,
    pub error: Option<ClientError>,
    pub closed: bool,
}

pub type StoreFactory = Box<dyn FnMut() -> Box<dyn Store> + Send>;

pub struct Harness {
    pub coord: Coordinator,
    /// The memory store, when the harness was built with [`Harness::new`].
    pub store: Arc<Mutex<MemStore>>,
    pub now: SystemTime,
    pub conns: BTreeMap<SessionId, Conn>,
    config: Config,
    make_store: StoreFactory,
    seed: u64,
}

pub fn key(n: u8) -> StaticSecret {
    StaticSecret::from([n; 32])
}

pub fn pubkey(n: u8) -> NodeKey {
    auth::public_key(&key(n))
}

impl Harness {
    pub fn new(config: Config) -> Self {
        let store = Arc::new(Mutex::new(MemStore::default()));
        let shared = store.clone();
        let mut h = Self::with_store(config, Box::new(move || Box::new(shared.clone())));
        h.store = store;
        h
    }

    /// A harness over any store; `make_store` is called again on restart.
    pub fn with_store(config: Config, make_store: StoreFactory) -> Self {
        Self::replica(config, make_store, 1)
    }

    /// A harness whose coordinator's RNG starts from `seed`: replicas of one
    /// mesh need different ones, as their random ids and session tags would
    /// otherwise be the same.
    pub fn replica(config: Config, mut make_store: StoreFactory, seed: u64) -> Self {
        let now = UNIX_EPOCH + Duration::from_secs(T0);
        let coord = Self::start(&config, make_store(), now, seed);
        Harness {
            coord,
            store: Arc::default(),
            now,
            conns: BTreeMap::new(),
            config,
            make_store,
            seed,
        }
    }

    fn start(config: &Config, store: Box<dyn Store>, now: SystemTime, seed: u64) -> Coordinator {
        Coordinator::new(
            config.clone(),
            StaticSecret::from([0xc0; 32]),
            store,
            Box::new(StdRng::seed_from_u64(seed)),
            now,
        )
        .unwrap()
    }

    /// A restart: a new coordinator on the same store; every session is gone.
    pub fn restart(&mut self) {
        self.seed += 1000;
        let store = (self.make_store)();
        self.coord = Self::start(&self.config, store, self.now, self.seed);
        self.conns.clear();
    }

    pub fn token(&mut self, spec: TokenSpec) -> (TokenRecord, TokenSecret) {
        self.coord.create_token(spec, self.now).unwrap()
    }

    pub fn connect(&mut self, secret: StaticSecret, join: Join) -> SessionId {
        self.connect_at(secret, join, &[])
    }

    /// Connects a node that reports `endpoints` with its Register or Login.
    pub fn connect_at(
        &mut self,
        secret: StaticSecret,
        join: Join,
        endpoints: &[&str],
    ) -> SessionId {
        self.open(|binding| {
            let mut client = Client::new(secret, join, binding);
            client.report_endpoints(endpoints.iter().map(|e| e.parse().unwrap()).collect());
            client
        })
    }

    /// Connects a relay of `region` (a Register with `token`, else a Login).
    pub fn connect_relay(&mut self, n: u8, region: &str, token: Option<&TokenSecret>) -> SessionId {
        let join = match token {
            Some(t) => Join::Register {
                token_secret: t.clone(),
                name: format!("relay-{region}"),
            },
            None => Join::Login,
        };
        let info = RelayInfo {
            region: region.into(),
            addrs: vec![format!("198.18.9.{n}:443").parse().unwrap()],
            stun_port: 3478,
            cert_pin: [n; 32],
        };
        self.open(|binding| Client::new(key(n), join, binding).as_relay(info))
    }

    /// Opens a session for the client `make` builds for its channel binding.
    fn open(&mut self, make: impl FnOnce(&[u8]) -> Client) -> SessionId {
        let binding = [self.conns.len() as u8; 32];
        let id = self.coord.open_session(&binding, self.now);
        let client = make(&binding);
        self.conns.insert(
            id,
            Conn {
                client,
                got: vec![],
                bytes: 0,
                error: None,
                closed: false,
            },
        );
        self.drive();
        id
    }

    pub fn register(&mut self, n: u8, name: &str, token: &TokenSecret) -> SessionId {
        let join = Join::Register {
            token_secret: token.clone(),
            name: name.into(),
        };
        self.connect(key(n), join)
    }

    pub fn login(&mut self, n: u8) -> SessionId {
        self.connect(key(n), Join::Login)
    }

    /// Moves messages both ways, through the wire encoding, until nothing moves.
    pub fn drive(&mut self) {
        loop {
            let mut moved = false;
            while let Some(a) = self.coord.poll_action() {
                moved = true;
                match a {
                    Action::Send { session, message } => {
                        let Some(c) = self.conns.get_mut(&session) else {
                            continue;
                        };
                        if c.closed {
                            continue;
                        }
                        let bytes = encode(&message).unwrap();
                        c.bytes += bytes.len();
                        let decoded = decode(&bytes).unwrap().unwrap();
                        assert_eq!(decoded, message);
                        c.got.push(decoded.clone());
                        if c.error.is_none() {
                            if let Err(e) = c.client.handle_message(decoded) {
                                c.error = Some(e);
                            }
                        }
                    }
                    Action::Close { session } => {
                        if let Some(c) = self.conns.get_mut(&session) {
                            c.closed = true;
                        }
                        self.coord.close_session(session, self.now);
                    }
                }
            }
            let ids: Vec<SessionId> = self.conns.keys().copied().collect();
            for id in ids {
                let c = self.conns.get_mut(&id).unwrap();
                while let Some(m) = c.client.poll_transmit() {
                    if c.closed {
                        continue;
                    }
                    moved = true;
                    self.coord.handle_message(id, m, self.now);
                }
            }
            if !moved {
                break;
            }
        }
    }

    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        self.coord.handle_timeout(self.now);
        self.drive();
    }

    pub fn disconnect(&mut self, id: SessionId) {
        self.conns.get_mut(&id).unwrap().closed = true;
        self.coord.close_session(id, self.now);
        self.drive();
    }

    pub fn conn(&mut self, id: SessionId) -> &mut Conn {
        self.conns.get_mut(&id).unwrap()
    }

    /// Messages received since the last call.
    pub fn take(&mut self, id: SessionId) -> Vec<Message> {
        std::mem::take(&mut self.conn(id).got)
    }

    /// What a join came to: `Ok` once welcomed (the session stays open),
    /// or the code it was refused with.
    pub fn outcome(&mut self, id: SessionId) -> Result<(), ErrorCode> {
        let c = self.conn(id);
        match &c.error {
            Some(ClientError::Rejected(e)) => Err(e.code),
            Some(other) => panic!("session failed: {other}"),
            None if c.client.info().is_some() => Ok(()),
            None => panic!("session neither joined nor refused"),
        }
    }

    pub fn refused(&mut self, id: SessionId) -> ErrorCode {
        let c = self.conn(id);
        assert!(c.closed, "session should be closed");
        match &c.error {
            Some(ClientError::Rejected(e)) => e.code,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    pub fn info(&mut self, id: SessionId) -> NodeInfo {
        self.conn(id).client.info().cloned().expect("joined")
    }

    pub fn peer_ids(&mut self, id: SessionId) -> Vec<NodeId> {
        self.conn(id).client.peers().keys().copied().collect()
    }

    pub fn report(&mut self, id: SessionId, endpoints: &[&str]) {
        let e = endpoints
            .iter()
            .map(|s| s.parse::<SocketAddr>().unwrap())
            .collect();
        self.conn(id).client.report_endpoints(e);
        self.drive();
    }
}
