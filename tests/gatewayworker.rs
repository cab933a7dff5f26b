//! GatewayWorker's gateway protocol on the inner port, spoken by a client in
//! this suite the way GatewayClient speaks it: one TCP connection per call,
//! to the node a client_id names or to every node, replies as a length and
//! PHP `serialize()`. On the in-process engine and on two nodes over Redis.

mod common;

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use common::gatewayworker::register_node_args;
use common::redis::RedisServer;
use common::{eventually, Client, Node, OutputWithin};
use gatecast::gatewayworker::php::{self, Value};
use gatecast::gatewayworker::protocol::{self, cmd, flag, Packet};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The connection number inside a client_id (its last 8 hex digits).
fn number(client_id: &str) -> u32 {
    u32::from_str_radix(&client_id[12..], 16).unwrap()
}

fn packet(command: u8, conn: u32, body: &[u8], ext: &[u8]) -> Packet {
    let mut p = Packet::new(command);
    p.connection_id = conn;
    p.flag = flag::BODY_IS_SCALAR;
    p.body = Bytes::copy_from_slice(body);
    p.ext_data = Bytes::copy_from_slice(ext);
    p
}

/// Sends packets on one connection and closes it, as GatewayClient does for
/// calls without an answer.
async fn send(inner: SocketAddr, packets: &[Packet]) {
    let mut s = TcpStream::connect(inner).await.unwrap();
    for p in packets {
        s.write_all(&protocol::encode(p)).await.unwrap();
    }
    s.shutdown().await.unwrap();
    // Wait for the node to close its side: everything sent was handled.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(common::WAIT, s.read_to_end(&mut rest)).await;
}

/// Sends a query and reads its answer.
async fn ask(inner: SocketAddr, p: Packet) -> Value {
    let mut s = TcpStream::connect(inner).await.unwrap();
    s.write_all(&protocol::encode(&p)).await.unwrap();
    let mut buf = BytesMut::new();
    loop {
        if let Some(reply) = protocol::decode_reply(&mut buf, 1 << 20).unwrap() {
            return php::unserialize(&reply).unwrap();
        }
        let n = tokio::time::timeout(common::WAIT, s.read_buf(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "closed before answering");
    }
}

fn ints(v: &Value) -> Vec<i64> {
    match v {
        Value::Array(a) => a
            .values()
            .map(|v| match v {
                Value::Int(i) => *i,
                other => panic!("not an int: {other:?}"),
            })
            .collect(),
        other => panic!("not an array: {other:?}"),
    }
}

/// Every call of GatewayClient against one node's own connections.
async fn gateway_protocol_on(nodes: &[Node]) {
    let node = &nodes[0];
    let inner = node.inner;
    let mut a = Client::connect(&node.ws_url("")).await;
    let mut b = Client::connect(&node.ws_url("")).await;
    let (na, nb) = (number(&a.id), number(&b.id));

    // Membership and session through the protocol...
    let session = php::serialize(&Value::from(&json!({"name": "ann", "tags": ["x", "y"]})));
    send(
        inner,
        &[
            packet(cmd::BIND_UID, na, b"", b"u1"),
            packet(cmd::JOIN_GROUP, na, b"", b"g"),
            packet(cmd::JOIN_GROUP, nb, b"", b"g"),
            packet(cmd::SET_SESSION, na, b"", &session),
            packet(
                cmd::UPDATE_SESSION,
                na,
                b"",
                &php::serialize(&Value::from(&json!({"tags": ["z"]}))),
            ),
        ],
    )
    .await;
    // ...is the gateway's state: the HTTP API of every node sees it.
    for n in nodes {
        eventually("membership from the protocol seen by the API", || async {
            n.ok("get_uid_by_client_id", json!({"client_id": a.id}))
                .await
                == json!("u1")
                && n.ok("get_client_count_by_group", json!({"group": "g"}))
                    .await
                    == json!(2)
        })
        .await;
    }
    // updateSession merges as PHP's array_replace_recursive: lists by index.
    assert_eq!(
        node.ok("get_session", json!({"client_id": a.id})).await,
        json!({"name": "ann", "tags": ["z", "y"]})
    );

    // Queries answer for this node's connections, by connection number.
    assert_eq!(
        ask(inner, packet(cmd::IS_ONLINE, na, b"", b"")).await,
        Value::Int(1)
    );
    assert_eq!(
        ints(&ask(inner, packet(cmd::GET_CLIENT_ID_BY_UID, 0, b"", b"u1")).await),
        vec![i64::from(na)]
    );
    assert_eq!(
        ask(inner, packet(cmd::GET_CLIENT_COUNT_BY_GROUP, 0, b"", b"g")).await,
        Value::Int(2)
    );
    // GET_SESSION answers the serialized session itself.
    let stored = ask(inner, packet(cmd::GET_SESSION_BY_CLIENT_ID, na, b"", b"")).await;
    assert_eq!(stored.to_json(), json!({"name": "ann", "tags": ["z", "y"]}));
    let select = ask(
        inner,
        packet(
            cmd::SELECT,
            0,
            b"",
            br#"{"fields":["uid","groups"],"where":{"groups":["g"]}}"#,
        ),
    )
    .await;
    let rows = select.to_json();
    assert_eq!(rows[na.to_string()]["uid"], json!("u1"));
    assert_eq!(rows[nb.to_string()]["groups"], json!({"g": "g"}));

    // Sends reach this node's connections, with GatewayWorker's exclusions:
    // the keys of `exclude`.
    let exclude = format!(r#"{{"group":["g"],"exclude":{{"{nb}":{nb}}}}}"#);
    send(
        inner,
        &[packet(
            cmd::SEND_TO_GROUP,
            0,
            b"to g but b",
            exclude.as_bytes(),
        )],
    )
    .await;
    a.expect_text("to g but b").await;
    send(
        inner,
        &[packet(cmd::SEND_TO_UID, 0, b"to u1", br#"["u1"]"#)],
    )
    .await;
    a.expect_text("to u1").await;
    // The values of `connections`: only those.
    let only = format!(r#"{{"connections":{{"{nb}":{nb}}}}}"#);
    send(
        inner,
        &[packet(cmd::SEND_TO_ALL, 0, b"only b", only.as_bytes())],
    )
    .await;
    b.expect_text("only b").await;
    send(inner, &[packet(cmd::SEND_TO_ONE, na, b"one", b"")]).await;
    a.expect_text("one").await;

    // Kick: the message, then the close.
    send(inner, &[packet(cmd::KICK, nb, b"bye", b"")]).await;
    b.expect_text("bye").await;
    b.expect_close(1000).await;
    assert_eq!(
        ask(inner, packet(cmd::IS_ONLINE, nb, b"", b"")).await,
        Value::Int(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gatewayclient_calls_on_the_in_process_engine() {
    let node = Node::start(&[]);
    gateway_protocol_on(&[node]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gatewayclient_calls_on_two_nodes_over_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args = ["--redis-url", url.as_str(), "--node-heartbeat", "1s"];
    let nodes = vec![Node::start(&args), Node::start(&args)];
    for n in &nodes {
        n.wait_ready().await;
    }
    gateway_protocol_on(&nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_key_or_garbage_closes_only_that_connection() {
    let node = Node::start(&["--gateway-secret-key", "gatewayworker-test-key-01"]);
    let mut a = Client::connect(&node.ws_url("")).await;
    let na = number(&a.id);
    let auth = |key: &str| {
        packet(
            cmd::GATEWAY_CLIENT_CONNECT,
            0,
            json!({"secret_key": key}).to_string().as_bytes(),
            b"",
        )
    };
    // No key, a wrong key, garbage: closed, nothing delivered.
    send(node.inner, &[packet(cmd::SEND_TO_ONE, na, b"no key", b"")]).await;
    send(
        node.inner,
        &[
            auth("wrong"),
            packet(cmd::SEND_TO_ONE, na, b"wrong key", b""),
        ],
    )
    .await;
    let mut s = TcpStream::connect(node.inner).await.unwrap();
    s.write_all(b"\x00\x00\x00\x05garbage").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(common::WAIT, s.read_to_end(&mut rest)).await;
    // A BusinessWorker with a wrong key is refused, and counted.
    let worker = br#"{"worker_key":"w:0","secret_key":"wrong"}"#;
    send(node.inner, &[packet(cmd::WORKER_CONNECT, 0, worker, b"")]).await;
    // The right key works, on the same node, at once; a ping is accepted.
    send(
        node.inner,
        &[
            auth("gatewayworker-test-key-01"),
            packet(cmd::PING, 0, b"", b""),
            packet(cmd::SEND_TO_ONE, na, b"right key", b""),
        ],
    )
    .await;
    a.expect_text("right key").await;
    let metrics = node.get_text("/metrics").await;
    assert_eq!(common::metric(&metrics, "gatecast_inner_errors_total"), 4.0);
}

/// PHP, as a GatewayWorker backend runs it: the Register of one node, then
/// the gateway protocol to each node, against two nodes with clients on
/// both. Checks what the WebSocket clients receive and what the queries
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_php_backend_drives_two_nodes_through_the_register() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args = register_node_args(&url, &["--gateway-secret-key", "php-gateway-secret-key-01"]);
    let nodes = [Node::start(&args), Node::start(&args)];
    for n in &nodes {
        n.wait_ready().await;
    }
    let mut a = Client::connect(&nodes[0].ws_url("")).await;
    let mut b = Client::connect(&nodes[0].ws_url("")).await;
    let mut c = Client::connect(&nodes[1].ws_url("")).await;
    let register = nodes[1].register.expect("register address");
    // Ready is not "listed": the Register reads the node list from Redis
    // once a second, and GatewayClient takes the list it gets first.
    eventually("the Register lists both nodes", || async {
        register_list(register, "php-gateway-secret-key-01")
            .await
            .len()
            == 2
    })
    .await;
    let ids = json!([a.id, b.id, c.id]).to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gatewayworker/e2e.php");
    let register = register.to_string();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("php")
            .args([script, &register, "php-gateway-secret-key-01", &ids])
            .output_within(common::WAIT * 3)
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "php failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let out: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let mut room = vec![a.id.clone(), c.id.clone()];
    room.sort();
    assert_eq!(out["addresses"], json!(2));
    assert_eq!(out["is_online_c"], json!(1));
    assert_eq!(out["is_uid_online"], json!(1));
    assert_eq!(out["client_ids_of_alice"], json!(room));
    assert_eq!(out["count_room"], json!(2));
    assert_eq!(out["count_all"], json!(3));
    assert_eq!(out["list_room"], json!(room));
    assert_eq!(out["uid_of_b"], json!("42"));
    assert_eq!(
        out["session_a"],
        json!({"name": "ann", "tags": ["z", "y"], "age": 3})
    );
    assert_eq!(out["groups"], json!(["other", "room"]));
    assert_eq!(
        out["batch_counts"],
        json!({"room": 2, "other": 1, "none": 0})
    );
    assert_eq!(
        out["sessions_room"][&a.id],
        json!({"name": "ann", "tags": ["z", "y"], "age": 3})
    );
    assert_eq!(out["sessions_room"][&c.id], json!([]));
    assert_eq!(out["all_sessions"], json!(3));
    assert_eq!(out["count_room_after_leave"], json!(1));
    assert_eq!(out["groups_after_ungroup"], json!(["room"]));
    assert_eq!(out["uid_of_b_after_unbind"], json!(null));
    // What each client received, in order.
    for text in ["hello room", "hello alice", "hello all"] {
        a.expect_text(text).await;
    }
    b.expect_text("only b").await;
    for text in ["hello alice", "hello all", "just c", "bye c"] {
        c.expect_text(text).await;
    }
    c.expect_close(1000).await;
    // The HTTP API sees the same state.
    assert_eq!(
        nodes[0]
            .ok("get_uid_by_client_id", json!({"client_id": a.id}))
            .await,
        json!("alice")
    );
}

/// What only the protocol has: the raw flag (the caller framed the bytes),
/// a body that is not UTF-8 (sent as is, in a binary frame), destroy, the
/// batch queries, ungroup, and the sessions of a group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_frames_non_utf8_text_destroy_and_batch_queries() {
    use common::RawClient;
    let node = Node::start(&[]);
    let inner = node.inner;
    let mut raw = RawClient::connect(node.public, "/ws", &[]).await.unwrap();
    let welcome = raw.read_frame().await.unwrap();
    let welcome: serde_json::Value = serde_json::from_slice(&welcome.payload).unwrap();
    let id = welcome["client_id"].as_str().unwrap().to_owned();
    let n = number(&id);

    // Raw: a binary frame [1, 2, 3] framed by the caller.
    let mut p = packet(cmd::SEND_TO_ONE, n, &[0x82, 3, 1, 2, 3], b"");
    p.flag |= flag::NOT_CALL_ENCODE;
    send(inner, &[p]).await;
    let frame = raw.read_frame().await.unwrap();
    assert_eq!((frame.opcode, frame.payload), (2, vec![1, 2, 3]));
    // Not UTF-8: a binary frame of exactly those bytes (a text frame would
    // make the browser close with 1007).
    send(inner, &[packet(cmd::SEND_TO_ONE, n, b"\xff\xfe", b"")]).await;
    let frame = raw.read_frame().await.unwrap();
    assert_eq!((frame.opcode, frame.payload), (2, b"\xff\xfe".to_vec()));

    // Batch queries and group sessions, keyed as GatewayWorker keys them.
    let mut other = Client::connect(&node.ws_url("")).await;
    let m = number(&other.id);
    send(
        inner,
        &[
            packet(cmd::BIND_UID, n, b"", b"u"),
            packet(cmd::BIND_UID, m, b"", b"u"),
            packet(cmd::JOIN_GROUP, m, b"", b"g"),
            packet(
                cmd::SET_SESSION,
                m,
                b"",
                &php::serialize(&Value::from(&json!({"k": 1}))),
            ),
        ],
    )
    .await;
    let by_uid = ask(
        inner,
        packet(
            cmd::BATCH_GET_CLIENT_ID_BY_UID,
            0,
            b"",
            br#"["u","nobody"]"#,
        ),
    )
    .await
    .to_json();
    let mut both = vec![json!(n), json!(m)];
    both.sort_by_key(|v| v.as_u64());
    let mut got = by_uid["u"].as_array().unwrap().clone();
    got.sort_by_key(|v| v.as_u64());
    assert_eq!((got, &by_uid["nobody"]), (both, &json!([])));
    let counts = ask(
        inner,
        packet(
            cmd::BATCH_GET_CLIENT_COUNT_BY_GROUP,
            0,
            b"",
            br#"["g","h"]"#,
        ),
    )
    .await;
    assert_eq!(counts.to_json(), json!({"g": 1, "h": 0}));
    let Value::Array(sessions) = ask(
        inner,
        packet(cmd::GET_CLIENT_SESSIONS_BY_GROUP, 0, b"", b"g"),
    )
    .await
    else {
        panic!("an array")
    };
    // Each session is itself a serialized string, as a Gateway stores it.
    let Some(Value::String(session)) = sessions.get(&php::Key::Int(m.into())) else {
        panic!("the member's session: {sessions:?}")
    };
    assert_eq!(
        php::session_from_php(session).unwrap(),
        json!({"k": 1}).as_object().unwrap().clone()
    );
    assert_eq!(
        ask(inner, packet(cmd::GET_GROUP_ID_LIST, 0, b"", b""))
            .await
            .to_json(),
        json!(["g"])
    );
    // Ungroup (sent to every node by GatewayClient): nobody is left in it.
    send(inner, &[packet(cmd::UNGROUP, 0, b"", b"g")]).await;
    assert_eq!(
        ask(inner, packet(cmd::GET_CLIENT_COUNT_BY_GROUP, 0, b"", b"g")).await,
        Value::Int(0)
    );

    // Destroy: closed at once, nothing queued is sent.
    send(inner, &[packet(cmd::DESTROY, m, b"", b"")]).await;
    other.expect_close(1000).await;
    eventually("the destroyed client is gone", || async {
        ask(inner, packet(cmd::IS_ONLINE, m, b"", b"")).await == Value::Int(0)
    })
    .await;
}

/// The addresses a Register gives a GatewayClient that connects now.
async fn register_list(register: SocketAddr, key: &str) -> Vec<serde_json::Value> {
    use tokio::io::AsyncBufReadExt;
    let stream = tokio::time::timeout(common::WAIT, TcpStream::connect(register))
        .await
        .expect("TCP connect in time")
        .expect("the Register accepts");
    let mut stream = tokio::io::BufReader::new(stream);
    let hello = json!({"event": "worker_connect", "secret_key": key}).to_string() + "\n";
    stream.get_mut().write_all(hello.as_bytes()).await.unwrap();
    let mut line = String::new();
    tokio::time::timeout(common::WAIT, stream.read_line(&mut line))
        .await
        .expect("the Register answers in time")
        .expect("a line");
    let message: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    message["addresses"].as_array().cloned().unwrap_or_default()
}

/// A raw push (the caller built whole frames) to a connection that opted
/// in to recovery comes framed like every other push there: each message
/// with the header `{}`, a fragmented one joined, control frames as given;
/// a connection that did not opt in gets the bytes exactly as sent. The
/// same for a raw last message of a kick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_pushes_reach_opted_in_connections_framed() {
    use common::RawClient;
    let node = Node::start(&[]);
    let inner = node.inner;
    let mut plain = RawClient::connect(node.public, "/ws", &[]).await.unwrap();
    let mut framed = RawClient::connect(node.public, "/ws?recover=1", &[])
        .await
        .unwrap();
    let mut ids = Vec::new();
    for c in [&mut plain, &mut framed] {
        let welcome = c.read_frame().await.unwrap();
        let welcome: serde_json::Value = serde_json::from_slice(&welcome.payload).unwrap();
        ids.push(number(welcome["client_id"].as_str().unwrap()));
    }
    // A text message with a newline in it, a binary one, and a text
    // message in two fragments.
    let body: &[u8] = &[
        0x81, 3, b'a', b'\n', b'b', 0x82, 3, 1, 2, 3, 0x01, 2, b'h', b'e', 0x80, 1, b'y',
    ];
    let mut p = packet(cmd::SEND_TO_ALL, 0, body, b"");
    p.flag |= flag::NOT_CALL_ENCODE;
    send(inner, &[p]).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let f = plain.read_frame().await.unwrap();
        got.push((f.fin, f.opcode, f.payload));
    }
    assert_eq!(
        got,
        [
            (true, 1, b"a\nb".to_vec()),
            (true, 2, vec![1, 2, 3]),
            (false, 1, b"he".to_vec()),
            (true, 0, b"y".to_vec()),
        ],
        "exactly the caller's frames"
    );
    let mut got = Vec::new();
    for _ in 0..3 {
        let f = framed.read_frame().await.unwrap();
        got.push((f.fin, f.opcode, f.payload));
    }
    assert_eq!(
        got,
        [
            (true, 1, b"{}\na\nb".to_vec()),
            (true, 2, b"{}\n\x01\x02\x03".to_vec()),
            (true, 1, b"{}\nhey".to_vec()),
        ],
        "each message with its header, as docs/recovery.md says every push is"
    );
    // A kick with a raw last message.
    let mut kick = packet(cmd::KICK, ids[1], &[0x81, 3, b'b', b'y', b'e'], b"");
    kick.flag |= flag::NOT_CALL_ENCODE | flag::BODY_IS_SCALAR;
    send(inner, &[kick]).await;
    let f = framed.read_frame().await.unwrap();
    assert_eq!((f.opcode, f.payload), (1, b"{}\nbye".to_vec()));
    assert_eq!(framed.read_frame().await.unwrap().close_code(), Some(1000));
}
