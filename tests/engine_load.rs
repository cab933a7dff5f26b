//! The Redis engine under load a real deployment sees: floods of commands,
//! reconnect storms, pushes as fast as Redis takes them, Redis restarting
//! with thousands of connections, two processes claiming one node id, a
//! node leaving while it writes. Every test runs real nodes on a real Redis
//! and ends with exact counts.

mod common;

use std::time::Duration;

use common::redis::RedisServer;
use common::{connect_many, eventually, metric, ready, sorted, Client, Node};
use fred::prelude::*;
use futures_util::stream::{self, StreamExt};
use gatecast_emitter::{Envelope, Op};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// One test at a time: each loads the machine on its own (thousands of
/// clients, two nodes and Redis on two cores), and together they would
/// measure the machine rather than gatecast.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Nodes on one Redis, heartbeat 1 s.
fn nodes(redis: &RedisServer, n: usize, extra: &[&str]) -> Vec<Node> {
    let url = redis.url();
    let mut args = vec!["--redis-url", url.as_str(), "--node-heartbeat", "1s"];
    args.extend_from_slice(extra);
    (0..n).map(|_| Node::start(&args)).collect()
}

async fn fred(redis: &RedisServer) -> fred::clients::Client {
    let config = fred::types::config::Config::from_url(&redis.url()).unwrap();
    let client = fred::types::Builder::from_config(config).build().unwrap();
    client.init().await.unwrap();
    client
}

/// Runs `commands` through one node's batch API, 1,000 per call, two
/// calls at a time; every reply must be a success.
async fn batch_all(node: &Node, commands: Vec<Value>) {
    let calls = commands
        .chunks(1000)
        .map(|chunk| node.call("batch", json!({ "commands": chunk })));
    let answers: Vec<(u16, Value)> = stream::iter(calls).buffer_unordered(2).collect().await;
    for (status, body) in answers {
        assert_eq!(status, 200, "{body}");
        for reply in body["replies"].as_array().unwrap() {
            assert_eq!(reply, &json!({"result": null}), "a command failed");
        }
    }
}

/// The client count of each group, as one node answers it.
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

/// Reads text frames on every client until each has `want`, or until
/// nothing more came for a while. Returns how many each got.
async fn receive_all(clients: Vec<Client>, want: usize) -> Vec<usize> {
    let tasks = clients.into_iter().map(|mut client| {
        tokio::spawn(async move {
            let mut got = 0;
            while got < want {
                // A silence of 30 s after the last frame ends the count:
                // the test then compares it with the drop metric. (A node
                // behind does not drop: the rest waits in Redis, so a
                // client may wait a few seconds for it on a loaded host.)
                match tokio::time::timeout(Duration::from_secs(30), client.stream().next()).await {
                    Ok(Some(Ok(Message::Text(_)))) => got += 1,
                    Ok(Some(Ok(_))) => {}
                    _ => break,
                }
            }
            got
        })
    });
    futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

/// Expects one text frame on each client.
async fn each_gets(clients: &mut [Client], text: &str) {
    for client in clients.iter_mut() {
        client.expect_text(text).await;
    }
}

fn groups(n: usize) -> Vec<String> {
    (0..n).map(|g| format!("g{g}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_commands_published_to_redis_is_applied_whole() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let n = nodes(&redis, 2, &[]);
    ready(&n).await;
    let mut clients = connect_many(&n[0].ws_url(""), 500).await;
    let groups = groups(40);
    // 20,000 join_group commands on the node's channel in one pipelined
    // burst, as a busy backend publishing straight to Redis sends them.
    let node_channel = format!("gatecast:node:{}", &clients[0].id[..12]);
    let fred = fred(&redis).await;
    let mut publishes = Vec::new();
    for client in &clients {
        for group in &groups {
            let mut e = Envelope::new(Op::JoinGroup);
            e.client_id = Some(client.id.clone());
            e.group = Some(group.clone());
            publishes.push(fred.publish::<i64, _, _>(node_channel.clone(), e.encode()));
        }
    }
    for receivers in futures_util::future::join_all(publishes).await {
        assert_eq!(receivers.unwrap(), 1);
    }
    eventually("every join applied and mirrored on every node", || async {
        let mut all = true;
        for node in &n {
            all &= group_counts(node, &groups).await.iter().all(|c| *c == 500);
        }
        all
    })
    .await;
    let dropped = metric(
        &n[0].get_text("/metrics").await,
        "gatecast_pubsub_dropped_total",
    );
    assert_eq!(dropped, 0.0, "no message was dropped");
    // And the node follows every group: a push through the other node
    // reaches all 500 members.
    n[1].ok("send_to_group", json!({"group": "g39", "data": "all here"}))
        .await;
    each_gets(&mut clients, "all here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_joins_through_another_node_is_applied_whole() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let n = nodes(&redis, 2, &[]);
    ready(&n).await;
    let mut clients = connect_many(&n[0].ws_url(""), 250).await;
    let groups = groups(40);
    // 10,000 join_group calls through node 1 for node 0's clients, ten
    // batches of 1,000 at once.
    let mut commands = Vec::new();
    for client in &clients {
        for group in &groups {
            commands.push(json!({"method": "join_group",
                "params": {"client_id": client.id, "group": group}}));
        }
    }
    batch_all(&n[1], commands).await;
    // Answered means applied, mirrored and followed: no waiting needed.
    let mut members: Vec<String> = clients.iter().map(|c| c.id.clone()).collect();
    members.sort();
    for node in &n {
        assert_eq!(group_counts(node, &groups).await, vec![250; 40]);
        let listed = node
            .ok("get_client_id_list_by_group", json!({"group": "g7"}))
            .await;
        assert_eq!(sorted(listed), members);
    }
    n[1].ok("send_to_group", json!({"groups": groups, "data": "once"}))
        .await;
    each_gets(&mut clients, "once").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_of_uids_is_followed_before_the_welcome() {
    let _serial = SERIAL.lock().await;
    use jsonwebtoken::{encode, EncodingKey, Header};
    let redis = RedisServer::start();
    let secret = "a-test-secret-of-some-length";
    let n = nodes(&redis, 2, &["--client-jwt-secret", secret]);
    ready(&n).await;
    let key = EncodingKey::from_secret(secret.as_bytes());
    let exp = 4_000_000_000u64;
    let urls: Vec<String> = (0..2000)
        .map(|i| {
            let claims = json!({"sub": format!("user-{i}"), "exp": exp});
            let token = encode(&Header::default(), &claims, &key).unwrap();
            n[0].ws_url(&format!("?token={token}"))
        })
        .collect();
    // 2,000 clients, each with a uid of its own, connect at once.
    let mut clients: Vec<Client> = stream::iter(urls.iter())
        .map(|url| Client::connect(url))
        .buffer_unordered(200)
        .collect()
        .await;
    // Welcomed means subscribed: a push to every uid through the other
    // node reaches every client.
    let uids: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
    n[1].ok("send_to_uid", json!({"uids": uids, "data": "hello"}))
        .await;
    each_gets(&mut clients, "hello").await;
    assert_eq!(n[1].ok("get_all_uid_count", json!({})).await, 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_as_fast_as_redis_takes_them_arrive_or_are_counted() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let n = nodes(&redis, 2, &[]);
    ready(&n).await;
    let mut clients = Vec::new();
    let mut owners = Vec::new();
    let mut commands = Vec::new();
    for (i, node) in n.iter().enumerate() {
        for client in connect_many(&node.ws_url(""), 1000).await {
            commands.push(json!({"method": "bind_uid",
                "params": {"client_id": client.id, "uid": format!("u{}", clients.len())}}));
            clients.push(client);
            owners.push(i);
        }
    }
    batch_all(&n[0], commands).await;
    let metrics_before: Vec<f64> = futures_util::future::join_all(n.iter().map(|node| async {
        metric(
            &node.get_text("/metrics").await,
            "gatecast_pubsub_dropped_total",
        )
    }))
    .await;
    // 200,000 pushes straight to Redis, 100 per uid, pipelined 10,000 at
    // a time.
    let fred = fred(&redis).await;
    let reader = tokio::spawn(receive_all(clients, 100));
    let mut e = Envelope::new(Op::Push);
    e.data = Some(bytes::Bytes::from_static(b"tick"));
    let body = e.encode();
    for round in 0..20 {
        let publishes = (0..10_000).map(|k| {
            let uid = (round * 10_000 + k) % 2000;
            fred.publish::<i64, _, _>(format!("gatecast:uid:u{uid}"), body.clone())
        });
        for r in futures_util::future::join_all(publishes).await {
            r.unwrap();
        }
    }
    let got = reader.await.unwrap();
    let mut missing = [0usize; 2];
    for (node, got) in owners.iter().zip(&got) {
        missing[*node] += 100 - got;
    }
    for (i, node) in n.iter().enumerate() {
        let dropped = metric(
            &node.get_text("/metrics").await,
            "gatecast_pubsub_dropped_total",
        ) - metrics_before[i];
        assert_eq!(
            missing[i] as f64, dropped,
            "node {i}: what clients missed is exactly what the node counted as dropped"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_gets_thousands_of_connections_back_within_5s() {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let n = nodes(&redis, 2, &[]);
    ready(&n).await;
    let mut clients = Vec::new();
    let mut commands = Vec::new();
    for node in &n {
        for client in connect_many(&node.ws_url(""), 1000).await {
            let i = clients.len();
            commands.push(json!({"method": "bind_uid",
                "params": {"client_id": client.id, "uid": format!("u{i}")}}));
            commands.push(json!({"method": "join_group",
                "params": {"client_id": client.id, "group": format!("g{}", i % 200)}}));
            clients.push(client);
        }
    }
    batch_all(&n[0], commands).await;
    let groups = groups(200);
    let expected = [
        ("get_all_client_count", json!(2000)),
        ("get_all_uid_count", json!(2000)),
    ];
    let port = redis.port;
    redis.stop();
    let restarted = std::time::Instant::now();
    let _redis = RedisServer::start_on(port);
    // SPEC: re-registered within 5 s of reconnecting (the client retries
    // at most every second), queries agreeing on every node.
    let deadline = restarted + Duration::from_secs(7);
    loop {
        let mut agree = true;
        for node in &n {
            for (method, want) in &expected {
                let (status, body) = node.call(method, json!({})).await;
                agree &= status == 200 && &body["result"] == want;
            }
            let groups_seen = node.call("get_all_group_id_list", json!({})).await.1;
            agree &= groups_seen["result"].as_array().map(Vec::len) == Some(200);
            if agree {
                agree &= group_counts(node, &groups).await == vec![10; 200];
            }
        }
        if agree {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "queries did not agree within 5 s of Redis coming back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every group and every uid channel is followed again (a push names
    // at most 100 groups: two pushes, each client in one of them).
    for half in groups.chunks(100) {
        n[1].ok(
            "send_to_group",
            json!({"groups": half, "data": "groups back"}),
        )
        .await;
    }
    each_gets(&mut clients, "groups back").await;
    let uids: Vec<String> = (0..2000).map(|i| format!("u{i}")).collect();
    n[0].ok("send_to_uid", json!({"uids": uids, "data": "uids back"}))
        .await;
    each_gets(&mut clients, "uids back").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_the_same_node_id_refuses_to_serve() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let url = redis.url();
    let port = common::redis::free_port().to_string();
    let inner_a = format!("127.0.0.1:{port}");
    let inner_b = format!("127.0.0.2:{port}");
    let args = |inner: &str| {
        vec![
            "--redis-url".to_owned(),
            url.clone(),
            "--node-heartbeat".into(),
            "1s".into(),
            "--inner-listen".into(),
            inner.to_owned(),
        ]
    };
    let a_args = args(&inner_a);
    let a = Node::start(&a_args.iter().map(String::as_str).collect::<Vec<_>>());
    a.wait_ready().await;
    let client = Client::connect(&a.ws_url("")).await;
    a.ok("join_group", json!({"client_id": client.id, "group": "g"}))
        .await;
    // Same advertised IP (127.0.0.1) and inner port, bound on another
    // loopback address: the same node id on "another host".
    let b_args = args(&inner_b);
    let mut b = Node::start(&b_args.iter().map(String::as_str).collect::<Vec<_>>());
    let status = b.wait_exit(common::WAIT).await;
    assert!(
        !status.success(),
        "the second process must stop: {status:?}"
    );
    // The first one never noticed: its partition is whole.
    assert_eq!(a.get_status(false, "/readyz").await, 200);
    let c = Node::start(&["--redis-url", &url, "--node-heartbeat", "1s"]);
    c.wait_ready().await;
    assert_eq!(
        c.ok("get_client_id_list_by_group", json!({"group": "g"}))
            .await,
        json!([client.id])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_leaving_while_it_writes_leaves_no_key_behind() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    // A long heartbeat: no other node's purge can do the cleanup for it.
    let url = redis.url();
    let mut a = Node::start(&["--redis-url", &url, "--node-heartbeat", "30s"]);
    a.wait_ready().await;
    let clients = connect_many(&a.ws_url(""), 200).await;
    let node_id = clients[0].id[..12].to_owned();
    // Membership writes in flight when the node is told to stop.
    let fred = fred(&redis).await;
    let channel = format!("gatecast:node:{node_id}");
    for client in &clients {
        for g in 0..20 {
            let mut e = Envelope::new(Op::JoinGroup);
            e.client_id = Some(client.id.clone());
            e.group = Some(format!("g{g}"));
            let _: i64 = fred.publish(channel.clone(), e.encode()).await.unwrap();
        }
    }
    a.signal("TERM");
    let status = a.wait_exit(common::WAIT).await;
    assert!(status.success());
    let left = redis.cli(&["--scan", "--pattern", &format!("gatecast:{{{node_id}}}*")]);
    assert_eq!(left, "", "keys left behind");
    let nodes: Vec<String> = fred.smembers("gatecast:nodes").await.unwrap();
    assert!(!nodes.contains(&node_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_all_with_80k_client_ids_answers_in_time() {
    let _serial = SERIAL.lock().await;
    let node = Node::start(&[
        "--api-max-body-bytes",
        "8388608",
        "--max-list-items",
        "100000",
    ]);
    let mut a = Client::connect(&node.ws_url("")).await;
    let mut b = Client::connect(&node.ws_url("")).await;
    let prefix = &a.id[..12];
    // 80,000 ids of this node (all but two offline), listed twice over.
    let mut ids: Vec<String> = (0..80_000u32)
        .map(|i| format!("{prefix}{:08x}", i.wrapping_mul(2_654_435_761)))
        .collect();
    ids.push(a.id.clone());
    ids.push(a.id.clone());
    let (status, body) = node
        .call("send_to_all", json!({"client_ids": ids, "data": "picked"}))
        .await;
    assert_eq!(status, 200, "{body}");
    a.expect_text("picked").await;
    b.send_text(r#"{"type":"ping"}"#).await;
    // b was not listed: the next thing it sees is the pong.
    b.expect_text(r#"{"type":"pong"}"#).await;
}
