#![allow(clippy::unwrap_used)]
//! The coordinator service in-process: an operator's certificate instead of
//! the self-signed one, a public admin listener, and the admin API driven
//! through its client (what `meshd coord token|nodes …` use).

use std::path::Path;
use std::time::Duration;

use meshd_coord::admin::client::{AdminClient, ClientError};
use meshd_coord::admin::{CreateToken, Expires};
use meshd_coord::net::{ClientConn, Transport};
use meshd_coord::service::{Service, ServiceConfig, ServiceError};
use meshd_proto::token::{cert_pin, JoinToken};

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
