//! `meshd relay`: the relay and STUN responder (crate `meshd-relay`), kept
//! a member of its mesh by `meshd_agent::relay_member`. See
//! docs/relay-protocol.md.
#![allow(clippy::print_stdout)] // a CLI talks to its user on stdout

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use meshd_agent::relay_member::{self, MemberConfig, Membership};
use meshd_proto::token::JoinToken;
use meshd_proto::RelayInfo;
use meshd_relay::{Members, MeshPeer, RelayConfig, RelayServer, Role};
use x25519_dalek::PublicKey;

/// Where `meshd relay status` finds the counters: rewritten every
/// [`COUNTERS_INTERVAL`] by the running relay.
const COUNTERS_FILE: &str = "relay-counters.json";
const COUNTERS_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RelayArgs {
    #[command(subcommand)]
    cmd: Option<RelayCmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum RelayCmd {
    /// Print the running relay's counters (clients, packets, bytes, drops per cause).
    Status {
        #[arg(long, default_value = DEFAULT_STATE, value_name = "DIR")]
        state: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

const DEFAULT_STATE: &str = "/var/lib/meshd-relay";

#[derive(Args)]
struct RunArgs {
    /// A join token tagged tag:relay (`meshd coord token create --tag tag:relay`).
    /// Needed the first time only.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Read the token from this file instead (keeps it out of `ps`).
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// The region this relay serves (a DNS label); nodes home on the nearest.
    #[arg(long, default_value = "default")]
    region: String,
    /// Its name in the mesh (default: relay-REGION).
    #[arg(long)]
    name: Option<String>,
    /// Where TLS over TCP and QUIC over UDP listen.
    #[arg(long, default_value = "[::]:443", value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// The STUN responder's UDP port (it also answers on the next port, so
    /// nodes can tell a NAT that maps by destination).
    #[arg(long, default_value_t = 3478, value_name = "PORT")]
    stun_port: u16,
    /// Where nodes reach this relay (repeat for several); default: --listen
    /// when it is a specific address.
    #[arg(long = "public", value_name = "ADDR:PORT")]
    public: Vec<SocketAddr>,
    #[arg(long, default_value = DEFAULT_STATE, value_name = "DIR")]
    state: PathBuf,
}

pub fn run(args: RelayArgs) -> Result<()> {
    match args.cmd {
        Some(RelayCmd::Status { state, json }) => status(&state, json),
        None => serve(args.run),
    }
}

fn status(state: &Path, json: bool) -> Result<()> {
    let path = state.join(COUNTERS_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no counters at {} (is meshd relay running with --state {}?)",
            path.display(),
            state.display()
        )
    })?;
    if json {
        print!("{text}");
        return Ok(());
    }
    let v: serde_json::Value =
        serde_json::from_str(&text).context("reading the relay's counters")?;
    print_tree("", &v);
    Ok(())
}

fn print_tree(prefix: &str, v: &serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                print_tree(&key, v);
            }
        }
        other => println!("{prefix}: {other}"),
    }
}

fn serve(args: RunArgs) -> Result<()> {
    if !meshd_coord::coordinator::valid_name(&args.region) {
        bail!(
            "invalid --region {:?}: use a DNS label (lowercase letters, digits, hyphens)",
            args.region
        );
    }
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the token from {}", f.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    let token = token
        .map(|t| JoinToken::parse(&t).context("the join token"))
        .transpose()?;
    let public = if args.public.is_empty() {
        if args.listen.ip().is_unspecified() {
            bail!("--listen {} is every address: say where nodes reach this relay with --public ADDR:PORT", args.listen);
        }
        vec![args.listen]
    } else {
        args.public.clone()
    };
    std::fs::create_dir_all(&args.state)
        .with_context(|| format!("creating the state directory {}", args.state.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the relay's runtime")?;
    runtime.block_on(async move {
        let mut config = RelayConfig::new(&args.state);
        config.listen = args.listen;
        config.stun_listen = Some(SocketAddr::new(args.listen.ip(), args.stun_port));
        config.stun_second = Some(SocketAddr::new(args.listen.ip(), args.stun_port.wrapping_add(1)));
        config.log_interval = Duration::from_secs(30);
        let members = Members::new();
        let server = RelayServer::start(config, members.clone())
            .await
            .context("starting the relay")?;
        let own = server.public_key();
        tracing::info!(region = %args.region, listen = %args.listen, key = %meshd_proto::NodeKey(own.to_bytes()), "relay joining its mesh");
        let info = RelayInfo {
            region: args.region.clone(),
            addrs: public,
            stun_port: args.stun_port,
            cert_pin: server.pin(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed))
            .context("installing the signal handler")?;
        let server = Arc::new(server);
        let counters = {
            let server = server.clone();
            let path = args.state.join(COUNTERS_FILE);
            tokio::spawn(async move {
                loop {
                    if let Ok(text) = serde_json::to_string_pretty(&server.counters()) {
                        let tmp = path.with_extension("json.tmp");
                        if std::fs::write(&tmp, text).is_ok() {
                            let _ = std::fs::rename(&tmp, &path);
                        }
                    }
                    tokio::time::sleep(COUNTERS_INTERVAL).await;
                }
            })
        };
        let member_config = MemberConfig {
            state: &args.state,
            token,
            name: args.name.clone().unwrap_or_else(|| format!("relay-{}", args.region)),
            info,
            key: server.static_key(),
        };
        let apply = |m: &Membership| {
            let relays = m.relays.iter().filter(|r| r.key.0 != own.to_bytes());
            members.replace(
                m.nodes
                    .iter()
                    .map(|k| (PublicKey::from(k.0), Role::Node))
                    .chain(relays.clone().map(|r| (PublicKey::from(r.key.0), Role::Relay))),
            );
            server.set_mesh(
                relays
                    .filter_map(|r| {
                        Some(MeshPeer {
                            addr: r.info.addrs.first()?.to_string(),
                            pin: r.info.cert_pin,
                            key: PublicKey::from(r.key.0),
                        })
                    })
                    .collect(),
            );
            tracing::info!(nodes = m.nodes.len(), relays = m.relays.len(), "membership updated");
        };
        let session = relay_member::run(member_config, apply);
        let stopped = async {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let result = tokio::select! {
            r = session => r.context("the relay's membership"),
            () = stopped => Ok(()),
        };
        counters.abort();
        result
    })
}
