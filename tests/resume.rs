//! Resume on any node (docs/recovery.md section 2.1), on real processes: a
//! client that opted in (`/ws?recover=1`) comes back under a new client_id
//! with its uid, groups and session, on another node, after its node was
//! SIGKILLed, drained, or cut off from Redis; a token works once, only with
//! its secret, only within `--resume-window`, and with client auth only for
//! the same `sub`; the in-process engine resumes too; and a thousand
//! clients of a killed node resume at once.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::redis::RedisServer;
use common::{eventually, webhook, within, Client, Node, Seen, WAIT};
use futures_util::StreamExt;
use gatecast::gatewayworker::protocol::{self, cmd, flag, Packet};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// One test at a time: each runs several nodes, kills or cuts one, and
/// waits on purges; side by side on two cores they would stretch each
/// other's bounds.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Short, so a purge (liveness TTL 2 heartbeats, then a purge round) comes
/// within a few seconds.
const HEARTBEAT: Duration = Duration::from_secs(1);

fn node(redis_url: &str, extra: &[&str]) -> Node {
    let mut args = vec!["--redis-url", redis_url, "--node-heartbeat", "1s"];
    args.extend_from_slice(extra);
    Node::start(&args)
}

/// Connects to `node` opted in to recovery, with more of the query.
async fn opt_in(node: &Node, query: &str) -> (Client, Value) {
    Client::connect_welcome(&node.ws_url(&format!("?recover=1{query}"))).await
}

/// The resume token of a welcome.
fn token(welcome: &Value) -> String {
    let token = welcome["resume"].as_str();
    token
        .unwrap_or_else(|| panic!("no resume token in the welcome {welcome}"))
        .to_owned()
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

/// Gives `id` a uid, two groups and a session, through `api`.
async fn give_state(api: &Node, id: &str, uid: &str) {
    batch_ok(
        api,
        vec![
            json!({"method": "bind_uid", "params": {"client_id": id, "uid": uid}}),
            json!({"method": "join_group", "params": {"client_id": id, "group": "room1"}}),
            json!({"method": "join_group", "params": {"client_id": id, "group": "room2"}}),
            json!({"method": "set_session", "params": {"client_id": id, "session": {"name": uid, "n": 7}}}),
        ],
    )
    .await;
}

/// What `api` answers about `id`: uid, room1 and room2 members, session.
async fn state_of(api: &Node, id: &str) -> (Value, Vec<String>, Vec<String>, Value) {
    let uid = api
        .ok("get_uid_by_client_id", json!({"client_id": id}))
        .await;
    let room1 = api
        .ok("get_client_id_list_by_group", json!({"group": "room1"}))
        .await;
    let room2 = api
        .ok("get_client_id_list_by_group", json!({"group": "room2"}))
        .await;
    let session = api.ok("get_session", json!({"client_id": id})).await;
    (uid, common::sorted(room1), common::sorted(room2), session)
}

/// `api` sees `id` with exactly the state [`give_state`] gave the
/// connection it resumed, and nothing else in the rooms.
async fn assert_restored(api: &Node, id: &str, uid: &str) {
    let (got_uid, room1, room2, session) = state_of(api, id).await;
    assert_eq!(got_uid, json!(uid), "uid of {id}");
    assert_eq!(room1, vec![id.to_owned()], "room1");
    assert_eq!(room2, vec![id.to_owned()], "room2");
    assert_eq!(session, json!({"name": uid, "n": 7}), "session of {id}");
    let by_uid = api.ok("get_client_id_by_uid", json!({"uid": uid})).await;
    assert_eq!(
        common::sorted(by_uid),
        vec![id.to_owned()],
        "clients of {uid}"
    );
}

/// The payload of a push frame: after the header line when there is one
/// (pushes to opted-in connections may carry a `<header>\n` framing).
fn payload(seen: Seen) -> String {
    match seen {
        Seen::Text(t) => match t.split_once('\n') {
            Some((_, rest)) => rest.to_owned(),
            None => t,
        },
        other => panic!("expected a push, got {other:?}"),
    }
}

/// Pushes to `uid`, room1 and room2 through `api` reach `client`, a
/// connection that came back with a token: `recovered` first (every such
/// connection hears it; nothing keeps history here, so it lists nothing).
async fn pushes_reach(api: &Node, client: &mut Client, uid: &str) {
    match client.next().await {
        Seen::Text(t) => assert_eq!(t, r#"{"type":"recovered","streams":{}}"#),
        other => panic!("expected recovered, got {other:?}"),
    }
    api.ok("send_to_uid", json!({"uid": uid, "data": "to-uid"}))
        .await;
    api.ok(
        "send_to_group",
        json!({"group": "room1", "data": "to-room1"}),
    )
    .await;
    api.ok(
        "send_to_group",
        json!({"group": "room2", "data": "to-room2"}),
    )
    .await;
    assert_eq!(payload(client.next().await), "to-uid");
    assert_eq!(payload(client.next().await), "to-room1");
    assert_eq!(payload(client.next().await), "to-room2");
}

async fn is_online(api: &Node, id: &str) -> bool {
    api.ok("is_online", json!({"client_id": id})).await == json!(true)
}

/// The close frame a client gets next: code and reason.
async fn close_frame(client: &mut Client, limit: Duration) -> (u16, String) {
    loop {
        let item = tokio::time::timeout(limit, client.stream().next())
            .await
            .expect("a close frame in time");
        match item {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string())
            }
            Some(Ok(Message::Close(None))) => return (1005, String::new()),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// The events stream holds a `resumed` event from `old` to `new`.
fn resumed_event_in(redis: &RedisServer, old: &str, new: &str) -> bool {
    let out = redis.cli(&["XRANGE", "gatecast:events", "-", "+"]);
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    lines.contains(&"resumed")
        && lines
            .windows(2)
            .any(|w| w[0] == "old_client_id" && w[1] == old)
        && lines
            .windows(2)
            .any(|w| w[0] == "new_client_id" && w[1] == new)
}

/// Three nodes on `redis`: A holds the client first, B takes it back, C
/// answers the API (so every push and query crosses Redis).
fn three(redis: &RedisServer, extra: &[&str]) -> Vec<Node> {
    (0..3).map(|_| node(&redis.url(), extra)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_a_killed_node_resumes_on_another_with_its_membership() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes = three(&redis, &["--events"]);
    common::ready(&nodes).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    let (client, welcome) = opt_in(a, "").await;
    assert!(welcome.get("resumed").is_none(), "{welcome}");
    let (old, resume) = (client.id.clone(), token(&welcome));
    assert!(resume.len() <= 64 && !resume.contains(&old), "{resume}");
    give_state(c, &old, "alice").await;

    a.signal("KILL");
    // Purged: the old client_id is gone everywhere; its record outlives it.
    within("A's connection purged", HEARTBEAT * 8, || async {
        !is_online(c, &old).await
    })
    .await;
    drop(client);

    let (mut back, welcome) = opt_in(b, &format!("&resume={resume}")).await;
    assert_eq!(welcome["resumed"], json!(true), "{welcome}");
    assert_ne!(back.id, old);
    assert_ne!(
        token(&welcome),
        resume,
        "a new token for the new connection"
    );
    assert_restored(c, &back.id, "alice").await;
    pushes_reach(c, &mut back, "alice").await;
    assert!(!is_online(c, &old).await);
    eventually("a resumed event in the events stream", || async {
        resumed_event_in(&redis, &old, &back.id)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_a_drained_node_resumes_on_another_with_its_membership() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let mut nodes = three(&redis, &[]);
    common::ready(&nodes).await;

    let (mut client, welcome) = opt_in(&nodes[0], "").await;
    let (old, resume) = (client.id.clone(), token(&welcome));
    give_state(&nodes[2], &old, "bob").await;

    nodes[0].signal("TERM");
    assert_eq!(client.next().await, Seen::Close(Some(1001)));
    nodes[0].wait_exit(WAIT).await;
    drop(client);

    let (b, c) = (&nodes[1], &nodes[2]);
    let (mut back, welcome) = opt_in(b, &format!("&resume={resume}")).await;
    assert_eq!(welcome["resumed"], json!(true), "{welcome}");
    assert!(!is_online(c, &old).await, "the drained node left");
    assert_restored(c, &back.id, "bob").await;
    pushes_reach(c, &mut back, "bob").await;
    drop(nodes.remove(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_from_redis_closes_its_opted_in_clients_which_resume_elsewhere() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port).await;
    // A grace longer than the test: clients that did not opt in stay
    // within it (past it every client goes: tests/netns.rs).
    let nodes = vec![
        node(&proxy.url(), &["--redis-lost-grace", "120s"]),
        node(&redis.url(), &[]),
        node(&redis.url(), &[]),
    ];
    common::ready(&nodes).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    let (mut client, welcome) = opt_in(a, "").await;
    let (old, resume) = (client.id.clone(), token(&welcome));
    give_state(c, &old, "carol").await;
    // A client that did not opt in: it stays within --redis-lost-grace.
    let mut plain = Client::connect(&a.ws_url("")).await;
    c.ok(
        "join_group",
        json!({"client_id": plain.id, "group": "plain"}),
    )
    .await;

    proxy.set(false, false);
    let cut = Instant::now();
    let (code, reason) = close_frame(&mut client, HEARTBEAT * 12).await;
    assert_eq!(code, 1001, "{reason}");
    let reason: Value = serde_json::from_str(&reason).expect("a JSON reason");
    assert_eq!(reason["reason"], "redis_lost");
    let retry_ms = reason["retry_ms"].as_u64().expect("retry_ms");
    assert!((1..=10_000).contains(&retry_ms), "{retry_ms}");
    // Not before the others could have purged it (liveness TTL).
    assert!(cut.elapsed() >= HEARTBEAT * 2, "{:?}", cut.elapsed());
    drop(client);

    let (mut back, welcome) = opt_in(b, &format!("&resume={resume}")).await;
    assert_eq!(welcome["resumed"], json!(true), "{welcome}");
    assert_restored(c, &back.id, "carol").await;
    pushes_reach(c, &mut back, "carol").await;

    // The link comes back: the client that did not opt in was kept, and is
    // written back and reachable again.
    proxy.set(true, true);
    let plain_id = plain.id.clone();
    within("A writes its plain client back", HEARTBEAT * 15, || async {
        let members = c
            .ok("get_client_id_list_by_group", json!({"group": "plain"}))
            .await;
        common::sorted(members) == vec![plain_id.clone()]
    })
    .await;
    c.ok(
        "send_to_group",
        json!({"group": "plain", "data": "still here"}),
    )
    .await;
    assert_eq!(payload(plain.next().await), "still here");
    assert!(!is_online(c, &old).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_works_once_with_its_secret_within_the_window() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes: Vec<Node> = (0..2)
        .map(|_| node(&redis.url(), &["--resume-window", "3s"]))
        .collect();
    common::ready(&nodes).await;
    token_rules(&nodes[0], &nodes[1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_engine_keeps_the_same_token_rules() {
    let _serial = SERIAL.lock().await;
    let n = Node::start(&["--resume-window", "3s"]);
    token_rules(&n, &n).await;
}

/// Single use, forged tokens, the window: clients connect to `a` and
/// resume on `b` (the same node on the in-process engine).
async fn token_rules(a: &Node, b: &Node) {
    // Closed by the client: the record stays for the window.
    let (client, welcome) = opt_in(a, "").await;
    let resume = token(&welcome);
    give_state(b, &client.id, "dora").await;
    client.close().await;
    let (first, welcome) = opt_in(b, &format!("&resume={resume}")).await;
    assert_eq!(welcome["resumed"], json!(true), "{welcome}");
    assert_restored(b, &first.id, "dora").await;

    // Used twice: a fresh connection, nothing restored.
    let (second, welcome) = opt_in(a, &format!("&resume={resume}")).await;
    assert_eq!(welcome["resumed"], json!(false), "{welcome}");
    assert_eq!(
        b.ok("get_uid_by_client_id", json!({"client_id": second.id}))
            .await,
        Value::Null
    );
    assert_restored(b, &first.id, "dora").await;

    // Forged: the right record with another secret. Consumes nothing.
    let real = token(&welcome);
    let last = real.chars().last().unwrap();
    let forged = format!(
        "{}{}",
        &real[..real.len() - 1],
        if last == 'A' { 'B' } else { 'A' }
    );
    let (_, welcome) = opt_in(a, &format!("&resume={forged}")).await;
    assert_eq!(welcome["resumed"], json!(false), "{welcome}");
    let (_, welcome) = opt_in(a, "&resume=not-a-token").await;
    assert_eq!(welcome["resumed"], json!(false), "{welcome}");
    second.close().await;
    let (_, welcome) = opt_in(b, &format!("&resume={real}")).await;
    assert_eq!(welcome["resumed"], json!(true), "the real one still works");

    // Past the window: gone.
    let (late, welcome) = opt_in(a, "").await;
    let resume = token(&welcome);
    b.ok("bind_uid", json!({"client_id": late.id, "uid": "eve"}))
        .await;
    late.close().await;
    // The window is a TTL in Redis: nothing to wait on but time.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let (fresh, welcome) = opt_in(b, &format!("&resume={resume}")).await;
    assert_eq!(welcome["resumed"], json!(false), "{welcome}");
    assert_eq!(
        b.ok("get_client_id_by_uid", json!({"uid": "eve"})).await,
        json!([])
    );
    drop(fresh);
    let metrics = a.get_text("/metrics").await;
    assert!(
        metrics.contains("gatecast_resumes_total{result=\"used\"} 1"),
        "{metrics}"
    );
}

/// Commands Redis has run so far (`INFO commandstats`), scripts' own calls
/// included.
fn redis_commands(redis: &RedisServer) -> u64 {
    redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

const SECRET: &str = "resume-test-jwt-secret";

/// An HS256 token for `sub`, valid for an hour.
fn jwt(sub: &str) -> String {
    common::hs256_token(SECRET, json!({"sub": sub}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_auth_only_the_same_sub_resumes() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes: Vec<Node> = (0..2)
        .map(|_| node(&redis.url(), &["--client-jwt-secret", SECRET]))
        .collect();
    common::ready(&nodes).await;
    let (a, b) = (&nodes[0], &nodes[1]);

    let (client, welcome) = opt_in(a, &format!("&token={}", jwt("alice"))).await;
    let resume = token(&welcome);
    b.ok(
        "join_group",
        json!({"client_id": client.id, "group": "secret"}),
    )
    .await;
    client.close().await;

    let query = format!("&token={}&resume={resume}", jwt("mallory"));
    let (other, welcome) = opt_in(b, &query).await;
    assert_eq!(welcome["resumed"], json!(false), "{welcome}");
    let uid = b
        .ok("get_uid_by_client_id", json!({"client_id": other.id}))
        .await;
    assert_eq!(uid, json!("mallory"), "what its own JWT grants");
    let members = b
        .ok("get_client_id_list_by_group", json!({"group": "secret"}))
        .await;
    assert_eq!(members, json!([]));

    // Without a valid JWT there is no connection at all.
    let refused =
        common::Client::try_connect(&b.ws_url(&format!("?recover=1&resume={resume}")), &[]).await;
    assert!(refused.is_err(), "no token, no connection");

    let query = format!("&token={}&resume={resume}", jwt("alice"));
    let (back, welcome) = opt_in(b, &query).await;
    assert_eq!(welcome["resumed"], json!(true), "{welcome}");
    let members = b
        .ok("get_client_id_list_by_group", json!({"group": "secret"}))
        .await;
    assert_eq!(members, json!([back.id]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_engine_resumes_on_the_same_node() {
    let _serial = SERIAL.lock().await;
    let (hook, mut events) = webhook().await;
    let n = Node::start(&["--events", "--events-webhook", &hook]);
    let (client, welcome) = opt_in(&n, "").await;
    let (old, resume) = (client.id.clone(), token(&welcome));
    give_state(&n, &old, "frank").await;
    client.close().await;

    let (mut back, welcome) = opt_in(&n, &format!("&resume={resume}")).await;
    assert_eq!(welcome["resumed"], json!(true), "{welcome}");
    assert_restored(&n, &back.id, "frank").await;
    pushes_reach(&n, &mut back, "frank").await;
    let new = back.id.clone();
    let event = tokio::time::timeout(WAIT, async {
        loop {
            let event = events.recv().await.expect("the webhook runs");
            if event["type"] == "resumed" {
                return event;
            }
        }
    })
    .await
    .expect("a resumed event");
    assert_eq!(event["old_client_id"], json!(old));
    assert_eq!(event["new_client_id"], json!(new));
    assert_eq!(event["client_id"], json!(new));
    assert_eq!(event["uid"], json!("frank"));

    // A connection still open is taken over: its token resumes it, and
    // the old connection is closed.
    let resume = token(&welcome);
    let (third, welcome) = opt_in(&n, &format!("&resume={resume}")).await;
    assert_eq!(welcome["resumed"], json!(true), "{welcome}");
    assert_eq!(back.next().await, Seen::Close(Some(1000)));
    eventually("the old connection is gone", || async {
        !is_online(&n, &new).await
    })
    .await;
    assert_restored(&n, &third.id, "frank").await;
    let (_, welcome) = opt_in(&n, &format!("&resume={resume}")).await;
    assert_eq!(welcome["resumed"], json!(false), "used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_of_a_killed_node_resume_at_once_on_another() {
    let _serial = SERIAL.lock().await;
    const N: usize = 1000;
    let redis = RedisServer::start();
    let nodes: Vec<Node> = (0..2).map(|_| node(&redis.url(), &[])).collect();
    common::ready(&nodes).await;
    let (a, b) = (&nodes[0], &nodes[1]);

    let url = a.ws_url("?recover=1");
    let opened: Vec<(Client, Value)> = futures_util::stream::iter(0..N)
        .map(|_| Client::connect_welcome(&url))
        .buffer_unordered(100)
        .collect()
        .await;
    let mut commands = Vec::new();
    let mut tokens = Vec::new();
    for (i, (client, welcome)) in opened.iter().enumerate() {
        let (uid, group) = (format!("u{i}"), format!("g{}", i % 10));
        commands
            .push(json!({"method": "bind_uid", "params": {"client_id": client.id, "uid": uid}}));
        commands.push(
            json!({"method": "join_group", "params": {"client_id": client.id, "group": group}}),
        );
        tokens.push(token(welcome));
    }
    batch_ok(b, commands).await;

    // Killed, and every client back at once, before A is even purged.
    a.signal("KILL");
    drop(opened);
    let commands_before = redis_commands(&redis);
    let started = Instant::now();
    let url = b.ws_url("?recover=1&resume=");
    let back: Vec<(usize, Client, Value)> = futures_util::stream::iter(tokens.iter().enumerate())
        .map(|(i, t)| {
            let url = format!("{url}{t}");
            async move {
                let (client, welcome) = Client::connect_welcome(&url).await;
                (i, client, welcome)
            }
        })
        .buffer_unordered(N)
        .collect()
        .await;
    let took = started.elapsed();
    let commands = redis_commands(&redis) - commands_before;
    // For the record (docs): everything Redis ran meanwhile, heartbeats and
    // purges included, per resume.
    eprintln!(
        "{N} resumes took {took:?}: {:.0}/s, {:.2} Redis commands per resume",
        N as f64 / took.as_secs_f64(),
        commands as f64 / N as f64
    );
    let refused = back
        .iter()
        .filter(|(_, _, w)| w["resumed"] != json!(true))
        .count();
    assert_eq!(refused, 0, "every client resumed");

    let mut queries = Vec::new();
    for (_, client, _) in &back {
        queries.push(json!({"method": "get_uid_by_client_id", "params": {"client_id": client.id}}));
    }
    for chunk_start in (0..N).step_by(500) {
        let chunk = &queries[chunk_start..(chunk_start + 500).min(N)];
        let (status, body) = b.call("batch", json!({ "commands": chunk })).await;
        assert_eq!(status, 200, "{body}");
        for (k, reply) in body["replies"].as_array().unwrap().iter().enumerate() {
            let (i, _, _) = &back[chunk_start + k];
            assert_eq!(reply["result"], json!(format!("u{i}")), "client {i}");
        }
    }
    within(
        "A purged: each group holds its resumed members only",
        HEARTBEAT * 8,
        || async {
            let mut all = true;
            for g in 0..10 {
                let count = b
                    .ok(
                        "get_client_count_by_group",
                        json!({"group": format!("g{g}")}),
                    )
                    .await;
                all &= count == json!(N / 10);
            }
            all
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_cluster_a_live_connection_is_taken_over_from_another_node() {
    let _serial = SERIAL.lock().await;
    let cluster = common::redis::RedisCluster::start();
    let nodes: Vec<Node> = (0..2).map(|_| node(&cluster.url(), &[])).collect();
    common::ready(&nodes).await;
    let (a, b) = (&nodes[0], &nodes[1]);

    let (mut old, welcome) = opt_in(a, "").await;
    let resume = token(&welcome);
    give_state(b, &old.id, "gina").await;
    // Its client believes it lost the connection; A does not know yet.
    let (mut back, welcome) = opt_in(b, &format!("&resume={resume}")).await;
    assert_eq!(welcome["resumed"], json!(true), "{welcome}");
    assert_eq!(old.next().await, Seen::Close(Some(1000)), "taken over");
    let old_id = old.id.clone();
    eventually("the old connection is gone", || async {
        !is_online(a, &old_id).await
    })
    .await;
    assert_restored(a, &back.id, "gina").await;
    pushes_reach(a, &mut back, "gina").await;
    // A wrote the old connection's removal after the resume: the record
    // stays spent.
    let (_, welcome) = opt_in(a, &format!("&resume={resume}")).await;
    assert_eq!(welcome["resumed"], json!(false), "{welcome}");
}

/// An HS256 token for `sub` with groups and a session, valid for an hour.
fn jwt_with(sub: &str, groups: &[&str], session: Value) -> String {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "exp": exp, "groups": groups, "session": session}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
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
async fn every_path_that_changes_membership_writes_the_record() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes: Vec<Node> = (0..2)
        .map(|_| node(&redis.url(), &["--client-jwt-secret", SECRET]))
        .collect();
    common::ready(&nodes).await;
    let (a, b) = (&nodes[0], &nodes[1]);

    // The JWT's claims at connect.
    let claims = jwt_with("hana", &["jwt-room"], json!({"from": "jwt"}));
    let (client, welcome) = opt_in(a, &format!("&token={claims}")).await;
    let (id, resume) = (client.id.clone(), token(&welcome));
    // A command published straight to Redis.
    let fred = fred::types::Builder::from_config(
        fred::types::config::Config::from_url(&redis.url()).unwrap(),
    )
    .build()
    .unwrap();
    fred::interfaces::ClientLike::init(&fred).await.unwrap();
    let emitter = gatecast_emitter::Emitter::new(fred, "gatecast");
    emitter.join_group(&id, "redis-room").await.unwrap();
    emitter.join_group(&id, "temp").await.unwrap();
    // The GatewayWorker inner port.
    let conn = u32::from_str_radix(&id[12..], 16).unwrap();
    let mut join = Packet::new(cmd::JOIN_GROUP);
    join.connection_id = conn;
    join.flag = flag::BODY_IS_SCALAR;
    join.ext_data = bytes::Bytes::from_static(b"inner-room");
    send_inner(a.inner, &[join]).await;
    // The API, on the other node.
    let groups = || async {
        common::sorted(
            b.ok("get_client_id_list_by_group", json!({"group": "temp"}))
                .await,
        ) == vec![id.clone()]
            && common::sorted(
                b.ok(
                    "get_client_id_list_by_group",
                    json!({"group": "inner-room"}),
                )
                .await,
            ) == vec![id.clone()]
    };
    eventually("the published and inner-port joins are applied", groups).await;
    b.ok("leave_group", json!({"client_id": id, "group": "temp"}))
        .await;
    b.ok(
        "update_session",
        json!({"client_id": id, "session": {"api": 1}}),
    )
    .await;

    a.signal("KILL");
    drop(client);
    let plain = jwt("hana");
    let (back, welcome) = opt_in(b, &format!("&token={plain}&resume={resume}")).await;
    assert_eq!(welcome["resumed"], json!(true), "{welcome}");
    let mut groups = Vec::new();
    for g in ["jwt-room", "redis-room", "inner-room", "temp"] {
        let members = b
            .ok("get_client_id_list_by_group", json!({"group": g}))
            .await;
        if common::sorted(members).contains(&back.id) {
            groups.push(g);
        }
    }
    assert_eq!(groups, ["jwt-room", "redis-room", "inner-room"]);
    let session = b.ok("get_session", json!({"client_id": back.id})).await;
    assert_eq!(session, json!({"from": "jwt", "api": 1}));
    let uid = b
        .ok("get_uid_by_client_id", json!({"client_id": back.id}))
        .await;
    assert_eq!(uid, json!("hana"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_worker_hears_of_the_resume() {
    let _serial = SERIAL.lock().await;
    const KEY: &str = "resume-test-gateway-key";
    let n = Node::start(&["--gateway-secret-key", KEY]);
    let mut worker = TcpStream::connect(n.inner).await.unwrap();
    let mut hello = Packet::new(cmd::WORKER_CONNECT);
    hello.flag = flag::BODY_IS_SCALAR;
    hello.body = bytes::Bytes::from(json!({"worker_key": "w:0", "secret_key": KEY}).to_string());
    worker.write_all(&protocol::encode(&hello)).await.unwrap();
    eventually("the worker is connected", || async {
        common::metric(&n.get_text("/metrics").await, "gatecast_workers") == 1.0
    })
    .await;

    let (client, welcome) = opt_in(&n, "").await;
    let (old, resume) = (client.id.clone(), token(&welcome));
    client.close().await;
    let (back, welcome) = opt_in(&n, &format!("&resume={resume}")).await;
    assert_eq!(welcome["resumed"], json!(true), "{welcome}");

    let mut buf = bytes::BytesMut::new();
    let resumed = tokio::time::timeout(WAIT, async {
        loop {
            while let Some(p) = protocol::decode(&mut buf, 1 << 24).unwrap() {
                if p.cmd == cmd::ON_RESUMED {
                    return p;
                }
            }
            assert!(worker.read_buf(&mut buf).await.unwrap() > 0, "closed");
        }
    })
    .await
    .expect("an ON_RESUMED packet");
    assert_eq!(&resumed.body[..], old.as_bytes());
    let number = u32::from_str_radix(&back.id[12..], 16).unwrap();
    assert_eq!(resumed.connection_id, number, "about the new connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_left_without_expiry_by_an_older_purge_are_swept() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes: Vec<Node> = (0..2).map(|_| node(&redis.url(), &[])).collect();
    common::ready(&nodes).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let (client, welcome) = opt_in(a, "").await;
    let resume = token(&welcome);
    b.ok("bind_uid", json!({"client_id": client.id, "uid": "ida"}))
        .await;
    let node_id = client.id[..12].to_owned();

    // A dies and a node of a version without resume records purges it: the
    // partition goes, its `:rs` and records stay, without expiry.
    a.signal("KILL");
    let partition = format!("gatecast:{{{node_id}}}");
    redis.cli(&["SREM", "gatecast:nodes", &node_id]);
    let keys = redis.cli(&["--scan", "--pattern", &format!("{partition}*")]);
    let records: Vec<&str> = keys.lines().filter(|k| k.contains("}:r:")).collect();
    assert_eq!(records.len(), 1, "{keys}");
    for key in keys.lines() {
        if !key.ends_with(":rs") && !key.contains("}:r:") {
            redis.cli(&["DEL", key]);
        }
    }
    assert_eq!(redis.cli(&["TTL", records[0]]).trim(), "-1");

    // The orphan sweep (every 10 heartbeats) gives them their expiry.
    within("the record expires", HEARTBEAT * 25, || async {
        redis
            .cli(&["TTL", records[0]])
            .trim()
            .parse::<i64>()
            .unwrap_or(-1)
            > 0
    })
    .await;
    assert_eq!(
        redis.cli(&["EXISTS", &format!("{partition}:rs")]).trim(),
        "0"
    );
    drop(client);
    let (_, welcome) = opt_in(b, &format!("&resume={resume}")).await;
    assert_eq!(welcome["resumed"], json!(true), "within the window still");
}

/// The consume script on a real Redis: once per token, but the attempt
/// that consumed it may ask again (its answer lost in a timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consume_whose_answer_was_lost_can_be_asked_again_by_its_attempt() {
    const SCRIPT: &str = include_str!("../src/engine/redis/scripts/take_resume.lua");
    let redis = RedisServer::start();
    let p = "gatecast:{7f0000010b54}";
    let record = format!("{p}:r:rec1");
    redis.cli(&[
        "HSET",
        &record,
        "d",
        "digest",
        "c",
        "7f0000010b5400000001",
        "u",
        "una",
        "g",
        r#"["room"]"#,
        "s",
        "{}",
    ]);
    redis.cli(&["HSET", &format!("{p}:rs"), "7f0000010b5400000001", "rec1"]);
    let take = |digest: &str, attempt: &str| {
        redis.cli(&[
            "EVAL", SCRIPT, "1", p, "rec1", digest, "60000", "0", "", attempt,
        ])
    };
    assert!(
        take("wrong", "a1").starts_with("forged"),
        "{}",
        take("wrong", "a1")
    );
    let first = take("digest", "a1");
    assert!(
        first.starts_with("ok\n7f0000010b5400000001\nuna"),
        "{first}"
    );
    assert_eq!(take("digest", "a1"), first, "the same attempt again");
    assert_eq!(take("digest", "a2").trim(), "used", "another attempt");
    let ttl: i64 = redis.cli(&["PTTL", &record]).trim().parse().unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
    assert_eq!(
        redis
            .cli(&["HGET", &format!("{p}:rs"), "7f0000010b5400000001"])
            .trim(),
        ""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_come_back_when_redis_restarts_empty() {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let port = redis.port;
    let nodes: Vec<Node> = (0..3).map(|_| node(&redis.url(), &[])).collect();
    common::ready(&nodes).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let (client, welcome) = opt_in(a, "").await;
    let (old, resume) = (client.id.clone(), token(&welcome));
    give_state(c, &old, "jon").await;

    // Redis loses everything; A writes its connections back, records too.
    redis.stop();
    let redis = RedisServer::start_on(port);
    common::ready(&nodes).await;
    within("A's client is back in Redis", WAIT, || async {
        let by_uid = c.ok("get_client_id_by_uid", json!({"uid": "jon"})).await;
        common::sorted(by_uid) == vec![old.clone()]
    })
    .await;

    a.signal("KILL");
    drop(client);
    let (mut back, welcome) = opt_in(b, &format!("&resume={resume}")).await;
    assert_eq!(welcome["resumed"], json!(true), "{welcome}");
    within("A's connection purged", HEARTBEAT * 8, || async {
        !is_online(c, &old).await
    })
    .await;
    assert_restored(c, &back.id, "jon").await;
    pushes_reach(c, &mut back, "jon").await;
    drop(redis);
}
