//! `meshd up`: the node daemon. It joins the mesh through the coordinator and
//! keeps the data-plane engine's peers in step with the coordinator's map.
//! docs/agent.md describes it for operators.
//!
//! Three threads: the engine's ([`Engine::run`]), untouched by anything the
//! control connection does; this module's driver, a single-threaded tokio
//! loop that carries out what the [`Supervisor`] and the protocol
//! [`Client`] decide (both sans-IO) and serves the control socket; and
//! quinn's, inside that runtime. The driver reaches the engine only through
//! its [`EngineHandle`], whose calls return within one engine turn.
//!
//! Losing the control session never touches the engine: tunnels keep their
//! sessions and peers while the driver reconnects, and a new session's full
//! map is applied as a diff, which leaves unchanged peers alone.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshd_control::{ClientConn, ConnError, ConnectOptions};
use meshd_proto::client::{Client, ClientError, ClientEvent, Join};
use meshd_proto::token::JoinToken;
use meshd_proto::{NodeId, NodeInfo, Peer, MAX_ENDPOINTS};
use rand::RngCore;
use tokio::sync::{mpsc, oneshot};

use crate::control::ipc::{self, ControlStatus, NodeStatus, PeerLine, Reply, Request};
use crate::control::netmap::{self, TunPlan};
use crate::control::state_dir::{CoordinatorFile, NodeFile, NodeRecordFile, StateDir, StateError};
use crate::control::supervisor::{
    Command, ControlState, Identity, Input, JoinKind, KeyChoice, Supervisor, SupervisorConfig,
};
use meshd_dataplane::control_socket::{self, Answer, ClaimError};
use meshd_dataplane::engine::{
    ControlError, Endpoint, Engine, EngineConfig, EngineError, EngineHandle, EngineStatus,
    DEFAULT_ANSWER_POLL,
};
use meshd_dataplane::keys::{PrivateKey, PublicKey};
use meshd_dataplane::peers::PeerConfig;
use meshd_dataplane::standalone::DEFAULT_MTU;

use crate::traversal::{self, Outlets, Traversal, TraversalEvent};

/// How often the driver looks at the stop flag and the engine thread.
const TICK: Duration = Duration::from_millis(200);
/// How often the node's own addresses are looked up for endpoint reports.
const ENDPOINT_SCAN: Duration = Duration::from_secs(10);
/// How long `meshd rotate-key` waits for the coordinator's confirmation.
const ROTATE_WAIT: Duration = Duration::from_secs(20);
/// How long `meshd down` waits for the daemon to remove its interface.
const DOWN_TIMEOUT: Duration = Duration::from_secs(15);

/// What `meshd up` was asked to do.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub state_dir: PathBuf,
    /// Needed to register; a registered node logs in without one.
    pub token: Option<JoinToken>,
    /// The name to register with (the coordinator may add a suffix to make
    /// it unique); the host name by default.
    pub name: Option<String>,
    pub interface: String,
    /// UDP port of the data plane; by default the one used last, or any.
    pub listen_port: Option<u16>,
    pub rotate_every: Option<Duration>,
    pub mtu: u16,
    /// See `EngineConfig::answer_poll`.
    pub answer_poll: Duration,
    pub connect: ConnectOptions,
    pub supervisor: SupervisorConfig,
    pub traversal: traversal::TraversalOptions,
}

impl UpOptions {
    pub fn new(state_dir: PathBuf, interface: String) -> Self {
        UpOptions {
            state_dir,
            token: None,
            name: None,
            interface,
            listen_port: None,
            rotate_every: None,
            mtu: DEFAULT_MTU,
            answer_poll: DEFAULT_ANSWER_POLL,
            connect: ConnectOptions::default(),
            supervisor: SupervisorConfig::default(),
            traversal: traversal::TraversalOptions::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("this node has not joined a mesh yet (no {}): run `meshd up --token TOKEN` once", .0.display())]
    NotJoined(PathBuf),
    #[error("{}: damaged coordinator pin; run `meshd up --token TOKEN` again", .0.display())]
    BadPin(PathBuf),
    #[error("meshd is already running for {}: its control socket {} answers", state.display(), socket.display())]
    AlreadyRunning { state: PathBuf, socket: PathBuf },
    #[error("no meshd is running for {}: nothing answers on {}", state.display(), socket.display())]
    NotRunning { state: PathBuf, socket: PathBuf },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the data plane: {0}")]
    EngineControl(#[from] ControlError),
    #[error("the data-plane thread ended unexpectedly")]
    EngineGone,
    #[error("{0}")]
    Fatal(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the daemon answered: {0}")]
    Daemon(String),
    #[error("the daemon's reply: {0}")]
    Ipc(#[from] ipc::IpcError),
    #[error("meshd for {} did not stop within {} s", .0.display(), DOWN_TIMEOUT.as_secs())]
    StillUp(PathBuf),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Io { what, source }
}

/// The host name as a node name: lower case, other characters as `-`.
pub fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut name: String = host
        .trim()
        .split('.')
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    name = name.trim_matches('-').to_owned();
    if name.is_empty() {
        "node".into()
    } else {
        name
    }
}

// ---- the daemon ----

/// Runs the node until `stop` is set (by a signal handler or `meshd down`).
/// `ready` is called once traffic can flow: after the first peer map, or at
/// once when a registered node starts from its cached state. An error before
/// then (a refused token, an unreachable coordinator on the first join) ends
/// `run` with that error; later ones are logged and shown by `meshd status`
/// while the tunnels stay up.
pub fn run(
    opts: UpOptions,
    stop: &Arc<AtomicBool>,
    ready: impl FnOnce(&NodeStatus),
) -> Result<(), NodeError> {
    let state = StateDir::open(&opts.state_dir)?;
    let path = state.socket_path();
    let (listener, socket_file) = control_socket::claim(&path).map_err(|e| match e {
        ClaimError::Running(socket) => NodeError::AlreadyRunning {
            state: state.path().to_owned(),
            socket,
        },
        ClaimError::Io { what, source } => NodeError::Io { what, source },
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("starting the runtime"))?;
    let (calls, ipc_rx) = mpsc::channel::<(Request, oneshot::Sender<Reply>)>(16);
    // The socket is served on threads of its own (the same server as
    // `meshd wg`'s); each request waits for the runtime's answer.
    let serving = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        let server = std::thread::Builder::new()
            .name("meshd-control".into())
            .spawn_scoped(s, || {
                control_socket::serve(&listener, &serving, &|request| answer(request, &calls))
            })
            .map_err(io_err("starting the control-socket thread"))?;
        let result = rt.block_on(async {
            let mut runtime = Runtime::new(opts, state, stop.clone(), Box::new(ready))?;
            runtime.run(ipc_rx).await
        });
        serving.store(true, Ordering::Relaxed);
        let _ = server.join();
        result
    });
    drop(rt);
    drop(socket_file);
    result
}

/// Answers one control-socket request through the runtime.
fn answer(
    request: control_socket::Request<'_>,
    calls: &mpsc::Sender<(Request, oneshot::Sender<Reply>)>,
) -> Answer {
    let stopping = || Answer::reply(Reply::Error("meshd is stopping".into()).encode());
    let text = match request {
        control_socket::Request::Text(text) => text,
        control_socket::Request::Malformed(why) => {
            return Answer::reply(Reply::Error(why.to_owned()).encode())
        }
    };
    let request = match Request::parse(text) {
        Ok(r) => r,
        Err(e) => return Answer::reply(Reply::Error(e.to_string()).encode()),
    };
    let (tx, rx) = oneshot::channel();
    let close = request == Request::Stop;
    if calls.blocking_send((request, tx)).is_err() {
        return stopping();
    }
    match rx.blocking_recv() {
        Ok(reply) => Answer {
            reply: Reply::encode(&reply).into(),
            close,
        },
        Err(_) => stopping(),
    }
}

/// How long the driver waits for the engine to carry out a command (it
/// does so within a turn; replacing peers runs `ip route` per prefix).
const ENGINE_TIMEOUT: Duration = Duration::from_secs(20);

/// Sends a command to the engine with `send` and awaits its answer: the
/// runtime goes on serving other tasks meanwhile.
async fn call<T: Send + 'static>(
    send: impl FnOnce(Box<dyn FnOnce(T) + Send>) -> Result<(), ControlError>,
) -> Result<T, ControlError> {
    let (tx, rx) = oneshot::channel();
    send(Box::new(move |v| {
        let _ = tx.send(v);
    }))?;
    match tokio::time::timeout(ENGINE_TIMEOUT, rx).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(ControlError::Stopped),
        Err(_) => Err(ControlError::Timeout(ENGINE_TIMEOUT)),
    }
}

/// The data-plane engine on its own thread.
struct EngineRunner {
    handle: EngineHandle,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), EngineError>>>,
    plan: TunPlan,
    listen_port: u16,
}

impl EngineRunner {
    fn start(
        config: EngineConfig,
        peers: Vec<PeerConfig>,
        outlets: Outlets,
    ) -> Result<Self, NodeError> {
        let plan = TunPlan {
            addresses: config.addresses.clone(),
            routes: config.routes.clone(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("meshd-engine".into())
            .spawn(move || {
                let mut engine = match Engine::new(config) {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return Ok(());
                    }
                };
                // NAT traversal chooses every peer's path.
                engine.set_roaming(false);
                engine.set_other_outlet(outlets.other);
                engine.set_relay_outlet(outlets.relay);
                if let Err(e) = engine.set_peers(&peers) {
                    tracing::warn!(error = %e, "cached peers not applied");
                }
                let _ = tx.send(Ok((engine.handle(), engine.status().listen_port)));
                engine.run(&flag)
            })
            .map_err(io_err("starting the engine thread"))?;
        match rx.recv() {
            Ok(Ok((handle, listen_port))) => Ok(EngineRunner {
                handle,
                stop,
                thread: Some(thread),
                plan,
                listen_port,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e.into())
            }
            Err(_) => Err(NodeError::EngineGone),
        }
    }

    async fn set_peers(&self, peers: Vec<PeerConfig>) -> Result<(), ControlError> {
        call(|reply| self.handle.set_peers_then(peers, reply))
            .await?
            .map_err(ControlError::from)
    }

    async fn status(&self) -> Result<EngineStatus, ControlError> {
        call(|reply| self.handle.status_then(reply)).await
    }

    async fn set_private_key(&self, key: PrivateKey) -> Result<(), ControlError> {
        call(|reply| self.handle.set_private_key_then(key, reply)).await
    }

    /// The engine's error if its thread has ended.
    fn check(&mut self) -> Result<(), NodeError> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            return match self.thread.take().map(|t| t.join()) {
                Some(Ok(Err(e))) => Err(e.into()),
                _ => Err(NodeError::EngineGone),
            };
        }
        Ok(())
    }
}

impl Drop for EngineRunner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if let Ok(Err(e)) = t.join() {
                tracing::warn!(error = %e, "the engine ended with an error");
            }
        }
    }
}

/// One control session: the transport and the protocol state over it.
struct Session {
    conn: ClientConn,
    client: Client,
    /// The full peer map has arrived in this session.
    synced: bool,
}

type Connecting = Pin<Box<dyn Future<Output = Result<ClientConn, ConnError>>>>;

/// A probe of a coordinator address: which, and whether it answered.
type Probing = Pin<Box<dyn Future<Output = (usize, bool)>>>;

/// Called once when the node is up (see [`run`]).
type ReadyFn<'r> = Box<dyn FnOnce(&NodeStatus) + 'r>;

enum Event {
    ConnectDone(Result<ClientConn, ConnError>),
    Probed(usize, bool),
    Received(Result<Option<meshd_proto::Message>, ConnError>),
    Timer,
    Ipc(Request, oneshot::Sender<Reply>),
    Tick,
    Traversal(TraversalEvent),
}

struct Runtime<'r> {
    opts: UpOptions,
    state: StateDir,
    node_file: NodeFile,
    pin: [u8; 32],
    key: PrivateKey,
    pending: Option<PrivateKey>,
    name: String,
    sup: Supervisor,
    info: Option<NodeInfo>,
    /// The peer map last applied (names and addresses for `status`).
    peers: BTreeMap<NodeId, Peer>,
    engine: Option<EngineRunner>,
    session: Option<Session>,
    connecting: Option<Connecting>,
    probing: Option<Probing>,
    rotate_waiters: Vec<(Instant, oneshot::Sender<Reply>)>,
    sessions: u64,
    stop: Arc<AtomicBool>,
    ready: Option<ReadyFn<'r>>,
    last_scan: Option<Instant>,
    /// NAT traversal, running beside the engine.
    traversal: Option<Traversal>,
    traversal_tx: tokio::sync::mpsc::UnboundedSender<TraversalEvent>,
    traversal_rx: tokio::sync::mpsc::UnboundedReceiver<TraversalEvent>,
    /// The relay map last received.
    relays: Vec<meshd_proto::RelayEntry>,
}

impl<'r> Runtime<'r> {
    fn new(
        opts: UpOptions,
        state: StateDir,
        stop: Arc<AtomicBool>,
        ready: ReadyFn<'r>,
    ) -> Result<Self, NodeError> {
        let saved = state.load_node()?;
        let node_file = match (&opts.token, saved) {
            (Some(token), saved) => {
                let coordinator = CoordinatorFile::from_token(token);
                // A token for the same coordinator keeps the registration
                // (the node logs in, and registers only if it is unknown);
                // one for another mesh starts afresh with the same key.
                let same = saved
                    .as_ref()
                    .is_some_and(|s| s.coordinator.pin == coordinator.pin);
                NodeFile {
                    listen_port: saved.as_ref().and_then(|s| s.listen_port),
                    node: saved.filter(|_| same).and_then(|s| s.node),
                    coordinator,
                }
            }
            (None, Some(saved)) => saved,
            (None, None) => return Err(NodeError::NotJoined(state.path().join("node.toml"))),
        };
        let pin = node_file
            .coordinator
            .pin_bytes()
            .ok_or_else(|| NodeError::BadPin(state.path().join("node.toml")))?;
        if node_file.coordinator.addresses.is_empty() {
            return Err(NodeError::NotJoined(state.path().join("node.toml")));
        }
        let (key, _) = state.load_or_create_key()?;
        let pending = state.load_pending_key()?;
        state.save_node(&node_file)?;
        let info = node_file.node.as_ref().and_then(NodeRecordFile::to_info);
        let identity = Identity {
            registered: info.is_some(),
            can_register: opts.token.is_some(),
            pending_key: pending.is_some(),
        };
        let config = SupervisorConfig {
            addresses: node_file.coordinator.addresses.len(),
            rotate_every: opts.rotate_every,
            ..opts.supervisor.clone()
        };
        let sup = Supervisor::new(config, identity, rand::rng().next_u64(), Instant::now());
        let name = opts.name.clone().unwrap_or_else(default_name);
        let (traversal_tx, traversal_rx) = tokio::sync::mpsc::unbounded_channel();
        // A registered node starts with the relays it knew, so relayed paths
        // come back while the coordinator is away.
        let relays = if info.is_some() {
            state.load_relays()
        } else {
            Vec::new()
        };
        Ok(Runtime {
            opts,
            node_file,
            pin,
            key,
            pending,
            name,
            sup,
            peers: if info.is_some() {
                state.load_peers()
            } else {
                BTreeMap::new()
            },
            info,
            state,
            engine: None,
            session: None,
            connecting: None,
            probing: None,
            rotate_waiters: Vec::new(),
            sessions: 0,
            stop,
            ready: None,
            last_scan: None,
            traversal: None,
            traversal_tx,
            traversal_rx,
            relays,
        }
        .with_ready(ready))
    }

    fn with_ready(mut self, ready: ReadyFn<'r>) -> Self {
        self.ready = Some(ready);
        self
    }

    async fn run(
        &mut self,
        mut ipc_rx: mpsc::Receiver<(Request, oneshot::Sender<Reply>)>,
    ) -> Result<(), NodeError> {
        // A registered node brings its tunnels up from the cached state at
        // once; the coordinator's map follows when it answers.
        if let Some(info) = self.info.clone() {
            self.ensure_engine(&info)?;
            self.signal_ready().await;
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            if let Err(e) = self.run_commands().await {
                break Err(e);
            }
            if self.stop.load(Ordering::Relaxed) {
                break Ok(());
            }
            let event = self.next_event(&mut ipc_rx, &mut tick).await;
            if let Err(e) = self.handle_event(event).await {
                break Err(e);
            }
        };
        if let Some(s) = self.session.take() {
            s.conn.close().await;
        }
        for (_, w) in self.rotate_waiters.drain(..) {
            let _ = w.send(Reply::Error("meshd is stopping".into()));
        }
        // Dropping the engine removes the TUN device.
        self.engine = None;
        result
    }

    async fn next_event(
        &mut self,
        ipc_rx: &mut mpsc::Receiver<(Request, oneshot::Sender<Reply>)>,
        tick: &mut tokio::time::Interval,
    ) -> Event {
        let timer = self.sup.poll_timeout();
        let connecting = self.connecting.as_mut();
        let probing = self.probing.as_mut();
        let session = self.session.as_mut();
        let traversal = &mut self.traversal_rx;
        tokio::select! {
            Some(e) = traversal.recv() => Event::Traversal(e),
            r = async { match connecting { Some(f) => f.await, None => std::future::pending().await } } => {
                Event::ConnectDone(r)
            }
            (address, reachable) = async { match probing { Some(f) => f.await, None => std::future::pending().await } } => {
                Event::Probed(address, reachable)
            }
            r = async { match session { Some(s) => s.conn.recv().await, None => std::future::pending().await } } => {
                Event::Received(r)
            }
            () = async { match timer {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            } } => Event::Timer,
            Some((req, reply)) = ipc_rx.recv() => Event::Ipc(req, reply),
            _ = tick.tick() => Event::Tick,
        }
    }

    async fn handle_event(&mut self, event: Event) -> Result<(), NodeError> {
        let now = Instant::now();
        match event {
            Event::ConnectDone(result) => {
                self.connecting = None;
                match result {
                    Ok(conn) => self.session_up(conn, now),
                    Err(e) => {
                        tracing::info!(error = %e, "coordinator not reachable");
                        self.sup.handle(
                            Input::ConnectFailed {
                                error: e.to_string(),
                            },
                            now,
                        );
                    }
                }
            }
            Event::Probed(address, reachable) => {
                self.probing = None;
                let addr = self.node_file.coordinator.addresses.get(address);
                if reachable {
                    tracing::info!(coordinator = ?addr, "an earlier coordinator address answers again: moving there");
                } else {
                    tracing::debug!(coordinator = ?addr, "an earlier coordinator address still does not answer");
                }
                self.sup.handle(Input::Probed { address, reachable }, now);
            }
            Event::Received(Ok(Some(msg))) => self.on_message(msg).await?,
            Event::Received(Ok(None)) => {
                self.session_lost("the coordinator closed the session".into(), now)
            }
            Event::Received(Err(e)) => {
                if let (ConnError::Decode(d), Some(s)) = (&e, self.session.as_mut()) {
                    s.client.handle_decode_error(d);
                    let _ = self.flush().await;
                }
                self.session_lost(e.to_string(), now)
            }
            Event::Timer => self.sup.handle_timeout(now),
            Event::Ipc(req, reply) => self.on_ipc(req, reply, now).await,
            Event::Tick => self.on_tick(now)?,
            Event::Traversal(TraversalEvent::Endpoints(list)) => {
                self.sup.handle(Input::Endpoints(list), now);
            }
        }
        Ok(())
    }

    fn session_up(&mut self, conn: ClientConn, now: Instant) {
        if !matches!(self.sup.state(), ControlState::Connecting { .. }) {
            return;
        }
        let (secret, join) = match self.sup.join() {
            JoinKind::Register => {
                let Some(token) = &self.opts.token else {
                    // The supervisor registers only when it may.
                    return;
                };
                (
                    self.key.to_static_secret(),
                    Join::Register {
                        token_secret: token.secret.clone(),
                        name: self.name.clone(),
                    },
                )
            }
            JoinKind::Login(KeyChoice::Pending) => match &self.pending {
                Some(k) => (k.to_static_secret(), Join::Login),
                None => (self.key.to_static_secret(), Join::Login),
            },
            JoinKind::Login(KeyChoice::Current) => (self.key.to_static_secret(), Join::Login),
        };
        tracing::info!(
            coordinator = %conn.remote(),
            transport = %conn.transport(),
            join = ?self.sup.join(),
            "control connection up"
        );
        let mut client = Client::new(secret, join, conn.binding());
        // With the join, so the node's peers learn where it is together
        // with the node (their first packets need not wait for a report).
        if let Some(port) = self.join_port() {
            client.report_endpoints(local_endpoints(port, &self.opts.interface));
        }
        self.session = Some(Session {
            conn,
            client,
            synced: false,
        });
        self.sup.handle(Input::Connected, now);
    }

    fn session_lost(&mut self, error: String, now: Instant) {
        if self.session.take().is_some() {
            tracing::warn!(%error, "control session lost; the tunnels stay up");
        }
        self.sup.handle(Input::Lost { error }, now);
    }

    async fn on_message(&mut self, msg: meshd_proto::Message) -> Result<(), NodeError> {
        let now = Instant::now();
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        match session.client.handle_message(msg) {
            Ok(()) => {}
            Err(ClientError::Rejected(e)) => {
                tracing::warn!(code = ?e.code, message = %e.message, "the coordinator refused");
                self.session = None;
                self.sup.handle(
                    Input::Rejected {
                        code: e.code,
                        message: e.message,
                    },
                    now,
                );
                return Ok(());
            }
            Err(e) => {
                // The client queued an Error telling the coordinator why.
                let _ = self.flush().await;
                self.session_lost(format!("control protocol: {e}"), now);
                return Ok(());
            }
        }
        if let Err(e) = self.flush().await {
            self.session_lost(e.to_string(), now);
            return Ok(());
        }
        while let Some(event) = self.session.as_mut().and_then(|s| s.client.poll_event()) {
            match event {
                ClientEvent::Joined(info) => self.on_joined(info, now)?,
                ClientEvent::PeersChanged => self.on_peers(now).await?,
                ClientEvent::PolicyChanged => {
                    tracing::debug!("inbound filter received (enforced from the ACL issue on)")
                }
                ClientEvent::KeyRotated(key) => {
                    tracing::info!(public_key = %key, "the coordinator confirmed the new key");
                    self.sup.handle(Input::RotationDone, now);
                }
                ClientEvent::Updated(info) => {
                    tracing::info!(node = %info.node_id, name = %info.name, expires_at = ?info.expires_at, "the coordinator changed this node's record");
                    self.adopt(info)?;
                }
                ClientEvent::RelaysChanged => self.on_relays(),
            }
        }
        Ok(())
    }

    fn on_relays(&mut self) {
        if let Some(s) = &self.session {
            self.relays = s.client.relays().to_vec();
        }
        tracing::debug!(relays = self.relays.len(), "relay map received");
        if let Err(e) = self.state.save_relays(&self.relays) {
            tracing::warn!(error = %e, "relay cache not written");
        }
        if let Some(t) = &self.traversal {
            t.set_relays(self.relays.clone());
        }
    }

    /// The peers NAT traversal manages, with the endpoints they reported.
    fn traversal_peers(&self) -> Vec<(meshd_proto::NodeKey, Vec<SocketAddr>)> {
        let own = *self.key.public_key().as_bytes();
        self.peers
            .values()
            .filter(|p| p.node_key.0 != own)
            .map(|p| (p.node_key, p.endpoints.clone()))
            .collect()
    }

    async fn flush(&mut self) -> Result<(), ConnError> {
        if let Some(s) = self.session.as_mut() {
            while let Some(m) = s.client.poll_transmit() {
                s.conn.send(&m).await?;
            }
        }
        Ok(())
    }

    fn on_joined(&mut self, info: NodeInfo, now: Instant) -> Result<(), NodeError> {
        tracing::info!(node = %info.node_id, name = %info.name, ipv4 = %info.ipv4, ipv6 = %info.ipv6, "joined the mesh");
        self.sup.handle(Input::Joined, now);
        self.adopt(info)
    }

    /// Makes `info` this node's record: saved, shown, and its addresses on
    /// the interface.
    fn adopt(&mut self, info: NodeInfo) -> Result<(), NodeError> {
        self.node_file.node = Some(NodeRecordFile::from_info(&info));
        self.state.save_node(&self.node_file)?;
        self.info = Some(info.clone());
        self.ensure_engine(&info)
    }

    /// The data plane's UDP port, known before the engine starts: a first
    /// join picks a free one now (saved, so the engine takes it; should it
    /// be taken by then, the engine takes another and reports that).
    fn join_port(&mut self) -> Option<u16> {
        if let Some(engine) = &self.engine {
            return Some(engine.listen_port);
        }
        if let Some(port) = self.opts.listen_port.or(self.node_file.listen_port) {
            return Some(port);
        }
        let port = std::net::UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0))
            .or_else(|_| std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)))
            .and_then(|s| s.local_addr())
            .ok()?
            .port();
        self.node_file.listen_port = Some(port);
        if let Err(e) = self.state.save_node(&self.node_file) {
            tracing::warn!(error = %e, "cannot save the data plane's port");
        }
        Some(port)
    }

    /// Starts the engine for `info`'s addresses, or restarts it if they
    /// changed (a node registered anew).
    fn ensure_engine(&mut self, info: &NodeInfo) -> Result<(), NodeError> {
        let plan = netmap::tun_plan(info);
        if self.engine.as_ref().is_some_and(|e| e.plan == plan) {
            return Ok(());
        }
        if self.engine.take().is_some() {
            tracing::info!("mesh addresses changed: restarting the data plane");
        }
        let peers = netmap::peer_configs(&self.peers, &self.key.public_key());
        let config = |port| EngineConfig {
            private_key: self.key.clone(),
            tun_name: self.opts.interface.clone(),
            mtu: self.opts.mtu,
            offload: true,
            addresses: plan.addresses.clone(),
            routes: plan.routes.clone(),
            listen_port: port,
            fwmark: 0,
            route_allowed_ips: true,
            answer_poll: self.opts.answer_poll,
        };
        self.traversal = None;
        let start = |port| {
            let (pending, outlets) = traversal::prepare();
            EngineRunner::start(config(port), peers.clone(), outlets).map(|r| (r, pending))
        };
        let (runner, pending) = match (self.opts.listen_port, self.node_file.listen_port) {
            (Some(port), _) => start(port)?,
            (None, Some(last)) => match start(last) {
                Err(NodeError::Engine(EngineError::Udp(e))) => {
                    tracing::info!(port = last, error = %e, "last UDP port unavailable, taking another");
                    start(0)?
                }
                other => other?,
            },
            (None, None) => start(0)?,
        };
        let traversal = pending.start(
            &self.key,
            self.opts.traversal.clone(),
            runner.handle.clone(),
            self.traversal_tx.clone(),
        );
        traversal.set_relays(self.relays.clone());
        traversal.set_peers(self.traversal_peers());
        traversal.set_local(local_endpoints(runner.listen_port, &self.opts.interface));
        self.traversal = Some(traversal);
        if self.node_file.listen_port != Some(runner.listen_port) {
            self.node_file.listen_port = Some(runner.listen_port);
            self.state.save_node(&self.node_file)?;
        }
        self.engine = Some(runner);
        // Report the endpoints of the new port at once.
        self.last_scan = None;
        Ok(())
    }

    async fn on_peers(&mut self, now: Instant) -> Result<(), NodeError> {
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        self.peers = session.client.peers().clone();
        let first = !session.synced;
        session.synced = true;
        let configs = netmap::peer_configs(&self.peers, &self.key.public_key());
        if let Some(engine) = &self.engine {
            match engine.set_peers(configs).await {
                Ok(()) => {}
                Err(ControlError::Engine(e)) => {
                    tracing::warn!(error = %e, "peer map not applied")
                }
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(t) = &self.traversal {
            t.set_peers(self.traversal_peers());
        }
        if let Err(e) = self.state.save_peers(&self.peers) {
            tracing::warn!(error = %e, "peer cache not written");
        }
        tracing::debug!(peers = self.peers.len(), "peer map applied");
        if first {
            self.sessions += 1;
            self.sup.handle(Input::Synced, now);
            self.signal_ready().await;
        }
        Ok(())
    }

    async fn signal_ready(&mut self) {
        if let Some(ready) = self.ready.take() {
            let status = self.status(Instant::now()).await;
            ready(&status);
        }
    }

    async fn run_commands(&mut self) -> Result<(), NodeError> {
        while let Some(cmd) = self.sup.poll_command() {
            match cmd {
                Command::Connect {
                    address,
                    join,
                    handshake_timeout,
                } => {
                    self.session = None;
                    let addr = self.address(address);
                    tracing::debug!(%addr, ?join, ?handshake_timeout, "connecting to the coordinator");
                    let pin = self.pin;
                    let opts = ConnectOptions {
                        handshake_timeout,
                        ..self.opts.connect.clone()
                    };
                    self.connecting = Some(Box::pin(async move {
                        ClientConn::connect_any(&addr, pin, &opts).await
                    }));
                }
                Command::Probe {
                    address,
                    handshake_timeout,
                } => {
                    let addr = self.address(address);
                    let pin = self.pin;
                    let opts = ConnectOptions {
                        handshake_timeout,
                        ..self.opts.connect.clone()
                    };
                    self.probing = Some(Box::pin(async move {
                        match ClientConn::connect_any(&addr, pin, &opts).await {
                            Ok(conn) => {
                                conn.close().await;
                                (address, true)
                            }
                            Err(_) => (address, false),
                        }
                    }));
                }
                Command::Disconnect => {
                    self.connecting = None;
                    if let Some(s) = self.session.take() {
                        s.conn.close().await;
                    }
                }
                Command::ReportEndpoints(list) => {
                    if let Some(s) = self.session.as_mut() {
                        tracing::debug!(endpoints = ?list, "reporting endpoints");
                        s.client.report_endpoints(list);
                    }
                    self.flush_or_lose().await;
                }
                Command::RotateKey => self.start_rotation().await?,
                Command::PromotePendingKey => {
                    let key = self.state.promote_pending_key()?;
                    let public = key.public_key();
                    self.key = key.clone();
                    self.pending = None;
                    if let Some(engine) = &self.engine {
                        engine.set_private_key(key.clone()).await?;
                    }
                    if let Some(t) = &self.traversal {
                        t.set_key(key);
                    }
                    tracing::info!(public_key = %public, "key rotated");
                    for (_, w) in self.rotate_waiters.drain(..) {
                        let _ = w.send(Reply::Ok(vec![("public_key".into(), public.to_string())]));
                    }
                }
                Command::DiscardPendingKey => {
                    self.state.discard_pending_key()?;
                    self.pending = None;
                }
                Command::Fatal(reason) => {
                    self.session = None;
                    self.connecting = None;
                    self.probing = None;
                    for (_, w) in self.rotate_waiters.drain(..) {
                        let _ = w.send(Reply::Error(reason.clone()));
                    }
                    if self.ready.is_some() {
                        return Err(NodeError::Fatal(reason));
                    }
                    tracing::error!(%reason, "control connection stopped; the tunnels stay up");
                }
            }
        }
        Ok(())
    }

    /// The token's coordinator address number `i`.
    fn address(&self, i: usize) -> String {
        self.node_file
            .coordinator
            .addresses
            .get(i)
            .cloned()
            .unwrap_or_default()
    }

    async fn flush_or_lose(&mut self) {
        if let Err(e) = self.flush().await {
            self.session_lost(e.to_string(), Instant::now());
        }
    }

    async fn start_rotation(&mut self) -> Result<(), NodeError> {
        let now = Instant::now();
        let Some(s) = self.session.as_mut() else {
            return Ok(());
        };
        let next = PrivateKey::generate();
        // On disk before the coordinator hears of it: whatever happens next,
        // the node holds the key the coordinator may switch to.
        self.state.save_pending_key(&next)?;
        if let Err(e) = s.client.rotate_key(next.to_static_secret()) {
            tracing::warn!(error = %e, "key rotation not sent");
            self.session_lost(e.to_string(), now);
            return Ok(());
        }
        tracing::info!(new_key = %next.public_key(), "asking the coordinator to rotate the key");
        self.pending = Some(next);
        self.flush_or_lose().await;
        Ok(())
    }

    async fn on_ipc(&mut self, req: Request, reply: oneshot::Sender<Reply>, now: Instant) {
        match req {
            Request::Status => {
                let _ = reply.send(Reply::Ok(self.status(now).await.to_fields()));
            }
            Request::Stop => {
                tracing::info!("stop requested");
                self.stop.store(true, Ordering::Relaxed);
                let _ = reply.send(Reply::Ok(Vec::new()));
            }
            Request::RotateKey => {
                if let ControlState::Stopped { reason } = self.sup.state() {
                    let _ = reply.send(Reply::Error(format!(
                        "the control connection has stopped: {reason}"
                    )));
                    return;
                }
                self.rotate_waiters.push((now + ROTATE_WAIT, reply));
                self.sup.handle(Input::RotateRequested, now);
            }
            Request::Ping { peer } => {
                let found = self.peers.values().find(|p| {
                    p.name == peer || p.ipv4.to_string() == peer || p.ipv6.to_string() == peer
                });
                let (Some(p), Some(t)) = (found, self.traversal.clone()) else {
                    let why = if found.is_none() {
                        format!("no peer named {peer:?} (meshd status lists them)")
                    } else {
                        "the data plane is not up yet".to_owned()
                    };
                    let _ = reply.send(Reply::Error(why));
                    return;
                };
                let key = p.node_key;
                // Answered from a task: the control loop does not wait.
                tokio::spawn(async move {
                    let answer =
                        match tokio::time::timeout(traversal::PING_TIMEOUT, t.ping(key)).await {
                            Ok(Ok(r)) => Reply::Ok(vec![
                                ("via".into(), r.via),
                                ("rtt_us".into(), r.rtt.as_micros().to_string()),
                                ("path_age_ms".into(), r.path_age.as_millis().to_string()),
                            ]),
                            Ok(Err(e)) => Reply::Error(e),
                            Err(_) => Reply::Error("no answer".into()),
                        };
                    let _ = reply.send(answer);
                });
            }
            Request::Netcheck => {
                let Some(t) = &self.traversal else {
                    let _ = reply.send(Reply::Error("the data plane is not up yet".into()));
                    return;
                };
                let s = t.status().await.unwrap_or_default();
                let n = &s.netcheck;
                let mut f: Vec<(String, String)> = vec![("udp".into(), n.udp.to_string())];
                if let Some(a) = n.public {
                    f.push(("public".into(), a.to_string()));
                }
                if let Some(v) = n.mapping_varies {
                    f.push(("mapping_varies".into(), v.to_string()));
                }
                for (region, ms) in &n.latency {
                    f.push(("relay".into(), format!("{region} {ms:.3}")));
                }
                if let Some(p) = n.preferred() {
                    f.push(("preferred".into(), p.to_owned()));
                }
                if let Some(h) = s.home_relay {
                    f.push(("home".into(), h));
                }
                if let Some(t) = s.relay_transport {
                    f.push(("home_transport".into(), t));
                }
                let _ = reply.send(Reply::Ok(f));
            }
        }
    }

    fn on_tick(&mut self, now: Instant) -> Result<(), NodeError> {
        if let Some(engine) = self.engine.as_mut() {
            engine.check()?;
        }
        let waiters = std::mem::take(&mut self.rotate_waiters);
        for (deadline, w) in waiters {
            if deadline <= now {
                let _ = w.send(Reply::Error(format!(
                    "the coordinator did not confirm the new key within {} s ({}); the rotation completes when it is reachable",
                    ROTATE_WAIT.as_secs(),
                    self.sup.last_error().unwrap_or("not connected"),
                )));
            } else {
                self.rotate_waiters.push((deadline, w));
            }
        }
        let due = self
            .last_scan
            .is_none_or(|t| now.duration_since(t) >= ENDPOINT_SCAN);
        if let (true, Some(engine)) = (due, &self.engine) {
            self.last_scan = Some(now);
            // NAT traversal adds the public address and reports the whole
            // set when it changes (Event::Traversal).
            let list = local_endpoints(engine.listen_port, &self.opts.interface);
            if let Some(t) = &self.traversal {
                t.set_local(list);
            }
        }
        Ok(())
    }

    async fn status(&self, now: Instant) -> NodeStatus {
        let engine: Option<EngineStatus> = match &self.engine {
            Some(e) => match e.status().await {
                Ok(s) => Some(s),
                Err(err) => {
                    tracing::warn!(error = %err, "no engine status");
                    None
                }
            },
            None => None,
        };
        let addresses = &self.node_file.coordinator.addresses;
        let addr = |i: usize| addresses.get(i).cloned();
        let mut control = ControlStatus {
            last_error: self.sup.last_error().map(str::to_owned),
            sessions: self.sessions,
            ..ControlStatus::default()
        };
        match self.sup.state() {
            ControlState::Connecting { address } => {
                control.state = "connecting".into();
                control.coordinator = addr(*address);
            }
            ControlState::Joining { address } => {
                control.state = "joining".into();
                control.coordinator = addr(*address);
            }
            ControlState::Connected { address, since } => {
                control.state = "connected".into();
                control.coordinator = addr(*address);
                control.connected_for = Some(now.saturating_duration_since(*since).as_secs());
                control.transport = self
                    .session
                    .as_ref()
                    .map(|s| s.conn.transport().to_string());
            }
            ControlState::Backoff { until } => {
                control.state = "waiting".into();
                control.retry_in_ms = Some(until.saturating_duration_since(now).as_millis() as u64);
            }
            ControlState::Stopped { .. } => control.state = "stopped".into(),
        }
        let traversal = match &self.traversal {
            Some(t) => t.status().await.unwrap_or_default(),
            None => Default::default(),
        };
        let by_key: BTreeMap<PublicKey, &Peer> = self
            .peers
            .values()
            .map(|p| (PublicKey::from_bytes(p.node_key.0), p))
            .collect();
        let peers = engine
            .as_ref()
            .map(|e| {
                e.peers
                    .iter()
                    .filter_map(|ps| {
                        let p = by_key.get(&ps.public_key)?;
                        let path = traversal.peers.get(&ps.public_key);
                        Some(PeerLine {
                            node_id: p.node_id.0,
                            name: p.name.clone(),
                            public_key: ps.public_key,
                            ipv4: p.ipv4,
                            ipv6: p.ipv6,
                            endpoint: ps.endpoint.and_then(|e| e.udp()),
                            handshake_age: ps.last_handshake.map(|d| d.as_secs()),
                            rx_bytes: ps.rx_bytes,
                            tx_bytes: ps.tx_bytes,
                            path: match ps.endpoint {
                                Some(Endpoint::Udp(_)) => "direct",
                                Some(Endpoint::Relay { .. }) => "relay",
                                None => "none",
                            }
                            .into(),
                            relay: path.and_then(|p| p.relay_region.clone()),
                            rtt_us: path
                                .and_then(|p| p.rtt)
                                .map(|r| u64::try_from(r.as_micros()).unwrap_or(u64::MAX)),
                            candidates: p.endpoints.clone(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        NodeStatus {
            home_relay: traversal.home_relay.clone(),
            name: self
                .info
                .as_ref()
                .map(|i| i.name.clone())
                .unwrap_or_default(),
            node_id: self.info.as_ref().map(|i| i.node_id.0),
            public_key: Some(self.key.public_key()),
            ipv4: self.info.as_ref().map(|i| i.ipv4),
            ipv6: self.info.as_ref().map(|i| i.ipv6),
            interface: self.opts.interface.clone(),
            listen_port: engine.as_ref().map(|e| e.listen_port),
            control,
            peers,
        }
    }
}

/// The node's own addresses with the data plane's port, as endpoints for
/// its peers: every address of an interface that is up, except loopback,
/// IPv6 link-local, and the mesh interface itself; IPv4 first.
pub fn local_endpoints(port: u16, mesh_interface: &str) -> Vec<SocketAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<SocketAddr> = Vec::new();
    for ifa in addrs {
        if ifa.interface_name == mesh_interface
            || !ifa.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP)
        {
            continue;
        }
        let Some(addr) = ifa.address else { continue };
        let ip: IpAddr = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let skip = ip.is_loopback()
            || ip.is_unspecified()
            || ip.is_multicast()
            || matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
        let ep = SocketAddr::new(ip, port);
        if !skip && !out.contains(&ep) {
            out.push(ep);
        }
    }
    out.sort_by_key(|e| e.is_ipv6());
    out.truncate(MAX_ENDPOINTS);
    out
}

// ---- clients of a running daemon ----

fn request(state_dir: &Path, req: Request) -> Result<Vec<(String, String)>, NodeError> {
    let path = StateDir::at(state_dir).socket_path();
    let mut stream = match control_socket::connect(&path) {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(NodeError::NotRunning {
                state: state_dir.to_owned(),
                socket: path,
            })
        }
        Err(e) => return Err(io_err(format!("connecting to {}", path.display()))(e)),
    };
    let text = control_socket::exchange(&mut stream, &req.encode())
        .map_err(io_err(format!("talking to {}", path.display())))?;
    match Reply::parse(&text)? {
        Reply::Ok(fields) => Ok(fields),
        Reply::Error(message) => Err(NodeError::Daemon(message)),
    }
}

/// The status of the node daemon of `state_dir`.
pub fn status(state_dir: &Path) -> Result<NodeStatus, NodeError> {
    Ok(NodeStatus::from_fields(&request(
        state_dir,
        Request::Status,
    )?)?)
}

/// Rotates the node's key and waits for the coordinator to confirm it;
/// returns the new public key.
pub fn rotate_key(state_dir: &Path) -> Result<PublicKey, NodeError> {
    let fields = request(state_dir, Request::RotateKey)?;
    fields
        .iter()
        .find(|(k, _)| k == "public_key")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| NodeError::Daemon("no public key in the reply".into()))
}

/// One discovery ping to `peer` (a name or mesh address): `(via, rtt, path
/// age)`.
pub fn ping(state_dir: &Path, peer: &str) -> Result<(String, Duration, Duration), NodeError> {
    let fields = request(
        state_dir,
        Request::Ping {
            peer: peer.to_owned(),
        },
    )?;
    let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
    let num = |k: &str| get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok((
        get("via").unwrap_or("?").to_owned(),
        Duration::from_micros(num("rtt_us")),
        Duration::from_millis(num("path_age_ms")),
    ))
}

/// `meshd netcheck`: the daemon's last view of the network, as fields.
pub fn netcheck(state_dir: &Path) -> Result<Vec<(String, String)>, NodeError> {
    request(state_dir, Request::Netcheck)
}

/// Stops the node daemon and waits until it has removed its interface.
pub fn down(state_dir: &Path) -> Result<(), NodeError> {
    request(state_dir, Request::Stop)?;
    let path = StateDir::at(state_dir).socket_path();
    let deadline = Instant::now() + DOWN_TIMEOUT;
    while path.exists() {
        if Instant::now() >= deadline {
            return Err(NodeError::StillUp(state_dir.to_owned()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_name_is_a_dns_label() {
        let n = default_name();
        assert!(!n.is_empty() && n.len() <= 63, "{n:?}");
        assert!(n
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        assert!(!n.starts_with('-') && !n.ends_with('-'));
    }

    #[test]
    fn loopback_is_never_an_endpoint() {
        let eps = local_endpoints(41641, "meshd-none");
        assert!(eps
            .iter()
            .all(|e| !e.ip().is_loopback() && e.port() == 41641));
        assert!(eps.windows(2).all(|w| w[0].is_ipv4() || w[1].is_ipv6()));
    }
}
