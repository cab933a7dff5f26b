//! BusinessWorkers on the inner port: GatewayWorker's Events.php runs
//! against gatecast nodes. The wire format is checked packet by packet with a
//! worker written here; then real PHP BusinessWorkers (tests/gatewayworker/
//! worker.php with its Events.php) run an echo room over two nodes, and one
//! of them is killed mid-run.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::gatewayworker::{register_node_args, PhpWorker};
use common::redis::RedisServer;
use common::{eventually, metric, Client, Node, Seen, WAIT};
use futures_util::SinkExt;
use gatecast::gatewayworker::php::{self, Key, Value};
use gatecast::gatewayworker::protocol::{self, cmd, flag, Packet};
use serde_json::{json, Value as Json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "businessworker-secret";

/// The connection number inside a client_id (its last 8 hex digits).
fn number(client_id: &str) -> u32 {
    u32::from_str_radix(&client_id[12..], 16).unwrap()
}

/// A BusinessWorker written here: it speaks the protocol by hand so the
/// test sees every field of every packet.
struct RawWorker {
    stream: TcpStream,
    buf: BytesMut,
}

impl RawWorker {
    async fn connect(inner: SocketAddr, secret: &str, key: &str) -> RawWorker {
        let mut stream = TcpStream::connect(inner).await.unwrap();
        let mut hello = Packet::new(cmd::WORKER_CONNECT);
        hello.flag = flag::BODY_IS_SCALAR;
        hello.body = Bytes::from(json!({"worker_key": key, "secret_key": secret}).to_string());
        stream.write_all(&protocol::encode(&hello)).await.unwrap();
        RawWorker {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// The next packet that is not a ping; `None` when the node closed.
    async fn next(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = protocol::decode(&mut self.buf, 1 << 24).unwrap() {
                if p.cmd == cmd::PING {
                    continue;
                }
                return Some(p);
            }
            let n = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("a packet in time")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    async fn send(&mut self, p: Packet) {
        self.stream.write_all(&protocol::encode(&p)).await.unwrap();
    }
}

/// `$value[$key]` of a PHP array.
fn field<'a>(value: &'a Value, key: &str) -> &'a Value {
    match value {
        Value::Array(a) => a.get(&Key::from(key)).unwrap_or(&Value::Null),
        other => panic!("not an array: {other:?}"),
    }
}

async fn workers_connected(node: &Node, n: f64) {
    eventually(&format!("{n} workers connected"), || async {
        metric(&node.get_text("/metrics").await, "gatecast_workers") == n
    })
    .await;
}

/// Every event of a connection, field by field, and what a worker sends
/// back: the session written after an event, a message to the current
/// client, a uid bound from onConnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_a_worker_in_gatewayworkers_format() {
    let node = Node::start(&["--gateway-secret-key", SECRET]);

    // A wrong key is refused, as GatewayWorker's gateway refuses it.
    let mut intruder = RawWorker::connect(node.inner, "not-the-secret-key", "evil:0").await;
    assert!(intruder.next().await.is_none(), "a wrong key is closed");

    let mut worker = RawWorker::connect(node.inner, SECRET, "test:0").await;
    workers_connected(&node, 1.0).await;

    let mut request = node
        .ws_url("?room=blue&token=abc")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("user-agent", "phpunit".parse().unwrap());
    request
        .headers_mut()
        .insert("cookie", "PHPSESSID=s%201".parse().unwrap());
    let mut client = Client::connect_request(request).await;
    let conn = number(&client.id);

    let connect = worker.next().await.unwrap();
    assert_eq!(connect.cmd, cmd::ON_CONNECT);
    assert_eq!(connect.connection_id, conn);
    assert_eq!(connect.local_ip, u32::from(std::net::Ipv4Addr::LOCALHOST));
    assert_eq!(connect.local_port, node.inner.port());
    assert_eq!(connect.gateway_port, node.public.port());
    assert_eq!(connect.client_ip, u32::from(std::net::Ipv4Addr::LOCALHOST));
    assert_ne!(connect.client_port, 0);
    assert!(connect.ext_data.is_empty(), "no session yet: ''");
    // The client_id BusinessWorker rebuilds is the client's.
    let rebuilt = format!(
        "{:08x}{:04x}{:08x}",
        connect.local_ip, connect.local_port, connect.connection_id
    );
    assert_eq!(rebuilt, client.id);

    let ws = worker.next().await.unwrap();
    assert_eq!(ws.cmd, cmd::ON_WEBSOCKET_CONNECT);
    assert_eq!(ws.flag & flag::BODY_IS_SCALAR, 0, "the body is serialized");
    let data = php::unserialize(&ws.body).unwrap();
    assert_eq!(field(field(&data, "get"), "room"), &Value::string("blue"));
    assert_eq!(field(field(&data, "get"), "token"), &Value::string("abc"));
    let server = field(&data, "server");
    assert_eq!(field(server, "HTTP_USER_AGENT"), &Value::string("phpunit"));
    assert_eq!(
        field(server, "QUERY_STRING"),
        &Value::string("room=blue&token=abc")
    );
    assert_eq!(field(server, "REMOTE_ADDR"), &Value::string("127.0.0.1"));
    assert_eq!(
        field(server, "REMOTE_PORT"),
        &Value::Int(connect.client_port.into())
    );
    assert_eq!(
        field(field(&data, "cookie"), "PHPSESSID"),
        &Value::string("s 1")
    );

    // onWebSocketConnect binds a uid and writes $_SESSION back.
    let mut bind = Packet::new(cmd::BIND_UID);
    bind.connection_id = conn;
    bind.ext_data = Bytes::from_static(b"u-1");
    worker.send(bind).await;
    let mut set = Packet::new(cmd::SET_SESSION);
    set.connection_id = conn;
    set.ext_data = Bytes::from(php::serialize(&Value::from(&json!({"room": "blue"}))));
    worker.send(set).await;
    eventually("the session written back", || async {
        node.ok("get_session", json!({"client_id": client.id}))
            .await
            == json!({"room": "blue"})
    })
    .await;
    assert_eq!(
        node.ok("get_uid_by_client_id", json!({"client_id": client.id}))
            .await,
        json!("u-1")
    );

    client
        .send(Message::binary(b"\x00\xffbytes".to_vec()))
        .await;
    let message = worker.next().await.unwrap();
    assert_eq!(message.cmd, cmd::ON_MESSAGE);
    assert!(message.body_is_scalar());
    assert_eq!(&message.body[..], b"\x00\xffbytes");
    assert_eq!(
        php::unserialize(&message.ext_data).unwrap(),
        Value::from(&json!({"room": "blue"})),
        "each event carries the session"
    );

    // sendToCurrentClient: SEND_TO_ONE for the event's connection.
    let mut reply = Packet::new(cmd::SEND_TO_ONE);
    reply.connection_id = conn;
    reply.flag = flag::BODY_IS_SCALAR;
    reply.body = Bytes::from_static(b"echo: bytes");
    worker.send(reply).await;
    client.expect_text("echo: bytes").await;

    client.close().await;
    let close = worker.next().await.unwrap();
    assert_eq!(close.cmd, cmd::ON_CLOSE);
    assert_eq!(close.connection_id, conn);
    assert_eq!(
        php::unserialize(&close.ext_data).unwrap(),
        Value::from(&json!({"room": "blue"})),
        "onClose still reads the session"
    );
    let metrics = node.get_text("/metrics").await;
    assert_eq!(metric(&metrics, "gatecast_worker_events_sent_total"), 4.0);
}

/// A worker that stops reading is disconnected once its queue is full;
/// clients keep working, and events go to a worker that reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stops_reading_is_disconnected() {
    // One client floods (the per-client message budget is lifted to let it).
    let node = Node::start(&[
        "--client-message-rate",
        "0",
        "--client-message-bytes-rate",
        "0",
    ]);
    let mut stuck = RawWorker::connect(node.inner, "", "stuck:0").await;
    workers_connected(&node, 1.0).await;
    let mut client = Client::connect(&node.ws_url("")).await;
    // ~36 MB of messages: past the 10 MB queue and the sockets' buffers.
    let chunk = "x".repeat(60_000);
    for _ in 0..600 {
        client.send_text(&chunk).await;
    }
    eventually("the stuck worker disconnected", || async {
        let m = node.get_text("/metrics").await;
        metric(&m, "gatecast_worker_disconnects_total{reason=\"slow\"}") == 1.0
            && metric(&m, "gatecast_workers") == 0.0
    })
    .await;
    let m = node.get_text("/metrics").await;
    assert!(
        metric(
            &m,
            "gatecast_worker_events_dropped_total{reason=\"worker_full\"}"
        ) >= 1.0
    );

    // The client was never held up: it still talks to the node.
    client.send_text("{\"type\":\"ping\"}").await;
    client.expect_text("{\"type\":\"pong\"}").await;

    // The stuck worker's socket is closed (after what it had buffered).
    let drained = tokio::time::timeout(WAIT, async { while stuck.next().await.is_some() {} }).await;
    assert!(drained.is_ok(), "the node closed the stuck worker");

    // With no worker left, events are dropped and counted (the client
    // stays connected), as GatewayWorker drops them.
    let no_worker = "gatecast_worker_events_dropped_total{reason=\"no_worker\"}";
    let before = metric(&node.get_text("/metrics").await, no_worker);
    client.send_text("nobody hears this").await;
    eventually("the event without a worker counted", || async {
        metric(&node.get_text("/metrics").await, no_worker) == before + 1.0
    })
    .await;

    // A worker that reads gets the client's next events.
    let mut worker = RawWorker::connect(node.inner, "", "good:0").await;
    workers_connected(&node, 1.0).await;
    client.send_text("after").await;
    let p = worker.next().await.unwrap();
    assert_eq!((p.cmd, &p.body[..]), (cmd::ON_MESSAGE, &b"after"[..]));
}

/// With a worker connected, a client's messages are held to the message
/// budget: a flood is closed with 1008 before it reaches the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_closed_before_it_floods_the_workers() {
    let node = Node::start(&[]);
    let mut worker = RawWorker::connect(node.inner, "", "flood:0").await;
    workers_connected(&node, 1.0).await;
    let mut client = Client::connect(&node.ws_url("")).await;
    for _ in 0..2 {
        worker.next().await.unwrap(); // connect, websocket-connect
    }
    for i in 0..1000 {
        // The node may close mid-flood: later sends may fail.
        if client
            .stream()
            .send(Message::text(format!("flood {i}")))
            .await
            .is_err()
        {
            break;
        }
    }
    client.expect_close(1008).await;
    let mut messages = 0;
    loop {
        let p = worker.next().await.unwrap();
        if p.cmd == cmd::ON_CLOSE {
            break;
        }
        assert_eq!(p.cmd, cmd::ON_MESSAGE);
        messages += 1;
    }
    // The burst (200) and what the rate refilled meanwhile, not the flood.
    assert!(
        (200..1000).contains(&messages),
        "{messages} messages reached the worker"
    );
    let m = node.get_text("/metrics").await;
    assert_eq!(
        metric(&m, "gatecast_client_rate_closed_total{reason=\"messages\"}"),
        1.0
    );
}

/// A node shutting down closes its clients and its workers get their close
/// events before it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_sends_the_close_events() {
    let mut node = Node::start(&[]);
    let mut worker = RawWorker::connect(node.inner, "", "drain:0").await;
    workers_connected(&node, 1.0).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client::connect(&node.ws_url("")).await);
    }
    let mut open: Vec<u32> = clients.iter().map(|c| number(&c.id)).collect();
    for _ in 0..6 {
        let p = worker.next().await.unwrap();
        assert!(matches!(p.cmd, cmd::ON_CONNECT | cmd::ON_WEBSOCKET_CONNECT));
    }
    node.signal("TERM");
    for c in clients.iter_mut() {
        c.expect_close(1001).await;
    }
    while !open.is_empty() {
        let p = worker
            .next()
            .await
            .expect("a close event before the node left");
        assert_eq!(p.cmd, cmd::ON_CLOSE);
        open.retain(|n| *n != p.connection_id);
    }
    assert!(node.wait_exit(WAIT).await.success());
}

/// The next echo a client gets, as JSON.
async fn echo(client: &mut Client) -> Json {
    match client.next().await {
        Seen::Text(text) => serde_json::from_str(&text).unwrap(),
        other => panic!("client {} expected an echo, got {other:?}", client.id),
    }
}

/// Two nodes over Redis, two PHP BusinessWorkers found through one node's
/// Register, clients on both nodes: Events.php binds uids, joins rooms from
/// the query string, keeps $_SESSION across events and echoes to the room;
/// a worker killed mid-run hands its connections to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_businessworkers_run_events_php_over_two_nodes() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args = register_node_args(
        &url,
        &[
            "--gateway-secret-key",
            SECRET,
            // The Redis Stream of events keeps working beside the workers.
            "--events",
        ],
    );
    let first = Node::start(&args);
    first.wait_ready().await;
    let register = first.register.expect("register address");
    let mut workers = [
        PhpWorker::start(register, "alpha", SECRET),
        PhpWorker::start(register, "beta", SECRET),
    ];
    workers_connected(&first, 2.0).await;
    // A replica that joins later: the Register tells the workers, and they
    // connect to it too.
    let second = Node::start(&args);
    second.wait_ready().await;
    let nodes = [first, second];
    for n in &nodes {
        workers_connected(n, 2.0).await;
    }

    let mut clients = Vec::new();
    for i in 0..6 {
        let mut request = nodes[i % 2]
            .ws_url("?room=r1")
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("user-agent", format!("agent-{i}").parse().unwrap());
        clients.push(Client::connect_request(request).await);
    }
    // onConnect bound each uid, onWebSocketConnect joined the room: seen
    // cluster-wide through Redis.
    for c in &clients {
        eventually("uid bound by Events::onConnect", || async {
            nodes[1]
                .ok(
                    "get_client_id_by_uid",
                    json!({"uid": format!("user-{}", c.id)}),
                )
                .await
                == json!([c.id])
        })
        .await;
    }
    eventually("room joined by Events::onWebSocketConnect", || async {
        nodes[0]
            .ok("get_client_count_by_group", json!({"group": "r1"}))
            .await
            == json!(6)
    })
    .await;

    // A message from each client reaches the whole room on both nodes, with
    // the session the worker wrote back at connect.
    let mut served_by = Vec::new();
    for i in 0..clients.len() {
        let text = format!("hello from {i}");
        clients[i].send_text(&text).await;
        let sender = clients[i].id.clone();
        let mut handled_by = None;
        for c in clients.iter_mut() {
            let got = echo(c).await;
            assert_eq!(got["text"], json!(text));
            assert_eq!(got["from"], json!(sender));
            assert_eq!(got["gateway_client_id"], json!(sender));
            assert_eq!(got["uid"], json!(format!("user-{sender}")));
            assert_eq!(got["room"], json!("r1"));
            assert_eq!(got["agent"], json!(format!("agent-{i}")));
            assert_eq!(got["addr"], json!("127.0.0.1"));
            handled_by = Some(got["worker"].clone());
        }
        // Sticky: the same worker for every event of a connection.
        for _ in 0..3 {
            clients[i].send_text("whoami").await;
            let me = echo(&mut clients[i]).await;
            assert_eq!(Some(&me["worker"]), handled_by.as_ref(), "client {i}");
        }
        served_by.push(handled_by.unwrap().as_str().unwrap().to_owned());
    }
    assert!(
        served_by.iter().any(|w| w == "alpha") && served_by.iter().any(|w| w == "beta"),
        "connections are spread over both workers: {served_by:?}"
    );

    // Kill the worker of client 0: its events move to the other one.
    let victim = served_by[0].clone();
    let (dead, alive) = if victim == "alpha" { (0, 1) } else { (1, 0) };
    workers[dead].kill();
    for n in &nodes {
        workers_connected(n, 1.0).await;
    }
    clients[0].send_text("still here").await;
    for c in clients.iter_mut() {
        let got = echo(c).await;
        assert_eq!(got["text"], json!("still here"));
        assert_eq!(got["worker"], json!(workers[alive].name));
        // The session lives in the gateway, not in the dead worker.
        assert_eq!(got["uid"], json!(format!("user-{}", clients_id(&got))));
    }

    // onClose runs with the session still readable.
    let leaving = clients.pop().unwrap();
    let id = leaving.id.clone();
    leaving.close().await;
    workers[alive]
        .expect_line(&format!("event close {id} room=r1"))
        .await;
    for n in &nodes {
        let m = n.get_text("/metrics").await;
        assert_eq!(
            metric(
                &m,
                "gatecast_worker_events_dropped_total{reason=\"no_worker\"}"
            ),
            0.0
        );
    }
    // Every event also went to the stream: 6 connects, 25 messages (6
    // hellos, 18 whoami, 1 after the kill), 1 close.
    eventually("the events stream has every event", || async {
        redis.cli(&["XLEN", "gatecast:events"]) == "32"
    })
    .await;
}

fn clients_id(echo: &Json) -> String {
    echo["from"].as_str().unwrap().to_owned()
}

/// An event too large for a worker's queue (a huge session, with
/// `--max-session-bytes` raised) is dropped and counted: the worker is not
/// taken for a slow one, stays connected and gets the next events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_event_is_dropped_and_the_worker_kept() {
    let node = Node::start(&[
        "--max-session-bytes",
        "16777216",
        "--api-max-body-bytes",
        "33554432",
    ]);
    let mut worker = RawWorker::connect(node.inner, "", "big:0").await;
    workers_connected(&node, 1.0).await;
    let mut client = Client::connect(&node.ws_url("")).await;
    for want in [cmd::ON_CONNECT, cmd::ON_WEBSOCKET_CONNECT] {
        assert_eq!(worker.next().await.unwrap().cmd, want);
    }
    // 11 MB of session: past the worker's whole 10 MB queue.
    let session = json!({"blob": "x".repeat(11_000_000)});
    node.ok(
        "set_session",
        json!({"client_id": client.id, "session": session}),
    )
    .await;
    client.send_text("too big to carry").await;
    eventually("the oversized event counted", || async {
        let m = node.get_text("/metrics").await;
        metric(
            &m,
            "gatecast_worker_events_dropped_total{reason=\"too_large\"}",
        ) == 1.0
    })
    .await;
    let m = node.get_text("/metrics").await;
    assert_eq!(metric(&m, "gatecast_workers"), 1.0, "{m}");
    assert_eq!(
        metric(&m, "gatecast_worker_disconnects_total{reason=\"slow\"}"),
        0.0
    );
    node.ok(
        "set_session",
        json!({"client_id": client.id, "session": {"small": true}}),
    )
    .await;
    client.send_text("after").await;
    let p = worker.next().await.unwrap();
    assert_eq!((p.cmd, &p.body[..]), (cmd::ON_MESSAGE, &b"after"[..]));
}

/// A node killed outright tells no worker of its connections' end: the
/// node that purges it does, as the dead node would have (onClose of the
/// connection's client_id, with its last session), once. Without
/// `--events`: BusinessWorkers hear it whether or not the stream is on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purging_node_tells_workers_of_a_killed_node_s_closes() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args = register_node_args(&url, &["--gateway-secret-key", SECRET]);
    let survivor = Node::start(&args);
    survivor.wait_ready().await;
    let worker = PhpWorker::start(survivor.register.expect("register"), "gamma", SECRET);
    let victim = Node::start(&args);
    victim.wait_ready().await;
    for n in [&survivor, &victim] {
        workers_connected(n, 1.0).await;
    }
    let client = Client::connect(&victim.ws_url("?room=r9")).await;
    let id = client.id.clone();
    worker
        .expect_line(&format!("event websocket-connect {id} room=r9"))
        .await;
    // The session Events.php wrote is in the dead node's partition.
    eventually("the session mirrored", || async {
        survivor
            .ok("get_session", json!({"client_id": id}))
            .await
            .get("room")
            == Some(&json!("r9"))
    })
    .await;

    victim.signal("KILL");
    worker
        .expect_line(&format!("event close {id} room=r9"))
        .await;
    // Once: no second close of it from another purge.
    tokio::time::sleep(Duration::from_secs(3)).await;
    while let Ok(line) = worker.lines.try_recv() {
        assert!(!line.starts_with(&format!("event close {id}")), "{line}");
    }
    drop(client);
}
