//! Issue 16, the limits no client can push past: connections per JWT `sub`,
//! the connect rate per address, slow or oversized handshakes, client
//! messages while events are on, and the caps on what a token may carry.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{
    assert_api_error, eventually, metric, webhook, Client, Node, RawClient, Refused, Seen,
};
use futures_util::SinkExt;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "security-test-jwt-secret";

/// An HS256 token for `claims`, valid for an hour unless they say.
fn token(mut claims: Value) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    if claims.get("exp").is_none() {
        claims["exp"] = json!(exp);
    }
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_sub_limit_are_refused_with_429() {
    let node = Node::start(&[
        "--client-jwt-secret",
        SECRET,
        "--max-connections-per-sub",
        "2",
    ]);
    let alice = node.ws_url(&format!("?token={}", token(json!({"sub": "alice"}))));
    let bob = node.ws_url(&format!("?token={}", token(json!({"sub": "bob"}))));
    let first = Client::connect(&alice).await;
    let _second = Client::connect(&alice).await;
    match Client::try_connect(&alice, &[]).await {
        Err(Refused::Status(429)) => {}
        other => panic!("expected 429, got {:?}", other.map(|c| c.id)),
    }
    // Another user is not affected.
    let _bob = Client::connect(&bob).await;
    // A closed connection gives its place back.
    first.close().await;
    eventually("alice's place frees up", || async {
        Client::try_connect(&alice, &[]).await.is_ok()
    })
    .await;
    let page = node.get_text("/metrics").await;
    assert!(
        metric(
            &page,
            "gatecast_connections_refused_total{reason=\"sub_full\"}"
        ) >= 1.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_faster_than_the_rate_of_an_address_are_refused_with_429() {
    let node = Node::start(&[
        "--trusted-proxies",
        "127.0.0.0/8",
        "--connect-rate-per-ip",
        "1",
        "--connect-burst-per-ip",
        "3",
    ]);
    let url = node.ws_url("");
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    // The burst goes through; ten attempts in much less than seven
    // seconds cannot all be refilled at one a second.
    let mut refused = 0;
    let mut clients = Vec::new();
    for _ in 0..10 {
        match Client::try_connect(&url, &from("192.0.2.7")).await {
            Ok(client) => clients.push(client),
            Err(Refused::Status(429)) => refused += 1,
            Err(other) => panic!("expected 101 or 429, got {other:?}"),
        }
    }
    assert!(clients.len() >= 3, "the burst is admitted");
    assert!(refused >= 1, "past the burst, refused");
    // Another address has a budget of its own.
    Client::try_connect(&url, &from("192.0.2.8"))
        .await
        .expect("another address connects");
    // The proxy's own (loopback) address is not limited by default.
    for _ in 0..10 {
        Client::connect(&url).await;
    }
    let page = node.get_text("/metrics").await;
    assert_eq!(
        metric(
            &page,
            "gatecast_connections_refused_total{reason=\"connect_rate\"}"
        ),
        f64::from(refused),
        "{page}"
    );
}

/// Whether the server ended the connection within `limit` (EOF or reset),
/// reading and discarding whatever it sends.
async fn ended_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_or_trickling_handshake_is_dropped_and_others_are_served() {
    let node = Node::start(&["--handshake-timeout", "1s"]);
    // Half a request line, then nothing.
    let mut stalled = TcpStream::connect(node.public).await.unwrap();
    stalled.write_all(b"GET /ws?tok").await.unwrap();
    // A request head trickled a byte every 100ms: each byte is progress,
    // but the head as a whole is late.
    let mut trickling = TcpStream::connect(node.public).await.unwrap();
    let addr = node.public;
    let trickle = tokio::spawn(async move {
        let head = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nX-Slow: {}\r\n",
            "a".repeat(200)
        );
        for byte in head.as_bytes() {
            if trickling.write_all(&[*byte]).await.is_err() {
                return (trickling, true);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (trickling, false)
    });
    // Meanwhile another client connects and is served.
    let mut other = Client::connect(&node.ws_url("")).await;
    other.send_text(r#"{"type":"ping"}"#).await;
    other.expect_text(r#"{"type":"pong"}"#).await;
    // Well within the 10s default: these fail if the option is ignored.
    assert!(
        ended_within(&mut stalled, Duration::from_secs(5)).await,
        "the stalled handshake is dropped"
    );
    let (mut trickling, write_failed) = tokio::time::timeout(common::WAIT, trickle)
        .await
        .expect("the trickle ends")
        .unwrap();
    assert!(
        write_failed || ended_within(&mut trickling, Duration::from_secs(1)).await,
        "the trickling handshake is dropped before its head is whole"
    );
    // The served client is still there.
    other.send_text(r#"{"type":"ping"}"#).await;
    other.expect_text(r#"{"type":"pong"}"#).await;
    let page = node.get_text("/metrics").await;
    assert!(
        metric(
            &page,
            "gatecast_handshakes_failed_total{reason=\"header_timeout\"}"
        ) >= 2.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_upgrades_is_closed_after_the_handshake_timeout() {
    let node = Node::start(&["--handshake-timeout", "1s"]);
    // Keep-alive requests, each in time: the connection as a whole is not.
    let mut stream = TcpStream::connect(node.public).await.unwrap();
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", node.public);
    let mut buf = [0u8; 4096];
    // Bounded: the default (10s) would not close it in time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if stream.write_all(request.as_bytes()).await.is_err() {
            break;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => panic!("the keep-alive connection is still open after 5s"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the keep-alive connection is still open after 5s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = node.get_text("/metrics").await;
    assert_eq!(
        metric(
            &page,
            "gatecast_handshakes_failed_total{reason=\"deadline\"}"
        ),
        1.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_past_the_bound_gets_431() {
    let node = Node::start(&[]);
    let big = "a".repeat(40 << 10);
    match RawClient::connect(node.public, "/ws", &[("x-big", &big)]).await {
        Err((status, _)) => assert_eq!(status, 431),
        Ok(_) => panic!("a 40 KiB head was upgraded"),
    }
    // Within the bound, a large head (a long token, cookies) is fine.
    let fine = "a".repeat(16 << 10);
    assert!(RawClient::connect(node.public, "/ws", &[("x-big", &fine)])
        .await
        .is_ok());
    let page = node.get_text("/metrics").await;
    assert_eq!(
        metric(
            &page,
            "gatecast_handshakes_failed_total{reason=\"head_too_large\"}"
        ),
        1.0,
        "{page}"
    );
}

/// Sends `n` messages as fast as the socket takes them, ignoring the
/// failure once the server closed.
async fn flood(client: &mut Client, n: usize, message: Message) {
    for _ in 0..n {
        if client.stream().feed(message.clone()).await.is_err() {
            return;
        }
    }
    let _ = client.stream().flush().await;
}

/// The next close code the client sees, skipping messages.
async fn closed_with(client: &mut Client) -> Option<u16> {
    loop {
        match client.next().await {
            Seen::Close(code) => return code,
            Seen::Ended => return None,
            Seen::Broken(error) => panic!("the stream broke instead of closing: {error}"),
            Seen::Text(_) | Seen::Binary(_) => {}
        }
    }
}

/// Message events the webhook got, by client, until `until`'s message
/// `last` arrives (bounded wait).
async fn messages_until(
    rx: &mut mpsc::UnboundedReceiver<Value>,
    until: &str,
    last: &str,
) -> std::collections::HashMap<String, usize> {
    let mut counts = std::collections::HashMap::new();
    loop {
        let event = tokio::time::timeout(common::WAIT, rx.recv())
            .await
            .expect("webhook called in time")
            .unwrap();
        if event["type"] != "message" {
            continue;
        }
        let from = event["client_id"].as_str().unwrap().to_owned();
        *counts.entry(from.clone()).or_default() += 1;
        if from == until && event["data"] == last {
            return counts;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_too_many_messages_is_closed_with_1008_and_others_still_heard() {
    let (hook, mut rx) = webhook().await;
    let node = Node::start(&[
        "--events",
        "--events-webhook",
        &hook,
        "--client-message-rate",
        "5",
        "--client-message-burst",
        "10",
    ]);
    let mut flooder = Client::connect(&node.ws_url("")).await;
    let mut quiet = Client::connect(&node.ws_url("")).await;
    flood(&mut flooder, 200, Message::text("spam")).await;
    assert_eq!(closed_with(&mut flooder).await, Some(1008));
    quiet.send_text("still heard").await;
    let counts = messages_until(&mut rx, &quiet.id, "still heard").await;
    let flooded = counts.get(&flooder.id).copied().unwrap_or(0);
    // The burst, and what the rate refilled meanwhile; not the 200.
    assert!(
        (10..=20).contains(&flooded),
        "{flooded} of the flood's messages became events"
    );
    let page = node.get_text("/metrics").await;
    assert_eq!(
        metric(
            &page,
            "gatecast_client_rate_closed_total{reason=\"messages\"}"
        ),
        1.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_too_many_bytes_is_closed_with_1008() {
    let (hook, mut rx) = webhook().await;
    let node = Node::start(&[
        "--events",
        "--events-webhook",
        &hook,
        "--client-message-rate",
        "0",
        "--client-message-bytes-rate",
        "1000",
        "--max-message-bytes",
        "4096",
    ]);
    let mut flooder = Client::connect(&node.ws_url("")).await;
    let mut quiet = Client::connect(&node.ws_url("")).await;
    // A burst of 4096 bytes (one largest message): the fifth 1000-byte
    // message is past it.
    flood(&mut flooder, 50, Message::binary(vec![7u8; 1000])).await;
    assert_eq!(closed_with(&mut flooder).await, Some(1008));
    quiet.send_text("still heard").await;
    let counts = messages_until(&mut rx, &quiet.id, "still heard").await;
    let flooded = counts.get(&flooder.id).copied().unwrap_or(0);
    assert!((4..=10).contains(&flooded), "{flooded} events");
    let page = node.get_text("/metrics").await;
    assert_eq!(
        metric(&page, "gatecast_client_rate_closed_total{reason=\"bytes\"}"),
        1.0,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_events_client_messages_are_not_rate_limited() {
    let node = Node::start(&["--client-message-rate", "1", "--client-message-burst", "1"]);
    let mut client = Client::connect(&node.ws_url("")).await;
    flood(&mut client, 50, Message::text("nobody listens")).await;
    client.send_text(r#"{"type":"ping"}"#).await;
    client.expect_text(r#"{"type":"pong"}"#).await;
}

/// The answer to `claims` on `node`: `None` when upgraded, else the error
/// message of a 401.
async fn refusal(node: &Node, claims: Value) -> Option<String> {
    let path = format!("/ws?token={}", token(claims));
    match RawClient::connect(node.public, &path, &[]).await {
        Ok(_) => None,
        Err((status, body)) => {
            let body: Value = serde_json::from_str(&body).unwrap();
            assert_api_error("token", &(status, body.clone()), 401, "unauthorized");
            Some(body["error"]["message"].as_str().unwrap().to_owned())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_with_too_many_groups_or_too_large_a_session_are_refused() {
    let node = Node::start(&["--client-jwt-secret", SECRET]);
    let groups = |n: usize| (0..n).map(|i| format!("g{i}")).collect::<Vec<_>>();
    // At the caps: accepted.
    assert_eq!(
        refusal(
            &node,
            json!({"sub": "a", "groups": groups(100), "session": {"x": "y".repeat(8000)}})
        )
        .await,
        None
    );
    // Past them: refused, saying no more than "invalid token".
    let invalid = Some("invalid token".to_owned());
    assert_eq!(
        refusal(&node, json!({"sub": "a", "groups": groups(101)})).await,
        invalid
    );
    assert_eq!(
        refusal(
            &node,
            json!({"sub": "a", "session": {"x": "y".repeat(8200)}})
        )
        .await,
        invalid
    );
    assert_eq!(
        refusal(&node, json!({"sub": "a", "groups": ["z".repeat(257)]})).await,
        invalid
    );
}
