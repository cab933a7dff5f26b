//! `--events`: connect, message and close events reach backends, through a
//! Redis stream (Redis engine) or a webhook (in-process engine).

mod common;

use axum::routing::post;
use axum::Router;
use common::events::{field, redis_client_url, Entry};
use common::{eventually, webhook, Client, Cluster, Engine, Node, OutputWithin};
use fred::prelude::*;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

async fn connect_with_headers(url: &str) -> Client {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", "https://app.example".parse().unwrap());
    request
        .headers_mut()
        .insert("user-agent", "events-test/1".parse().unwrap());
    Client::connect_request(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_appended_to_the_redis_stream_in_order() {
    let c = Cluster::start(Engine::Redis, &["--events"]).await;
    let redis = redis_client_url(&c.redis.as_ref().unwrap().url()).await;

    let mut a = connect_with_headers(&c.nodes[0].ws_url("?room=7&lang=en")).await;
    c.nodes[2]
        .ok("bind_uid", json!({"client_id": a.id, "uid": "alice"}))
        .await;
    c.nodes[2]
        .ok(
            "set_session",
            json!({"client_id": a.id, "session": {"role": "admin"}}),
        )
        .await;
    a.send_text("hello backend").await;
    a.send(Message::binary(vec![0u8, 255])).await;
    a.send_text(r#"{"type":"ping"}"#).await; // answered by the gateway, not an event
    a.expect_text(r#"{"type":"pong"}"#).await;
    let id = a.id.clone();
    a.close().await;

    let read = || async {
        let entries: Vec<Entry> = redis
            .xrange("gatecast:events", "-", "+", None)
            .await
            .unwrap();
        entries
    };
    eventually("four events in the stream", || async {
        read().await.len() >= 4
    })
    .await;
    let entries = read().await;
    assert_eq!(entries.len(), 4, "{entries:?}");
    let kinds: Vec<String> = entries.iter().map(|e| field(e, "type")).collect();
    assert_eq!(kinds, ["connect", "message", "message", "close"]);
    for e in &entries {
        assert_eq!(field(e, "client_id"), id);
        assert_eq!(field(e, "node"), &id[..12]);
    }
    let connect = &entries[0];
    assert_eq!(field(connect, "query"), "room=7&lang=en");
    assert!(field(connect, "remote_addr").starts_with("127.0.0.1:"));
    let headers: Value = serde_json::from_str(&field(connect, "headers")).unwrap();
    assert_eq!(headers["origin"], "https://app.example");
    assert_eq!(headers["user-agent"], "events-test/1");

    let text = &entries[1];
    assert_eq!(text.1["data"].as_bytes(), Some(&b"hello backend"[..]));
    assert_eq!(field(text, "binary"), "0");
    assert_eq!(field(text, "uid"), "alice");
    assert_eq!(
        serde_json::from_str::<Value>(&field(text, "session")).unwrap(),
        json!({"role": "admin"})
    );
    let binary = &entries[2];
    assert_eq!(binary.1["data"].as_bytes(), Some(&[0u8, 255][..]));
    assert_eq!(field(binary, "binary"), "1");
    // The close event still knows who it was.
    assert_eq!(field(&entries[3], "uid"), "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_events_are_posted_to_the_webhook() {
    let (hook, mut rx) = webhook().await;

    let node = Node::start(&["--events", "--events-webhook", &hook]);
    let mut a = connect_with_headers(&node.ws_url("?x=1")).await;
    node.ok("bind_uid", json!({"client_id": a.id, "uid": 42}))
        .await;
    a.send_text("hi").await;
    a.send(Message::binary(vec![1u8, 2, 3])).await;
    let id = a.id.clone();
    a.close().await;

    let mut events = Vec::new();
    while events.len() < 4 {
        let event = tokio::time::timeout(common::WAIT, rx.recv())
            .await
            .expect("webhook called in time")
            .unwrap();
        events.push(event);
    }
    assert_eq!(events[0]["type"], "connect");
    assert_eq!(events[0]["query"], "x=1");
    assert_eq!(events[0]["headers"]["origin"], "https://app.example");
    assert_eq!(events[1]["type"], "message");
    assert_eq!(events[1]["data"], "hi");
    assert_eq!(events[1]["uid"], "42");
    assert_eq!(events[2]["data_base64"], "AQID");
    assert_eq!(events[3]["type"], "close");
    for e in &events {
        assert_eq!(e["client_id"], id.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_without_a_sink_are_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatecast"))
        .args([
            "--events",
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .args(["--inner-listen", "127.0.0.1:0"])
        .output_within(common::WAIT);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--events needs"));
}

/// The next connect event the webhook got (bounded wait).
async fn next_connect(rx: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    loop {
        let event = tokio::time::timeout(common::WAIT, rx.recv())
            .await
            .expect("webhook called in time")
            .unwrap();
        if event["type"] == "connect" {
            return event;
        }
    }
}

/// Connects to `url` with a cookie and an origin; returns the client.
async fn connect_with_cookie(url: &str) -> Client {
    let mut request = url.into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert("cookie", "session=s3cret".parse().unwrap());
    headers.insert("origin", "https://app.example".parse().unwrap());
    headers.insert("x-tenant", "t1".parse().unwrap());
    Client::connect_request(request).await
}

/// Connect events leave out `Cookie` unless `--events-headers` asks for
/// it, and carry exactly the headers it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_events_forward_cookies_only_when_asked() {
    let (hook, mut rx) = webhook().await;
    let node = Node::start(&["--events", "--events-webhook", &hook]);
    let _a = connect_with_cookie(&node.ws_url("")).await;
    let event = next_connect(&mut rx).await;
    assert_eq!(event["headers"]["origin"], "https://app.example");
    assert!(event["headers"].get("cookie").is_none(), "{event}");
    drop(node);

    let node = Node::start(&[
        "--events",
        "--events-webhook",
        &hook,
        "--events-headers",
        "Cookie,x-tenant",
    ]);
    let _a = connect_with_cookie(&node.ws_url("")).await;
    let event = next_connect(&mut rx).await;
    assert_eq!(
        event["headers"],
        json!({"cookie": "session=s3cret", "x-tenant": "t1"})
    );
}

/// Behind a trusted proxy, a connect event's `remote_addr` is the client
/// the proxy forwarded, as the connection limits see it; from anyone else,
/// `X-Forwarded-For` is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_events_name_the_client_behind_a_trusted_proxy() {
    let (hook, mut rx) = webhook().await;
    let connect = |node: &Node| {
        let mut request = node.ws_url("").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
        Client::connect_request(request)
    };
    let trusting = [
        "--events",
        "--events-webhook",
        &hook,
        "--trusted-proxies",
        "127.0.0.1/32",
    ];
    let node = Node::start(&trusting);
    let _a = connect(&node).await;
    let event = next_connect(&mut rx).await;
    let addr = event["remote_addr"].as_str().unwrap();
    assert!(addr.starts_with("203.0.113.7:"), "{event}");
    drop(node);

    let node = Node::start(&["--events", "--events-webhook", &hook]);
    let _a = connect(&node).await;
    let event = next_connect(&mut rx).await;
    let addr = event["remote_addr"].as_str().unwrap();
    assert!(addr.starts_with("127.0.0.1:"), "{event}");
}

/// A token is kept out of connect events however its key is spelled: the
/// gateway decodes `%74oken` as `token` to authenticate, so the filter
/// must decode it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_events_never_carry_the_token_even_percent_encoded() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let (hook, mut rx) = webhook().await;
    let node = Node::start(&[
        "--events",
        "--events-webhook",
        &hook,
        "--client-jwt-secret",
        "events-test-jwt-secret",
    ]);
    let token = encode(
        &Header::default(),
        &json!({"sub": "alice", "exp": 4_000_000_000u64}),
        &EncodingKey::from_secret(b"events-test-jwt-secret"),
    )
    .unwrap();
    for key in ["token", "%74oken", "to%6B%65n"] {
        let _a = Client::connect(&node.ws_url(&format!("?room=7&{key}={token}&lang=en"))).await;
        let event = next_connect(&mut rx).await;
        assert_eq!(event["uid"], "alice", "{key}: authenticated");
        assert_eq!(event["query"], "room=7&lang=en", "{key}");
        assert!(!event.to_string().contains(&token), "{key}: {event}");
    }
}

/// A node started from [`common::gatecast_command`] with `args`, whose log
/// lines (JSON) all come through the returned channel; and its public
/// address.
fn start_logged(
    args: &[&str],
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<String>,
    String,
) {
    use std::io::{BufRead, BufReader};
    let mut child = common::gatecast_command()
        .args(["--log-level", "info,gatecast=debug"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gatecast starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            eprintln!("[node] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let public = loop {
        let line = rx.recv_timeout(common::WAIT).expect("node logs");
        let v: Value = serde_json::from_str(&line).unwrap_or_default();
        if v["fields"]["message"] == "listening" {
            assert!(!line.contains("hunter2"), "{line}");
            break v["fields"]["public"].as_str().unwrap().to_owned();
        }
    };
    (child, rx, public)
}

/// The first log line with `message` (bounded wait); every line read on
/// the way must not hold `secret`.
fn log_line(rx: &std::sync::mpsc::Receiver<String>, message: &str, secret: &str) -> String {
    loop {
        let line = rx
            .recv_timeout(common::WAIT)
            .unwrap_or_else(|_| panic!("no {message:?} logged"));
        assert!(!line.contains(secret), "{line}");
        if line.contains(message) {
            return line;
        }
    }
}

/// The webhook's redirects are not followed (the events would go, sessions
/// included, wherever the redirect points), and neither a refusal nor an
/// unreachable webhook logs the URL's query, where keys hide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_follows_no_redirect_and_logs_no_query() {
    use axum::http::{header, StatusCode};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let (elsewhere, mut leaked) = webhook().await;
    let redirects = Arc::new(AtomicUsize::new(0));
    let counter = redirects.clone();
    let app = Router::new().route(
        "/hook",
        post(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let to = elsewhere.clone();
            async move { (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)]) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!(
        "http://user:hunter2@{}/hook?key=hunter2",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (mut child, log, public) = start_logged(&["--events", "--events-webhook", &hook]);
    let _a = Client::connect(&format!("ws://{public}/ws")).await;
    let refused = log_line(&log, "event webhook refused an event", "hunter2");
    assert!(refused.contains("307"), "{refused}");
    // Every try of the connect event was redirected, none followed.
    for _ in 0..2 {
        log_line(&log, "event webhook refused an event", "hunter2");
    }
    assert_eq!(redirects.load(Ordering::SeqCst), 3);
    assert!(leaked.try_recv().is_err(), "the redirect was followed");
    let _ = child.kill();
    let _ = child.wait();

    // Unreachable: reqwest's error names the URL; the log must not.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = format!("http://{}/hook?key=hunter2", closed.local_addr().unwrap());
    drop(closed);
    let (mut child, log, public) = start_logged(&["--events", "--events-webhook", &hook]);
    let _a = Client::connect(&format!("ws://{public}/ws")).await;
    log_line(&log, "event webhook unreachable", "hunter2");
    let _ = child.kill();
    let _ = child.wait();
}

/// A node is ready before its events connection is up (here a Redis of
/// their own, `--events-redis-url`, that starts after the node): the
/// events of that moment wait for the connection (a bounded 2 s) instead
/// of being dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_a_node_ready_before_its_events_redis_wait_for_it() {
    use common::redis::{free_port, RedisServer};
    let main = RedisServer::start();
    let port = free_port();
    let events_url = format!("redis://127.0.0.1:{port}");
    let node = Node::start(&[
        "--redis-url",
        &main.url(),
        "--events",
        "--events-redis-url",
        &events_url,
    ]);
    node.wait_ready().await;
    // The events Redis is not there yet: the connect event is queued, and
    // the Redis comes up within the wait.
    let client = Client::connect(&node.ws_url("")).await;
    let events = RedisServer::start_on(port);
    let redis = redis_client_url(&events.url()).await;
    let id = client.id.clone();
    eventually("the first connect event", || async {
        let entries: Vec<Entry> = redis
            .xrange("gatecast:events", "-", "+", None)
            .await
            .unwrap();
        entries
            .iter()
            .any(|e| field(e, "type") == "connect" && field(e, "client_id") == id)
    })
    .await;
    let page = node.get_text("/metrics").await;
    assert_eq!(common::metric(&page, "gatecast_events_dropped_total"), 0.0);
}
