//! `meshd coord …`: run the coordinator, and administer a running one through
//! its admin API (docs/admin-api.md).
#![allow(clippy::print_stdout)] // a CLI talks to its user on stdout

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use meshd_coord::admin::client::{AdminClient, KEY_FILE, URL_FILE};
use meshd_coord::admin::{CreateToken, Expires, NodeView, TokenView};
use meshd_coord::service::{Service, ServiceConfig};
use meshd_proto::NodeId;
use serde::Serialize;

const DEFAULT_STATE: &str = "/var/lib/meshd-coord";

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CoordArgs {
    #[command(subcommand)]
    admin: Option<AdminCmd>,
    // Boxed: the server's flags would make every `meshd` command this large.
    #[command(flatten)]
    serve: Box<ServeArgs>,
}

/// Without a subcommand, `meshd coord` runs the coordinator.
#[derive(Args)]
struct ServeArgs {
    /// Where nodes connect: QUIC on this UDP address, TLS on the same TCP address.
    #[arg(long, default_value = "0.0.0.0:443", value_name = "ADDR")]
    listen: SocketAddr,
    /// State directory: TLS identity, admin key, SQLite database.
    #[arg(long, default_value = DEFAULT_STATE, value_name = "DIR")]
    state: PathBuf,
    /// Keep state in PostgreSQL instead of SQLite, shared with other replicas.
    /// A password it lacks comes from PGPASSWORD or ~/.pgpass (PGPASSFILE).
    #[arg(long, value_name = "postgres://…")]
    database: Option<String>,
    /// Read the --database connection string from this file (keeps a
    /// password in it out of `ps`).
    #[arg(long, value_name = "FILE", conflicts_with = "database")]
    database_url_file: Option<PathBuf>,
    /// HOST:PORT that join tokens tell nodes to connect to (repeat for every
    /// replica). Default: the listen address, if it is not a wildcard.
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Vec<String>,
    /// Address of the admin API (HTTP). Must be loopback unless --admin-public.
    #[arg(long, default_value = "127.0.0.1:8443", value_name = "ADDR")]
    admin_listen: SocketAddr,
    /// Allow --admin-listen on a non-loopback address (plain HTTP: put it
    /// behind TLS or a private network).
    #[arg(long)]
    admin_public: bool,
    /// Nodes must register again this long after joining (e.g. 90d). Default: never.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    node_expiry: Option<Duration>,
    /// Ephemeral nodes are deleted after being disconnected this long.
    #[arg(long, default_value = "5m", value_name = "DURATION", value_parser = parse_duration)]
    ephemeral_timeout: Duration,
    /// Serve this certificate (PEM, chain allowed) instead of the self-signed one.
    #[arg(long, value_name = "PEM", requires = "key")]
    cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, value_name = "PEM", requires = "cert")]
    key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Join tokens: create, list, revoke.
    #[command(subcommand, visible_alias = "token")]
    Tokens(TokenCmd),
    /// Registered nodes: list, rename, expire, delete.
    #[command(subcommand, visible_alias = "node")]
    Nodes(NodeCmd),
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a join token and print it (the only time it is shown).
    Create {
        /// Any number of nodes may join with it (default: one node).
        #[arg(long)]
        reusable: bool,
        /// Nodes that join with it are deleted once disconnected for a while.
        #[arg(long)]
        ephemeral: bool,
        /// The token stops working after this long (e.g. 24h). Default: never.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires: Option<Duration>,
        /// Give joining nodes this tag (`tag:NAME`); repeatable.
        #[arg(long = "tag", value_name = "tag:NAME")]
        tags: Vec<String>,
        /// Put joining nodes into this network slice.
        #[arg(long, value_name = "NAME")]
        slice: Option<String>,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// List join tokens (never their secrets).
    List {
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Revoke a join token: no node can join with it any more.
    Revoke {
        /// Token id, as `tokens list` shows.
        id: String,
        #[command(flatten)]
        conn: AdminConn,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// List registered nodes.
    List {
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Rename a node (a DNS label: lowercase letters, digits, hyphens).
    Rename {
        id: u64,
        name: String,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Expire a node now: it leaves every peer map and must register again.
    Expire {
        id: u64,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Delete a node.
    Delete {
        id: u64,
        #[command(flatten)]
        conn: AdminConn,
    },
}

/// How an admin command reaches the running coordinator.
#[derive(Args)]
struct AdminConn {
    /// The coordinator's state directory: the admin URL and key are read from it.
    #[arg(long, default_value = DEFAULT_STATE, value_name = "DIR")]
    state: PathBuf,
    /// Admin API URL (http://HOST:PORT) instead of the state directory's.
    #[arg(long, value_name = "URL")]
    admin: Option<String>,
    /// File holding the admin key, instead of the state directory's.
    #[arg(long, value_name = "FILE")]
    admin_key_file: Option<PathBuf>,
    /// Print JSON (the admin API's answer) instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{e} (examples: 90s, 30m, 24h, 7d)")),
    }
}

pub fn run(args: CoordArgs) -> Result<()> {
    match args.admin {
        None => serve(*args.serve),
        Some(cmd) => admin(cmd),
    }
}

fn serve(a: ServeArgs) -> Result<()> {
    let database = match &a.database_url_file {
        Some(path) => Some(read_database_url(path)?),
        None => a.database,
    };
    let config = ServiceConfig {
        listen: a.listen,
        state_dir: a.state,
        database,
        advertise: a.advertise,
        admin_listen: a.admin_listen,
        admin_public: a.admin_public,
        node_expiry: a.node_expiry,
        ephemeral_timeout: a.ephemeral_timeout,
        certificate: a.cert.zip(a.key),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("meshd-coord-io")
        .build()
        .context("cannot start the async runtime")?;
    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::unbounded_channel();
    ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    })
    .context("cannot install the SIGINT/SIGTERM handler")?;
    runtime.block_on(async {
        // One line: each error's message already includes its cause.
        let service = Service::start(config)
            .await
            .map_err(|e| anyhow::anyhow!("cannot start the coordinator: {e}"))?;
        stop_rx.recv().await;
        tracing::info!("stopping on signal");
        service.shutdown().await;
        Ok(())
    })
}

/// The connection string in `path`: its first line, trimmed. The text is
/// never shown, as it may hold a password.
fn read_database_url(path: &Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --database-url-file {}", path.display()))?;
    let url = text.lines().next().unwrap_or_default().trim();
    if url.is_empty() {
        anyhow::bail!(
            "--database-url-file {}: the file is empty; put a PostgreSQL connection string in it",
            path.display()
        );
    }
    if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
        tracing::warn!(file = %path.display(), "the database URL file is readable by others than its owner; chmod 600 it");
    }
    Ok(url.to_owned())
}

fn admin(cmd: AdminCmd) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match cmd {
            AdminCmd::Tokens(TokenCmd::Create {
                reusable,
                ephemeral,
                expires,
                tags,
                slice,
                conn,
            }) => {
                let req = CreateToken {
                    reusable,
                    ephemeral,
                    expires: expires.map(Expires),
                    tags,
                    slice,
                };
                let created = client(&conn)?.create_token(&req).await?;
                if conn.json {
                    print_json(&created)?;
                } else {
                    println!("{}", created.token);
                    let t = &created.info;
                    eprintln!(
                        "token {}: {}{}, expires {}",
                        t.id,
                        if t.reusable { "reusable" } else { "one node" },
                        if t.ephemeral { ", ephemeral nodes" } else { "" },
                        t.expires_at.as_deref().unwrap_or("never")
                    );
                }
            }
            AdminCmd::Tokens(TokenCmd::List { conn }) => {
                let tokens = client(&conn)?.list_tokens().await?;
                let json = serde_json::json!({ "tokens": tokens });
                show(&conn, &json, || token_table(&tokens))?;
            }
            AdminCmd::Tokens(TokenCmd::Revoke { id, conn }) => {
                let token = client(&conn)?.revoke_token(&id).await?;
                show(&conn, &token, || format!("revoked token {}\n", token.id))?;
            }
            AdminCmd::Nodes(NodeCmd::List { conn }) => {
                let nodes = client(&conn)?.list_nodes().await?;
                let json = serde_json::json!({ "nodes": nodes });
                show(&conn, &json, || node_table(&nodes))?;
            }
            AdminCmd::Nodes(NodeCmd::Rename { id, name, conn }) => {
                let node = client(&conn)?.rename_node(NodeId(id), &name).await?;
                show(&conn, &node, || {
                    format!("node {} is now named {}\n", node.id, node.name)
                })?;
            }
            AdminCmd::Nodes(NodeCmd::Expire { id, conn }) => {
                let node = client(&conn)?.expire_node(NodeId(id)).await?;
                show(&conn, &node, || {
                    format!("node {} ({}) expired\n", node.id, node.name)
                })?;
            }
            AdminCmd::Nodes(NodeCmd::Delete { id, conn }) => {
                client(&conn)?.delete_node(NodeId(id)).await?;
                let json = serde_json::json!({ "deleted": id.to_string() });
                show(&conn, &json, || format!("node {id} deleted\n"))?;
            }
        }
        Ok(())
    })
}

fn client(conn: &AdminConn) -> Result<AdminClient> {
    let dir: &Path = &conn.state;
    let url = match &conn.admin {
        Some(u) => u.clone(),
        None => std::fs::read_to_string(dir.join(URL_FILE)).with_context(|| {
            format!(
                "cannot find the admin API: {} is missing or unreadable \
                 (is `meshd coord` running with --state {}? otherwise give --admin URL)",
                dir.join(URL_FILE).display(),
                dir.display()
            )
        })?,
    };
    let key_file = conn
        .admin_key_file
        .clone()
        .unwrap_or_else(|| dir.join(KEY_FILE));
    Ok(AdminClient::with_key_file(&url, &key_file)?)
}

fn print_json(value: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints the admin API's answer `value` as JSON with --json, else `text`
/// (whole lines).
fn show(conn: &AdminConn, value: &impl Serialize, text: impl FnOnce() -> String) -> Result<()> {
    if conn.json {
        return print_json(value);
    }
    print!("{}", text());
    Ok(())
}

/// Left-aligned columns, two spaces apart, a header line first.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn or_dash(v: Option<&str>) -> String {
    v.unwrap_or("-").to_owned()
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

fn token_table(tokens: &[TokenView]) -> String {
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.state.clone(),
                if t.reusable { "reusable" } else { "one-time" }.into(),
                if t.ephemeral { "yes" } else { "no" }.into(),
                t.uses.to_string(),
                t.created_at.clone(),
                or_dash(t.expires_at.as_deref()),
                list(&t.tags),
                or_dash(t.slice.as_deref()),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "STATE",
            "KIND",
            "EPHEMERAL",
            "USES",
            "CREATED",
            "EXPIRES",
            "TAGS",
            "SLICE",
        ],
        &rows,
    )
}

fn node_table(nodes: &[NodeView]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let status = if n.expired {
                "expired".to_owned()
            } else if n.connected {
                "connected".to_owned()
            } else {
                match &n.disconnected_at {
                    Some(t) => format!("offline since {t}"),
                    None => "offline".to_owned(),
                }
            };
            vec![
                n.id.clone(),
                n.name.clone(),
                n.ipv4.clone(),
                n.ipv6.clone(),
                status,
                or_dash(n.expires_at.as_deref()),
                list(&n.tags),
                list(&n.endpoints),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "NAME",
            "IPV4",
            "IPV6",
            "STATUS",
            "EXPIRES",
            "TAGS",
            "ENDPOINTS",
        ],
        &rows,
    )
}
