//! The built-in dashboard (issue 30, docs/dashboard.md): node stats records
//! across real nodes on a real Redis, lookups, the live tail of pushes made
//! through another node, the API key, and the page in a real browser
//! (headless Debian chromium driven by playwright-core, as tests/browser.rs
//! does).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::redis::RedisServer;
use common::{eventually, Client, Cluster, Engine, Node, OutputWithin, WAIT};
use serde_json::{json, Value};

const KEY: &str = "dashboard-test-key-0123456789abcdef";

fn http() -> reqwest::Client {
    // reqwest's rustls has no default provider (see Cargo.toml).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().timeout(WAIT).build().unwrap()
}

/// GETs a dashboard path on `node`'s API listener with `key`; returns the
/// status and the JSON body.
async fn get(node: &Node, path: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = http().get(format!("http://{}{path}", node.api));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let res = req.send().await.expect("API answers");
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{path}: body is JSON: {text:?} ({status})"));
    (status, body)
}

/// The `result` of a dashboard GET that must succeed (no API key set).
async fn result(node: &Node, path: &str) -> Value {
    let (status, body) = get(node, path, None).await;
    assert_eq!(status, 200, "{path}: {body}");
    body["result"].clone()
}

/// The node id of a node: the first 12 hex digits of its client_ids.
fn node_id(client: &Client) -> String {
    client.id[..12].to_owned()
}

/// A node's row in an overview.
fn row<'a>(overview: &'a Value, node: &str) -> Option<&'a Value> {
    overview["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["node"] == node)
}

/// Two nodes on one real Redis, heartbeat 1 s, with `args`.
async fn two_nodes(redis: &RedisServer, args: &[&str]) -> Vec<Node> {
    let url = redis.url();
    let mut all = vec!["--redis-url", url.as_str(), "--node-heartbeat", "1s"];
    all.extend_from_slice(args);
    let nodes: Vec<Node> = (0..2).map(|_| Node::start(&all)).collect();
    common::ready(&nodes).await;
    nodes
}

// --- Both engines ---

/// Every node of the gateway is listed by any node's overview, with the
/// connections it really holds; the totals add them up.
async fn the_overview_lists_every_node_with_its_connections(engine: Engine) {
    let cluster = Cluster::start(engine, &[]).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(cluster.client().await);
    }
    let per_node = |id: &str| clients.iter().filter(|c| node_id(c) == id).count() as u64;
    let asked = cluster.api();
    let want_nodes = cluster.nodes.len();
    let mut last = Value::Null;
    let done = tokio::time::timeout(WAIT, async {
        loop {
            last = result(asked, "/api/dashboard/overview").await;
            let nodes = last["nodes"].as_array().cloned().unwrap_or_default();
            // The round trip is the previous write's: from the second
            // record on.
            let counts_match = nodes.iter().all(|n| {
                n["connections"] == per_node(n["node"].as_str().unwrap_or(""))
                    && (matches!(engine, Engine::Memory) || n["redis_rtt_ms"].is_number())
            });
            if nodes.len() == want_nodes && counts_match && last["totals"]["connections"] == 3 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        done.is_ok(),
        "overview never showed every node's count: {last:#}"
    );
    for client in &clients {
        let n = row(&last, &node_id(client)).unwrap();
        assert_eq!(n["ready"], true, "{n}");
        assert_eq!(n["version"], env!("CARGO_PKG_VERSION"));
        assert!(n["memory_rss_bytes"].as_u64().unwrap() > 1 << 20, "{n}");
        let port = u16::from_str_radix(&n["node"].as_str().unwrap()[8..], 16).unwrap();
        assert_eq!(n["inner"], format!("127.0.0.1:{port}"), "{n}");
        if matches!(engine, Engine::Memory) {
            assert_eq!(n["redis_rtt_ms"], Value::Null, "{n}");
        }
    }
    assert_eq!(last["totals"]["nodes"], want_nodes);
    assert_eq!(last["without_stats"], json!([]));
}

/// Lookups answer for connections held by another node than the one
/// asked: a uid's connections with their node, groups and session; a
/// group's members per node; one client_id.
async fn lookups_show_connections_of_other_nodes(engine: Engine) {
    let cluster = Cluster::start(engine, &[]).await;
    let a = cluster.client().await;
    let b = cluster.client().await;
    let api = cluster.api();
    for c in [&a, &b] {
        api.ok("bind_uid", json!({"client_id": c.id, "uid": "alice"}))
            .await;
        api.ok("join_group", json!({"client_id": c.id, "group": "room"}))
            .await;
    }
    api.ok(
        "set_session",
        json!({"client_id": a.id, "session": {"name": "Alice"}}),
    )
    .await;

    let uid = result(api, "/api/dashboard/uid?uid=alice").await;
    assert_eq!(uid["count"], 2, "{uid:#}");
    let shown = uid["clients"].as_array().unwrap();
    let of_a = shown
        .iter()
        .find(|c| c["client_id"] == a.id.as_str())
        .unwrap();
    assert_eq!(of_a["node"], node_id(&a));
    assert_eq!(of_a["online"], true);
    assert_eq!(of_a["uid"], "alice");
    assert_eq!(of_a["groups"], json!(["room"]));
    assert_eq!(of_a["session"], json!({"name": "Alice"}));
    let per_node: u64 = uid["per_node"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["count"].as_u64().unwrap())
        .sum();
    assert_eq!(per_node, 2);

    let group = result(api, "/api/dashboard/group?group=room").await;
    assert_eq!(group["count"], 2, "{group:#}");
    assert_eq!(group["uids"], json!(["alice"]));
    let mut ids: Vec<&str> = group["client_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    ids.sort();
    let mut want = vec![a.id.as_str(), b.id.as_str()];
    want.sort();
    assert_eq!(ids, want);
    let nodes: Vec<&str> = group["per_node"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap())
        .collect();
    assert!(nodes.contains(&node_id(&b).as_str()), "{group:#}");

    let one = result(api, &format!("/api/dashboard/client?client_id={}", b.id)).await;
    assert_eq!(one["online"], true);
    assert_eq!(one["groups"], json!(["room"]));
    assert_eq!(one["session"], json!({}));
    let gone = result(
        api,
        &format!("/api/dashboard/client?client_id={}", common::OFFLINE_ID),
    )
    .await;
    assert_eq!(gone["online"], false);
    assert_eq!(gone["uid"], Value::Null);
    assert_eq!(gone["groups"], json!([]));

    for bad in [
        "/api/dashboard/client?client_id=nope",
        "/api/dashboard/client",
        "/api/dashboard/uid?uid=",
        "/api/dashboard/group",
    ] {
        let got = get(api, bad, None).await;
        common::assert_api_error(bad, &got, 400, "invalid_params");
    }
}

/// A live tail, opened on one node, reads what `tail` yields as
/// server-sent events.
struct Tail {
    res: reqwest::Response,
    buf: String,
}

impl Tail {
    async fn open(node: &Node, query: &str, key: Option<&str>) -> Tail {
        let mut req = http()
            .get(format!("http://{}/api/dashboard/tail?{query}", node.api))
            // The stream outlives the client's per-request timeout.
            .timeout(Duration::from_secs(600));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let res = req.send().await.expect("tail answers");
        assert_eq!(res.status(), 200, "tail of {query}");
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        let mut tail = Tail {
            res,
            buf: String::new(),
        };
        let (kind, data) = tail.next().await;
        assert_eq!(kind, "ready", "{data}");
        tail
    }

    /// The next event (kind, data), within [`WAIT`].
    async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(cut) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..cut + 2).collect();
                if block.starts_with(':') {
                    continue;
                }
                let mut kind = String::new();
                let mut data = Value::Null;
                for line in block.lines() {
                    if let Some(k) = line.strip_prefix("event: ") {
                        kind = k.to_owned();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = serde_json::from_str(d).unwrap();
                    }
                }
                return (kind, data);
            }
            let chunk = tokio::time::timeout(WAIT, self.res.chunk())
                .await
                .expect("a tail event in time")
                .expect("the tail stream is readable")
                .expect("the tail stream goes on");
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

/// The tail of a uid, opened on one node, shows a push to that uid made
/// through another node (and nothing pushed elsewhere); so does a group's.
async fn the_tail_shows_pushes_made_through_another_node(engine: Engine) {
    let cluster = Cluster::start(engine, &[]).await;
    let watched = &cluster.nodes[0];
    let pushing = cluster.api();
    let mut uid_tail = Tail::open(watched, "uid=alice", None).await;
    let mut group_tail = Tail::open(watched, "group=room", None).await;
    pushing
        .ok(
            "send_to_uid",
            json!({"uid": "bob", "data": "not for alice"}),
        )
        .await;
    pushing
        .ok(
            "send_to_uid",
            json!({"uid": ["carol", "alice"], "data": "hello alice"}),
        )
        .await;
    pushing
        .ok(
            "send_to_group",
            json!({"group": "room", "data_base64": "AAEK/w==", "exclude_client_ids": [common::OFFLINE_ID]}),
        )
        .await;
    let (kind, entry) = uid_tail.next().await;
    assert_eq!(kind, "push");
    assert_eq!(entry["target"], "uid:alice");
    assert_eq!(entry["preview"], "hello alice", "{entry}");
    assert_eq!(entry["bytes"], 11);
    assert_eq!(entry["binary"], false);
    assert_eq!(entry["skipped"], 0);
    let pusher = pushing.inner.port();
    assert_eq!(
        entry["origin"],
        format!("7f000001{pusher:04x}"),
        "the node that accepted the push"
    );
    let (kind, entry) = group_tail.next().await;
    assert_eq!(kind, "push");
    assert_eq!(entry["preview"], "00 01 0a ff");
    assert_eq!(entry["binary"], true);
    assert_eq!(entry["excluded"], 1);
    // The push to bob never reached alice's tail: the next one does.
    pushing
        .ok("send_to_uid", json!({"uid": "alice", "data": "again"}))
        .await;
    let (_, entry) = uid_tail.next().await;
    assert_eq!(entry["preview"], "again");
}

engine_suite!(
    the_overview_lists_every_node_with_its_connections,
    lookups_show_connections_of_other_nodes,
    the_tail_shows_pushes_made_through_another_node,
);
// Sharded pub/sub (SSUBSCRIBE) and the Sentinel's primary for the tail's
// own connection; the records' hash on a cluster.
topology_suite!(
    the_overview_lists_every_node_with_its_connections,
    the_tail_shows_pushes_made_through_another_node,
);

// --- Redis: records come and go with the nodes ---

/// Node A's overview lists node B with B's real connection count, read
/// from B's record in Redis; B's record goes as soon as B stops, and a
/// record of a node that is not registered is never shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_cross_redis_and_leave_with_their_node() {
    let redis = RedisServer::start();
    let mut nodes = two_nodes(&redis, &["--shutdown-grace", "5s"]).await;
    let mut on_b = Vec::new();
    for _ in 0..2 {
        on_b.push(Client::connect(&nodes[1].ws_url("")).await);
    }
    let b = node_id(&on_b[0]);
    let a = Client::connect(&nodes[0].ws_url("")).await;
    let a_id = node_id(&a);
    // A node id that is in no registry, with a fresh record.
    let fake = json!({"node": "0a0000011234", "inner": "10.0.0.1:4660", "connections": 99,
                      "until_ms": u64::MAX / 2});
    redis.cli(&["HSET", "gatecast:stats", "0a0000011234", &fake.to_string()]);
    eventually("A's overview shows B's two connections", || async {
        let o = result(&nodes[0], "/api/dashboard/overview").await;
        row(&o, &b).is_some_and(|n| n["connections"] == 2)
            && row(&o, &a_id).is_some_and(|n| n["connections"] == 1)
    })
    .await;
    let o = result(&nodes[0], "/api/dashboard/overview").await;
    assert!(row(&o, "0a0000011234").is_none(), "unregistered: {o:#}");
    assert_eq!(o["totals"]["connections"], 3, "{o:#}");
    assert_eq!(o["this_node"], a_id);

    // A client more on B shows within a few heartbeats.
    on_b.push(Client::connect(&nodes[1].ws_url("")).await);
    eventually("A's overview shows B's third connection", || async {
        let o = result(&nodes[0], "/api/dashboard/overview").await;
        row(&o, &b).is_some_and(|n| n["connections"] == 3)
    })
    .await;

    // B stops: its record is deleted as it leaves, not left to expire.
    let mut b_node = nodes.remove(1);
    b_node.signal("TERM");
    b_node.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(redis.cli(&["HEXISTS", "gatecast:stats", &b]).trim(), "0");
    let o = result(&nodes[0], "/api/dashboard/overview").await;
    assert!(row(&o, &b).is_none(), "{o:#}");
    assert_eq!(o["totals"]["nodes"], 1, "{o:#}");
}

/// Node A's dashboard evacuates node B: B takes the request with its next
/// record and closes its clients with 1001 `evacuate`, as if
/// `POST /api/evacuate` had been called on B; A keeps its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_of_one_node_evacuates_another() {
    let redis = RedisServer::start();
    let nodes = two_nodes(&redis, &[]).await;
    let mut on_b = Client::connect(&nodes[1].ws_url("")).await;
    let b = node_id(&on_b);
    let on_a = Client::connect(&nodes[0].ws_url("")).await;
    eventually("B's record is there", || async {
        let o = result(&nodes[0], "/api/dashboard/overview").await;
        row(&o, &b).is_some()
    })
    .await;
    let post = |body: Value| {
        let url = format!("http://{}/api/dashboard/evacuate", nodes[0].api);
        async move {
            let res = http().post(url).json(&body).send().await.unwrap();
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap())
        }
    };
    for bad in [
        json!({"node": "0a0000011234"}),
        json!({"node": "nope"}),
        json!({"node": b, "rate": 0}),
        json!({}),
    ] {
        let got = post(bad.clone()).await;
        common::assert_api_error(&bad.to_string(), &got, 400, "invalid_params");
    }
    let (status, body) = post(json!({"node": b.to_uppercase(), "rate": 1000})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["requested"], true);
    match on_b.next().await {
        common::Seen::Close(Some(1001)) => {}
        other => panic!("B's client: {other:?}"),
    }
    eventually("B reports evacuating", || async {
        nodes[1].get_text("/readyz").await.contains("evacuating")
    })
    .await;
    assert_eq!(nodes[0].get_status(false, "/readyz").await, 200);
    let o = result(&nodes[0], "/api/dashboard/overview").await;
    assert_eq!(row(&o, &node_id(&on_a)).unwrap()["connections"], 1);
    assert_eq!(
        redis.cli(&["HLEN", "gatecast:evacuate"]).trim(),
        "0",
        "taken once"
    );
}

/// A tail's Redis subscription lives exactly as long as the tail: nobody
/// watching costs Redis nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_subscribes_only_while_it_is_open() {
    let redis = RedisServer::start();
    let nodes = two_nodes(&redis, &[]).await;
    let subscribers = || {
        redis
            .cli(&["PUBSUB", "NUMSUB", "gatecast:uid:watched"])
            .lines()
            .nth(1)
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    assert_eq!(subscribers(), "0", "no node holds the uid");
    let tail = Tail::open(&nodes[0], "uid=watched", None).await;
    assert_eq!(subscribers(), "1", "the tail's own subscription");
    drop(tail);
    eventually("the subscription ends with the tail", || async {
        subscribers() == "0"
    })
    .await;
}

/// A tail whose Redis connection is lost ends with a reason (the page
/// starts another), never stays open and silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_ends_when_its_redis_connection_is_lost() {
    let redis = RedisServer::start();
    let nodes = two_nodes(&redis, &[]).await;
    let mut tail = Tail::open(&nodes[0], "group=lost", None).await;
    // Every subscriber connection: the nodes' own reconnect, the tail's
    // does not.
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    let (kind, data) = tail.next().await;
    assert_eq!(kind, "end", "{data}");
    assert!(data["reason"].as_str().unwrap().contains("lost"), "{data}");
}

/// While Redis hangs, the overview and a new tail answer 503 within the
/// API's deadline; the node lives on and shows its record again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_redis_gets_503_in_time_never_a_hang() {
    let redis = RedisServer::start();
    let nodes = two_nodes(&redis, &[]).await;
    redis.signal("STOP");
    for path in ["/api/dashboard/overview", "/api/dashboard/tail?uid=a"] {
        let started = std::time::Instant::now();
        let got = get(&nodes[0], path, None).await;
        redis.signal("CONT");
        common::assert_api_error(path, &got, 503, "unavailable");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{path} answered in {:?}",
            started.elapsed()
        );
        redis.signal("STOP");
    }
    redis.signal("CONT");
    eventually("the overview is back", || async {
        let (status, body) = get(&nodes[0], "/api/dashboard/overview", None).await;
        status == 200
            && body["result"]["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 2)
    })
    .await;
}

// --- The API key ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_needs_the_api_key_and_the_page_does_not() {
    let node = Node::start(&["--api-key", KEY]);
    let paths = [
        "/api/dashboard/overview",
        "/api/dashboard/uid?uid=a",
        "/api/dashboard/group?group=g",
        "/api/dashboard/client?client_id=7f000001ffff00000001",
        "/api/dashboard/tail?uid=a",
    ];
    for path in paths {
        let got = get(&node, path, None).await;
        common::assert_api_error(path, &got, 401, "unauthorized");
        let got = get(&node, path, Some("wrong-key-wrong-key-wrong")).await;
        common::assert_api_error(path, &got, 401, "unauthorized");
    }
    for path in &paths[..4] {
        let (status, body) = get(&node, path, Some(KEY)).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let _tail = Tail::open(&node, "uid=a", Some(KEY)).await;
    // The page and its files carry no secret and need no key.
    for (path, kind) in [
        ("/dashboard", "text/html"),
        ("/dashboard/dashboard.js", "text/javascript"),
        ("/dashboard/dashboard.css", "text/css"),
    ] {
        let res = http()
            .get(format!("http://{}{path}", node.api))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let header = |h: &str| res.headers()[h].to_str().unwrap().to_owned();
        assert_eq!(header("content-type"), format!("{kind}; charset=utf-8"));
        assert!(header("content-security-policy").contains("default-src 'self'"));
        let body = res.text().await.unwrap();
        assert!(!body.contains(KEY));
    }
    // Not on the public listener.
    assert_eq!(node.get_status(true, "/dashboard").await, 404);
}

/// Tails are bounded per node: past the limit a clear 429, and a closed
/// tail frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tails_are_bounded_per_node() {
    let node = Node::start(&[]);
    let mut tails = Vec::new();
    for i in 0..16 {
        tails.push(Tail::open(&node, &format!("uid=u{i}"), None).await);
    }
    let got = get(&node, "/api/dashboard/tail?uid=x", None).await;
    common::assert_api_error("17th tail", &got, 429, "too_many_tails");
    drop(tails.pop());
    eventually("a closed tail frees its place", || async {
        // Dropped at once: a 200 is a stream that does not end.
        http()
            .get(format!("http://{}/api/dashboard/tail?uid=x", node.api))
            .send()
            .await
            .is_ok_and(|res| res.status() == 200)
    })
    .await;
}

// --- In a real browser ---

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `tests/browser/<name>.mjs` as tests/browser.rs does.
fn scenario(name: &str, mut config: Value) {
    let chromium = std::env::var_os("GATECAST_CHROMIUM")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromium".into());
    assert!(
        chromium.exists(),
        "chromium not found at {}: apt-get install chromium (scripts/test does)",
        chromium.display()
    );
    assert!(
        root()
            .join("clients/js/node_modules/playwright-core")
            .exists(),
        "clients/js/node_modules/playwright-core is missing: run `npm ci` in clients/js"
    );
    let limit = Duration::from_secs(90);
    config["chromium"] = json!(chromium);
    config["shots"] = json!(Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser"));
    config["deadline_ms"] = json!(limit.as_millis() - 5000);
    let out = Command::new("node")
        .arg(root().join(format!("tests/browser/{name}.mjs")))
        .arg(config.to_string())
        .current_dir(root())
        .output_within(limit);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- {name} stdout\n{stdout}--- {name} stderr\n{stderr}---");
    assert!(
        out.status.success() && stdout.lines().any(|l| l == format!("ok {name}")),
        "browser scenario {name} failed ({}): {stderr}",
        out.status
    );
}

/// The page on node A asks for the key once (kept for the tab across a
/// reload), shows both nodes with B's real connection count, finds a uid
/// connected to B, tails it, and its test push reaches that client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_both_nodes_finds_and_pushes_in_a_browser() {
    let redis = RedisServer::start();
    let nodes = two_nodes(&redis, &["--api-key", KEY]).await;
    let held: Vec<Client> = vec![
        Client::connect(&nodes[1].ws_url("")).await,
        Client::connect(&nodes[1].ws_url("")).await,
    ];
    let b = node_id(&held[0]);
    let a = Client::connect(&nodes[0].ws_url("")).await;
    let a_id = node_id(&a);
    eventually("both records are written", || async {
        let (_, o) = get(&nodes[0], "/api/dashboard/overview", Some(KEY)).await;
        row(&o["result"], &b).is_some_and(|n| n["connections"] == 2)
            && row(&o["result"], &a_id).is_some()
    })
    .await;
    scenario(
        "dashboard",
        json!({
            "page": format!("http://{}", nodes[0].api),
            "key": KEY,
            "node_a": a_id,
            "node_b": b,
            "b_connections": 2,
            "ws_b": nodes[1].ws_url(""),
            "public_b": format!("http://{}", nodes[1].public),
            "api_b": format!("http://{}", nodes[1].api),
        }),
    );
}
