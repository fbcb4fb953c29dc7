#![allow(clippy::unwrap_used)]
//! The coordinator service in-process: an operator's certificate instead of
//! the self-signed one, a public admin listener, and the admin API driven
//! through its client (what `meshd coord token|nodes …` use).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use meshd_coord::admin::client::{AdminClient, ClientError};
use meshd_coord::admin::{CreateToken, Expires};
use meshd_coord::net::{ClientConn, Transport};
use meshd_coord::service::{Service, ServiceConfig, ServiceError};
use meshd_proto::token::{cert_pin, JoinToken};
use support::pg::TestPostgres;

fn config(dir: &Path) -> ServiceConfig {
    ServiceConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: dir.join("state"),
        database: None,
        advertise: Vec::new(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        admin_public: false,
        node_expiry: None,
        ephemeral_timeout: Duration::from_secs(300),
        certificate: None,
    }
}

fn admin(service: &Service, dir: &Path) -> AdminClient {
    let url = std::fs::read_to_string(dir.join("state/admin.url")).unwrap();
    assert_eq!(
        url.trim(),
        format!("http://127.0.0.1:{}", service.admin_addr.port())
    );
    AdminClient::with_key_file(&url, &dir.join("state/admin.key")).unwrap()
}

/// A PEM certificate and key for `name`, written into `dir`.
fn operator_cert(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key, ck.cert.der().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_certificate_is_served_and_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = operator_cert(dir.path(), "coord.example");
    let mut cfg = config(dir.path());
    cfg.certificate = Some((cert, key));
    let service = Service::start(cfg).await.unwrap();
    assert_eq!(service.cert_pin, cert_pin(&der));
    // No self-signed identity was made beside it.
    assert!(!dir.path().join("state/coord-cert.der").exists());

    let client = admin(&service, dir.path());
    let req = CreateToken {
        reusable: true,
        expires: Some(Expires(Duration::from_secs(3600))),
        ..CreateToken::default()
    };
    let created = client.create_token(&req).await.unwrap();
    assert_eq!(created.info.state, "valid");
    let token = JoinToken::parse(&created.token).unwrap();
    assert_eq!(token.cert_pin, cert_pin(&der));
    assert_eq!(token.addresses, [service.control_addr.to_string()]);
    for transport in [Transport::Quic, Transport::Tcp] {
        ClientConn::connect(&token, transport).await.unwrap();
    }
    service.shutdown().await;
    assert!(!dir.path().join("state/admin.url").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_with_the_wrong_key_or_no_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _, _) = operator_cert(dir.path(), "a.example");
    let (_, other_key, _) = operator_cert(dir.path(), "b.example");
    let mut cfg = config(dir.path());
    cfg.certificate = Some((cert.clone(), other_key));
    let err = Service::start(cfg).await.unwrap_err();
    assert!(matches!(err, ServiceError::Identity(_)), "{err}");
    assert!(err.to_string().contains("key"), "{err}");

    let mut cfg = config(dir.path());
    cfg.certificate = Some((cert.clone(), cert.clone()));
    let err = Service::start(cfg).await.unwrap_err().to_string();
    assert!(
        err.contains("a.example.crt") && err.contains("no PRIVATE KEY"),
        "{err}"
    );

    let mut cfg = config(dir.path());
    cfg.certificate = Some((dir.path().join("missing.crt"), cert));
    let err = Service::start(cfg).await.unwrap_err().to_string();
    assert!(err.contains("missing.crt"), "{err}");
    assert!(!dir.path().join("state/admin.url").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_admin_listener_needs_the_flag_and_writes_a_loopback_url() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.admin_listen = "0.0.0.0:0".parse().unwrap();
    let err = Service::start(cfg.clone()).await.unwrap_err();
    assert!(matches!(err, ServiceError::AdminNotLoopback(_)), "{err}");
    cfg.admin_public = true;
    let service = Service::start(cfg).await.unwrap();
    assert!(service.admin_addr.ip().is_unspecified());
    let client = admin(&service, dir.path());
    assert!(client.list_nodes().await.unwrap().is_empty());
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_fail_cleanly_once_the_coordinator_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.advertise = vec!["coord.example:443".into(), "[2001:db8::1]:443".into()];
    let service = Service::start(cfg).await.unwrap();
    let client = admin(&service, dir.path());
    let created = client.create_token(&CreateToken::default()).await.unwrap();
    let token = JoinToken::parse(&created.token).unwrap();
    assert_eq!(token.addresses, ["coord.example:443", "[2001:db8::1]:443"]);
    let err = client.revoke_token("../nodes").await.unwrap_err();
    assert!(matches!(err, ClientError::Invalid(_)), "{err}");
    let err = client
        .rename_node(meshd_proto::NodeId(1), "x")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { code, .. } if code == "no_such_node"),
        "{err}"
    );
    service.shutdown().await;
    let err = client.list_tokens().await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_postgres_share_what_each_admin_api_changes() {
    let pg = tokio::task::spawn_blocking(TestPostgres::start)
        .await
        .unwrap();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut ca = config(da.path());
    ca.database = Some(pg.url());
    let a = Service::start(ca).await.unwrap();
    // A replica serves the same identity: its files copied from the first.
    std::fs::create_dir(db.path().join("state")).unwrap();
    for f in ["coord-cert.der", "coord-key.der", "coord-x25519.key"] {
        std::fs::copy(
            da.path().join("state").join(f),
            db.path().join("state").join(f),
        )
        .unwrap();
    }
    let mut cb = config(db.path());
    cb.database = Some(pg.url());
    let b = Service::start(cb).await.unwrap();
    assert_eq!(a.cert_pin, b.cert_pin);
    let (admin_a, admin_b) = (admin(&a, da.path()), admin(&b, db.path()));

    let created = admin_a.create_token(&CreateToken::default()).await.unwrap();
    let id = created.info.id.clone();
    seen_by(&admin_b, &id, "valid").await;
    admin_b.revoke_token(&id).await.unwrap();
    seen_by(&admin_a, &id, "revoked").await;
    a.shutdown().await;
    b.shutdown().await;
    drop(pg);
}

/// Waits until `client` lists token `id` in `state`.
async fn seen_by(client: &AdminClient, id: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tokens = client.list_tokens().await.unwrap();
        if tokens.iter().any(|t| t.id == id && t.state == state) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{state} token {id} not seen: {tokens:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
