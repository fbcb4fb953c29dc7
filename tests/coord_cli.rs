#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! `meshd coord` as an operator runs it: the real binary on loopback with its
//! state in a temporary directory, administered through `meshd coord
//! token|tokens|nodes …` and through raw HTTP requests to its admin API, and
//! joined by a node with the coordinator's own client and a created token.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use meshd_coord::net::{ClientConn, Transport};
use meshd_proto::client::{Client, ClientEvent, Join};
use meshd_proto::token::{cert_pin, JoinToken};
use meshd_proto::{ErrorCode, Message};
use x25519_dalek::StaticSecret;

// The coordinator tests' private PostgreSQL server (this file uses a part).
#[path = "../coord/tests/support/pg.rs"]
#[allow(dead_code)]
mod pg;

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");

/// A running `meshd coord`, killed when dropped (also when a test fails).
struct Coord {
    child: Option<Child>,
    state: PathBuf,
    log: PathBuf,
}

impl Coord {
    /// Starts a coordinator on loopback (ports chosen by the kernel) and
    /// waits until it has written its admin URL.
    fn start(state: &Path, extra: &[&str]) -> Coord {
        Self::start_env(state, extra, &[])
    }

    /// [`Coord::start`] with more environment variables.
    fn start_env(state: &Path, extra: &[&str], env: &[(&str, &str)]) -> Coord {
        let log = state.with_extension(format!("log{}", std::process::id()));
        let child = Command::new(MESHD)
            .args([
                "coord",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--state",
            ])
            .arg(state)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut c = Coord {
            child: Some(child),
            state: state.to_owned(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !state.join("admin.url").exists() {
            if let Some(status) = c.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "meshd coord exited ({status}) before it was ready:\n{}",
                    c.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "meshd coord not ready:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `host:port` of the admin API, from the file the coordinator wrote.
    fn admin_addr(&self) -> String {
        let url = std::fs::read_to_string(self.state.join("admin.url")).unwrap();
        url.trim().strip_prefix("http://").unwrap().to_owned()
    }

    fn admin_key(&self) -> String {
        std::fs::read_to_string(self.state.join("admin.key"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// `meshd coord ARGS --state DIR`.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(MESHD)
            .arg("coord")
            .args(args)
            .arg("--state")
            .arg(&self.state)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    }

    /// Like [`Coord::cli`], asserting success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "meshd coord {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.push("--json");
        serde_json::from_str(&self.ok(&args)).unwrap()
    }

    /// SIGTERM, and the clean exit that must follow.
    fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        let pid = rustix::process::Pid::from_child(&child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "exit after SIGTERM: {status}\n{}",
            self.log()
        );
        assert!(
            !self.state.join("admin.url").exists(),
            "admin.url left behind"
        );
    }
}

impl Drop for Coord {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
fn http(addr: &str, method: &str, path: &str, key: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(k) = key {
        req.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // The server may answer (413) before reading all of a large body and
    // close; a failed write is then expected.
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {resp:?}"));
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// [`http`] for a request the admin API refuses: its status and error code.
fn refusal(addr: &str, method: &str, path: &str, key: Option<&str>, body: &[u8]) -> (u16, String) {
    let (status, body) = http(addr, method, path, key, body);
    (status, error_code(&body))
}

fn error_code(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    v["error"].as_str().unwrap().to_owned()
}

/// Registers a node with `token` over `transport`; returns the session's
/// first refusal, if the coordinator refused.
async fn join(
    token: &JoinToken,
    seed: u8,
    name: &str,
    transport: Transport,
) -> Result<(ClientConn, Client), ErrorCode> {
    let mut conn = ClientConn::connect(token, transport).await.unwrap();
    let join = Join::Register {
        token_secret: token.secret.clone(),
        name: name.into(),
    };
    let mut client = Client::new(StaticSecret::from([seed; 32]), join, conn.binding());
    let run = async {
        loop {
            while let Some(m) = client.poll_transmit() {
                conn.send(&m).await.unwrap();
            }
            while let Some(e) = client.poll_event() {
                if e == ClientEvent::PeersChanged {
                    return Ok(());
                }
            }
            match conn.recv().await.unwrap() {
                Some(Message::Error(e)) => return Err(e.code),
                Some(m) => client.handle_message(m).unwrap(),
                None => panic!("coordinator closed the session"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap()
        .map(|()| (conn, client))
}

#[test]
fn tokens_are_created_listed_and_revoked_without_showing_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coord::start(&dir.path().join("state"), &[]);
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(coord.state.join("admin.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);

    let out = coord.cli(&[
        "token",
        "create",
        "--reusable",
        "--tag",
        "tag:edge",
        "--expires",
        "24h",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one token, nothing else: {stdout:?}");
    let text = lines[0];
    let token = JoinToken::parse(text).unwrap();
    let port = coord.admin_addr(); // a different listener: the token names the control one
    assert_eq!(token.addresses.len(), 1);
    assert!(token.addresses[0].starts_with("127.0.0.1:") && !token.addresses[0].ends_with(":0"));
    assert_ne!(token.addresses[0], port);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!stderr.contains(text), "token on stderr: {stderr}");

    let tokens = coord.json(&["tokens", "list"]);
    let list = tokens["tokens"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    let id = list[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(list[0]["state"], "valid");
    assert_eq!(list[0]["reusable"], true);
    assert_eq!(list[0]["tags"], serde_json::json!(["tag:edge"]));
    assert!(list[0]["expires_at"].is_string());
    let table = coord.ok(&["tokens", "list"]);
    assert!(table.starts_with("ID ") && table.contains(&id), "{table}");
    // Neither form shows the secret, nor does the coordinator's log.
    let secret_b64 = &text["meshd1_".len()..][..40];
    for shown in [tokens.to_string(), table, coord.log()] {
        assert!(!shown.contains(secret_b64), "secret shown: {shown}");
    }

    let out = coord.ok(&["tokens", "revoke", &id]);
    assert_eq!(out.trim(), format!("revoked token {id}"));
    let tokens = coord.json(&["token", "list"]);
    assert_eq!(tokens["tokens"][0]["state"], "revoked");
    assert_eq!(tokens["tokens"][0]["revoked"], true);

    let out = coord.cli(&["tokens", "revoke", "0000000000000000"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("no token with id 0000000000000000") && err.contains("404"),
        "{err}"
    );
    assert!(!coord.log().contains("panicked"));
    coord.stop();
}

#[test]
fn wrong_admin_key_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coord::start(&dir.path().join("state"), &[]);
    let (addr, key) = (coord.admin_addr(), coord.admin_key());

    assert_eq!(
        refusal(&addr, "GET", "/v1/tokens", None, b""),
        (401, "unauthorized".into())
    );
    assert_eq!(
        refusal(&addr, "GET", "/v1/tokens", Some("not-the-key"), b""),
        (401, "unauthorized".into())
    );
    // The key's prefix is no better than any other wrong key.
    let (status, _) = http(&addr, "GET", "/v1/tokens", Some(&key[..32]), b"");
    assert_eq!(status, 401);
    // Unauthenticated requests learn nothing about routes.
    let (status, _) = http(&addr, "GET", "/nothing/here", None, b"");
    assert_eq!(status, 401);

    let wrong = dir.path().join("wrong.key");
    std::fs::write(&wrong, "0123456789abcdef0123456789abcdef\n").unwrap();
    let out = coord.cli(&[
        "tokens",
        "list",
        "--admin-key-file",
        wrong.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("wrong admin key") && err.contains("401"),
        "{err}"
    );
    let out = coord.cli(&[
        "nodes",
        "list",
        "--admin",
        &format!("http://{addr}"),
        "--admin-key-file",
        wrong.to_str().unwrap(),
    ]);
    assert!(!out.status.success());

    let k = Some(key.as_str());
    for body in [
        &b"{not json"[..],
        b"[1,2]",
        b"{\"reusable\": \"yes\"}",
        b"{\"reuseable\": true}",
        b"{\"expires\": \"soon\"}",
        b"{\"expires\": 0}",
    ] {
        assert_eq!(
            refusal(&addr, "POST", "/v1/tokens", k, body),
            (400, "bad_request".into()),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    assert_eq!(
        refusal(&addr, "POST", "/v1/tokens", k, br#"{"tags": ["edge"]}"#),
        (400, "invalid_tag".into())
    );
    assert_eq!(
        refusal(&addr, "PATCH", "/v1/nodes/12", k, b"{}"),
        (400, "bad_request".into())
    );
    assert_eq!(
        refusal(&addr, "PATCH", "/v1/nodes/twelve", k, br#"{"name": "a"}"#),
        (400, "bad_request".into())
    );
    assert_eq!(
        refusal(&addr, "POST", "/v1/tokens", k, &vec![b' '; 65 * 1024]),
        (413, "payload_too_large".into())
    );
    assert_eq!(
        refusal(&addr, "GET", "/v2/tokens", k, b""),
        (404, "not_found".into())
    );
    assert_eq!(
        refusal(&addr, "PUT", "/v1/tokens", k, b""),
        (405, "method_not_allowed".into())
    );
    assert_eq!(
        refusal(&addr, "DELETE", "/v1/nodes/12", k, b""),
        (404, "no_such_node".into())
    );
    // None of that created anything, and the coordinator still answers.
    let (status, resp) = http(&addr, "GET", "/v1/tokens", k, b"");
    assert_eq!((status, resp.as_str()), (200, r#"{"tokens":[]}"#));
    // An empty body is an empty object: a one-time token.
    let (status, resp) = http(&addr, "POST", "/v1/tokens", k, b"");
    assert_eq!(status, 201);
    let created: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(created["reusable"], false);
    JoinToken::parse(created["token"].as_str().unwrap()).unwrap();
    assert!(!coord.log().contains("panicked"));
    coord.stop();
}

#[test]
fn restart_keeps_tokens_identity_and_admin_key() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let coord = Coord::start(&state, &[]);
    let first = JoinToken::parse(&coord.ok(&["token", "create", "--reusable"])).unwrap();
    let ids = coord.json(&["tokens", "list"]);
    let key = coord.admin_key();
    coord.stop();

    let coord = Coord::start(&state, &[]);
    assert_eq!(coord.json(&["tokens", "list"]), ids);
    assert_eq!(coord.admin_key(), key);
    let second = JoinToken::parse(&coord.ok(&["token", "create"])).unwrap();
    assert_eq!(second.cert_pin, first.cert_pin);
    assert_ne!(second.secret, first.secret);
    let cert = std::fs::read(state.join("coord-cert.der")).unwrap();
    assert_eq!(cert_pin(&cert), first.cert_pin);
    assert_eq!(
        coord.json(&["tokens", "list"])["tokens"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_joins_the_coordinator_that_serves_its_pinned_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coord::start(&dir.path().join("state"), &[]);
    let text = coord.ok(&["token", "create", "--tag", "tag:edge"]);
    let token = JoinToken::parse(&text).unwrap();

    // The pin is that of the certificate the coordinator serves: the
    // client accepts only that one, on QUIC and on TCP.
    let (_conn, node) = join(&token, 7, "web-1", Transport::Quic).await.unwrap();
    let info = node.info().unwrap().clone();
    assert_eq!(info.tags, ["tag:edge"]);
    // A one-time token does not admit a second node.
    let second = join(&token, 8, "web-2", Transport::Tcp).await;
    assert_eq!(second.err(), Some(ErrorCode::TokenUsed));
    let mut other = token.clone();
    other.cert_pin[31] ^= 1;
    let err = ClientConn::connect(&other, Transport::Tcp)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("pin"), "{err}");

    let nodes = coord.json(&["nodes", "list"]);
    let n = &nodes["nodes"][0];
    assert_eq!(n["id"], info.node_id.to_string());
    assert_eq!(n["name"], "web-1");
    assert_eq!(n["ipv4"], info.ipv4.to_string());
    assert_eq!(n["connected"], true);
    let tokens = coord.json(&["tokens", "list"]);
    assert_eq!(tokens["tokens"][0]["uses"], 1);
    assert_eq!(tokens["tokens"][0]["state"], "used");

    let id = info.node_id.to_string();
    let out = coord.ok(&["nodes", "rename", &id, "edge-1"]);
    assert_eq!(out.trim(), format!("node {id} is now named edge-1"));
    let table = coord.ok(&["nodes", "list"]);
    assert!(
        table.contains("edge-1") && table.contains("connected"),
        "{table}"
    );
    let out = coord.cli(&["nodes", "rename", &id, "Not_A_Label"]);
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("invalid_name"));
    let expired = coord.json(&["nodes", "expire", &id]);
    assert_eq!(expired["expired"], true);
    coord.ok(&["nodes", "delete", &id]);
    assert_eq!(
        coord.json(&["nodes", "list"]),
        serde_json::json!({ "nodes": [] })
    );
    let out = coord.cli(&["nodes", "delete", &id]);
    assert!(!out.status.success());
    coord.stop();
}

/// Runs `meshd coord` expecting it to fail at start; returns its stderr.
/// `uid`: run as that user, with the binary at `bin`.
fn failed_start(args: &[&str], state: &Path, uid: Option<(u32, &Path)>) -> String {
    failed_start_env(args, state, uid, &[])
}

fn failed_start_env(
    args: &[&str],
    state: &Path,
    uid: Option<(u32, &Path)>,
    env: &[(&str, &str)],
) -> String {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(uid.map_or(Path::new(MESHD), |u| u.1));
    cmd.arg("coord");
    for (flag, default) in [
        ("--listen", "127.0.0.1:0"),
        ("--admin-listen", "127.0.0.1:0"),
    ] {
        if !args.contains(&flag) {
            cmd.args([flag, default]);
        }
    }
    cmd.arg("--state")
        .arg(state)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .envs(env.iter().copied());
    if let Some((uid, _)) = uid {
        cmd.uid(uid).gid(uid);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(start.elapsed() < Duration::from_secs(20));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn an_unreachable_database_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let err = failed_start(
        &["--database", "postgres://meshd:hunter2@127.0.0.1:1/meshd"],
        &dir.path().join("state"),
        None,
    );
    assert!(
        err.contains("cannot connect to PostgreSQL at 127.0.0.1:1"),
        "{err}"
    );
    assert!(err.contains("refused"), "{err}");
    assert!(!err.contains("hunter2"), "password shown: {err}");
    assert!(!dir.path().join("state/admin.url").exists());
}

/// A PostgreSQL that wants a password: taken from the environment or a
/// password file, or from a connection string in a file, never needed on the
/// command line; a wrong one fails with the server's words. Then the server
/// goes away under a running coordinator, which says why its writes fail,
/// fails them at once, and says when the connection is back. Restarts log no
/// PostgreSQL notices at INFO.
#[test]
fn postgres_passwords_stay_off_the_command_line_and_errors_say_why() {
    use std::os::unix::fs::PermissionsExt;
    let pg = pg::TestPostgres::start_with_password("s3cret-pw");
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "host=127.0.0.1 port={} user=meshd dbname=postgres",
        pg.port()
    );
    let wrong = failed_start_env(
        &["--database", &url],
        &dir.path().join("wrong"),
        None,
        &[("PGPASSWORD", "not-it")],
    );
    assert!(
        wrong.contains("password authentication failed for user \"meshd\""),
        "{wrong}"
    );
    assert!(!wrong.contains("not-it"), "{wrong}");

    // ~/.pgpass's format, through PGPASSFILE.
    let passfile = dir.path().join("pgpass");
    std::fs::write(
        &passfile,
        format!(
            "# meshd\n127.0.0.1:{}:postgres:meshd:s3cret-pw\n",
            pg.port()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let state = dir.path().join("state");
    let env = [("PGPASSFILE", passfile.to_str().unwrap())];
    let coord = Coord::start_env(&state, &["--database", &url], &env);
    coord.ok(&["token", "create"]);
    coord.stop();

    // The whole connection string from a file; the schema exists by now,
    // which PostgreSQL mentions in a notice that is not worth an INFO line.
    let url_file = dir.path().join("database-url");
    std::fs::write(
        &url_file,
        format!(
            "postgres://meshd:s3cret-pw@127.0.0.1:{}/postgres\n",
            pg.port()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let flags = ["--database-url-file", url_file.to_str().unwrap()];
    let debug = [("RUST_LOG", "info,meshd_coord::store::pg=debug")];
    let coord = Coord::start_env(&state, &flags, &debug);
    assert_eq!(
        coord.json(&["tokens", "list"])["tokens"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let log = coord.log();
    let notices: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("already exists"))
        .collect();
    assert!(!notices.is_empty(), "{log}");
    assert!(notices.iter().all(|l| l.contains("DEBUG")), "{log}");
    assert!(!log.contains("s3cret-pw"), "{log}");

    // The database goes away: writes fail at once, saying why.
    pg.stop_server();
    let mut refused = false;
    for _ in 0..3 {
        let started = Instant::now();
        let out = coord.cli(&["token", "create"]);
        // Answered at once, not after a connection timeout.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains("503"), "{err}");
        refused |= err.contains(&format!(
            "cannot connect to PostgreSQL at 127.0.0.1:{}",
            pg.port()
        )) && err.contains("refused");
        std::thread::sleep(Duration::from_millis(600));
    }
    assert!(
        refused,
        "no write said the connection was refused:\n{}",
        coord.log()
    );
    assert!(
        coord.log().contains("lost the connection to PostgreSQL"),
        "{}",
        coord.log()
    );
    pg.start_server();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !coord.cli(&["token", "create"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "no reconnection:\n{}",
            coord.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = coord.log();
    assert!(log.contains("connection to PostgreSQL restored"), "{log}");
    assert!(!log.contains("s3cret-pw"), "{log}");
    coord.stop();
}

/// The meshd binary at a path every user may run: itself if all its parent
/// directories let others through, else a link or copy in `dir`.
fn runnable_by_others(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let open = Path::new(MESHD)
        .ancestors()
        .skip(1)
        .all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    if open {
        return PathBuf::from(MESHD);
    }
    let bin = dir.join("meshd");
    if std::fs::hard_link(MESHD, &bin).is_err() {
        std::fs::copy(MESHD, &bin).unwrap();
    }
    bin
}

#[test]
fn an_unwritable_state_dir_fails_clearly() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("locked");
    std::fs::create_dir(&parent).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o555)).unwrap();
    // Root writes anywhere: run as nobody, for whom the directory is read-only.
    let bin = runnable_by_others(dir.path());
    let uid = rustix::process::geteuid()
        .is_root()
        .then_some((65534, bin.as_path()));
    for state in [parent.clone(), parent.join("state")] {
        let err = failed_start(&[], &state, uid);
        assert!(
            err.contains(&format!("state directory {}", state.display())),
            "{err}"
        );
        assert!(err.contains("Permission denied"), "{err}");
    }
    // A file where the directory should be.
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    let err = failed_start(&[], &file, None);
    assert!(err.contains("not a directory"), "{err}");
}

#[test]
fn bad_flags_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let err = failed_start(&["--admin-listen", "0.0.0.0:0"], &state, None);
    assert!(err.contains("--admin-public"), "{err}");
    let err = failed_start(&["--listen", "0.0.0.0:0"], &state, None);
    assert!(err.contains("--advertise"), "{err}");
    let err = failed_start(&["--advertise", "no-port"], &state, None);
    assert!(err.contains("HOST:PORT"), "{err}");
    // Flags clap refuses exit with 2 and a usage message.
    for args in [
        &["coord", "--cert", "/nonexistent.pem"][..],
        &["coord", "--node-expiry", "soon"],
        &[
            "coord",
            "token",
            "create",
            "--expires",
            "0s",
            "--state",
            "/nonexistent",
        ],
        &["coord", "--listen", "nowhere"],
    ] {
        let out = Command::new(MESHD).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    let out = Command::new(MESHD)
        .args(["coord", "tokens", "list", "--state"])
        .arg(dir.path().join("never-started"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        !out.status.success() && err.contains("is `meshd coord` running"),
        "{err}"
    );
}

#[test]
fn a_second_coordinator_on_the_same_state_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let coord = Coord::start(&state, &[]);
    let url = std::fs::read_to_string(state.join("admin.url")).unwrap();
    let err = failed_start(&[], &state, None);
    assert!(err.contains("another `meshd coord` is using it"), "{err}");
    // The first one's admin URL is left alone and it still answers.
    assert_eq!(
        std::fs::read_to_string(state.join("admin.url")).unwrap(),
        url
    );
    coord.ok(&["tokens", "list"]);
    coord.stop();
}
