//! Redis faults a node must repair by itself, on real processes: a node
//! cut off from Redis (packets held, nothing reset) long enough to be
//! purged by the others, changes made on the inner port while Redis is
//! down, `SCRIPT FLUSH`, and a query on the owner that shows a change
//! before its subscription exists. The cut is a TCP proxy between the node
//! and Redis that stops forwarding without closing anything, as a switch
//! or a NetworkPolicy dropping packets does.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::proxy::Proxy;
use common::redis::RedisServer;
use common::{eventually, metric, within, Client, Node, WAIT};
use gatecast::gatewayworker::php::{self, Value as Php};
use gatecast::gatewayworker::protocol::{self, cmd, flag, Packet};
use gatecast_emitter::{Emitter, Message};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One test at a time: each holds a cut or an outage for seconds, and two
/// side by side on two cores would stretch each other's bounds.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Short, so a purge (liveness TTL 2 heartbeats, then a purge round) comes
/// within a few seconds.
const HEARTBEAT: Duration = Duration::from_secs(1);

fn node(redis_url: &str) -> Node {
    let heartbeat = format!("{}ms", HEARTBEAT.as_millis());
    Node::start(&["--redis-url", redis_url, "--node-heartbeat", &heartbeat])
}

/// Runs a batch whose every command must succeed.
async fn batch_ok(api: &Node, commands: Vec<Value>) {
    for chunk in commands.chunks(500) {
        let (status, body) = api.call("batch", json!({ "commands": chunk })).await;
        assert_eq!(status, 200, "{body}");
        for reply in body["replies"].as_array().unwrap() {
            assert!(reply.get("result").is_some(), "a command failed: {reply}");
        }
    }
}

/// The results of a batch of queries, or `None` if any failed.
async fn query(api: &Node, commands: Vec<Value>) -> Option<Vec<Value>> {
    let (status, body) = api.call("batch", json!({ "commands": commands })).await;
    if status != 200 {
        return None;
    }
    body["replies"]
        .as_array()?
        .iter()
        .map(|r| r.get("result").cloned())
        .collect()
}

fn sorted_strings(v: &Value) -> Vec<String> {
    let mut l: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    l.sort();
    l
}

async fn client_count(api: &Node) -> Option<u64> {
    let (status, body) = api.call("get_all_client_count", json!({})).await;
    (status == 200).then(|| body["result"].as_u64()).flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_purged_while_cut_off_writes_its_clients_back() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port).await;
    // Cut for less than --redis-lost-grace: A keeps its clients (past it
    // A would close them all, tests/netns.rs).
    let heartbeat = format!("{}ms", HEARTBEAT.as_millis());
    let a = Node::start(&[
        "--redis-url",
        &proxy.url(),
        "--node-heartbeat",
        &heartbeat,
        "--redis-lost-grace",
        "120s",
    ]);
    let b = node(&redis.url());
    a.wait_ready().await;
    b.wait_ready().await;

    const N: usize = 200;
    let mut clients = Vec::new();
    for _ in 0..N {
        clients.push(Client::connect(&a.ws_url("")).await);
    }
    // Through B: each change crosses Redis to A and back.
    let mut commands = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        commands.push(
            json!({"method": "bind_uid", "params": {"client_id": c.id, "uid": format!("u{i}")}}),
        );
        commands
            .push(json!({"method": "join_group", "params": {"client_id": c.id, "group": "cut"}}));
    }
    batch_ok(&b, commands).await;
    assert_eq!(client_count(&b).await, Some(N as u64));

    // Cut both ways for longer than the purge bound: B finds A's liveness
    // key expired and deletes A's partition, as designed.
    proxy.set(false, false);
    let cut = Instant::now();
    within("B purges A's partition", HEARTBEAT * 8, || async {
        client_count(&b).await == Some(0)
    })
    .await;
    // Past the command timeouts of everything A sent into the cut.
    if let Some(rest) = (HEARTBEAT * 5).checked_sub(cut.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    proxy.set(true, true);

    // A's connection to Redis simply resumes (no reconnection): A must
    // notice it was purged and write every connection back.
    let mut ids: Vec<String> = clients.iter().map(|c| c.id.clone()).collect();
    ids.sort();
    within(
        "A's connections are back in Redis",
        HEARTBEAT * 10,
        || async {
            let q = vec![
                json!({"method": "get_all_client_count"}),
                json!({"method": "get_client_id_list_by_group", "params": {"group": "cut"}}),
                json!({"method": "get_client_id_by_uid", "params": {"uid": "u7"}}),
            ];
            match query(&b, q).await {
                Some(r) => {
                    r[0] == json!(N)
                        && sorted_strings(&r[1]) == ids
                        && sorted_strings(&r[2]) == vec![clients[7].id.clone()]
                }
                None => false,
            }
        },
    )
    .await;
    within("A ready again", HEARTBEAT * 10, || async {
        a.get_status(false, "/readyz").await == 200
    })
    .await;
    // And A follows their channels again: pushes through B reach them.
    b.ok("send_to_group", json!({"group": "cut", "data": "back"}))
        .await;
    b.ok("send_to_uid", json!({"uid": "u7", "data": "to u7"}))
        .await;
    for c in &mut clients {
        c.expect_text("back").await;
    }
    clients[7].expect_text("to u7").await;
}

/// A gateway-protocol packet about connection number `conn`.
fn packet(command: u8, conn: u32, ext: &[u8]) -> Packet {
    let mut p = Packet::new(command);
    p.connection_id = conn;
    p.flag = flag::BODY_IS_SCALAR;
    p.ext_data = Bytes::copy_from_slice(ext);
    p
}

/// Sends packets on the inner port as a BusinessWorker does, and waits
/// until the node closed its side (everything sent was handled).
async fn send_inner(inner: SocketAddr, packets: &[Packet]) {
    let mut s = TcpStream::connect(inner).await.unwrap();
    for p in packets {
        s.write_all(&protocol::encode(p)).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_port_changes_during_an_outage_reach_redis_when_it_is_back() {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let port = redis.port;
    let a = node(&redis.url());
    let b = node(&redis.url());
    a.wait_ready().await;
    b.wait_ready().await;
    let mut c = Client::connect(&a.ws_url("")).await;
    let conn = u32::from_str_radix(&c.id[12..], 16).unwrap();

    redis.stop();
    // Known to be disconnected (not merely not ready): an aggregate query
    // is refused at once.
    within("A knows Redis is gone", WAIT, || async {
        a.get_status(false, "/readyz").await == 503 && client_count(&a).await.is_none()
    })
    .await;
    // What a BusinessWorker sends on onConnect/onMessage, while Redis is down.
    let session = php::serialize(&Php::from(&json!({"name": "ann"})));
    send_inner(
        a.inner,
        &[
            packet(cmd::BIND_UID, conn, b"u-out"),
            packet(cmd::JOIN_GROUP, conn, b"g-out"),
            packet(cmd::SET_SESSION, conn, &session),
        ],
    )
    .await;
    // Served by A alone meanwhile, as the in-process engine does.
    send_inner(
        a.inner,
        &[{
            let mut p = packet(cmd::SEND_TO_GROUP, 0, br#"{"group":["g-out"]}"#);
            p.body = Bytes::from_static(b"during");
            p
        }],
    )
    .await;
    c.expect_text("during").await;

    let _redis = RedisServer::start_on(port);
    // Every node agrees: B reads A's partition, A its hub.
    for api in [&b, &a] {
        eventually(
            "the changes made during the outage are everywhere",
            || async {
                let q = vec![
                    json!({"method": "get_client_id_list_by_group", "params": {"group": "g-out"}}),
                    json!({"method": "get_client_id_by_uid", "params": {"uid": "u-out"}}),
                    json!({"method": "get_session", "params": {"client_id": c.id}}),
                    json!({"method": "get_uid_by_client_id", "params": {"client_id": c.id}}),
                ];
                match query(api, q).await {
                    Some(r) => {
                        sorted_strings(&r[0]) == vec![c.id.clone()]
                            && sorted_strings(&r[1]) == vec![c.id.clone()]
                            && r[2] == json!({"name": "ann"})
                            && r[3] == json!("u-out")
                    }
                    None => false,
                }
            },
        )
        .await;
    }
    b.ok(
        "send_to_group",
        json!({"group": "g-out", "data": "to group"}),
    )
    .await;
    c.expect_text("to group").await;
    b.ok("send_to_uid", json!({"uid": "u-out", "data": "to uid"}))
        .await;
    c.expect_text("to uid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_breaks_nothing() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let a = node(&redis.url());
    let b = node(&redis.url());
    a.wait_ready().await;
    b.wait_ready().await;
    let mut ca = Client::connect(&a.ws_url("")).await;
    let mut cb = Client::connect(&b.ws_url("")).await;

    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]), "OK");
    // Longer than the liveness TTL: a node whose heartbeat script fails
    // would be purged by the other by now.
    tokio::time::sleep(HEARTBEAT * 3).await;

    // Changes crossing nodes, written by each owner's scripts.
    b.ok("bind_uid", json!({"client_id": ca.id, "uid": "ua"}))
        .await;
    a.ok("join_group", json!({"client_id": cb.id, "group": "gb"}))
        .await;
    for api in [&a, &b] {
        let q = vec![
            json!({"method": "get_all_client_count"}),
            json!({"method": "get_client_id_by_uid", "params": {"uid": "ua"}}),
            json!({"method": "get_client_id_list_by_group", "params": {"group": "gb"}}),
        ];
        let r = query(api, q).await.expect("queries answer");
        assert_eq!(r[0], json!(2), "neither node was purged");
        assert_eq!(sorted_strings(&r[1]), vec![ca.id.clone()]);
        assert_eq!(sorted_strings(&r[2]), vec![cb.id.clone()]);
        assert_eq!(api.get_status(false, "/readyz").await, 200);
    }
    a.ok("send_to_group", json!({"group": "gb", "data": "g"}))
        .await;
    cb.expect_text("g").await;
    b.ok("send_to_uid", json!({"uid": "ua", "data": "u"})).await;
    ca.expect_text("u").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_shows_on_its_owner_only_once_pushes_can_reach_it() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port).await;
    let a = node(&proxy.url());
    a.wait_ready().await;
    let mut c = Client::connect(&a.ws_url("")).await;
    let fred = fred::types::Builder::from_config(
        fred::types::config::Config::from_url(&redis.url()).unwrap(),
    )
    .build()
    .unwrap();
    fred::interfaces::ClientLike::init(&fred).await.unwrap();
    let emitter = Emitter::new(fred, "gatecast");

    // A hears the command (Redis to A flows) but cannot subscribe yet (A to
    // Redis is held) for a while.
    proxy.set(false, true);
    emitter.bind_uid(&c.id, "late").await.unwrap();
    let cut = Instant::now();
    // docs/publishing.md: poll a query until it shows the change, then push.
    loop {
        if cut.elapsed() > HEARTBEAT * 3 {
            proxy.set(true, true);
        }
        let (status, body) = a
            .call("get_uid_by_client_id", json!({"client_id": c.id}))
            .await;
        if status == 200 && body["result"] == "late" {
            break;
        }
        assert!(cut.elapsed() < WAIT, "never shown: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    emitter
        .send_to_uid("late", Message::text("pushed once shown"))
        .await
        .unwrap();
    c.expect_text("pushed once shown").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refusing_writes_makes_the_node_unready_until_it_writes_again() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let a = node(&redis.url());
    let b = node(&redis.url());
    a.wait_ready().await;
    b.wait_ready().await;
    let mut c = Client::connect(&a.ws_url("")).await;

    // Out of memory with the default policy (noeviction): every write and
    // every script that may write is refused.
    redis.cli(&["CONFIG", "SET", "maxmemory", "1"]);
    let (status, _) = a
        .call("join_group", json!({"client_id": c.id, "group": "oom"}))
        .await;
    assert_eq!(status, 503, "a change Redis refused is not a success");
    within("A not ready while it cannot write", WAIT, || async {
        a.get_status(false, "/readyz").await == 503
    })
    .await;
    let page = a.get_text("/metrics").await;
    assert!(
        metric(&page, "gatecast_redis_write_failures_total") >= 1.0,
        "{page}"
    );

    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    within("A ready again", WAIT, || async {
        a.get_status(false, "/readyz").await == 200
    })
    .await;
    eventually("the change is written once Redis takes writes", || async {
        let q = vec![json!({"method": "get_client_id_list_by_group", "params": {"group": "oom"}})];
        matches!(query(&b, q).await, Some(r) if sorted_strings(&r[0]) == vec![c.id.clone()])
    })
    .await;
    b.ok("send_to_group", json!({"group": "oom", "data": "fed"}))
        .await;
    c.expect_text("fed").await;
}
