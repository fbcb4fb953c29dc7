#![allow(clippy::unwrap_used)]
//! The admin API's meaning without HTTP: routes and bodies
//! (`parse_request`), and operations on a coordinator over a memory store
//! with a fake clock (`execute`).

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::{Method, StatusCode};
use meshd_coord::admin::{
    execute, parse_request, CreateToken, CreatedToken, Expires, NodeList, NodeView, Request,
    TokenContext, TokenList, TokenView,
};
use meshd_coord::*;
use meshd_proto::token::JoinToken;
use meshd_proto::NodeId;
use rand::rngs::StdRng;
use rand::SeedableRng;
use x25519_dalek::StaticSecret;

fn err(method: Method, path: &str, body: &str) -> (StatusCode, &'static str) {
    let e = parse_request(&method, path, body.as_bytes()).unwrap_err();
    assert!(!e.message.is_empty());
    (e.status, e.code)
}

#[test]
fn routes_and_bodies() {
    let ok = |m: Method, p: &str, b: &str| parse_request(&m, p, b.as_bytes()).unwrap();
    assert_eq!(
        ok(Method::POST, "/v1/tokens", ""),
        Request::CreateToken(CreateToken::default())
    );
    assert_eq!(
        ok(
            Method::POST,
            "/v1/tokens",
            r#"{"reusable": true, "ephemeral": true, "expires": "1h 30m", "tags": ["tag:a"], "slice": "blue"}"#
        ),
        Request::CreateToken(CreateToken {
            reusable: true,
            ephemeral: true,
            expires: Some(Expires(Duration::from_secs(5400))),
            tags: vec!["tag:a".into()],
            slice: Some("blue".into()),
        })
    );
    assert_eq!(
        ok(Method::POST, "/v1/tokens", r#"{"expires": 86400}"#),
        Request::CreateToken(CreateToken {
            expires: Some(Expires(Duration::from_secs(86400))),
            ..CreateToken::default()
        })
    );
    assert_eq!(
        ok(Method::GET, "/v1/tokens", "ignored"),
        Request::ListTokens
    );
    assert_eq!(
        ok(Method::DELETE, "/v1/tokens/00ff", ""),
        Request::RevokeToken("00ff".into())
    );
    assert_eq!(ok(Method::GET, "/v1/nodes", ""), Request::ListNodes);
    assert_eq!(
        ok(Method::PATCH, "/v1/nodes/42", r#"{"name": "db"}"#),
        Request::RenameNode(NodeId(42), "db".into())
    );
    assert_eq!(
        ok(Method::POST, "/v1/nodes/42/expire", ""),
        Request::ExpireNode(NodeId(42))
    );
    assert_eq!(
        ok(Method::DELETE, "/v1/nodes/42", ""),
        Request::DeleteNode(NodeId(42))
    );

    let bad = (StatusCode::BAD_REQUEST, "bad_request");
    let missing = (StatusCode::NOT_FOUND, "not_found");
    let method = (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    for (m, p, b, want) in [
        (Method::POST, "/v1/tokens", "{", bad),
        (Method::POST, "/v1/tokens", "null", bad),
        (Method::POST, "/v1/tokens", r#"{"expires": -5}"#, bad),
        (
            Method::POST,
            "/v1/tokens",
            r#"{"expires": "tomorrow"}"#,
            bad,
        ),
        (Method::POST, "/v1/tokens", r#"{"tags": "tag:a"}"#, bad),
        (Method::POST, "/v1/tokens", r#"{"secret": "x"}"#, bad),
        (Method::PATCH, "/v1/nodes/42", "", bad),
        (Method::PATCH, "/v1/nodes/42", r#"{"name": 7}"#, bad),
        (Method::PATCH, "/v1/nodes/-1", r#"{"name": "a"}"#, bad),
        (Method::DELETE, "/v1/nodes/18446744073709551616", "", bad),
        (Method::GET, "/", "", missing),
        (Method::GET, "/v1/tokens/", "", missing),
        (Method::GET, "/v1/nodes/42/expire/now", "", missing),
        (Method::GET, "/v1//nodes", "", missing),
        (Method::PUT, "/v1/tokens", "", method),
        (Method::GET, "/v1/tokens/00ff", "", method),
        (Method::POST, "/v1/nodes", "", method),
        (Method::GET, "/v1/nodes/42", "", method),
        (Method::GET, "/v1/nodes/42/expire", "", method),
    ] {
        assert_eq!(err(m.clone(), p, b), want, "{m} {p} {b}");
    }
    let e = parse_request(&Method::PUT, "/v1/nodes/1", b"").unwrap_err();
    assert_eq!(e.allow, Some("PATCH, DELETE"));
}

const T0: u64 = 1_800_000_000;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(T0 + secs)
}

struct Setup {
    coord: Coordinator,
    store: Arc<Mutex<MemStore>>,
    ctx: TokenContext,
}

fn setup() -> Setup {
    let mut mem = MemStore::default();
    for i in [1, 2] {
        let mut n = support::node(i);
        n.expires_at = None;
        mem.nodes.insert(n.id, n);
    }
    let store = Arc::new(Mutex::new(mem));
    let coord = Coordinator::new(
        Config::default(),
        StaticSecret::from([9; 32]),
        Box::new(store.clone()),
        Box::new(StdRng::seed_from_u64(1)),
        at(0),
    )
    .unwrap();
    let ctx = TokenContext {
        cert_pin: [7; 32],
        addresses: vec!["coord.example:443".into()],
    };
    Setup { coord, store, ctx }
}

impl Setup {
    fn run(
        &mut self,
        req: Request,
        secs: u64,
    ) -> Result<(StatusCode, String), (StatusCode, &'static str)> {
        execute(req, &mut self.coord, at(secs), &self.ctx)
            .map(|r| (r.status, r.body.unwrap_or_default()))
            .map_err(|e| (e.status, e.code))
    }

    fn tokens(&mut self, secs: u64) -> Vec<TokenView> {
        let (_, body) = self.run(Request::ListTokens, secs).unwrap();
        serde_json::from_str::<TokenList>(&body).unwrap().tokens
    }

    fn nodes(&mut self) -> Vec<NodeView> {
        let (_, body) = self.run(Request::ListNodes, 0).unwrap();
        serde_json::from_str::<NodeList>(&body).unwrap().nodes
    }
}

#[test]
fn tokens_carry_pin_and_addresses_and_age_through_their_states() {
    let mut s = setup();
    let req = CreateToken {
        expires: Some(Expires(Duration::from_secs(60))),
        tags: vec!["tag:edge".into()],
        ..CreateToken::default()
    };
    let (status, body) = s.run(Request::CreateToken(req), 0).unwrap();
    assert_eq!(status, StatusCode::CREATED);
    let created: CreatedToken = serde_json::from_str(&body).unwrap();
    let token = JoinToken::parse(&created.token).unwrap();
    assert_eq!(token.cert_pin, [7; 32]);
    assert_eq!(token.addresses, ["coord.example:443"]);
    assert_eq!(created.info.created_at, "2027-01-15T08:00:00Z");
    assert_eq!(
        created.info.expires_at.as_deref(),
        Some("2027-01-15T08:01:00Z")
    );
    // Only the hash is kept: the listing and the store never hold the text.
    let stored = format!("{:?}", s.store.lock().unwrap().tokens);
    assert!(!stored.contains(&created.token[7..30]));
    let listed = s.tokens(59);
    assert_eq!(
        listed,
        [TokenView {
            state: "valid".into(),
            ..created.info.clone()
        }]
    );
    assert_eq!(s.tokens(60)[0].state, "expired");
    s.run(Request::RevokeToken(created.info.id.clone()), 61)
        .unwrap();
    assert_eq!(s.tokens(61)[0].state, "revoked");

    let zero = CreateToken {
        expires: Some(Expires(Duration::ZERO)),
        ..CreateToken::default()
    };
    assert_eq!(
        s.run(Request::CreateToken(zero), 0).unwrap_err(),
        (StatusCode::BAD_REQUEST, "bad_request")
    );
    let many = CreateToken {
        tags: (0..33).map(|i| format!("tag:t{i}")).collect(),
        ..CreateToken::default()
    };
    assert_eq!(
        s.run(Request::CreateToken(many), 0).unwrap_err(),
        (StatusCode::BAD_REQUEST, "too_many_tags")
    );
    let slice = CreateToken {
        slice: Some("Blue Team".into()),
        ..CreateToken::default()
    };
    assert_eq!(
        s.run(Request::CreateToken(slice), 0).unwrap_err(),
        (StatusCode::BAD_REQUEST, "invalid_name")
    );
    assert_eq!(
        s.run(Request::RevokeToken("nope".into()), 0).unwrap_err(),
        (StatusCode::NOT_FOUND, "no_such_token")
    );
    assert_eq!(s.tokens(0).len(), 1);
}

#[test]
fn nodes_are_renamed_expired_and_deleted() {
    let mut s = setup();
    let nodes = s.nodes();
    assert_eq!(
        nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["n1", "n2"]
    );
    let n1 = support::node(1);
    assert_eq!(nodes[0].id, n1.id.to_string());
    assert_eq!(nodes[0].key, n1.key.to_string());
    assert_eq!(nodes[0].endpoints, ["192.0.2.1:51820", "[2001:db8::1]:7"]);
    assert!(!nodes[0].connected && !nodes[0].expired);

    let (status, body) = s.run(Request::RenameNode(n1.id, "web".into()), 0).unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_str::<NodeView>(&body).unwrap().name, "web");
    assert_eq!(
        s.run(Request::RenameNode(n1.id, "n2".into()), 0)
            .unwrap_err(),
        (StatusCode::CONFLICT, "name_taken")
    );
    assert_eq!(
        s.run(Request::RenameNode(n1.id, "-x".into()), 0)
            .unwrap_err(),
        (StatusCode::BAD_REQUEST, "invalid_name")
    );
    let (_, body) = s.run(Request::ExpireNode(n1.id), 5).unwrap();
    let expired: NodeView = serde_json::from_str(&body).unwrap();
    assert!(expired.expired);
    assert_eq!(expired.expires_at.as_deref(), Some("2027-01-15T08:00:05Z"));

    // A store that cannot write refuses with 503 and changes nothing.
    s.store.lock().unwrap().fail_commits = true;
    assert_eq!(
        s.run(Request::DeleteNode(n1.id), 6).unwrap_err(),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    );
    assert_eq!(s.nodes().len(), 2);
    s.store.lock().unwrap().fail_commits = false;
    let (status, body) = s.run(Request::DeleteNode(n1.id), 6).unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::NO_CONTENT, ""));
    assert_eq!(s.nodes().len(), 1);
    assert!(!s.store.lock().unwrap().nodes.contains_key(&n1.id));
    for req in [
        Request::DeleteNode(n1.id),
        Request::ExpireNode(n1.id),
        Request::RenameNode(n1.id, "x".into()),
    ] {
        assert_eq!(
            s.run(req, 7).unwrap_err(),
            (StatusCode::NOT_FOUND, "no_such_node")
        );
    }
}
