//! Recovery end to end (docs/recovery.md, issue 27): resume token AND
//! positions together, as gatecast.js sends them
//! (`/ws?recover=1&resume=<token>&pos=<b64>`), on real nodes sharing a real
//! Redis. A client bound to a uid and joined to a group through the API (no
//! JWT) loses its node (SIGKILL, drain, Redis link cut) while pushes go on
//! through another; it resumes elsewhere and gets exactly what it missed,
//! in order, then live pushes, then `recovered`. And a rolling restart of a
//! whole cluster under a steady push rate loses nothing and doubles
//! nothing for any client.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use common::proxy::Proxy;
use common::recovery::{Got, Recovering};
use common::redis::RedisServer;
use common::{eventually, Node, WAIT};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::watch;

/// One test at a time: each runs several nodes and kills, drains or cuts
/// one; side by side on two cores they would stretch each other's bounds.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How the client's node goes away.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// SIGKILL: the connection breaks, nothing is said.
    Kill,
    /// SIGTERM: the node drains, 1001.
    Drain,
    /// The node's Redis link blackholed: it closes opted-in clients with
    /// 1001 `redis_lost` after ~2.5 heartbeats.
    Cut,
}

/// How history is asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kept {
    /// `--history-streams u:,g:` on every node.
    ByPrefix,
    /// `"history": true` on each push.
    PerPush,
}

fn node(redis_url: &str, kept: Kept) -> Node {
    let mut args = vec!["--redis-url", redis_url, "--node-heartbeat", "1s"];
    if kept == Kept::ByPrefix {
        args.extend(["--history-streams", "u:,g:"]);
    }
    Node::start(&args)
}

async fn send(api: &Node, kept: Kept, method: &str, mut params: Value) {
    if kept == Kept::PerPush {
        params["history"] = json!(true);
    }
    api.ok(method, params).await;
}

/// Push number `i` to the uid and to the group.
async fn missed(c: &Node, kept: Kept, i: u64) {
    let uid = json!({"uid": "ann", "data": format!("u{i}")});
    send(c, kept, "send_to_uid", uid).await;
    let group = json!({"group": "crew", "data": format!("g{i}")});
    send(c, kept, "send_to_group", group).await;
}

/// Node A holds the client (through a proxy to Redis for [`Fault::Cut`]),
/// B takes it back, C answers the API: every push and membership change
/// crosses Redis.
async fn missed_while_away(fault: Fault, kept: Kept) {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port).await;
    let a_url = if fault == Fault::Cut {
        proxy.url()
    } else {
        redis.url()
    };
    let mut a = node(&a_url, kept);
    let b = node(&redis.url(), kept);
    let c = node(&redis.url(), kept);
    for n in [&a, &b, &c] {
        n.wait_ready().await;
    }

    // Bound and joined through the API on another node: no JWT.
    let mut client = Recovering::connect(&a).await;
    let old = client.client.id.clone();
    c.ok("bind_uid", json!({"client_id": old, "uid": "ann"}))
        .await;
    c.ok("join_group", json!({"client_id": old, "group": "crew"}))
        .await;
    eventually("ann online and in crew, seen from C", || async {
        c.ok("is_uid_online", json!({"uid": "ann"})).await == true
            && c.ok("get_client_count_by_group", json!({"group": "crew"}))
                .await
                == 1
    })
    .await;
    send(&c, kept, "send_to_uid", json!({"uid": "ann", "data": "u0"})).await;
    send(
        &c,
        kept,
        "send_to_group",
        json!({"group": "crew", "data": "g0"}),
    )
    .await;
    let mut first: Vec<String> = vec![client.push().await.text(), client.push().await.text()];
    first.sort();
    assert_eq!(first, ["g0", "u0"]);
    assert_eq!(client.pos["u:ann"].1, 1);
    assert_eq!(client.pos["g:crew"].1, 1);

    match fault {
        Fault::Kill => {
            a.signal("KILL");
            a.wait_exit(WAIT).await;
            let got = client.next().await;
            assert!(matches!(got, Got::Gone(_) | Got::Closed(..)), "{got:?}");
            for i in 1..=25 {
                missed(&c, kept, i).await;
            }
        }
        Fault::Drain => {
            a.signal("TERM");
            let got = client.next().await;
            assert!(matches!(got, Got::Closed(1001, _)), "{got:?}");
            for i in 1..=25 {
                missed(&c, kept, i).await;
            }
            a.wait_exit(WAIT).await;
        }
        Fault::Cut => {
            // The client stays connected to A while the pushes go out: A
            // cannot deliver them (its subscriber is cut), and closes it.
            proxy.set(false, false);
            for i in 1..=25 {
                missed(&c, kept, i).await;
            }
            let got = client.next_within(Duration::from_secs(15)).await;
            match &got {
                Got::Closed(1001, reason) => {
                    let reason: Value = serde_json::from_str(reason).expect("a JSON reason");
                    assert_eq!(reason["reason"], "redis_lost");
                }
                other => panic!("expected 1001 redis_lost, got {other:?}"),
            }
            // As gatecast.js: come back after retry_ms, not before.
            let retry_ms = got.retry_ms().expect("retry_ms in the reason");
            assert!(retry_ms <= 10_000, "{retry_ms}");
            tokio::time::sleep(Duration::from_millis(retry_ms)).await;
        }
    }

    client.resume(&b).await;
    let new = client.client.id.clone();
    assert_ne!(new, old);
    // Exactly the 50 missed, streams in name order, each in offset order.
    let mut got = Vec::new();
    for _ in 0..50 {
        let p = client.push().await;
        got.push((p.stream().to_owned(), p.offset(), p.text()));
    }
    let want: Vec<_> = (1..=25)
        .map(|i| ("g:crew".to_owned(), i + 1, format!("g{i}")))
        .chain((1..=25).map(|i| ("u:ann".to_owned(), i + 1, format!("u{i}"))))
        .collect();
    assert_eq!(got, want, "{fault:?}: exactly the missed pushes, in order");

    // The membership came back with the token (no JWT, no backend call):
    // live pushes through C reach the new connection on B.
    assert_eq!(
        c.ok("get_uid_by_client_id", json!({"client_id": new}))
            .await,
        "ann"
    );
    send(
        &c,
        kept,
        "send_to_uid",
        json!({"uid": "ann", "data": "live-u"}),
    )
    .await;
    send(
        &c,
        kept,
        "send_to_group",
        json!({"group": "crew", "data": "live-g"}),
    )
    .await;
    let mut live = Vec::new();
    let mut recovered = Vec::new();
    while live.len() < 2 {
        match client.next().await {
            Got::Push(p) => live.push((p.stream().to_owned(), p.offset(), p.text())),
            Got::Control(v) => recovered.push(v),
            other => panic!("{fault:?}: expected live pushes, got {other:?}"),
        }
    }
    live.sort();
    assert_eq!(
        live,
        [
            ("g:crew".to_owned(), 27, "live-g".to_owned()),
            ("u:ann".to_owned(), 27, "live-u".to_owned())
        ]
    );
    if recovered.is_empty() {
        match client.next().await {
            Got::Control(v) => recovered.push(v),
            other => panic!("{fault:?}: expected recovered, got {other:?}"),
        }
    }
    assert_eq!(
        recovered,
        [json!({"type": "recovered", "streams": {"u:ann": true, "g:crew": true}})],
        "{fault:?}"
    );
    // Nothing more: no duplicate of anything replayed or live.
    c.ok(
        "send_to_uid",
        json!({"uid": "ann", "data": "fence", "history": false}),
    )
    .await;
    match client.next().await {
        Got::Push(p) => assert_eq!((&p.header, p.text()), (&json!({}), "fence".to_owned())),
        other => panic!("{fault:?}: expected the fence, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_the_client_resumes_elsewhere_with_exactly_what_it_missed() {
    missed_while_away(Fault::Kill, Kept::ByPrefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_drain_the_client_resumes_elsewhere_with_exactly_what_it_missed() {
    missed_while_away(Fault::Drain, Kept::PerPush).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_its_node_lost_redis_the_client_resumes_elsewhere_with_exactly_what_it_missed() {
    missed_while_away(Fault::Cut, Kept::ByPrefix).await;
}

/// Frames until `recovered` (within [`WAIT`] each): the pushes and
/// `position` frames before it, and it.
async fn until_recovered(client: &mut Recovering) -> (Vec<Got>, Value) {
    let mut before = Vec::new();
    loop {
        match client.next().await {
            Got::Control(v) if v["type"] == "recovered" => return (before, v),
            got @ (Got::Push(_) | Got::Control(_)) => before.push(got),
            other => panic!("expected frames up to recovered, got {other:?}"),
        }
    }
}

/// A stream the client holds no position in yet is never a silent gap
/// (docs/recovery.md, the `position` frame). The client, on node A, is
/// bound to uid ann, whose history already has a push, and joins group
/// crew, which keeps history but has none yet: it is told where it stands
/// in ann (a `position` frame), and of crew nothing, for there is nothing.
/// A is SIGKILLed; one push to each, kept, goes out through B. Resumed on
/// B with the token and the positions it holds: ann's push is replayed and
/// ann recovered; crew, which it could not name, is said not recovered
/// (with where it stands now), and its live pushes follow. Before the
/// `position` frame, ann's push was lost without a word, and crew's too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_client_had_no_position_in_is_replayed_or_said_not_recovered() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let mut a = node(&redis.url(), Kept::ByPrefix);
    let b = node(&redis.url(), Kept::ByPrefix);
    a.wait_ready().await;
    b.wait_ready().await;

    // ann's history has one push from before this client.
    send(
        &b,
        Kept::ByPrefix,
        "send_to_uid",
        json!({"uid": "ann", "data": "old"}),
    )
    .await;
    let mut client = Recovering::connect(&a).await;
    let old = client.client.id.clone();
    b.ok("bind_uid", json!({"client_id": old, "uid": "ann"}))
        .await;
    match client.next().await {
        Got::Control(v) => {
            assert_eq!(
                (&v["type"], &v["s"], &v["o"]),
                (&json!("position"), &json!("u:ann"), &json!(1)),
                "{v}"
            );
        }
        other => panic!("expected ann's position, got {other:?}"),
    }
    b.ok("join_group", json!({"client_id": old, "group": "crew"}))
        .await;
    eventually("ann in crew, seen from B", || async {
        b.ok("get_client_count_by_group", json!({"group": "crew"}))
            .await
            == 1
    })
    .await;
    assert_eq!(
        client.pos.keys().collect::<Vec<_>>(),
        ["u:ann"],
        "no history in crew yet"
    );

    a.signal("KILL");
    a.wait_exit(WAIT).await;
    let got = client.next().await;
    assert!(matches!(got, Got::Gone(_) | Got::Closed(..)), "{got:?}");
    send(
        &b,
        Kept::ByPrefix,
        "send_to_uid",
        json!({"uid": "ann", "data": "missed-u"}),
    )
    .await;
    send(
        &b,
        Kept::ByPrefix,
        "send_to_group",
        json!({"group": "crew", "data": "missed-g"}),
    )
    .await;

    client.resume(&b).await;
    let (before, recovered) = until_recovered(&mut client).await;
    assert_eq!(
        recovered,
        json!({"type": "recovered", "streams": {"u:ann": true, "g:crew": false}}),
        "ann named and replayed; crew not named: said not recovered, never silent"
    );
    let pushes: Vec<(String, u64, String)> = before
        .iter()
        .filter_map(|g| match g {
            Got::Push(p) => Some((p.stream().to_owned(), p.offset(), p.text())),
            _ => None,
        })
        .collect();
    assert_eq!(pushes, [("u:ann".to_owned(), 2, "missed-u".to_owned())]);
    let crew = client.pos["g:crew"].clone();
    assert_eq!(crew.1, 1, "told where it stands in crew: {before:?}");

    // From there on crew is followed: its next push, and a resume after it,
    // are whole.
    send(
        &b,
        Kept::ByPrefix,
        "send_to_group",
        json!({"group": "crew", "data": "live-g"}),
    )
    .await;
    let p = client.push().await;
    assert_eq!(
        (p.stream(), p.offset(), p.text().as_str()),
        ("g:crew", 2, "live-g")
    );
    assert_eq!(p.epoch(), crew.0);
}

/// A history read that times out during a resume (Redis stalled for a
/// moment: longer than the node's 1.5 s command timeout, shorter than two)
/// is asked once more before the stream is said not recovered: the client
/// gets its missed push and `recovered: true`. Before the retry, the one
/// timeout cost it the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_read_that_times_out_once_is_asked_again() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port).await;
    // A slow heartbeat: the stall must not get B purged or closing clients.
    let args = |url: &str| {
        let url = url.to_owned();
        move || {
            Node::start(&[
                "--redis-url",
                &url,
                "--node-heartbeat",
                "5s",
                "--history-streams",
                "u:",
            ])
        }
    };
    let a = args(&redis.url())();
    let b = args(&proxy.url())();
    a.wait_ready().await;
    b.wait_ready().await;

    let mut client = Recovering::connect(&a).await;
    let id = client.client.id.clone();
    a.ok("bind_uid", json!({"client_id": id, "uid": "ann"}))
        .await;
    a.ok("send_to_uid", json!({"uid": "ann", "data": "seen"}))
        .await;
    assert_eq!(client.push().await.text(), "seen");
    client.leave().await;
    eventually("ann gone", || async {
        a.ok("is_uid_online", json!({"uid": "ann"})).await == false
    })
    .await;
    a.ok("send_to_uid", json!({"uid": "ann", "data": "missed"}))
        .await;

    // B's next history read (the resume's) stalls 2 s.
    proxy.stall_next(b"gatecast_since", Duration::from_secs(2));
    client.resume(&b).await;
    let (before, recovered) = until_recovered(&mut client).await;
    let pushes: Vec<String> = before
        .iter()
        .filter_map(|g| match g {
            Got::Push(p) => Some(p.text()),
            _ => None,
        })
        .collect();
    assert_eq!(pushes, ["missed"], "{before:?}");
    assert_eq!(recovered["streams"]["u:ann"], true, "{recovered}");
}

// ---------------------------------------------------------------------------
// A rolling restart of a whole cluster under a steady push rate.

/// What one client saw across its reconnects.
#[derive(Default)]
struct Log {
    /// Per stream, each push as (offset, payload), in arrival order.
    streams: BTreeMap<String, Vec<(u64, String)>>,
    /// Reconnects (each a resume with token and positions).
    reconnects: u32,
    /// Welcomes that said `resumed: false`.
    not_resumed: u32,
    /// Streams a `recovered` frame said false for.
    not_recovered: Vec<String>,
}

/// A small xorshift: jitter and picks without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// The public URLs (`ws://…/ws`) of the nodes taking clients; `None` for a
/// node being restarted.
type Slots = Arc<StdMutex<Vec<Option<String>>>>;

/// A random node taking clients, another than `not` when there is one.
fn pick(slots: &Slots, not: &str, rng: &mut Rng) -> Option<String> {
    let slots = slots.lock().unwrap();
    let open: Vec<&String> = slots.iter().flatten().collect();
    let others: Vec<&String> = open.iter().copied().filter(|u| *u != not).collect();
    let from = if others.is_empty() { open } else { others };
    (!from.is_empty()).then(|| from[rng.below(from.len() as u64) as usize].clone())
}

/// Follows one client as gatecast.js does: records every push; on a close
/// waits the reason's `retry_ms` (or a short backoff when it has none) plus
/// a little jitter, then resumes with its token and positions on another
/// node, trying again on a refused handshake.
async fn follow(
    mut client: Recovering,
    mut at: String,
    slots: Slots,
    log: Arc<StdMutex<Log>>,
    received: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
    mut rng: Rng,
) {
    loop {
        let got = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            got = client.next_within(Duration::from_secs(600)) => got,
        };
        match got {
            Got::Push(p) => {
                let mut log = log.lock().unwrap();
                let stream = log.streams.entry(p.stream().to_owned()).or_default();
                stream.push((p.offset(), p.text()));
                received.fetch_add(1, Ordering::Relaxed);
            }
            Got::Control(v) => {
                if v["type"] == "recovered" {
                    let streams = v["streams"].as_object().cloned().unwrap_or_default();
                    let mut log = log.lock().unwrap();
                    for (s, ok) in streams {
                        if ok != true {
                            log.not_recovered.push(s);
                        }
                    }
                }
            }
            end => {
                let wait = end.retry_ms().unwrap_or(200) + rng.below(100);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                let mut tries = 0;
                loop {
                    tries += 1;
                    assert!(tries <= 200, "client never got back: {end:?}");
                    let Some(base) = pick(&slots, &at, &mut rng) else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    match client.try_resume(&base).await {
                        Ok(welcome) => {
                            let mut log = log.lock().unwrap();
                            log.reconnects += 1;
                            if welcome["resumed"] != true {
                                log.not_resumed += 1;
                            }
                            at = base;
                            break;
                        }
                        // A node draining or just gone: another one, soon.
                        Err(_) => {
                            let backoff = 100 + rng.below(200);
                            tokio::time::sleep(Duration::from_millis(backoff)).await;
                        }
                    }
                }
            }
        }
    }
}

/// Pushes sent per stream, in the order they were sent: the payload, and
/// whether the API said it was done (true) or answered 503 `unavailable`
/// (false: it may still have been kept and delivered, docs/redis.md).
type Sent = Arc<StdMutex<BTreeMap<String, Vec<(String, bool)>>>>;

/// Sends `commands` (pushes) as one batch to the API at `api`, records each
/// in `sent`; returns how many were answered `unavailable` (any other
/// failure fails the test).
async fn push_batch(
    http: &reqwest::Client,
    api: SocketAddr,
    commands: Vec<Value>,
    sent: &Sent,
) -> usize {
    let resp = http
        .post(format!("http://{api}/api/batch"))
        .json(&json!({ "commands": commands }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("batch to {api}: {e}"));
    assert_eq!(resp.status().as_u16(), 200, "batch to {api}");
    let body: Value = resp.json().await.unwrap();
    let replies = body["replies"].as_array().expect("replies");
    let mut sent = sent.lock().unwrap();
    let mut unsure = 0;
    for (command, reply) in commands.iter().zip(replies) {
        let done = reply.get("result").is_some();
        assert!(
            done || reply["error"]["code"] == "unavailable",
            "a push failed: {reply}"
        );
        unsure += usize::from(!done);
        let p = &command["params"];
        let stream = match p.get("uid") {
            Some(uid) => format!("u:{}", uid.as_str().unwrap()),
            None => format!("g:{}", p["group"].as_str().unwrap()),
        };
        let data = p["data"].as_str().unwrap().to_owned();
        sent.entry(stream).or_default().push((data, done));
    }
    unsure
}

/// Whether `got` (offset, payload) is exactly `want` in order, once each,
/// where a push answered `unavailable` may be missing (everywhere: offsets
/// count from 1 with no gap).
fn exactly(got: &[(u64, String)], want: &[(String, bool)]) -> bool {
    let contiguous = got.iter().enumerate().all(|(k, (o, _))| *o == k as u64 + 1);
    let mut got = got.iter().peekable();
    for (data, done) in want {
        if got.peek().is_some_and(|(_, p)| p == data) {
            got.next();
        } else if *done {
            return false;
        }
    }
    contiguous && got.next().is_none()
}

fn push_command(seq: u64, uid: Option<String>, group: Option<String>) -> Value {
    match (uid, group) {
        (Some(uid), _) => {
            json!({"method": "send_to_uid", "params": {"uid": uid, "data": seq.to_string()}})
        }
        (None, Some(group)) => {
            json!({"method": "send_to_group", "params": {"group": group, "data": seq.to_string()}})
        }
        (None, None) => unreachable!(),
    }
}

/// Runs `commands` as batches through `api`; every one must succeed.
async fn batch_ok(api: &Node, commands: &[Value]) {
    for chunk in commands.chunks(500) {
        let (status, body) = api.call("batch", json!({ "commands": chunk })).await;
        assert_eq!(status, 200, "{body}");
        for reply in body["replies"].as_array().expect("replies") {
            assert!(reply.get("result").is_some(), "a command failed: {reply}");
        }
    }
}

/// Waits until every uid `u0..` is online and the groups `g0..` hold
/// `clients` members in all, as `api` sees them (a push sent before that
/// could beat the subscription).
async fn all_bound(api: &Node, clients: usize, groups: usize) {
    eventually("every uid online and every group full", || async {
        let mut checks: Vec<Value> = (0..clients)
            .map(|i| json!({"method": "is_uid_online", "params": {"uid": format!("u{i}")}}))
            .collect();
        checks.extend((0..groups).map(|g| {
            json!({"method": "get_client_count_by_group", "params": {"group": format!("g{g}")}})
        }));
        let mut online = 0;
        let mut members = 0;
        for chunk in checks.chunks(1000) {
            let (status, body) = api.call("batch", json!({ "commands": chunk })).await;
            if status != 200 {
                return false;
            }
            for r in body["replies"].as_array().unwrap() {
                match &r["result"] {
                    Value::Bool(true) => online += 1,
                    Value::Number(n) => members += n.as_u64().unwrap_or(0) as usize,
                    _ => {}
                }
            }
        }
        online == clients && members == clients
    })
    .await;
}

/// `clients` opted-in clients over 3 nodes, each bound to its own uid and
/// in one group of 10 (through the API); `rate` pushes a second to random
/// uids and groups while each node in turn is drained (SIGTERM,
/// `--drain-spread 2s`) and started again. Every client must receive every
/// push to its uid and its group exactly once, in order, across its
/// reconnects, and every resume must say `resumed` and `recovered` true.
async fn rolling_restart(clients: usize, rate: u64) {
    let _serial = SERIAL.lock().await;
    let groups = (clients / 10).max(1);
    let redis = RedisServer::start();
    let url = redis.url();
    let args: Vec<String> = [
        "--redis-url",
        &url,
        "--history-streams",
        "u:,g:",
        "--shutdown-grace",
        "6s",
        "--drain-spread",
        "2s",
        "--connect-rate-per-ip",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let start = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            Node::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap()
    };
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(start(args.clone()).await);
    }
    common::ready(&nodes).await;
    let slots: Slots = Arc::new(StdMutex::new(
        nodes.iter().map(|n| Some(n.ws_url(""))).collect(),
    ));

    // Connect, 100 at a time, over the three nodes.
    let connected: Vec<(usize, Recovering)> = futures_util::stream::iter(0..clients)
        .map(|i| {
            let node = &nodes[i % 3];
            async move { (i, Recovering::connect(node).await) }
        })
        .buffer_unordered(100)
        .collect()
        .await;
    let mut connected = connected;
    connected.sort_by_key(|(i, _)| *i);
    let api = &nodes[0];
    let mut commands = Vec::new();
    for (i, c) in &connected {
        let id = &c.client.id;
        commands.push(
            json!({"method": "bind_uid", "params": {"client_id": id, "uid": format!("u{i}")}}),
        );
        commands.push(json!({"method": "join_group", "params": {"client_id": id, "group": format!("g{}", i % groups)}}));
    }
    batch_ok(api, &commands).await;
    all_bound(api, clients, groups).await;

    let (stop_clients, stop) = watch::channel(false);
    let received = Arc::new(AtomicUsize::new(0));
    let mut logs = Vec::new();
    let mut tasks = Vec::new();
    for (i, client) in connected {
        let log = Arc::new(StdMutex::new(Log::default()));
        logs.push(log.clone());
        let at = slots.lock().unwrap()[i % 3].clone().unwrap();
        tasks.push(tokio::spawn(follow(
            client,
            at,
            slots.clone(),
            log,
            received.clone(),
            stop.clone(),
            Rng(0x9e37_79b9_7f4a_7c15 ^ ((i as u64 + 1) * 0x2545_f491)),
        )));
    }

    // Warm-up: one push to every uid and every group, so each client has a
    // position on both its streams before anything goes away.
    let sent: Sent = Arc::default();
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let mut seq = 0;
    let mut warm = Vec::new();
    for i in 0..clients {
        seq += 1;
        warm.push(push_command(seq, Some(format!("u{i}")), None));
    }
    for g in 0..groups {
        seq += 1;
        warm.push(push_command(seq, None, Some(format!("g{g}"))));
    }
    for chunk in warm.chunks(500) {
        let unsure = push_batch(&http, api.api, chunk.to_vec(), &sent).await;
        assert_eq!(unsure, 0, "the warm-up is sent before any fault");
    }
    common::within(
        "every client warmed up",
        Duration::from_secs(30),
        || async { received.load(Ordering::Relaxed) >= 2 * clients },
    )
    .await;

    // The pushers: `rate` a second in all, in batches every 100 ms, to the
    // API of a node that is not being restarted (a read lock held while a
    // batch is out, so none is in flight to a node going away). One lane
    // per 100 pushes/s, each with its own uids and groups (index modulo the
    // lanes), so each stream's pushes are sent one after the other.
    let api_addr = Arc::new(tokio::sync::RwLock::new(nodes[1].api));
    let (stop_pushes, pushes_stopped) = watch::channel(false);
    let lanes = (rate / 100).max(1) as usize;
    let pushers: Vec<_> = (0..lanes)
        .map(|lane| {
            let (api_addr, sent, http) = (api_addr.clone(), sent.clone(), http.clone());
            let mut stopped = pushes_stopped.clone();
            let per_tick = (rate / 10 / lanes as u64).max(1);
            let first = seq + 1;
            tokio::spawn(async move {
                let mut rng = Rng(0x1234_5678_9abc_def1 + lane as u64);
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                let (mut n, mut unsure) = (0u64, 0);
                // Index `lane + lanes * k` below `count`.
                let mut own = |count: usize| {
                    let k = rng.below(count.saturating_sub(lane).div_ceil(lanes) as u64);
                    lane + lanes * k as usize
                };
                loop {
                    tokio::select! {
                        _ = stopped.wait_for(|s| *s) => return (n, unsure),
                        _ = tick.tick() => {}
                    }
                    let commands: Vec<Value> = (0..per_tick)
                        .map(|_| {
                            n += 1;
                            let seq = first + (n * lanes as u64) + lane as u64;
                            if n % 2 == 0 {
                                push_command(seq, Some(format!("u{}", own(clients))), None)
                            } else {
                                push_command(seq, None, Some(format!("g{}", own(groups))))
                            }
                        })
                        .collect();
                    let api = api_addr.read().await;
                    unsure += push_batch(&http, *api, commands, &sent).await;
                }
            })
        })
        .collect();

    let began = std::time::Instant::now();
    for i in 0..3 {
        // Pushes go through a node that stays.
        *api_addr.write().await = nodes[(i + 1) % 3].api;
        slots.lock().unwrap()[i] = None;
        nodes[i].signal("TERM");
        nodes[i].wait_exit(Duration::from_secs(30)).await;
        let node = start(args.clone()).await;
        node.wait_ready().await;
        slots.lock().unwrap()[i] = Some(node.ws_url(""));
        nodes[i] = node;
    }
    let restart_took = began.elapsed();
    stop_pushes.send_replace(true);
    let (mut pushes, mut unsure) = (0, 0);
    for pusher in pushers {
        let (n, u) = pusher.await.expect("a pusher failed");
        pushes += n;
        unsure += u;
    }
    let pushed_for = began.elapsed();

    // Every client's two streams, checked until they are whole (bounded);
    // then what is wrong is listed, per client.
    let check = || {
        let sent = sent.lock().unwrap();
        let mut wrong = Vec::new();
        let (mut reconnects, mut deliveries, mut silent) = (0, 0, 0);
        for (i, log) in logs.iter().enumerate() {
            let log = log.lock().unwrap();
            reconnects += log.reconnects;
            let mine = [format!("u:u{i}"), format!("g:g{}", i % groups)];
            for stream in &mine {
                let want = sent.get(stream).cloned().unwrap_or_default();
                let got = log.streams.get(stream).cloned().unwrap_or_default();
                deliveries += got.len();
                if !exactly(&got, &want) {
                    // Said so (`recovered: false` for it) or silent.
                    if !log.not_recovered.contains(stream) {
                        silent += 1;
                    }
                    wrong.push(format!("client {i} {stream}: sent {want:?}, got {got:?}"));
                }
            }
            for stream in log.streams.keys() {
                if !mine.contains(stream) {
                    wrong.push(format!("client {i}: pushes of {stream}, not its stream"));
                }
            }
            if log.not_resumed > 0 || !log.not_recovered.is_empty() {
                wrong.push(format!(
                    "client {i}: {} resumed:false, recovered false for {:?}",
                    log.not_resumed, log.not_recovered
                ));
            }
        }
        (wrong, reconnects, deliveries, silent)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (wrong, reconnects, deliveries, silent) = loop {
        let checked = check();
        if checked.0.is_empty() || std::time::Instant::now() >= deadline {
            break checked;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let caught_up = began.elapsed();
    stop_clients.send_replace(true);
    for t in tasks {
        t.await.expect("a client task failed");
    }
    eprintln!(
        "rolling restart of 3 nodes in {restart_took:.1?} (every client whole after \
         {caught_up:.1?}): {clients} clients, {pushes} pushes in {pushed_for:.1?} (asked \
         {rate}/s; {unsure} answered 503), {deliveries} deliveries, {reconnects} resumes, {} wrong ({silent} streams \
         short without a recovered false)",
        wrong.len()
    );
    for w in wrong.iter().take(50) {
        eprintln!("wrong: {w}");
    }
    assert!(
        wrong.is_empty(),
        "{} findings over {clients} clients (up to 50 printed above); first: {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert!(
        reconnects as usize >= clients,
        "every client moved at least once"
    );
}

/// In the suite: 300 clients, 100 pushes/s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_pushes_loses_nothing_and_doubles_nothing() {
    rolling_restart(300, 100).await;
}

/// The headline (docs/reliability.md): 3,000 clients, 1,000 pushes/s. Run
/// by hand: `cargo test --release --test recovery -- --ignored --nocapture
/// a_rolling_restart_at_full_size`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn a_rolling_restart_at_full_size_loses_nothing_and_doubles_nothing() {
    rolling_restart(3000, 1000).await;
}

// ---------------------------------------------------------------------------
// Measurement: a resume storm with replay.

/// Redis's `INFO commandstats`: calls per command.
fn redis_commands(redis: &RedisServer) -> BTreeMap<String, u64> {
    redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// Run by hand (`--ignored --nocapture`; `GATECAST_STORM_CLIENTS`, default
/// 5,000): N opted-in clients on node A, each in its own uid and in one
/// group of 10 (through the API); A SIGKILLed; 1 push to each uid and 5 to
/// each group meanwhile; then all N resume at once, half on B, half on C,
/// with token and positions. Each must get exactly its 6 missed pushes and
/// `recovered` true. Prints resumes/s, p50/p99/max time to `recovered`,
/// and Redis commands per resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_a_resume_storm_with_replay() {
    let _serial = SERIAL.lock().await;
    let n: usize = std::env::var("GATECAST_STORM_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let groups = (n / 10).max(1);
    let redis = RedisServer::start();
    let url = redis.url();
    let args = [
        "--redis-url",
        url.as_str(),
        "--node-heartbeat",
        "1s",
        "--history-streams",
        "u:,g:",
        "--connect-rate-per-ip",
        "0",
    ];
    let mut a = Node::start(&args);
    let b = Node::start(&args);
    let c = Node::start(&args);
    for node in [&a, &b, &c] {
        node.wait_ready().await;
    }
    let clients: Vec<Recovering> = futures_util::stream::iter(0..n)
        .map(|_| Recovering::connect(&a))
        .buffer_unordered(100)
        .collect()
        .await;
    let mut commands = Vec::new();
    for (i, r) in clients.iter().enumerate() {
        let id = &r.client.id;
        commands.push(
            json!({"method": "bind_uid", "params": {"client_id": id, "uid": format!("u{i}")}}),
        );
        commands.push(json!({"method": "join_group", "params": {"client_id": id, "group": format!("g{}", i % groups)}}));
    }
    batch_ok(&c, &commands).await;
    all_bound(&c, n, groups).await;
    let sent: Sent = Arc::default();
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let mut warm: Vec<Value> = (0..n)
        .map(|i| push_command(i as u64, Some(format!("u{i}")), None))
        .collect();
    warm.extend((0..groups).map(|g| push_command(g as u64, None, Some(format!("g{g}")))));
    for chunk in warm.chunks(500) {
        let unsure = push_batch(&http, c.api, chunk.to_vec(), &sent).await;
        assert_eq!(unsure, 0);
    }
    let clients: Vec<Recovering> = futures_util::stream::iter(clients)
        .map(|mut r| async move {
            r.push().await;
            r.push().await;
            r
        })
        .buffer_unordered(500)
        .collect()
        .await;

    a.signal("KILL");
    a.wait_exit(WAIT).await;
    let mut missed: Vec<Value> = (0..n)
        .map(|i| push_command(1, Some(format!("u{i}")), None))
        .collect();
    for k in 0..5 {
        missed.extend((0..groups).map(|g| push_command(10 + k, None, Some(format!("g{g}")))));
    }
    for chunk in missed.chunks(500) {
        let unsure = push_batch(&http, c.api, chunk.to_vec(), &sent).await;
        assert_eq!(unsure, 0);
    }

    let before = redis_commands(&redis);
    let bases = [b.ws_url(""), c.ws_url("")];
    let began = std::time::Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            let base = bases[i % 2].clone();
            tokio::spawn(async move {
                let t = std::time::Instant::now();
                let welcome = loop {
                    match r.try_resume(&base).await {
                        Ok(w) => break w,
                        Err(e) => {
                            assert!(t.elapsed() < Duration::from_secs(60), "{e}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                };
                assert_eq!(welcome["resumed"], true, "{welcome}");
                let mut pushes = 0;
                loop {
                    match r.next_within(Duration::from_secs(60)).await {
                        Got::Push(_) => pushes += 1,
                        Got::Control(v) if v["type"] == "recovered" => {
                            let all = v["streams"]
                                .as_object()
                                .unwrap()
                                .values()
                                .all(|v| v == true);
                            assert!(all, "{v}");
                            break;
                        }
                        Got::Control(_) => {}
                        other => panic!("{other:?}"),
                    }
                }
                assert_eq!(pushes, 6, "exactly the missed pushes");
                (t.elapsed(), r)
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("a resume failed"));
    }
    let total = began.elapsed();
    let after = redis_commands(&redis);
    let mut per_command: Vec<(String, f64)> = after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (v - before.get(k).unwrap_or(&0)) as f64 / n as f64,
            )
        })
        .filter(|(_, v)| *v > 0.0)
        .collect();
    per_command.sort_by(|a, b| b.1.total_cmp(&a.1));
    let all: f64 = per_command.iter().map(|(_, v)| v).sum();
    let mut times: Vec<Duration> = results.iter().map(|(t, _)| *t).collect();
    times.sort();
    eprintln!(
        "resume storm: {n} clients of a SIGKILLed node, 6 missed pushes each, onto 2 nodes \
         in {total:.2?}: {:.0} resumes/s; time to recovered p50 {:?} p99 {:?} max {:?}; \
         Redis commands per resume {all:.1} (INFO commandstats): {per_command:.2?}",
        n as f64 / total.as_secs_f64(),
        times[n / 2],
        times[n * 99 / 100],
        times[n - 1],
    );
}
