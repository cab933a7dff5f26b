//! `--presence-events`: online / offline of uids and occupied / vacated of
//! groups, exact across nodes and node crashes, debounced by
//! `--presence-grace`; the node that purges a dead node emits its
//! connections' close events. Real Redis, real nodes, real clients.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::events::{events, events_flowing, field, redis_client_url, Entry};
use common::redis::RedisServer;
use common::{within, Client, Node, OutputWithin};
use futures_util::StreamExt;
use serde_json::json;

/// `n` nodes with presence events on the Redis (or Redis Cluster) at
/// `url`, and a reader of their events stream, once every node's events
/// reach it.
async fn presence_nodes(url: &str, n: usize, grace: &str) -> (Vec<Node>, fred::clients::Client) {
    let nodes = nodes_on(url, n, grace);
    let redis = redis_client_url(url).await;
    events_flowing(&nodes, &redis).await;
    (nodes, redis)
}

/// The close events of connections bound to a uid (not the probes of
/// [`events_flowing`]).
async fn bound_closes(redis: &fred::clients::Client) -> Vec<Entry> {
    let mut closes = events(redis, &["close"]).await;
    closes.retain(|e| !field(e, "uid").is_empty());
    closes
}

const PRESENCE: [&str; 4] = ["online", "offline", "occupied", "vacated"];

/// `n` nodes on the Redis (or Redis Cluster) at `url`.
fn nodes_on(url: &str, n: usize, grace: &str) -> Vec<Node> {
    (0..n)
        .map(|_| {
            Node::start(&[
                "--redis-url",
                url,
                "--node-heartbeat",
                "1s",
                "--events",
                "--presence-events",
                "uid,group",
                "--presence-grace",
                grace,
            ])
        })
        .collect()
}

async fn bind(api: &Node, client: &Client, uid: &str) {
    api.ok("bind_uid", json!({"client_id": client.id, "uid": uid}))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_on_three_nodes_is_online_once_and_offline_once_after_the_grace() {
    let server = RedisServer::start();
    three_nodes(&server.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_cluster_a_uid_on_three_nodes_is_online_once_and_offline_once() {
    let cluster = common::redis::RedisCluster::start();
    three_nodes(&cluster.url()).await;
}

/// A uid connected on 3 nodes: one online; closing two: nothing; closing
/// the last: one offline, after the grace.
async fn three_nodes(url: &str) {
    let (nodes, redis) = presence_nodes(url, 3, "1s").await;

    let mut clients = Vec::new();
    for node in &nodes {
        let c = Client::connect(&node.ws_url("")).await;
        // Bound through another node: the command crosses Redis.
        bind(&nodes[(clients.len() + 1) % 3], &c, "alice").await;
        clients.push(c);
    }
    within("one online", Duration::from_secs(10), || async {
        !events(&redis, &PRESENCE).await.is_empty()
    })
    .await;
    let last = clients.pop().unwrap();
    for c in clients.drain(..) {
        c.close().await;
    }
    // Both closes are mirrored (the uid is on one node only), and still
    // nothing but the one online, even past the grace.
    within("two closes", Duration::from_secs(10), || async {
        bound_closes(&redis).await.len() == 2
    })
    .await;
    within(
        "alice on one node only",
        Duration::from_secs(10),
        || async {
            let ids = nodes[0]
                .ok("get_client_id_by_uid", json!({"uid": "alice"}))
                .await;
            ids.as_array().map(Vec::len) == Some(1)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = events(&redis, &PRESENCE).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(field(&seen[0], "type"), "online");
    assert_eq!(field(&seen[0], "uid"), "alice");
    // The fields every entry has, empty: about no connection.
    assert_eq!(field(&seen[0], "client_id"), "");
    assert_eq!(field(&seen[0], "session"), "{}");

    let closed_at = std::time::Instant::now();
    last.close().await;
    within("one offline", Duration::from_secs(10), || async {
        events(&redis, &PRESENCE).await.len() >= 2
    })
    .await;
    let waited = closed_at.elapsed();
    let seen = events(&redis, &PRESENCE).await;
    let kinds: Vec<String> = seen.iter().map(|e| field(e, "type")).collect();
    assert_eq!(kinds, ["online", "offline"]);
    assert_eq!(field(&seen[1], "uid"), "alice");
    assert!(
        waited >= Duration::from_secs(1),
        "offline before the grace: {waited:?}"
    );
    assert!(
        field(&seen[1], "seq").parse::<u64>().unwrap()
            > field(&seen[0], "seq").parse::<u64>().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_within_the_grace_produces_no_event() {
    let server = RedisServer::start();
    let (nodes, redis) = presence_nodes(&server.url(), 2, "3s").await;

    let a = Client::connect(&nodes[0].ws_url("")).await;
    bind(&nodes[1], &a, "bob").await;
    nodes[1]
        .ok("join_group", json!({"client_id": a.id, "group": "room"}))
        .await;
    within("online and occupied", Duration::from_secs(10), || async {
        events(&redis, &PRESENCE).await.len() == 2
    })
    .await;
    // The page reloads: the old connection goes, a new one on the other
    // node comes back with the same uid and group within the grace.
    a.close().await;
    within("the close", Duration::from_secs(10), || async {
        bound_closes(&redis).await.len() == 1
    })
    .await;
    let b = Client::connect(&nodes[1].ws_url("")).await;
    bind(&nodes[0], &b, "bob").await;
    nodes[0]
        .ok("join_group", json!({"client_id": b.id, "group": "room"}))
        .await;
    // Past the grace of the first close: still only the first two.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let seen = events(&redis, &PRESENCE).await;
    let kinds: Vec<String> = seen.iter().map(|e| field(e, "type")).collect();
    assert_eq!(kinds, ["online", "occupied"], "{seen:?}");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_uids_go_offline_and_its_closes_are_emitted_once() {
    let server = RedisServer::start();
    killed_node(&server.url()).await;
}

/// A node SIGKILLed holding the last connection of 100 uids and the only
/// members of 20 groups: 100 offline, 19 vacated (one group has a member
/// elsewhere) and 100 closes, each once, within 3 heartbeats plus the
/// grace.
async fn killed_node(url: &str) {
    const UIDS: usize = 100;
    const GROUPS: usize = 20;
    let (nodes, redis) = presence_nodes(url, 3, "500ms").await;

    // Node 2 holds the only connection of 100 uids and the only members
    // of 20 groups; "shared" has members on node 0 too, which stays.
    let victim = &nodes[2];
    let clients = common::connect_many(&victim.ws_url(""), UIDS).await;
    // Each client's bind and join on their own, 20 clients at a time.
    futures_util::stream::iter(clients.iter().enumerate())
        .for_each_concurrent(20, |(i, c)| {
            let nodes = &nodes;
            async move {
                bind(&nodes[0], c, &format!("u{i}")).await;
                nodes[1]
                    .ok(
                        "join_group",
                        json!({"client_id": c.id, "group": format!("g{}", i % GROUPS)}),
                    )
                    .await;
            }
        })
        .await;
    let keeper = Client::connect(&nodes[0].ws_url("")).await;
    nodes[1]
        .ok("join_group", json!({"client_id": keeper.id, "group": "g0"}))
        .await;
    within("online and occupied", Duration::from_secs(20), || async {
        events(&redis, &PRESENCE).await.len() == UIDS + GROUPS
    })
    .await;

    victim.signal("KILL");
    let killed = std::time::Instant::now();
    // Within 3 heartbeats (1 s) plus the grace.
    within(
        "offline, vacated and closes",
        Duration::from_secs(4),
        || async {
            events(&redis, &["offline", "vacated"]).await.len() + bound_closes(&redis).await.len()
                >= UIDS + GROUPS - 1 + UIDS
        },
    )
    .await;
    // Let any duplicate show up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut gone = events(&redis, &["offline", "vacated"]).await;
    gone.extend(bound_closes(&redis).await);
    let count = |kind: &str| gone.iter().filter(|e| field(e, "type") == kind).count();
    assert_eq!(count("offline"), UIDS, "{:?}", killed.elapsed());
    assert_eq!(count("vacated"), GROUPS - 1, "g0 still has a member");
    assert_eq!(count("close"), UIDS);
    let mut ids: Vec<String> = gone
        .iter()
        .filter(|e| field(e, "type") == "close")
        .map(|e| field(e, "client_id"))
        .collect();
    ids.sort();
    ids.dedup();
    let mut want: Vec<String> = clients.iter().map(|c| c.id.clone()).collect();
    want.sort();
    assert_eq!(ids, want, "each close exactly once");
    for e in gone.iter().filter(|e| field(e, "type") == "close") {
        let id = field(e, "client_id");
        assert_eq!(field(e, "node"), &id[..12], "the dead node's id");
        let i = clients.iter().position(|c| c.id == id).unwrap();
        assert_eq!(field(e, "uid"), format!("u{i}"));
    }
    let mut offline: Vec<String> = gone
        .iter()
        .filter(|e| field(e, "type") == "offline")
        .map(|e| field(e, "uid"))
        .collect();
    offline.sort();
    offline.dedup();
    assert_eq!(offline.len(), UIDS);
    assert!(!gone
        .iter()
        .any(|e| field(e, "type") == "vacated" && field(e, "group") == "g0"));
    drop(keeper);
}

/// The race: `total` clients of one uid connecting and
/// disconnecting at random on two nodes for about `secs` seconds (four
/// churners, two per node, each bound through the other node), no grace:
/// every moment no churner holds a connection is a transition, decided by
/// whichever node's script runs first. The events alternate strictly (by
/// `seq`) and end in the true state. Returns how many transitions.
async fn race(url: &str, total: usize, secs: u64) -> usize {
    let (nodes, redis) = presence_nodes(url, 2, "0s").await;

    const CHURNERS: usize = 4;
    let each = total / CHURNERS;
    // Half of a client's slot connected, half not (at random): all four
    // churners are often between clients at once.
    let slot_ms = (secs * 1000 * CHURNERS as u64 / total as u64).max(2);
    let churn = |k: usize| {
        let (node, api) = (&nodes[k % 2], &nodes[1 - k % 2]);
        async move {
            let mut seed = 7u64 + k as u64;
            let mut next = || {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                seed >> 33
            };
            for _ in 0..each {
                let c = Client::connect(&node.ws_url("")).await;
                bind(api, &c, "carol").await;
                tokio::time::sleep(Duration::from_millis(next() % slot_ms)).await;
                c.close().await;
                tokio::time::sleep(Duration::from_millis(next() % slot_ms)).await;
            }
        }
    };
    let started = std::time::Instant::now();
    futures_util::future::join_all((0..CHURNERS).map(churn)).await;
    eprintln!(
        "{} clients of one uid in {:?}",
        each * CHURNERS,
        started.elapsed()
    );
    let kept = Client::connect(&nodes[0].ws_url("")).await;
    bind(&nodes[1], &kept, "carol").await;
    // carol is online (the kept client): the last event says so.
    let check = |want: &'static str| {
        let redis = redis.clone();
        async move {
            let seen = events(&redis, &["online", "offline"]).await;
            let mut by_seq: Vec<(u64, String)> = seen
                .iter()
                .map(|e| (field(e, "seq").parse().unwrap(), field(e, "type")))
                .collect();
            by_seq.sort();
            let kinds: Vec<&str> = by_seq.iter().map(|(_, k)| k.as_str()).collect();
            for pair in kinds.windows(2) {
                assert_ne!(pair[0], pair[1], "two in a row: {kinds:?}");
            }
            if kinds.is_empty() {
                let all = events(&redis, &["connect", "close", "online", "offline"]).await;
                let types: Vec<String> = all.iter().map(|e| field(e, "type")).collect();
                panic!("no presence event; the stream: {types:?}");
            }
            assert_eq!(kinds.first(), Some(&"online"), "{kinds:?}");
            kinds.last() == Some(&want)
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    within("carol online at the end", Duration::from_secs(20), || {
        check("online")
    })
    .await;
    kept.close().await;
    within("carol offline at the end", Duration::from_secs(20), || {
        check("offline")
    })
    .await;
    let transitions = events(&redis, &["online", "offline"]).await.len();
    eprintln!("{transitions} transitions of carol");
    assert!(
        transitions >= 4,
        "the churn made carol come and go: {transitions}"
    );
    // Nothing late changes it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(check("offline").await);
    assert_eq!(
        events(&redis, &["online", "offline"]).await.len(),
        transitions
    );
    transitions
}

/// CI size of the race (200 clients, about 8 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_connects_and_disconnects_of_one_uid_alternate_and_end_true() {
    let server = RedisServer::start();
    race(&server.url(), 200, 8).await;
}

/// The full size: 1,000 clients for 30 s
/// (`cargo test --test presence -- --ignored --nocapture`;
/// docs/benchmarks.md has a run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full size of the race: about a minute"]
async fn racing_a_thousand_clients_of_one_uid_for_30_s() {
    let server = RedisServer::start();
    race(&server.url(), 1000, 30).await;
}

/// The same on a real Redis Cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full size of the race: about a minute"]
async fn on_redis_cluster_racing_a_thousand_clients_of_one_uid_for_30_s() {
    let cluster = common::redis::RedisCluster::start();
    race(&cluster.url(), 1000, 30).await;
}

/// On Redis Cluster (three masters): the same exactness, the counts kept
/// under one hash tag per instance of a node (presence_hold.lua).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_cluster_a_killed_node_s_uids_go_offline_once() {
    let cluster = common::redis::RedisCluster::start();
    killed_node(&cluster.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_cluster_racing_clients_of_one_uid_alternate_and_end_true() {
    let cluster = common::redis::RedisCluster::start();
    race(&cluster.url(), 200, 8).await;
}

/// `--presence-prefixes`: only uids and groups named with one of the
/// prefixes have events, and the others cost no presence work in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_names_with_a_watched_prefix_have_presence_events() {
    let server = RedisServer::start();
    let url = server.url();
    let nodes: Vec<Node> = (0..2)
        .map(|_| {
            Node::start(&[
                "--redis-url",
                &url,
                "--node-heartbeat",
                "1s",
                "--events",
                "--presence-events",
                "uid,group",
                "--presence-grace",
                "0s",
                "--presence-prefixes",
                "room:,vip:",
            ])
        })
        .collect();
    let redis = redis_client_url(&url).await;
    events_flowing(&nodes, &redis).await;
    let a = Client::connect(&nodes[0].ws_url("")).await;
    let b = Client::connect(&nodes[1].ws_url("")).await;
    bind(&nodes[1], &a, "vip:ann").await;
    bind(&nodes[0], &b, "bob").await;
    for (c, group) in [(&a, "room:1"), (&b, "lobby"), (&b, "vip:lounge")] {
        nodes[1]
            .ok("join_group", json!({"client_id": c.id, "group": group}))
            .await;
    }
    within("watched names online", Duration::from_secs(10), || async {
        events(&redis, &PRESENCE).await.len() == 3
    })
    .await;
    a.close().await;
    b.close().await;
    within("watched names offline", Duration::from_secs(10), || async {
        events(&redis, &PRESENCE).await.len() == 6
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut got: Vec<(String, String)> = events(&redis, &PRESENCE)
        .await
        .iter()
        .map(|e| {
            let name = [field(e, "uid"), field(e, "group")].concat();
            (field(e, "type"), name)
        })
        .collect();
    got.sort();
    let want = [
        ("occupied", "room:1"),
        ("occupied", "vip:lounge"),
        ("offline", "vip:ann"),
        ("online", "vip:ann"),
        ("vacated", "room:1"),
        ("vacated", "vip:lounge"),
    ];
    assert_eq!(got, want.map(|(k, n)| (k.to_owned(), n.to_owned())));
    // No counter was ever kept for bob or lobby.
    let stats = commandstats(&server);
    assert_eq!(stats.get("hincrby"), Some(&6), "{stats:?}");
}

/// Redis Cluster loses the presence slot's keys (a failover to a replica
/// far behind): each node finds at its next poll that its process is no
/// longer counted and reports its names again, so what it holds is
/// announced once more and its last connection going still brings the
/// offline (without the sync no count would be left to go to 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_cluster_a_node_reports_its_names_again_after_presence_keys_are_lost() {
    let cluster = common::redis::RedisCluster::start();
    let url = cluster.url();
    let (nodes, redis) = presence_nodes(&url, 2, "0s").await;
    let c = Client::connect(&nodes[0].ws_url("")).await;
    bind(&nodes[1], &c, "zoe").await;
    within("online", Duration::from_secs(10), || async {
        events(&redis, &["online"]).await.len() == 1
    })
    .await;
    // One DEL of them all (one slot, one master): deleted one by one, a
    // node's poll between two DELs would sync back what the next DEL then
    // takes, and nothing would announce zoe again.
    let mut lost = 0;
    for server in &cluster.servers {
        let keys = server.cli(&["--scan", "--pattern", "gatecast:{pr}*"]);
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        if keys.is_empty() {
            continue;
        }
        let mut del = vec!["DEL"];
        del.extend(&keys);
        server.cli(&del);
        lost += keys.len();
    }
    assert!(lost >= 3, "the counter, the process's set and the live set");
    within("zoe announced again", Duration::from_secs(10), || async {
        events(&redis, &["online"]).await.len() == 2
    })
    .await;
    c.close().await;
    within("offline after all", Duration::from_secs(10), || async {
        events(&redis, &["offline"]).await.len() == 1
    })
    .await;
}

/// The in-process engine decides the same from its hub, to the webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_without_redis_posts_presence_to_the_webhook() {
    let (hook, mut rx) = common::webhook().await;
    let node = Node::start(&[
        "--events",
        "--events-webhook",
        &hook,
        "--presence-events",
        "uid,group",
        "--presence-grace",
        "500ms",
    ]);
    let a = Client::connect(&node.ws_url("")).await;
    let b = Client::connect(&node.ws_url("")).await;
    for c in [&a, &b] {
        bind(&node, c, "dave").await;
        node.ok("join_group", json!({"client_id": c.id, "group": "lobby"}))
            .await;
    }
    a.close().await;
    // A reload of b within the grace: neither event.
    b.close().await;
    let c = Client::connect(&node.ws_url("")).await;
    bind(&node, &c, "dave").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // dave stays online; lobby has no member since b left.
    c.close().await;
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.len() < 4 {
        let body = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("presence events in time")
            .unwrap();
        if PRESENCE.contains(&body["type"].as_str().unwrap_or("")) {
            seen.push(body);
        }
    }
    let got: Vec<(String, String)> = seen
        .iter()
        .map(|e| {
            let name = e["uid"].as_str().map_or(&e["group"], |_| &e["uid"]);
            (
                e["type"].as_str().unwrap().to_owned(),
                name.as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want = [
        ("online", "dave"),
        ("occupied", "lobby"),
        ("vacated", "lobby"),
        ("offline", "dave"),
    ];
    assert_eq!(
        got,
        want.map(|(k, n)| (k.to_owned(), n.to_owned())),
        "{seen:?}"
    );
    // Nothing more.
    tokio::time::sleep(Duration::from_secs(1)).await;
    while let Ok(body) = rx.try_recv() {
        assert!(
            !PRESENCE.contains(&body["type"].as_str().unwrap_or("")),
            "{body}"
        );
    }
}

/// `--presence-prefixes` without Redis: the node filters the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_without_redis_watches_only_the_prefixes_too() {
    let (hook, mut rx) = common::webhook().await;
    let node = Node::start(&[
        "--events",
        "--events-webhook",
        &hook,
        "--presence-events",
        "uid,group",
        "--presence-grace",
        "0s",
        "--presence-prefixes",
        "vip:",
    ]);
    let a = Client::connect(&node.ws_url("")).await;
    let b = Client::connect(&node.ws_url("")).await;
    bind(&node, &b, "bob").await;
    node.ok("join_group", json!({"client_id": b.id, "group": "lobby"}))
        .await;
    bind(&node, &a, "vip:ann").await;
    b.close().await;
    a.close().await;
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // The close of a comes after its offline: everything before is in.
    loop {
        let body = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("events in time")
            .unwrap();
        let kind = body["type"].as_str().unwrap_or("").to_owned();
        if PRESENCE.contains(&kind.as_str()) {
            seen.push((kind.clone(), body["uid"].clone(), body["group"].clone()));
        }
        if kind == "offline" {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(body) = rx.try_recv() {
        let kind = body["type"].as_str().unwrap_or("").to_owned();
        if PRESENCE.contains(&kind.as_str()) {
            seen.push((kind, body["uid"].clone(), body["group"].clone()));
        }
    }
    assert_eq!(
        seen,
        [
            (
                "online".to_owned(),
                json!("vip:ann"),
                serde_json::Value::Null
            ),
            (
                "offline".to_owned(),
                json!("vip:ann"),
                serde_json::Value::Null
            ),
        ],
        "no event of bob nor lobby"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_options_are_checked_at_start() {
    for (args, says) in [
        (
            &["--presence-events", "uid"][..],
            "--presence-events needs --events",
        ),
        (
            &[
                "--events",
                "--events-webhook",
                "http://127.0.0.1:9/h",
                "--presence-events",
                "uid,room",
            ],
            "--presence-events takes uid and group",
        ),
    ] {
        let out = common::gatecast_command()
            .args(args)
            .output_within(Duration::from_secs(30));
        assert!(!out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(says), "{args:?}: {text}");
    }
}

/// Redis commands by name (INFO commandstats), scripts' inner calls
/// included.
fn commandstats(server: &RedisServer) -> HashMap<String, u64> {
    server
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats.strip_prefix("calls=")?.split(',').next()?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

/// Redis commands of all `servers` by name, summed.
fn commandstats_of(servers: &[&RedisServer]) -> HashMap<String, u64> {
    let mut all = HashMap::new();
    for server in servers {
        for (name, calls) in commandstats(server) {
            *all.entry(name).or_insert(0) += calls;
        }
    }
    all
}

type Measured = (bool, HashMap<String, u64>, HashMap<String, u64>);

/// Redis commands (summed over every server) for `N` clients, each with a
/// uid and a group of its own, bound and joined through the other node,
/// then closed; presence off, then on (`--presence-grace 0s`). One after
/// the other, not at once: the Cluster test compares the two runs' script
/// calls, which depend on how each run's writes batch.
async fn measure(cluster: bool, n: usize) -> Vec<Measured> {
    let mut measured = Vec::new();
    for on in [false, true] {
        let single = (!cluster).then(RedisServer::start);
        let many = cluster.then(common::redis::RedisCluster::start);
        let (url, servers): (String, Vec<&RedisServer>) = match (&single, &many) {
            (Some(s), _) => (s.url(), vec![s]),
            (_, Some(c)) => (c.url(), c.servers.iter().collect()),
            _ => unreachable!(),
        };
        let resetstat = || {
            for s in &servers {
                s.cli(&["CONFIG", "RESETSTAT"]);
            }
        };
        let mut args = vec!["--redis-url", &url, "--node-heartbeat", "1s", "--events"];
        if on {
            args.extend(["--presence-events", "uid,group", "--presence-grace", "0s"]);
        }
        let nodes: Vec<Node> = (0..2).map(|_| Node::start(&args)).collect();
        common::ready(&nodes).await;
        resetstat();
        let clients = common::connect_many(&nodes[0].ws_url(""), n).await;
        for (i, c) in clients.iter().enumerate() {
            bind(&nodes[1], c, &format!("u{i}")).await;
            nodes[1]
                .ok(
                    "join_group",
                    json!({"client_id": c.id, "group": format!("g{i}")}),
                )
                .await;
        }
        within("all mirrored", Duration::from_secs(20), || async {
            nodes[1].ok("get_all_uid_count", json!({})).await == json!(n)
        })
        .await;
        let joined = commandstats_of(&servers);
        resetstat();
        for c in clients {
            c.close().await;
        }
        within("all gone", Duration::from_secs(20), || async {
            nodes[1].ok("get_all_client_count", json!({})).await == json!(0)
        })
        .await;
        let closed = commandstats_of(&servers);
        measured.push((on, joined, closed));
    }
    for (on, joined, closed) in &measured {
        eprintln!("cluster {cluster}, presence {on}: per connect+bind+join: {joined:?}");
        eprintln!("cluster {cluster}, presence {on}: per close: {closed:?}");
    }
    measured
}

fn calls(m: &HashMap<String, u64>, command: &str) -> u64 {
    m.get(command).copied().unwrap_or(0)
}

/// The extra Redis work of presence events per connect + bind + join and
/// per close (docs/benchmarks.md): none when off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_costs_no_redis_work_when_off_and_a_few_commands_when_on() {
    const N: usize = 200;
    let measured = measure(false, N).await;
    let (_, off_joined, off_closed) = &measured[0];
    for command in ["hincrby", "zrem", "zadd", "time"] {
        assert_eq!(calls(off_joined, command), 0, "{command} with presence off");
        assert_eq!(calls(off_closed, command), 0, "{command} with presence off");
    }
    let (_, on_joined, on_closed) = &measured[1];
    // One counter per uid and per group, each counted once per change of
    // a node's holding, not per rewrite.
    assert_eq!(calls(on_joined, "hincrby"), 2 * N as u64);
    assert_eq!(calls(on_closed, "hincrby"), 2 * N as u64);
}

/// The same on Redis Cluster: the same counts, and at most one more script
/// call per partition write (the report of its changes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_cluster_presence_counts_once_per_change() {
    const N: usize = 200;
    let measured = measure(true, N).await;
    let (_, off_joined, off_closed) = &measured[0];
    assert_eq!(
        calls(off_joined, "hincrby") + calls(off_closed, "hincrby"),
        0
    );
    let (_, on_joined, on_closed) = &measured[1];
    assert_eq!(calls(on_joined, "hincrby"), 2 * N as u64);
    assert_eq!(calls(on_closed, "hincrby"), 2 * N as u64);
    // Reports are batched per round of writes: never more than one per
    // partition write, whatever the names it carried.
    for (off, on) in [(off_joined, on_joined), (off_closed, on_closed)] {
        let extra = calls(on, "evalsha").saturating_sub(calls(off, "evalsha"));
        assert!(
            extra <= calls(off, "evalsha") + 50,
            "{extra} more script calls"
        );
    }
}

/// BusinessWorkers hear presence too: gatecast's command 241 with the
/// event as JSON, about no connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_worker_hears_presence_as_command_241() {
    use gatecast::gatewayworker::protocol::{self, cmd, flag, Packet};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const KEY: &str = "presence-test-gateway-key";
    let (hook, _rx) = common::webhook().await;
    let node = Node::start(&[
        "--gateway-secret-key",
        KEY,
        "--events",
        "--events-webhook",
        &hook,
        "--presence-events",
        "uid",
        "--presence-grace",
        "0s",
    ]);
    let mut worker = tokio::net::TcpStream::connect(node.inner).await.unwrap();
    let mut hello = Packet::new(cmd::WORKER_CONNECT);
    hello.flag = flag::BODY_IS_SCALAR;
    hello.body = bytes::Bytes::from(json!({"worker_key": "w:0", "secret_key": KEY}).to_string());
    worker.write_all(&protocol::encode(&hello)).await.unwrap();
    within(
        "the worker is connected",
        Duration::from_secs(10),
        || async { common::metric(&node.get_text("/metrics").await, "gatecast_workers") == 1.0 },
    )
    .await;
    let c = Client::connect(&node.ws_url("")).await;
    bind(&node, &c, "erin").await;
    c.close().await;

    let mut buf = bytes::BytesMut::new();
    let mut bodies = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while bodies.len() < 2 {
            while let Some(p) = protocol::decode(&mut buf, 1 << 24).unwrap() {
                if p.cmd == cmd::ON_PRESENCE {
                    assert_eq!(p.connection_id, 0);
                    bodies.push(serde_json::from_slice::<serde_json::Value>(&p.body).unwrap());
                }
            }
            if bodies.len() < 2 {
                assert!(worker.read_buf(&mut buf).await.unwrap() > 0, "closed");
            }
        }
    })
    .await
    .expect("two ON_PRESENCE packets");
    assert_eq!(bodies[0]["type"], "online");
    assert_eq!(bodies[0]["uid"], "erin");
    assert_eq!(bodies[1]["type"], "offline");
    assert!(bodies[1]["seq"].as_u64() > bodies[0]["seq"].as_u64());
}

/// A drained node (a rolling restart): its clients come back on another
/// node within the grace, and no offline / online pair is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_whose_clients_come_back_within_the_grace_produces_no_event() {
    let server = RedisServer::start();
    drain(&server.url()).await;
}

/// The same on Redis Cluster: the drained node's process leaves (its names
/// count down, pending their grace) and the client's new node cancels it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_cluster_a_drain_whose_clients_come_back_produces_no_event() {
    let cluster = common::redis::RedisCluster::start();
    drain(&cluster.url()).await;
}

async fn drain(url: &str) {
    let (mut nodes, redis) = presence_nodes(url, 2, "3s").await;

    let a = Client::connect(&nodes[0].ws_url("")).await;
    bind(&nodes[1], &a, "frank").await;
    nodes[1]
        .ok("join_group", json!({"client_id": a.id, "group": "desk"}))
        .await;
    within("online and occupied", Duration::from_secs(10), || async {
        events(&redis, &PRESENCE).await.len() == 2
    })
    .await;
    nodes[0].signal("TERM");
    // The client is told to go (1001) and comes back on the other node at
    // once, as gatecast.js does.
    let mut a = a;
    assert!(matches!(a.next().await, common::Seen::Close(Some(1001))));
    drop(a);
    let back = Client::connect(&nodes[1].ws_url("")).await;
    bind(&nodes[1], &back, "frank").await;
    nodes[1]
        .ok("join_group", json!({"client_id": back.id, "group": "desk"}))
        .await;
    nodes[0].wait_exit(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let kinds: Vec<String> = events(&redis, &PRESENCE)
        .await
        .iter()
        .map(|e| field(e, "type"))
        .collect();
    assert_eq!(kinds, ["online", "occupied"]);
    // And when the client goes for good, both go, once.
    back.close().await;
    within("offline and vacated", Duration::from_secs(10), || async {
        events(&redis, &PRESENCE).await.len() == 4
    })
    .await;
    let mut rest: Vec<String> = events(&redis, &PRESENCE).await[2..]
        .iter()
        .map(|e| field(e, "type"))
        .collect();
    rest.sort();
    assert_eq!(rest, ["offline", "vacated"]);
    nodes.clear();
}
