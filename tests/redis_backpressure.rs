//! The receive path of the Redis engine under what a real deployment
//! sends and suffers: pipelined bursts written to Redis in one write (as
//! `redis-cli --pipe`, redis-py or phpredis pipelines send them), a
//! subscriber Redis disconnects for its output buffer, Redis Cluster slot
//! moves, an ACL that refuses a channel, and a subscriber connection that
//! goes silent without a reset. Real redis-server, real nodes, real
//! WebSocket clients.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::redis::{RedisCluster, RedisServer};
use common::{connect_many, eventually, metric, ready, within, Client, Node};
use futures_util::StreamExt;
use gatecast_emitter::{Envelope, Op};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// One test at a time: each loads the machine on its own.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Nodes on one Redis, heartbeat 1 s unless `extra` sets it.
fn nodes(url: &str, n: usize, extra: &[&str]) -> Vec<Node> {
    let mut args = vec!["--redis-url", url];
    if !extra.contains(&"--node-heartbeat") {
        args.extend(["--node-heartbeat", "1s"]);
    }
    args.extend_from_slice(extra);
    (0..n).map(|_| Node::start(&args)).collect()
}

/// One RESP command.
fn resp(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Publishes every `(channel, payload)` in ONE write on a plain socket, as
/// `redis-cli --pipe` does, and returns each PUBLISH's receiver count.
async fn publish_pipelined(port: u16, publishes: &[(String, Vec<u8>)]) -> Vec<i64> {
    let mut out = Vec::new();
    for (channel, payload) in publishes {
        resp(&mut out, &[b"PUBLISH", channel.as_bytes(), payload]);
    }
    let mut socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut rd, mut wr) = socket.split();
    let writer = async {
        wr.write_all(&out).await.unwrap();
    };
    let reader = async {
        let mut replies = Vec::with_capacity(publishes.len());
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 << 10];
        while replies.len() < publishes.len() {
            let n = tokio::time::timeout(Duration::from_secs(30), rd.read(&mut chunk))
                .await
                .expect("redis answers the pipeline")
                .unwrap();
            assert!(n > 0, "redis closed the publisher");
            buf.extend_from_slice(&chunk[..n]);
            let mut start = 0;
            while let Some(end) = buf[start..].windows(2).position(|w| w == b"\r\n") {
                let line = &buf[start..start + end];
                assert_eq!(line[0], b':', "{}", String::from_utf8_lossy(line));
                replies.push(std::str::from_utf8(&line[1..]).unwrap().parse().unwrap());
                start += end + 2;
            }
            buf.drain(..start);
        }
        replies
    };
    let ((), replies) = tokio::join!(writer, reader);
    replies
}

async fn metric_of(node: &Node, name: &str) -> f64 {
    metric(&node.get_text("/metrics").await, name)
}

/// The sum of a labelled family (`name{...} value` lines).
async fn family_sum(node: &Node, name: &str) -> f64 {
    node.get_text("/metrics")
        .await
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn group_counts(node: &Node, groups: &[String]) -> Vec<u64> {
    let commands: Vec<Value> = groups
        .iter()
        .map(|g| json!({"method": "get_client_count_by_group", "params": {"group": g}}))
        .collect();
    let (_, body) = node.call("batch", json!({ "commands": commands })).await;
    body["replies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["result"].as_u64().unwrap_or(u64::MAX))
        .collect()
}

async fn batch_all(node: &Node, commands: Vec<Value>) {
    for chunk in commands.chunks(1000) {
        let (status, body) = node.call("batch", json!({ "commands": chunk })).await;
        assert_eq!(status, 200, "{body}");
        for reply in body["replies"].as_array().unwrap() {
            assert_eq!(reply, &json!({"result": null}), "a command failed");
        }
    }
}

async fn texts(client: &mut Client, n: usize, limit: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, client.stream().next()).await {
            Ok(Some(Ok(Message::Text(t)))) => got.push(t.to_string()),
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    got
}

/// Pushes `data` to `group` through `node` until `client` gets it
/// (bounded), skipping whatever else it receives meanwhile.
async fn push_until_delivered(node: &Node, client: &mut Client, group: &str, data: &str) {
    for _ in 0..20 {
        node.call("send_to_group", json!({"group": group, "data": data}))
            .await;
        let got = texts(client, usize::MAX, Duration::from_millis(500)).await;
        if got.iter().any(|t| t == data) {
            return;
        }
    }
    panic!("{data:?} to {group} never arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_joins_pipelined_in_one_write_is_applied_whole() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let n = nodes(&redis.url(), 2, &[]);
    ready(&n).await;
    let mut clients = connect_many(&n[0].ws_url(""), 500).await;
    let groups: Vec<String> = (0..40).map(|g| format!("g{g}")).collect();
    let node_channel = format!("gatecast:node:{}", &clients[0].id[..12]);
    let mut publishes = Vec::new();
    for client in &clients {
        for group in &groups {
            let mut e = Envelope::new(Op::JoinGroup);
            e.client_id = Some(client.id.clone());
            e.group = Some(group.clone());
            publishes.push((node_channel.clone(), e.encode().to_vec()));
        }
    }
    assert_eq!(publishes.len(), 20_000);
    let receivers = publish_pipelined(redis.port, &publishes).await;
    assert!(receivers.iter().all(|r| *r == 1), "the node listened");
    within(
        "every join applied and mirrored on every node",
        Duration::from_secs(10),
        || async {
            let mut all = true;
            for node in &n {
                all &= group_counts(node, &groups).await.iter().all(|c| *c == 500);
            }
            all
        },
    )
    .await;
    for node in &n {
        assert_eq!(
            metric_of(node, "gatecast_pubsub_dropped_total").await,
            0.0,
            "nothing dropped"
        );
    }
    // The node follows every group: a push through the other node reaches
    // all 500 members.
    n[1].ok("send_to_group", json!({"group": "g39", "data": "all here"}))
        .await;
    for client in &mut clients {
        client.expect_text("all here").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_pipelined_in_one_write_arrive_whole_once_and_in_order() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    // A long heartbeat: on two loaded cores a node must not be purged.
    let n = nodes(&redis.url(), 2, &["--node-heartbeat", "10s"]);
    ready(&n).await;
    let mut clients = Vec::new();
    for node in &n {
        let mine = connect_many(&node.ws_url(""), 1000).await;
        let commands = mine
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let uid = format!("u{}", clients.len() + k);
                json!({"method": "bind_uid", "params": {"client_id": c.id, "uid": uid}})
            })
            .collect();
        batch_all(node, commands).await;
        clients.extend(mine);
    }
    // 200,000 pushes, 100 per uid, numbered per uid, in one write.
    let mut publishes = Vec::with_capacity(200_000);
    for seq in 0..100 {
        for uid in 0..2000 {
            let mut e = Envelope::new(Op::Push);
            e.data = Some(bytes::Bytes::from(format!("{seq}")));
            publishes.push((format!("gatecast:uid:u{uid}"), e.encode().to_vec()));
        }
    }
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move { texts(&mut c, 101, Duration::from_secs(240)).await })
        })
        .collect();
    let receivers = publish_pipelined(redis.port, &publishes).await;
    assert!(
        receivers.iter().all(|r| *r == 1),
        "each uid's node listened"
    );
    // Then one last push per uid: a client that gets it after its 100 got
    // nothing twice (per-uid order holds), without waiting out a deadline.
    let ends: Vec<(String, Vec<u8>)> = (0..2000)
        .map(|uid| {
            let mut e = Envelope::new(Op::Push);
            e.data = Some(bytes::Bytes::from_static(b"end"));
            (format!("gatecast:uid:u{uid}"), e.encode().to_vec())
        })
        .collect();
    publish_pipelined(redis.port, &ends).await;
    let mut want: Vec<String> = (0..100).map(|s| s.to_string()).collect();
    want.push("end".into());
    for (i, reader) in readers.into_iter().enumerate() {
        let got = reader.await.unwrap();
        assert_eq!(got, want, "client {i}: all of its pushes, once, in order");
    }
    for node in &n {
        assert_eq!(metric_of(node, "gatecast_pubsub_dropped_total").await, 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_redis_cut_off_for_its_output_buffer_reconnects_and_resyncs() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    assert_eq!(
        redis
            .cli(&[
                "CONFIG",
                "SET",
                "client-output-buffer-limit",
                "pubsub 64kb 32kb 1"
            ])
            .trim(),
        "OK"
    );
    // A long heartbeat: the pause below must not get the node purged.
    let n = nodes(&redis.url(), 2, &["--node-heartbeat", "10s"]);
    ready(&n).await;
    let mut a = Client::connect(&n[0].ws_url("")).await;
    n[1].ok("join_group", json!({"client_id": a.id, "group": "room"}))
        .await;
    // The flood goes to another group, whose member does not read: what
    // the node reads of it before Redis cuts the connection may close that
    // member as a slow client, which must not be taken for a lost `room`.
    let sink = Client::connect(&n[0].ws_url("")).await;
    n[1].ok(
        "join_group",
        json!({"client_id": sink.id, "group": "flood"}),
    )
    .await;
    // The node stops reading (paused), a flood of 20 MB of pushes piles up
    // in the socket and then in Redis, past the 64 kB limit.
    n[0].signal("STOP");
    let mut e = Envelope::new(Op::Push);
    e.data = Some(bytes::Bytes::from(vec![b'x'; 1000]));
    let flood: Vec<(String, Vec<u8>)> = (0..20_000)
        .map(|_| ("gatecast:group:flood".to_owned(), e.encode().to_vec()))
        .collect();
    publish_pipelined(redis.port, &flood).await;
    n[0].signal("CONT");
    eventually("the reconnect is counted", || async {
        family_sum(&n[0], "gatecast_redis_subscriber_reconnects_total").await >= 1.0
    })
    .await;
    n[0].wait_ready().await;
    // Resynced: the state agrees on both nodes, and a later push arrives.
    eventually("both nodes see the member", || async {
        n[1].ok("get_client_count_by_group", json!({"group": "room"}))
            .await
            == 1
    })
    .await;
    push_until_delivered(&n[1], &mut a, "room", "after").await;
}

/// Moves `slot` from its owner to another master of `cluster` (no keys
/// live in it: channels are not keys).
fn move_slot(cluster: &RedisCluster, slot: u16) {
    let ids: Vec<String> = cluster
        .servers
        .iter()
        .map(|s| s.cli(&["CLUSTER", "MYID"]).trim().to_owned())
        .collect();
    let owner = cluster
        .servers
        .iter()
        .position(|s| {
            s.cli(&["CLUSTER", "NODES"])
                .lines()
                .any(|l| l.contains("myself") && owns(l, slot))
        })
        .expect("an owner");
    let to = (owner + 1) % cluster.servers.len();
    let s = slot.to_string();
    let (src, dst) = (&cluster.servers[owner], &cluster.servers[to]);
    assert_eq!(
        src.cli(&["CLUSTER", "COUNTKEYSINSLOT", &s]).trim(),
        "0",
        "slot {slot} holds keys"
    );
    assert_eq!(
        dst.cli(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &ids[owner]])
            .trim(),
        "OK"
    );
    assert_eq!(
        src.cli(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &ids[to]])
            .trim(),
        "OK"
    );
    for server in [dst, src] {
        assert_eq!(
            server
                .cli(&["CLUSTER", "SETSLOT", &s, "NODE", &ids[to]])
                .trim(),
            "OK"
        );
    }
    let third = &cluster.servers[3 - owner - to];
    third.cli(&["CLUSTER", "SETSLOT", &s, "NODE", &ids[to]]);
}

/// Whether a CLUSTER NODES line owns `slot`.
fn owns(line: &str, slot: u16) -> bool {
    line.split_whitespace()
        .skip(8)
        .any(|r| match r.split_once('-') {
            Some((a, b)) => match (a.parse::<u16>(), b.parse::<u16>()) {
                (Ok(a), Ok(b)) => (a..=b).contains(&slot),
                _ => false,
            },
            None => r.parse::<u16>() == Ok(slot),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_slot_moves_of_a_group_and_a_node_channel_are_followed() {
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let n = nodes(&cluster.url(), 2, &[]);
    ready(&n).await;
    let mut a = Client::connect(&n[0].ws_url("")).await;
    n[1].ok("join_group", json!({"client_id": a.id, "group": "room"}))
        .await;
    n[1].ok("send_to_group", json!({"group": "room", "data": "before"}))
        .await;
    a.expect_text("before").await;

    let slot_of = |channel: &str| -> u16 {
        cluster.servers[0]
            .cli(&["CLUSTER", "KEYSLOT", channel])
            .trim()
            .parse()
            .unwrap()
    };
    let group_slot = slot_of("gatecast:group:room");
    let node_slot = slot_of(&format!("gatecast:node:{}", &a.id[..12]));
    // Pushes flow while the slots move.
    let flowing = Arc::new(AtomicBool::new(true));
    let pusher = {
        let flowing = flowing.clone();
        let api = n[1].api;
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while flowing.load(Ordering::Relaxed) {
                let _ = http
                    .post(format!("http://{api}/api/send_to_group"))
                    .json(&json!({"group": "room", "data": "flow"}))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    move_slot(&cluster, group_slot);
    if node_slot != group_slot {
        move_slot(&cluster, node_slot);
    }
    eventually("the node subscribed again where the slots went", || async {
        metric_of(&n[0], "gatecast_redis_resubscribed_total").await >= 2.0
    })
    .await;
    flowing.store(false, Ordering::Relaxed);
    pusher.await.unwrap();
    // Later pushes arrive, and membership calls through the moved node
    // channel work.
    push_until_delivered(&n[1], &mut a, "room", "after").await;
    let (status, body) = n[1]
        .call("join_group", json!({"client_id": a.id, "group": "later"}))
        .await;
    assert_eq!(
        status, 200,
        "join_group through the moved node channel: {body}"
    );
    n[1].ok("send_to_group", json!({"group": "later", "data": "joined"}))
        .await;
    let got = texts(&mut a, 10_000, Duration::from_secs(2)).await;
    assert!(got.iter().any(|t| t == "joined"), "{got:?}");
    assert!(n[0].get_status(false, "/readyz").await == 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_the_acl_refuses_answers_503_not_200() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    // May use every key and command, and every channel but uids'.
    let rule = [
        "ACL",
        "SETUSER",
        "limited",
        "on",
        ">pw",
        "~gatecast:*",
        "resetchannels",
        "&gatecast:node:*",
        "&gatecast:all",
        "&gatecast:group:*",
        "+@all",
    ];
    assert_eq!(redis.cli(&rule).trim(), "OK");
    let url = format!("redis://limited:pw@127.0.0.1:{}", redis.port);
    let n = nodes(&url, 2, &[]);
    ready(&n).await;
    let a = Client::connect(&n[0].ws_url("")).await;
    n[1].ok("join_group", json!({"client_id": a.id, "group": "room"}))
        .await;
    let (status, body) = n[0]
        .call("bind_uid", json!({"client_id": a.id, "uid": "alice"}))
        .await;
    assert_eq!(
        status, 503,
        "a uid whose channel Redis refuses is not bound with 200: {body}"
    );
    let why = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        why.contains("refused the subscription to gatecast:uid:alice") && why.contains("NOPERM"),
        "a clear error: {body}"
    );
    // Through another node too: the owner's reply carries the refusal.
    let b = Client::connect(&n[0].ws_url("")).await;
    let (status, body) = n[1]
        .call("bind_uid", json!({"client_id": b.id, "uid": "bob"}))
        .await;
    assert_eq!(status, 503, "{body}");
    let why = body["error"]["message"].as_str().unwrap_or_default();
    assert!(why.contains("gatecast:uid:bob"), "a clear error: {body}");
    // Counted, and bounded: the node does not retry the refused channel in
    // a loop, stays ready while the clients stay, and other changes work.
    assert!(metric_of(&n[0], "gatecast_redis_subscribe_refused_total").await >= 2.0);
    n[1].ok("join_group", json!({"client_id": b.id, "group": "other"}))
        .await;
    n[0].ok(
        "set_session",
        json!({"client_id": a.id, "session": {"k": 1}}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(n[0].get_status(false, "/readyz").await, 200, "still ready");
    assert_eq!(
        metric_of(&n[0], "gatecast_redis_write_failures_total").await,
        0.0
    );
}

/// A TCP proxy to Redis that can stop forwarding the subscriber's
/// connections (told apart by the name they set first) without closing
/// them, as a NAT or a load balancer that dropped them does.
async fn silent_proxy(redis_port: u16, frozen: Arc<AtomicBool>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let frozen = frozen.clone();
            tokio::spawn(async move {
                let mut first = vec![0u8; 4096];
                let Ok(n) = inbound.read(&mut first).await else {
                    return;
                };
                let subscriber = first[..n].windows(12).any(|w| w == b"gatecast-sub");
                let frozen = move || subscriber && frozen.load(Ordering::Relaxed);
                while frozen() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", redis_port)).await else {
                    return;
                };
                if outbound.write_all(&first[..n]).await.is_err() {
                    return;
                }
                let (mut ri, mut wi) = inbound.into_split();
                let (mut ro, mut wo) = outbound.into_split();
                let f = frozen.clone();
                let up = async move { pump(&mut ri, &mut wo, f).await };
                let down = async move { pump(&mut ro, &mut wi, frozen).await };
                tokio::join!(up, down);
            });
        }
    });
    port
}

async fn pump(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    frozen: impl Fn() -> bool,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if frozen() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        match tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_connection_gone_silent_makes_the_node_unready_until_it_answers() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let frozen = Arc::new(AtomicBool::new(false));
    let proxy = silent_proxy(redis.port, frozen.clone()).await;
    let through_proxy = format!("redis://127.0.0.1:{proxy}");
    let (an, bn) = (nodes(&through_proxy, 1, &[]), nodes(&redis.url(), 1, &[]));
    let (a_node, b_node) = (&an[0], &bn[0]);
    a_node.wait_ready().await;
    b_node.wait_ready().await;
    let mut a = Client::connect(&a_node.ws_url("")).await;
    b_node
        .ok("join_group", json!({"client_id": a.id, "group": "room"}))
        .await;
    frozen.store(true, Ordering::Relaxed);
    within(
        "the node turns unready once its subscriber is silent",
        Duration::from_secs(8),
        || async { a_node.get_status(false, "/readyz").await != 200 },
    )
    .await;
    frozen.store(false, Ordering::Relaxed);
    within(
        "ready again once the connection answers",
        Duration::from_secs(15),
        || async { a_node.get_status(false, "/readyz").await == 200 },
    )
    .await;
    assert!(
        family_sum(a_node, "gatecast_redis_subscriber_reconnects_total").await >= 1.0,
        "the reconnect is counted"
    );
    b_node
        .ok("send_to_group", json!({"group": "room", "data": "back"}))
        .await;
    a.expect_text("back").await;
}

/// A Redis without a pub/sub output-buffer limit: it keeps a whole flood
/// for a paused node, which reads it after SIGCONT.
fn redis_keeping_every_backlog() -> RedisServer {
    let redis = RedisServer::start();
    let unlimited = [
        "CONFIG",
        "SET",
        "client-output-buffer-limit",
        "pubsub 0 0 0",
    ];
    assert_eq!(redis.cli(&unlimited).trim(), "OK");
    redis
}

/// Pushes to client_ids of `node_id` that no connection has: cheap for
/// Redis and for the node, so a flood of them is long only by its count.
fn node_flood(node_id: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut e = Envelope::new(Op::Push);
    e.client_ids = vec![format!("{node_id}ffffffff")];
    e.data = Some(bytes::Bytes::from_static(b"flood"));
    let bytes = e.encode().to_vec();
    let channel = format!("gatecast:node:{node_id}");
    (0..n).map(|_| (channel.clone(), bytes.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_overtakes_a_flood_of_pushes_on_the_node_channel() {
    let _serial = SERIAL.lock().await;
    let redis = redis_keeping_every_backlog();
    let n = nodes(&redis.url(), 2, &["--node-heartbeat", "10s"]);
    ready(&n).await;
    let a = Client::connect(&n[0].ws_url("")).await;
    let mut b = Client::connect(&n[1].ws_url("")).await;
    let a_node = a.id[..12].to_owned();
    let before = metric_of(&n[0], "gatecast_pubsub_received_total").await;
    // Node A stops reading while a pipelined burst of pushes to its node
    // channel piles up in Redis, then reads it in order.
    const FLOOD: usize = 300_000;
    n[0].signal("STOP");
    let receivers = publish_pipelined(redis.port, &node_flood(&a_node, FLOOD)).await;
    n[0].signal("CONT");
    assert!(receivers.iter().all(|r| *r == 1), "node A listened");
    // A membership change through A for B's connection: B's reply to A
    // must not wait behind the flood on A's node channel.
    let (status, body) = n[0]
        .call("bind_uid", json!({"client_id": b.id, "uid": "bob"}))
        .await;
    let received = metric_of(&n[0], "gatecast_pubsub_received_total").await - before;
    assert_eq!(status, 200, "answered within its deadline: {body}");
    assert!(
        received < FLOOD as f64,
        "the reply overtook the flood: A had read {received} of its {FLOOD} messages"
    );
    n[0].ok("send_to_uid", json!({"uid": "bob", "data": "bound"}))
        .await;
    b.expect_text("bound").await;
    // The flood is read whole, nothing dropped.
    eventually("A read the whole flood", || async {
        metric_of(&n[0], "gatecast_pubsub_received_total").await - before >= FLOOD as f64
    })
    .await;
    assert_eq!(metric_of(&n[0], "gatecast_pubsub_dropped_total").await, 0.0);
}

/// A plain RESP2 subscriber to `channels` (as another node, or an older
/// one, would be): every message, in order, none dropped.
struct Listener {
    socket: TcpStream,
    buf: Vec<u8>,
}

impl Listener {
    async fn new(redis: &RedisServer, channels: &[String]) -> Listener {
        let socket = TcpStream::connect(("127.0.0.1", redis.port)).await.unwrap();
        let mut l = Listener {
            socket,
            buf: Vec::new(),
        };
        let mut out = Vec::new();
        let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
        args.extend(channels.iter().map(|c| c.as_bytes()));
        resp(&mut out, &args);
        l.socket.write_all(&out).await.unwrap();
        for _ in channels {
            l.next().await;
        }
        l
    }

    /// The next line, without its CRLF.
    async fn line(&mut self) -> Vec<u8> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..end].to_vec();
                self.buf.drain(..end + 2);
                return line;
            }
            self.fill().await;
        }
    }

    async fn fill(&mut self) {
        let mut chunk = vec![0u8; 64 << 10];
        let n = tokio::time::timeout(Duration::from_secs(60), self.socket.read(&mut chunk))
            .await
            .expect("redis sends on")
            .unwrap();
        assert!(n > 0, "redis closed the listener");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// The next push (`kind`, channel, payload).
    async fn next(&mut self) -> (Vec<u8>, String, Vec<u8>) {
        let head = self.line().await;
        assert_eq!(head[0], b'*');
        let mut parts = Vec::new();
        for _ in 0..3 {
            let l = self.line().await;
            if l[0] == b':' {
                parts.push(l[1..].to_vec());
                continue;
            }
            let len: usize = std::str::from_utf8(&l[1..]).unwrap().parse().unwrap();
            while self.buf.len() < len + 2 {
                self.fill().await;
            }
            parts.push(self.buf[..len].to_vec());
            self.buf.drain(..len + 2);
        }
        let payload = parts.pop().unwrap();
        let channel = String::from_utf8(parts.pop().unwrap()).unwrap();
        (parts.pop().unwrap(), channel, payload)
    }

    /// The next message: channel and envelope.
    async fn envelope(&mut self) -> (String, Envelope) {
        let (kind, channel, payload) = self.next().await;
        assert_eq!(kind, b"message");
        (channel, Envelope::decode(&payload).unwrap())
    }
}

/// A join_group for `client_id` with a request number, answered to node
/// `reply_to`.
fn join_command(client_id: &str, group: &str, req: u64, reply_to: &str, new: bool) -> Vec<u8> {
    let mut e = Envelope::new(Op::JoinGroup);
    e.client_id = Some(client_id.to_owned());
    e.group = Some(group.to_owned());
    e.req = Some(req);
    e.reply_to = Some(reply_to.to_owned());
    e.reply_channel = new;
    e.encode().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_go_where_the_asking_node_reads_them_old_or_new() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let n = nodes(&redis.url(), 1, &[]);
    ready(&n).await;
    let a = Client::connect(&n[0].ws_url("")).await;
    let asker = "7f000001ffff";
    let node_channel = format!("gatecast:node:{asker}");
    let reply_channel = format!("gatecast:node:{asker}:reply");
    let mut rx = Listener::new(&redis, &[node_channel.clone(), reply_channel.clone()]).await;
    let owner = format!("gatecast:node:{}", &a.id[..12]);
    // An asker older than the reply channel sends no flag: one reply per
    // command, with `req`, on its node channel.
    let old = join_command(&a.id, "old", 11, asker, false);
    publish_pipelined(redis.port, &[(owner.clone(), old)]).await;
    let (channel, e) = rx.envelope().await;
    assert_eq!(channel, node_channel);
    assert_eq!(
        (e.op, e.req, e.reqs.len(), e.error),
        (Op::Reply, Some(11), 0, None)
    );
    // A new one asks for its reply channel: replies there, batched.
    let new: Vec<(String, Vec<u8>)> = (100..110)
        .map(|req| (owner.clone(), join_command(&a.id, "new", req, asker, true)))
        .collect();
    publish_pipelined(redis.port, &new).await;
    let mut answered = Vec::new();
    while answered.len() < 10 {
        let (channel, e) = rx.envelope().await;
        assert_eq!(channel, reply_channel);
        assert_eq!((e.op, e.error), (Op::Reply, None));
        answered.extend(e.req.into_iter().chain(e.reqs));
    }
    answered.sort_unstable();
    assert_eq!(answered, (100..110).collect::<Vec<u64>>());

    // The other way round: this node asks an owner older than the reply
    // channel, which ignores the flag and answers on the node channel.
    let old_owner = "7f000001ffee";
    let mut owner_rx = Listener::new(&redis, &[format!("gatecast:node:{old_owner}")]).await;
    let api = n[0].api;
    let call = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("http://{api}/api/bind_uid"))
            .json(&json!({"client_id": format!("{old_owner}00000001"), "uid": "x"}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    let (_, command) = owner_rx.envelope().await;
    assert_eq!(command.op, Op::BindUid);
    assert!(
        command.reply_channel,
        "a new node asks for its reply channel"
    );
    let asked = command.reply_to.clone().unwrap();
    let mut reply = Envelope::new(Op::Reply);
    reply.req = command.req;
    let back = format!("gatecast:node:{asked}");
    publish_pipelined(redis.port, &[(back, reply.encode().to_vec())]).await;
    assert_eq!(call.await.unwrap(), 200, "an old owner's reply is taken");
}

/// Commands a node's Redis client holds unwritten before it fails one at
/// once (`COMMAND_BUFFER` in src/engine/redis/client.rs): one reply per
/// command would fill it with any flood larger than this.
const CLIENT_QUEUE: u64 = 1 << 16;

/// CI size: 2^18 commands owed a reply, four times the client's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_past_the_client_queue_fail_no_unrelated_command() {
    owed_replies_fail_no_unrelated_command(4 * CLIENT_QUEUE).await;
}

/// The size: 2^20 commands (about 25 s in a debug build;
/// `cargo test --test redis_backpressure -- --ignored`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full size: 2^20 commands, about 25 s"]
async fn a_million_replies_fail_no_unrelated_command() {
    owed_replies_fail_no_unrelated_command(1 << 20).await;
}

/// `commands` session writes asking for a reply, all in Redis before the
/// node reads one: calls on the node answer within their deadline while it
/// works them off, and the replies go out in few messages.
async fn owed_replies_fail_no_unrelated_command(commands: u64) {
    let _serial = SERIAL.lock().await;
    let redis = redis_keeping_every_backlog();
    let n = nodes(&redis.url(), 1, &["--node-heartbeat", "10s"]);
    ready(&n).await;
    let a = Client::connect(&n[0].ws_url("")).await;
    let mut d = Client::connect(&n[0].ws_url("")).await;
    n[0].ok("join_group", json!({"client_id": d.id, "group": "room"}))
        .await;
    let asker = "7f000001fffe";
    let reply_channel = format!("gatecast:node:{asker}:reply");
    let mut rx = Listener::new(&redis, &[reply_channel]).await;
    // Commands asking for a reply (session writes: no subscription to
    // wait for), all in Redis before the node reads one: it owes each a
    // reply, to one node.
    let owner = format!("gatecast:node:{}", &a.id[..12]);
    let mut e = Envelope::new(Op::UpdateSession);
    e.client_id = Some(a.id.clone());
    e.session = Some(serde_json::from_value(json!({"k": 1})).unwrap());
    e.reply_to = Some(asker.to_owned());
    e.reply_channel = true;
    let flood: Vec<(String, Vec<u8>)> = (0..commands)
        .map(|req| {
            e.req = Some(req);
            (owner.clone(), e.encode().to_vec())
        })
        .collect();
    n[0].signal("STOP");
    publish_pipelined(redis.port, &flood).await;
    drop(flood);
    n[0].signal("CONT");
    // Meanwhile, unrelated calls on the node answer within their deadline.
    for k in 0..5 {
        let (status, body) = n[0]
            .call(
                "set_session",
                json!({"client_id": d.id, "session": {"k": k}}),
            )
            .await;
        assert_eq!(status, 200, "unrelated call {k}: {body}");
    }
    n[0].ok("send_to_group", json!({"group": "room", "data": "fine"}))
        .await;
    d.expect_text("fine").await;
    // ...while it was still working the flood off: else the calls above
    // proved nothing.
    let received = metric_of(&n[0], "gatecast_pubsub_received_total").await;
    assert!(
        received < commands as f64,
        "the calls came after the flood: {received} of {commands} read"
    );
    // Every command is answered, in few messages.
    let mut answered = 0u64;
    let mut messages = 0u64;
    while answered < commands {
        let (_, e) = rx.envelope().await;
        assert_eq!(e.error, None);
        answered += e.reqs.len() as u64 + u64::from(e.req.is_some());
        messages += 1;
    }
    assert_eq!(answered, commands);
    // At most one message per mirror batch (and per 4,096 commands), not
    // one per command.
    assert!(
        messages * 10 <= commands,
        "{messages} reply messages for {commands} commands"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uid_count_never_blocks_redis_for_every_uid_and_stays_exact() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let n = nodes(&redis.url(), 2, &["--node-heartbeat", "10s"]);
    ready(&n).await;
    let a = Client::connect(&n[0].ws_url("")).await;
    let b = Client::connect(&n[1].ws_url("")).await;
    n[0].ok("bind_uid", json!({"client_id": a.id, "uid": "shared"}))
        .await;
    n[1].ok("bind_uid", json!({"client_id": b.id, "uid": "shared"}))
        .await;
    // Two more (live) nodes' partitions with 100,000 uids each, half of
    // them on both: 150,000 distinct, plus "shared". (A SUNION of them
    // holds Redis for 150 ms or more.)
    for (node, from) in [("7f000001f001", 0), ("7f000001f002", 50_000)] {
        let fill = "for i = tonumber(ARGV[1]), tonumber(ARGV[1]) + 99999 do redis.call('SADD', KEYS[1], 'u' .. i) end";
        let set = format!("gatecast:{{{node}}}:uids");
        redis.cli(&["EVAL", fill, "1", &set, &from.to_string()]);
        let alive = format!("gatecast:{{{node}}}:alive");
        redis.cli(&["SET", &alive, "{}", "EX", "600"]);
        redis.cli(&["SADD", "gatecast:nodes", node]);
    }
    // Any command that holds Redis for 50 ms or more is logged.
    redis.cli(&["CONFIG", "SET", "slowlog-log-slower-than", "50000"]);
    redis.cli(&["SLOWLOG", "RESET"]);
    let count = n[0].ok("get_all_uid_count", json!({})).await;
    assert_eq!(count, 150_001, "exact");
    let slow = redis.cli(&["SLOWLOG", "GET", "5"]);
    assert_eq!(
        redis.cli(&["SLOWLOG", "LEN"]).trim(),
        "0",
        "no command held Redis for 50 ms: {slow}"
    );
}
