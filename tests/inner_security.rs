//! Issue 25: the GatewayWorker ports (inner and Register) as an attacker
//! inside the cluster network sees them. Each test makes the attack on a
//! real node, then checks that the node still serves everyone else.

mod common;

use std::process::Command;

use common::{Node, OutputWithin, WAIT};

/// The binary on free loopback ports, the inner listener from the
/// environment as the harness sets it, no advertised address given.
fn bare() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gatecast"));
    command
        .args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
        .args(["--log-format", "json"])
        .env_remove("GATECAST_API_KEY")
        .env_remove("GATECAST_INNER_LISTEN")
        .env_remove("GATECAST_GATEWAY_SECRET_KEY");
    command
}

/// An inner or Register listener other hosts can reach needs a strong key,
/// or an explicit `--gateway-insecure`: the node refuses to start, naming
/// the flag. A weak key is refused too unless `--gateway-weak-key-ok`.
#[test]
fn reachable_gateway_ports_without_a_strong_key_refuse_to_start() {
    for (args, flag) in [
        (&["--inner-listen", "0.0.0.0:0"][..], "--inner-listen"),
        (
            &[
                "--inner-listen",
                "127.0.0.1:0",
                "--register-listen",
                "0.0.0.0:0",
            ],
            "--register-listen",
        ),
        (
            &[
                "--inner-listen",
                "0.0.0.0:0",
                "--gateway-secret-key",
                "short-key",
            ],
            "--gateway-secret-key",
        ),
        (
            &[
                "--inner-listen",
                "127.0.0.1:0",
                "--gateway-secret-key",
                "change-me-gateway-key",
            ],
            "--gateway-secret-key",
        ),
    ] {
        let out = bare().args(args).output_within(WAIT);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("change-me-gateway-key") && !stderr.contains("short-key"),
            "the key is not echoed: {stderr}"
        );
    }
}

/// The same node starts with a strong key, with `--gateway-insecure`, and
/// with a weak key under `--gateway-weak-key-ok` (saying so in its log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strong_key_or_an_explicit_flag_lets_it_start() {
    for args in [
        &[
            "--inner-listen",
            "0.0.0.0:0",
            "--gateway-secret-key",
            "inner-security-key-0001",
        ][..],
        &["--inner-listen", "0.0.0.0:0", "--gateway-insecure"],
        &[
            "--inner-listen",
            "127.0.0.1:0",
            "--gateway-secret-key",
            "short-key",
            "--gateway-weak-key-ok",
        ],
    ] {
        let node = Node::start_command(bare(), args);
        node.wait_ready().await;
    }
}

/// With `--inner-listen 127.0.0.1:P` and no `--advertise-ip`, the node
/// advertises 127.0.0.1 (where its inner listener is), not the
/// default-route address where nothing listens: GatewayClient reaches the
/// node at the address inside a client_id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inner_listener_on_one_address_advertises_that_address() {
    let node = Node::start_command(bare(), &["--inner-listen", "127.0.0.1:0"]);
    node.wait_ready().await;
    let client = common::Client::connect(&node.ws_url("")).await;
    // 7f000001 is 127.0.0.1; then the inner port, in hex.
    let want = format!("7f000001{:04x}", node.inner.port());
    assert!(client.id.starts_with(&want), "{} for {want}", client.id);
    // And the address in the id answers the gateway protocol.
    let inner: std::net::SocketAddr = format!("127.0.0.1:{}", node.inner.port()).parse().unwrap();
    tokio::net::TcpStream::connect(inner).await.unwrap();
}

/// Without `--inner-listen`, the inner listener binds loopback:
/// 127.0.0.1:2900 (tried only when the port is free on this machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_inner_listener_is_loopback_only() {
    if std::net::TcpListener::bind("0.0.0.0:2900").is_err() {
        eprintln!("port 2900 is taken here: skipped");
        return;
    }
    let node = Node::start_command(bare(), &[]);
    node.wait_ready().await;
    assert_eq!(node.inner, "127.0.0.1:2900".parse().unwrap());
}

// ------------------------------------------------------------------ the
// gateway protocol as an attacker and as a GatewayClient speak it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gatecast::gatewayworker::php::{self, Value};
use gatecast::gatewayworker::protocol::{self, cmd, flag, Packet};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const KEY: &str = "inner-security-key-0001";

fn packet(command: u8, conn: u32, body: &[u8], ext: &[u8]) -> Packet {
    let mut p = Packet::new(command);
    p.connection_id = conn;
    p.flag = flag::BODY_IS_SCALAR;
    p.body = Bytes::copy_from_slice(body);
    p.ext_data = Bytes::copy_from_slice(ext);
    p
}

/// `GATEWAY_CLIENT_CONNECT` with `key`, as GatewayClient writes it first.
fn auth(key: &str) -> Bytes {
    protocol::encode(&packet(
        cmd::GATEWAY_CLIENT_CONNECT,
        0,
        json!({ "secret_key": key }).to_string().as_bytes(),
        b"",
    ))
}

/// The connection number inside a client_id (its last 8 hex digits).
fn number(client_id: &str) -> u32 {
    u32::from_str_radix(&client_id[12..], 16).unwrap()
}

/// A GatewayClient call with an answer: a fresh connection, the key and
/// the query in one write, then the answer.
async fn ask(inner: SocketAddr, p: Packet) -> Value {
    let mut s = TcpStream::connect(inner).await.unwrap();
    let mut out = auth(KEY).to_vec();
    out.extend_from_slice(&protocol::encode(&p));
    s.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    loop {
        if let Some(reply) = protocol::decode_reply(&mut buf, 64 << 20).unwrap() {
            return php::unserialize(&reply).unwrap();
        }
        let n = tokio::time::timeout(WAIT, s.read_buf(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "closed before answering");
    }
}

/// A GatewayClient call without an answer.
async fn call(inner: SocketAddr, p: Packet) {
    let mut s = TcpStream::connect(inner).await.unwrap();
    let mut out = auth(KEY).to_vec();
    out.extend_from_slice(&protocol::encode(&p));
    s.write_all(&out).await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
}

/// Whether the node closes `s` within `limit` (reading whatever it sends).
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut sink = vec![0u8; 64 << 10];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut sink)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// A node with a key, GatewayWorker-style, on loopback.
fn keyed_node(extra: &[&str]) -> Node {
    let mut args = vec!["--gateway-secret-key", KEY];
    args.extend_from_slice(extra);
    Node::start(&args)
}

/// A peer asks for every session (about 20 MB here) and never reads the
/// answer. Before, one task served every inner connection and sat 5 s on
/// that write per reply; now only that peer's task waits: a GatewayClient
/// `isOnline` on another connection answers at once, and pushes still go
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_a_big_answer_stalls_nobody_else() {
    let node = keyed_node(&["--max-message-bytes", "1048576"]);
    node.wait_ready().await;
    // 400 connections with a 50 KB session each.
    let big = "x".repeat(50_000);
    let mut clients = Vec::new();
    for _ in 0..400 {
        clients.push(common::Client::connect(&node.ws_url("")).await);
    }
    let ids: Vec<String> = clients.iter().map(|c| c.id.clone()).collect();
    let node_ref = &node;
    futures_util::future::join_all(ids.iter().map(|id| {
        let body = json!({"client_id": id, "session": {"blob": big}});
        async move { node_ref.ok("set_session", body).await }
    }))
    .await;

    // The attacker: a tiny receive window, three such queries, no reads.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut attacker = socket.connect(node.inner).await.unwrap();
    let mut out = auth(KEY).to_vec();
    for _ in 0..3 {
        out.extend_from_slice(&protocol::encode(&packet(
            cmd::GET_ALL_CLIENT_SESSIONS,
            0,
            b"",
            b"",
        )));
    }
    attacker.write_all(&out).await.unwrap();
    // Let the node build the first answer and get stuck writing it (no
    // condition to wait for: nothing is observable until it fails).
    tokio::time::sleep(Duration::from_millis(500)).await;

    let first = number(&ids[0]);
    for _ in 0..5 {
        let asked = Instant::now();
        let online = ask(node.inner, packet(cmd::IS_ONLINE, first, b"", b"")).await;
        assert_eq!(online, Value::Int(1));
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "isOnline took {:?} while another peer did not read",
            asked.elapsed()
        );
    }
    call(
        node.inner,
        packet(cmd::SEND_TO_ONE, first, b"still served", b""),
    )
    .await;
    clients[0].expect_text("still served").await;
    drop(attacker);
}

/// Before the key, a peer announcing a 10 MiB packet is closed at once (it
/// was given a 10 MiB buffer and 10 minutes), and one that sends nothing is
/// closed after 10 s (it held a slot for 10 minutes); both are counted and
/// the node still serves a GatewayClient at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_peers_get_neither_big_buffers_nor_long_slots() {
    let node = keyed_node(&[]);
    node.wait_ready().await;
    let mut client = common::Client::connect(&node.ws_url("")).await;

    let mut big = TcpStream::connect(node.inner).await.unwrap();
    let mut header = ((10u32 << 20) - 1).to_be_bytes().to_vec();
    header.extend_from_slice(&[0u8; 24]);
    big.write_all(&header).await.unwrap();
    assert!(
        closed_within(&mut big, Duration::from_secs(3)).await,
        "a 10 MiB packet before the key is refused at once"
    );

    let mut silent = TcpStream::connect(node.inner).await.unwrap();
    let opened = Instant::now();
    assert!(
        closed_within(&mut silent, Duration::from_secs(20)).await,
        "a peer that never sends its key is closed"
    );
    assert!(
        opened.elapsed() >= Duration::from_secs(9),
        "not before 10 s"
    );

    let n = number(&client.id);
    call(node.inner, packet(cmd::SEND_TO_ONE, n, b"served", b"")).await;
    client.expect_text("served").await;
    let metrics = node.get_text("/metrics").await;
    assert_eq!(common::metric(&metrics, "gatecast_inner_errors_total"), 2.0);
}

/// Authenticated peers that each begin a 10 MiB packet and stop: the read
/// budget (128 MiB here) holds a dozen; the next ones are closed at once
/// instead of each taking 10 MiB more, and small calls still get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_unfinished_packets_cannot_exhaust_the_nodes_memory() {
    let node = keyed_node(&[]);
    node.wait_ready().await;
    let mut client = common::Client::connect(&node.ws_url("")).await;
    let mut peers = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(node.inner).await.unwrap();
        let mut out = auth(KEY).to_vec();
        let mut header = ((10u32 << 20) - 1).to_be_bytes().to_vec();
        header.push(cmd::SEND_TO_ALL);
        header.extend_from_slice(&[0u8; 23]);
        out.extend_from_slice(&header);
        out.extend_from_slice(&[b'x'; 1000]);
        s.write_all(&out).await.unwrap();
        peers.push(s);
    }
    let mut closed = 0;
    for s in &mut peers {
        if closed_within(s, Duration::from_millis(300)).await {
            closed += 1;
        }
    }
    assert!(
        (4..=10).contains(&closed),
        "{closed} of 20 closed: the budget holds 12 packets of 10 MiB"
    );
    let n = number(&client.id);
    assert_eq!(
        ask(node.inner, packet(cmd::IS_ONLINE, n, b"", b"")).await,
        Value::Int(1)
    );
    call(node.inner, packet(cmd::SEND_TO_ONE, n, b"served", b"")).await;
    client.expect_text("served").await;
}

/// A push whose body is not UTF-8 goes out as a binary frame (a text frame
/// made the browser close with 1007, so one such message from Events.php
/// disconnected a whole room), counted; a raw push larger than
/// `--max-message-bytes` is not sent, and the connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_oversized_pushes_do_not_break_clients() {
    let node = keyed_node(&["--max-message-bytes", "1024"]);
    node.wait_ready().await;
    let mut client = common::Client::connect(&node.ws_url("")).await;
    let n = number(&client.id);
    call(node.inner, packet(cmd::SEND_TO_ONE, n, b"\xff\xfebin", b"")).await;
    match client.next().await {
        common::Seen::Binary(data) => assert_eq!(&data[..], b"\xff\xfebin"),
        other => panic!("expected a binary frame, got {other:?}"),
    }
    let mut raw = packet(cmd::SEND_TO_ONE, n, &[b'x'; 4096], b"");
    raw.flag |= flag::NOT_CALL_ENCODE;
    call(node.inner, raw).await;
    call(node.inner, packet(cmd::SEND_TO_ONE, n, b"after", b"")).await;
    client.expect_text("after").await;
    let metrics = node.get_text("/metrics").await;
    assert_eq!(
        common::metric(&metrics, "gatecast_inner_binary_pushes_total"),
        1.0
    );
    assert_eq!(
        common::metric(&metrics, "gatecast_inner_pushes_refused_total"),
        1.0
    );
}

/// A TCP connection to `to` from `source` (any 127/8 address: loopback
/// answers them all), as a peer on another host would make it.
async fn connect_from(source: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::from((source, 0)))
        .expect("bind a loopback source address");
    tokio::time::timeout(WAIT, socket.connect(to))
        .await
        .expect("TCP connect in time")
        .expect("the kernel accepts")
}

/// [`ask`] from `source`: the answer, or `None` when the node closes the
/// connection first.
async fn ask_from(source: [u8; 4], inner: SocketAddr, p: Packet) -> Option<Value> {
    let mut s = connect_from(source, inner).await;
    let mut out = auth(KEY).to_vec();
    out.extend_from_slice(&protocol::encode(&p));
    // A refused connection may be reset under the write: the read tells.
    let _ = s.write_all(&out).await;
    let mut buf = BytesMut::new();
    loop {
        if let Some(reply) = protocol::decode_reply(&mut buf, 64 << 20).unwrap() {
            return Some(php::unserialize(&reply).unwrap());
        }
        match tokio::time::timeout(WAIT, s.read_buf(&mut buf))
            .await
            .expect("an answer or a close in time")
        {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// One address may hold `MAX_UNAUTHENTICATED_PER_ADDRESS` (256)
/// connections that have not sent the key; the next one from it is closed
/// at once and counted, while a peer on another address is still accepted
/// and served. The place comes back when those connections go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_unauthenticated_slot() {
    use gatecast::gatewayworker::inner::MAX_UNAUTHENTICATED_PER_ADDRESS as CAP;
    let node = keyed_node(&[]);
    node.wait_ready().await;
    let client = common::Client::connect(&node.ws_url("")).await;
    let n = number(&client.id);
    let refused = r#"gatecast_inner_refused_total{reason="address_unauthenticated_full"}"#;

    // The node accepts in arrival order, so these are admitted before the
    // next one (and all within the 10 s they have to send the key).
    let mut silent = Vec::new();
    for _ in 0..CAP {
        silent.push(connect_from([127, 0, 0, 1], node.inner).await);
    }
    let mut extra = connect_from([127, 0, 0, 1], node.inner).await;
    assert!(
        closed_within(&mut extra, Duration::from_secs(3)).await,
        "connection {} from one address is refused at once",
        CAP + 1
    );
    // A GatewayClient on the same address is refused too: it is not
    // authenticated when it connects.
    assert_eq!(
        ask_from(
            [127, 0, 0, 1],
            node.inner,
            packet(cmd::IS_ONLINE, n, b"", b"")
        )
        .await,
        None
    );
    let metrics = node.get_text("/metrics").await;
    assert_eq!(common::metric(&metrics, refused), 2.0, "{metrics}");

    // Another address: accepted, and served once it gives the key.
    assert_eq!(
        ask_from(
            [127, 0, 0, 2],
            node.inner,
            packet(cmd::IS_ONLINE, n, b"", b"")
        )
        .await,
        Some(Value::Int(1))
    );
    // Once they go, the address gets its places back.
    drop(silent);
    common::eventually("127.0.0.1 served again", || async {
        ask_from(
            [127, 0, 0, 1],
            node.inner,
            packet(cmd::IS_ONLINE, n, b"", b""),
        )
        .await
            == Some(Value::Int(1))
    })
    .await;
    let metrics = node.get_text("/metrics").await;
    assert!(common::metric(&metrics, refused) >= 2.0);
    assert_eq!(
        common::metric(
            &metrics,
            r#"gatecast_inner_refused_total{reason="address_full"}"#
        ),
        0.0
    );
}
