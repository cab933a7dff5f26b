//! Issue 25, node-wide budgets no peer can exhaust: the session size and
//! depth on every path, connections per IPv6 /64, the handshakes in
//! flight, the bytes of unfinished messages, and the warning when the
//! per-address limits only ever see a proxy.

mod common;

use common::{assert_api_error, eventually, metric, Client, Cluster, Engine, Node, RawClient};
use fred::prelude::*;
use gatecast_emitter::Emitter;
use serde_json::{json, Value};
use tokio::net::TcpStream;

/// A session of about `bytes` bytes of JSON.
fn session_of(bytes: usize) -> Value {
    json!({ "blob": "x".repeat(bytes) })
}

/// A session nested `levels` objects deep, itself included.
fn nested(levels: usize) -> Value {
    let mut value = json!(1);
    for _ in 0..levels {
        value = json!({ "k": value });
    }
    value
}

async fn session(node: &Node, id: &str) -> Value {
    node.ok("get_session", json!({"client_id": id})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_past_the_size_or_depth_are_refused_on_every_path() {
    let c = Cluster::start(Engine::Redis, &["--max-session-bytes", "4096"]).await;
    let client = Client::connect(&c.nodes[0].ws_url("")).await;
    let id = client.id.as_str();
    let (owner, api) = (&c.nodes[0], &c.nodes[2]);
    let params = |session: Value| json!({"client_id": id, "session": session});

    api.ok("set_session", params(json!({"keep": 1}))).await;
    // The API, from a node that does not hold the connection: 400.
    for method in ["set_session", "update_session"] {
        let got = api.call(method, params(session_of(5000))).await;
        assert_api_error(method, &got, 400, "session_too_large");
        let got = api.call(method, params(nested(65))).await;
        assert_api_error(method, &got, 400, "session_too_deep");
    }
    // At the limits: accepted.
    api.ok("update_session", params(nested(64))).await;
    api.ok("set_session", params(json!({"keep": 1}))).await;

    // Merges that each fit but together grow past the limit: the last is
    // refused where the connection lives, and the session stays whole.
    api.ok("update_session", params(json!({"a": "x".repeat(2000)})))
        .await;
    api.ok("update_session", params(json!({"b": "x".repeat(2000)})))
        .await;
    let _ = api
        .call("update_session", params(json!({"c": "x".repeat(2000)})))
        .await;
    // On the owner itself the caller hears it.
    let got = owner
        .call("update_session", params(json!({"d": "x".repeat(2000)})))
        .await;
    assert_api_error("local merge", &got, 400, "session_too_large");
    let kept = session(api, id).await;
    assert_eq!(kept["keep"], 1);
    assert!(kept.get("c").is_none() && kept.get("d").is_none(), "{kept}");
    assert_eq!(kept["b"].as_str().map(str::len), Some(2000));

    // A backend publishing straight to Redis: refused, counted, logged.
    let url = c.redis.as_ref().unwrap().url();
    let redis = Builder::from_config(Config::from_url(&url).unwrap())
        .build()
        .unwrap();
    redis.init().await.unwrap();
    let emitter = Emitter::new(redis, "gatecast");
    let big = session_of(5000).as_object().cloned().unwrap();
    emitter.set_session(id, big).await.unwrap();
    let deep = nested(80).as_object().cloned().unwrap();
    emitter.set_session(id, deep).await.unwrap();
    eventually("the owner counts both refusals", || async {
        let page = owner.get_text("/metrics").await;
        metric(
            &page,
            "gatecast_sessions_refused_total{reason=\"too_large\"}",
        ) >= 3.0
            && metric(
                &page,
                "gatecast_sessions_refused_total{reason=\"too_deep\"}",
            ) >= 1.0
    })
    .await;
    // Every node still reads the same session, never `{}`.
    for node in &c.nodes {
        assert_eq!(session(node, id).await, kept);
    }
}

const SECRET: &str = "budgets-test-jwt-secret";

/// An HS256 token for `sub`, valid for an hour.
fn token(sub: &str) -> String {
    common::hs256_token(SECRET, json!({"sub": sub}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_holds_a_hundred_connections_by_default_and_no_more() {
    let node = Node::start(&["--client-jwt-secret", SECRET]);
    let url = node.ws_url(&format!("?token={}", token("alice")));
    let mut tabs = Vec::new();
    for _ in 0..100 {
        tabs.push(
            Client::try_connect(&url, &[])
                .await
                .expect("a tab connects"),
        );
    }
    assert_eq!(
        Client::try_connect(&url, &[]).await.err(),
        Some(common::Refused::Status(429))
    );
    let bob = node.ws_url(&format!("?token={}", token("bob")));
    Client::try_connect(&bob, &[]).await.expect("another user");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_count_an_ipv6_client_by_its_slash_64() {
    let node = Node::start(&[
        "--trusted-proxies",
        "127.0.0.0/8",
        "--max-connections-per-ip",
        "1",
    ]);
    let url = node.ws_url("");
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    let _first = Client::try_connect(&url, &from("2001:db8:1:2::1"))
        .await
        .expect("the first of the /64");
    // Another address of the same /64 (one host can use them all).
    assert_eq!(
        Client::try_connect(&url, &from("2001:db8:1:2::99"))
            .await
            .err(),
        Some(common::Refused::Status(429))
    );
    Client::try_connect(&url, &from("2001:db8:1:3::1"))
        .await
        .expect("another /64");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_past_the_node_cap_are_refused_and_upgraded_ones_do_not_count() {
    let node = Node::start(&["--max-handshakes", "4"]);
    // Upgraded connections give their place back.
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(Client::connect(&node.ws_url("")).await);
    }
    // Four sockets that never send their request hold every place.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(node.public).await.unwrap());
    }
    eventually("a fifth handshake is refused with 503", || async {
        matches!(
            RawClient::connect(node.public, "/ws", &[]).await,
            Err((503, _))
        )
    })
    .await;
    // The connections already open are not affected.
    let client = &mut clients[0];
    client.send_text(r#"{"type":"ping"}"#).await;
    client.expect_text(r#"{"type":"pong"}"#).await;
    drop(idle);
    eventually("places free up once the idle sockets go", || async {
        RawClient::connect(node.public, "/ws", &[]).await.is_ok()
    })
    .await;
    let page = node.get_text("/metrics").await;
    assert!(
        metric(
            &page,
            "gatecast_connections_refused_total{reason=\"handshakes_full\"}"
        ) >= 1.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_partial_budget_the_oldest_unfinished_message_is_closed() {
    let node = Node::start(&["--max-partial-bytes", "100000"]);
    let chunk = vec![b'x'; 40_000];
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = RawClient::connect(node.public, "/ws", &[]).await.unwrap();
        let welcome = client.read_frame().await.unwrap();
        assert_eq!(welcome.opcode, 1);
        clients.push(client);
    }
    // Two unfinished messages fit (80,000 bytes)...
    clients[0].send_frame(false, 1, &chunk).await;
    clients[1].send_frame(false, 1, &chunk).await;
    eventually("both are buffered", || async {
        let page = node.get_text("/metrics").await;
        metric(&page, "gatecast_partial_bytes") >= 80_000.0
    })
    .await;
    // ...a third does not: the oldest goes, with 1013. The first two may
    // have begun in the same millisecond, so either is "the oldest"; the
    // newest must never be the one closed.
    clients[2].send_frame(false, 1, &chunk).await;
    let (first, second) = clients.split_at_mut(1);
    let (closed, evicted) = tokio::select! {
        frame = first[0].read_frame() => (frame.unwrap(), 0),
        frame = second[0].read_frame() => (frame.unwrap(), 1),
    };
    assert_eq!(closed.close_code(), Some(1013), "{closed:?}");
    clients.remove(evicted);
    // The others finish their messages and are served.
    for client in &mut clients {
        client.send_frame(true, 0, b"end").await;
        client.send_frame(true, 1, br#"{"type":"ping"}"#).await;
        let pong = client.read_frame().await.unwrap();
        assert_eq!(pong.payload, br#"{"type":"pong"}"#);
    }
    let page = node.get_text("/metrics").await;
    assert_eq!(
        metric(&page, "gatecast_partial_closed_total"),
        1.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_private_peers_and_no_trusted_proxy_is_flagged() {
    let open = Node::start(&[]);
    let trusted = Node::start(&["--trusted-proxies", "10.0.0.0/8"]);
    for node in [&open, &trusted] {
        let _client = Client::connect(&node.ws_url("")).await;
    }
    let page = open.get_text("/metrics").await;
    assert_eq!(metric(&page, "gatecast_untrusted_private_peers"), 1.0);
    let page = trusted.get_text("/metrics").await;
    assert_eq!(metric(&page, "gatecast_untrusted_private_peers"), 0.0);
}
