//! Many hosts, not one loopback (issue 32): gatecast nodes on hosts of
//! their own (network namespaces on a private bridge, tests/common/netns.rs),
//! all on the pod ports 8080/8081/2900 with their own addresses, Redis on
//! another host, and the test's clients on a client host. Faults are real
//! partitions: packets dropped, nothing reset.
//!
//! Needs root (CI runs as root). Without it these tests fail with the
//! reason, unless `GATECAST_SKIP_NETNS=1` (then they say they skip).

mod common;

use std::net::SocketAddrV4;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::netns::{self, Host, Lab, INNER_PORT};
use common::{metric, within, Client, Node, OutputWithin};
use futures_util::StreamExt;
use gatecast::ids::ClientId;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message};

/// Short, so a purge (liveness TTL 2 heartbeats, then a purge round) comes
/// within seconds.
const HEARTBEAT: &str = "1s";

/// One lab at a time: each runs several nodes, and a cut held for seconds
/// must not be stretched by another test's load.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Names (namespaces and links) that exist now and start with `prefix`.
fn names_with(prefix: &str) -> Vec<String> {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut names = Vec::new();
    for line in run(&["netns", "list"]).lines() {
        names.extend(line.split_whitespace().next().map(str::to_owned));
    }
    for line in run(&["-o", "link", "show"]).lines() {
        if let Some(name) = line.split(": ").nth(1) {
            names.push(name.split('@').next().unwrap_or("").to_owned());
        }
    }
    names.retain(|n| n.starts_with(prefix));
    names
}

/// Whether a TCP connection to `addr` opens within a second.
async fn reaches(addr: std::net::SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// The harness itself: two nodes on the same ports with their own
/// addresses; client ids carry each node's own address and inner port
/// without `--advertise-ip`; a push crosses Redis between hosts; a link
/// cut and restored; and nothing of the lab is left after it is dropped.
#[test]
fn nodes_on_their_own_hosts_share_the_pod_ports_and_the_lab_leaves_nothing() {
    if !netns::available("nodes_on_their_own_hosts_share_the_pod_ports") {
        return;
    }
    let _serial = serial();
    let lab = Lab::new();
    let (redis_host, a_host, b_host, client) = (
        lab.host("redis"),
        lab.host("a"),
        lab.host("b"),
        lab.host("client"),
    );
    let prefix = redis_host.ns.split('-').next().unwrap().to_owned();
    let redis = lab.redis(&redis_host, &[]);
    lab.run(&client, async {
        let url = redis.url();
        let args = ["--redis-url", &url, "--node-heartbeat", HEARTBEAT];
        let a = lab.node(&a_host, &args);
        let b = lab.node(&b_host, &args);
        a.wait_ready().await;
        b.wait_ready().await;
        assert_ne!(a_host.ip, b_host.ip);

        let mut on_a = Client::connect(&a.ws_url("")).await;
        let on_b = Client::connect(&b.ws_url("")).await;
        for (client, host) in [(&on_a, &a_host), (&on_b, &b_host)] {
            let id: ClientId = client.id.parse().expect("a client id");
            assert_eq!(
                id.node().addr(),
                SocketAddrV4::new(host.ip, INNER_PORT),
                "the client id carries its node's own address"
            );
        }
        b.ok(
            "send_to_client",
            json!({"client_id": on_a.id, "data": "across hosts"}),
        )
        .await;
        on_a.expect_text("across hosts").await;

        lab.link_down(&a_host);
        assert!(!reaches(a.api).await, "A unreachable with its link down");
        lab.link_up(&a_host);
        within("A reachable again", Duration::from_secs(10), || {
            reaches(a.api)
        })
        .await;
    });
    assert!(!names_with(&prefix).is_empty(), "the lab's names exist");
    drop(redis);
    drop(lab);
    assert_eq!(names_with(&prefix), Vec::<String>::new(), "all removed");
}

// ---------------------------------------------------------------------------
// A node cut off from Redis but not from its clients.

/// What one client went through.
#[derive(Debug, Default, Clone)]
struct Track {
    /// Its client_id on A.
    first: String,
    /// Its client_id now.
    id: String,
    /// Which node it is on now (`a`, `b`).
    on: &'static str,
    /// Bound and joined again after its last reconnection.
    rebound: bool,
    /// Close frames it got: code and reason.
    closes: Vec<(u16, String)>,
    /// Handshakes A refused with 503 `redis_lost`.
    refused_by_a: usize,
    /// Text frames it got (after its welcomes).
    texts: Vec<String>,
    /// When it was closed by A, and when it was back.
    closed_at: Option<Instant>,
    back_at: Option<Instant>,
}

/// A handshake: the connection and its client_id, or the refusal's status
/// and JSON body.
async fn handshake(
    url: &str,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        String,
    ),
    (u16, Value),
> {
    let connect = tokio_tungstenite::connect_async(url);
    let (mut ws, _) = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Err(_) => return Err((0, json!("timeout"))),
        Ok(Err(tungstenite::Error::Http(response))) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            return Err((status, body));
        }
        Ok(Err(e)) => return Err((0, json!(e.to_string()))),
        Ok(Ok(ok)) => ok,
    };
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => {
            let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
            let id = v["client_id"].as_str().unwrap_or("").to_owned();
            Ok((ws, id))
        }
        other => Err((0, json!(format!("no welcome: {other:?}")))),
    }
}

/// Client `i`: connects to A, reads until it gets its two fences (uid
/// and group); when closed
/// it waits `retry_ms` and comes back as a client behind a load balancer
/// would: A first (refused while it has no Redis), then B; on the node
/// that took it, the backend binds it again (uid `u<i>`, group `g<i % 10>`),
/// as an app's connect handler does.
async fn drive(i: usize, a: &Node, b: &Node, tracks: &Mutex<Vec<Track>>) {
    let (mut ws, id) = handshake(&a.ws_url("")).await.expect("connects to A");
    {
        let mut t = tracks.lock().unwrap();
        t[i].first = id.clone();
        t[i].id = id;
        t[i].on = "a";
    }
    let fences = [format!("fence-{i}"), format!("fence-g{}", i % 10)];
    let mut fenced = 0;
    loop {
        let item = tokio::time::timeout(Duration::from_secs(90), ws.next())
            .await
            .unwrap_or_else(|_| panic!("client {i} heard nothing for 90 s"));
        let retry_ms = match item {
            Some(Ok(Message::Text(t))) => {
                fenced += fences.iter().filter(|f| ***f == *t).count();
                tracks.lock().unwrap()[i].texts.push(t.to_string());
                if fenced == fences.len() {
                    let _ = ws.close(None).await;
                    return;
                }
                continue;
            }
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((0, String::new()));
                let v: Value = serde_json::from_str(&reason).unwrap_or(Value::Null);
                let mut t = tracks.lock().unwrap();
                t[i].closes.push((code, reason));
                t[i].closed_at = Some(Instant::now());
                t[i].rebound = false;
                v["retry_ms"].as_u64().unwrap_or(1000)
            }
            Some(Ok(_)) => continue,
            // Broken without a close frame: counted as a close without one.
            None | Some(Err(_)) => {
                let mut t = tracks.lock().unwrap();
                t[i].closes.push((0, "broken".into()));
                t[i].rebound = false;
                1000
            }
        };
        tokio::time::sleep(Duration::from_millis(retry_ms)).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let (next, id, node, on) = loop {
            assert!(Instant::now() < deadline, "client {i} found no node");
            match handshake(&a.ws_url("")).await {
                Ok((ws, id)) => break (ws, id, a, "a"),
                Err((503, body)) if body["error"] == "redis_lost" => {
                    tracks.lock().unwrap()[i].refused_by_a += 1;
                }
                Err(_) => {}
            }
            match handshake(&b.ws_url("")).await {
                Ok((ws, id)) => break (ws, id, b, "b"),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        };
        ws = next;
        let commands = json!({"commands": [
            {"method": "bind_uid", "params": {"client_id": id, "uid": format!("u{i}")}},
            {"method": "join_group", "params": {"client_id": id, "group": format!("g{}", i % 10)}},
        ]});
        let (status, body) = node.call("batch", commands).await;
        assert_eq!(status, 200, "{body}");
        let mut t = tracks.lock().unwrap();
        t[i].id = id;
        t[i].on = on;
        t[i].rebound = true;
        t[i].back_at = Some(Instant::now());
    }
}

/// Runs a batch whose every command must succeed; the results.
async fn batch_ok(api: &Node, commands: Vec<Value>) -> Vec<Value> {
    let mut out = Vec::new();
    for chunk in commands.chunks(500) {
        let (status, body) = api.call("batch", json!({ "commands": chunk })).await;
        assert_eq!(status, 200, "{body}");
        for reply in body["replies"].as_array().unwrap() {
            let result = reply.get("result").unwrap_or_else(|| panic!("{reply}"));
            out.push(result.clone());
        }
    }
    out
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

/// `n` clients on node A; A's link to Redis cut (its clients still reach
/// it) for `cut_for` while pushes flow through B. Past the grace A is
/// unready, refuses handshakes and closes every client with `redis_lost`;
/// they all end on B, bound again. When the link is back A registers again
/// and is ready; the queries are exact (no zombie of A, no double
/// membership), and pushes after it reach every client once.
fn cut_from_redis(test: &str, n: usize, cut_for: Duration) {
    if !netns::available(test) {
        return;
    }
    let _serial = serial();
    let lab = Lab::new();
    let (redis_host, a_host, b_host, client) = (
        lab.host("redis"),
        lab.host("a"),
        lab.host("b"),
        lab.host("client"),
    );
    let redis = lab.redis(&redis_host, &[]);
    lab.run(&client, async {
        let url = redis.url();
        let args = [
            "--redis-url",
            &url,
            "--node-heartbeat",
            HEARTBEAT,
            "--redis-lost-grace",
            "3s",
            "--reconnect-window",
            "2s",
        ];
        let a = lab.node(&a_host, &args);
        let b = lab.node(&b_host, &args);
        a.wait_ready().await;
        b.wait_ready().await;
        let tracks = Mutex::new(vec![Track::default(); n]);
        let drivers = futures_util::future::join_all((0..n).map(|i| drive(i, &a, &b, &tracks)));
        let control = control(
            &lab,
            [&redis_host, &a_host, &b_host],
            &a,
            &b,
            &tracks,
            n,
            cut_for,
        );
        tokio::join!(drivers, control);

        // Every client got its after-push once, and the group push once.
        let tracks = tracks.into_inner().unwrap();
        for (i, t) in tracks.iter().enumerate() {
            let count = |s: &str| t.texts.iter().filter(|x| *x == s).count();
            assert_eq!(count(&format!("after-{i}")), 1, "client {i}: {:?}", t.texts);
            assert_eq!(
                count(&format!("after-g{}", i % 10)),
                1,
                "client {i}: {:?}",
                t.texts
            );
        }
    });
}

/// The test's side: cut, watch, restore, check.
#[allow(clippy::too_many_arguments)]
async fn control(
    lab: &Lab,
    [redis_host, a_host, _b_host]: [&Host; 3],
    a: &Node,
    b: &Node,
    tracks: &Mutex<Vec<Track>>,
    n: usize,
    cut_for: Duration,
) {
    let long = Duration::from_secs(60);
    within("every client connected to A", long, || async {
        tracks.lock().unwrap().iter().all(|t| !t.first.is_empty())
    })
    .await;
    let firsts: Vec<String> = tracks
        .lock()
        .unwrap()
        .iter()
        .map(|t| t.first.clone())
        .collect();
    let mut commands = Vec::new();
    for (i, id) in firsts.iter().enumerate() {
        commands.push(
            json!({"method": "bind_uid", "params": {"client_id": id, "uid": format!("u{i}")}}),
        );
        commands.push(json!({"method": "join_group", "params": {"client_id": id, "group": format!("g{}", i % 10)}}));
    }
    batch_ok(b, commands).await;
    assert_eq!(b.ok("get_all_client_count", json!({})).await, json!(n));

    // Pushes flow through B the whole time.
    let stop = tokio_util::sync::CancellationToken::new();
    let pusher = async {
        let (mut sent, mut failed, mut k) = (0u64, 0u64, 0u64);
        while !stop.is_cancelled() {
            let params = json!({"group": format!("g{}", k % 10), "data": format!("live-{k}")});
            match b.call("send_to_group", params).await.0 {
                200 => sent += 1,
                _ => failed += 1,
            }
            k += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (sent, failed)
    };
    let cut_and_back = async {
        let cut = Instant::now();
        lab.cut(a_host, redis_host);
        within(
            "A unready once cut off",
            Duration::from_secs(10),
            || async { a.get_status(false, "/readyz").await == 503 },
        )
        .await;
        let unready_after = cut.elapsed();
        within(
            "every client closed by A and bound again on B",
            long,
            || async {
                tracks
                    .lock()
                    .unwrap()
                    .iter()
                    .all(|t| t.on == "b" && t.rebound)
            },
        )
        .await;
        let moved_after = cut.elapsed();
        let page = a.get_text("/metrics").await;
        assert_eq!(metric(&page, "gatecast_redis_lost"), 1.0, "{page}");
        assert_eq!(
            metric(&page, "gatecast_redis_lost_closes_total"),
            n as f64,
            "every client closed once"
        );
        {
            let t = tracks.lock().unwrap();
            let first_close = t.iter().filter_map(|t| t.closed_at).min().unwrap();
            let last_close = t.iter().filter_map(|t| t.closed_at).max().unwrap();
            eprintln!(
                "FIGURES {n} clients: A unready {unready_after:?} after the cut; closed from {:?} to {:?}; all back on B and bound {moved_after:?} after the cut",
                first_close - cut,
                last_close - cut,
            );
            for (i, t) in t.iter().enumerate() {
                assert_eq!(t.closes.len(), 1, "client {i} closed once: {:?}", t.closes);
                let (code, reason) = &t.closes[0];
                assert_eq!(*code, 1001, "client {i}: {reason}");
                let v: Value = serde_json::from_str(reason).expect("a JSON reason");
                assert_eq!(v["reason"], "redis_lost", "client {i}");
                let retry = v["retry_ms"].as_u64().expect("retry_ms");
                assert!((250..=2250).contains(&retry), "client {i}: {retry}");
                assert!(t.refused_by_a >= 1, "client {i} tried A first: refused");
                // Not before the grace.
                assert!(
                    t.closed_at.unwrap() - cut >= Duration::from_secs(3),
                    "client {i} closed before the grace"
                );
            }
        }
        if let Some(rest) = cut_for.checked_sub(cut.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        lab.restore(a_host, redis_host);
        within("A ready again", long, || async {
            a.get_status(false, "/readyz").await == 200
        })
        .await;
        eprintln!(
            "FIGURES A ready {:?} after the link came back",
            cut.elapsed().saturating_sub(cut_for)
        );
        stop.cancel();
    };
    let ((sent, failed), ()) = tokio::join!(pusher, cut_and_back);
    eprintln!("FIGURES pushes through B during the test: {sent} accepted, {failed} refused");
    assert!(sent > 0);

    // Exact queries, from both nodes: n clients, each uid on its new id
    // alone, each group its members, nothing left of A's old ids.
    let t = tracks.lock().unwrap().clone();
    let ids: Vec<String> = t.iter().map(|t| t.id.clone()).collect();
    for api in [a, b] {
        within("the cluster counts every client once", long, || async {
            api.ok("get_all_client_count", json!({})).await == json!(n)
        })
        .await;
        let uids: Vec<Value> = (0..n)
            .map(|i| json!({"method": "get_client_id_by_uid", "params": {"uid": format!("u{i}")}}))
            .collect();
        let got = batch_ok(api, uids).await;
        for (i, ids_of) in got.iter().enumerate() {
            assert_eq!(sorted_strings(ids_of), vec![ids[i].clone()], "uid u{i}");
        }
        for k in 0..10 {
            let members = api
                .ok(
                    "get_client_id_list_by_group",
                    json!({"group": format!("g{k}")}),
                )
                .await;
            let mut want: Vec<String> = (0..n)
                .filter(|i| i % 10 == k)
                .map(|i| ids[i].clone())
                .collect();
            want.sort();
            assert_eq!(sorted_strings(&members), want, "group g{k}");
        }
        let online: Vec<Value> = t
            .iter()
            .map(|t| json!({"method": "is_online", "params": {"client_id": t.first}}))
            .collect();
        for (i, v) in batch_ok(api, online).await.iter().enumerate() {
            assert_eq!(*v, json!(false), "A's old id of client {i} is gone");
        }
    }
    let nodes = redis_cli_nodes(lab, redis_host);
    assert_eq!(nodes.len(), 2, "two nodes registered once each: {nodes:?}");

    // A serves again: a new client on A gets a push sent through B.
    let mut fresh = Client::connect(&a.ws_url("")).await;
    b.ok(
        "send_to_client",
        json!({"client_id": fresh.id, "data": "A is back"}),
    )
    .await;
    fresh.expect_text("A is back").await;

    // Pushes after recovery, through A (back in the cluster): each once.
    let mut groups: Vec<Value> = (0..10)
        .map(|k| json!({"method": "send_to_group", "params": {"group": format!("g{k}"), "data": format!("after-g{k}")}}))
        .collect();
    groups.extend((0..10).map(|k| json!({"method": "send_to_group", "params": {"group": format!("g{k}"), "data": format!("fence-g{k}")}})));
    batch_ok(a, groups).await;
    let mut uids = Vec::new();
    for i in 0..n {
        uids.push(json!({"method": "send_to_uid", "params": {"uid": format!("u{i}"), "data": format!("after-{i}")}}));
    }
    for i in 0..n {
        uids.push(json!({"method": "send_to_uid", "params": {"uid": format!("u{i}"), "data": format!("fence-{i}")}}));
    }
    batch_ok(a, uids).await;
}

/// The node set in Redis, read on its host.
fn redis_cli_nodes(_lab: &Lab, redis_host: &Host) -> Vec<String> {
    let out = redis_host.sh("redis-cli", &["SMEMBERS", "gatecast:nodes"]);
    out.lines().map(str::to_owned).collect()
}

#[test]
fn a_node_cut_from_redis_moves_every_client_to_a_healthy_node() {
    cut_from_redis(
        "a_node_cut_from_redis_moves_every_client_to_a_healthy_node",
        300,
        Duration::from_secs(10),
    );
}

/// The issue's size: 2,000 clients, a 30 s cut. Run by hand:
/// `cargo test --test netns -- --ignored full_size`.
#[test]
#[ignore]
fn full_size_a_node_cut_from_redis_for_30s_with_2000_clients() {
    cut_from_redis(
        "full_size_a_node_cut_from_redis_for_30s_with_2000_clients",
        2000,
        Duration::from_secs(30),
    );
}

// ---------------------------------------------------------------------------
// Redis Sentinel failover under load.

/// A primary, a replica and three Sentinels, each on its own host; three
/// nodes with `n` clients between them (uid `u<i>`, group `g<i % 10>`)
/// and pushes flowing through all three. The primary's link is cut (its
/// host gone, nothing reset). Shows: the Sentinels promote the replica;
/// the nodes find the new primary, write their partitions there again
/// (membership written just before the cut included, which the replica may
/// not have had), are all ready again, and pushes flow; what was lost in
/// the window is counted (at most once without history). Figures printed.
fn sentinel_failover(test: &str, load: Load, extra: &[&str]) {
    if !netns::available(test) {
        return;
    }
    let _serial = serial();
    let lab = Lab::new();
    let primary_host = lab.host("primary");
    let replica_host = lab.host("replica");
    let sentinel_hosts: Vec<Host> = (1..=3).map(|i| lab.host(&format!("s{i}"))).collect();
    let node_hosts: Vec<Host> = ["a", "b", "c"].iter().map(|r| lab.host(r)).collect();
    let client = lab.host("client");
    let primary = lab.redis(&primary_host, &[]);
    let replicaof = primary_host.ip.to_string();
    let replica = lab.redis(&replica_host, &["--replicaof", &replicaof, "6379"]);
    let sentinels: Vec<_> = sentinel_hosts
        .iter()
        .map(|h| lab.sentinel(h, &primary_host, 2))
        .collect();
    let url = format!(
        "redis-sentinel://{}:26379/0?sentinelServiceName=mymaster&node={}:26379&node={}:26379",
        sentinel_hosts[0].ip, sentinel_hosts[1].ip, sentinel_hosts[2].ip
    );
    let master_of =
        |s: &netns::NsRedis| s.cli(&["SENTINEL", "get-master-addr-by-name", "mymaster"]);
    // Every Sentinel knows the replica and the other Sentinels before the
    // cut: otherwise there is nothing to promote, or no quorum.
    let deadline = Instant::now() + Duration::from_secs(30);
    for s in &sentinels {
        loop {
            let info = s.cli(&["SENTINEL", "MASTER", "mymaster"]);
            let field = |name: &str| {
                let lines: Vec<&str> = info.lines().collect();
                lines
                    .iter()
                    .position(|l| l.trim() == name)
                    .and_then(|i| lines.get(i + 1))
                    .map(|v| v.trim().to_owned())
            };
            if field("num-slaves").as_deref() == Some("1")
                && field("num-other-sentinels").as_deref() == Some("2")
            {
                break;
            }
            assert!(Instant::now() < deadline, "Sentinels not set up: {info}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let want = format!("{}\n{REDIS_PORT_STR}", replica_host.ip);
    let promoted = || master_of(&sentinels[0]) == want;
    failover_under_load(
        &lab,
        &client,
        &node_hosts,
        &url,
        Fault::cut(&lab, &primary_host, &promoted),
        load,
        "sentinel failover",
        extra,
    );
    drop(sentinels);
    drop(replica);
    drop(primary);
}

/// The payload of a text frame: after the header of an opted-in
/// connection's push (`<header>\n<payload>`), the whole frame otherwise;
/// none for a control frame of an opted-in connection (`recovered`...).
fn payload(text: &str) -> Option<String> {
    match text.split_once('\n') {
        Some((_, payload)) => Some(payload.to_owned()),
        None if text.starts_with("{\"type\"") => None,
        None => Some(text.to_owned()),
    }
}

/// What a test under load does to Redis, and how it knows Redis is whole
/// again.
struct Fault<'a> {
    /// Starts the fault (cuts a host's link, or migrates slots); may block.
    start: Box<dyn Fn() + Sync + 'a>,
    /// Whether it is over (the replica promoted; a migration finished).
    over: &'a (dyn Fn() -> bool + Sync),
}

impl<'a> Fault<'a> {
    /// `host`'s link cut; over when `promoted` says so.
    fn cut(lab: &'a Lab, host: &'a Host, promoted: &'a (dyn Fn() -> bool + Sync)) -> Self {
        Fault {
            start: Box::new(move || lab.link_down(host)),
            over: promoted,
        }
    }
}

/// The load of a test, and what it requires.
#[derive(Clone, Copy)]
struct Load {
    /// Clients, spread over the three nodes.
    n: usize,
    /// Pushes a second (to a group of n/10 members each), through the
    /// nodes in turn.
    rate: u32,
    /// Membership commands must all succeed during the fault, and every
    /// node must stay ready throughout (a slot migration); otherwise they
    /// are counted and retried after it (a failover).
    strict: bool,
    /// Groups the clients are in (client i in `g<i % groups>`).
    groups: usize,
    /// Clients opted in to recovery (`?recover=1`) and every push to a
    /// group kept in history (`--history-streams g:`): then no accepted
    /// push may be lost.
    history: bool,
    /// `--node-heartbeat`.
    heartbeat: &'static str,
}

impl Load {
    /// `n` clients and ~50 pushes a second; a failover.
    fn failover(n: usize) -> Load {
        Load {
            n,
            rate: 50,
            strict: false,
            groups: 10,
            history: false,
            heartbeat: HEARTBEAT,
        }
    }
}

/// The part of a failover test after the set-up: nodes on `node_hosts`
/// on `url`, `load.n` clients, pushes; the fault starts and lasts until
/// it is over; checks and figures (see [`sentinel_failover`]).
#[allow(clippy::too_many_arguments)]
fn failover_under_load(
    lab: &Lab,
    client: &Host,
    node_hosts: &[Host],
    url: &str,
    fault: Fault,
    load: Load,
    what: &str,
    extra: &[&str],
) {
    let n = load.n;
    lab.run(client, async {
        let mut args = vec!["--redis-url", url, "--node-heartbeat", load.heartbeat];
        args.extend_from_slice(extra);
        if load.history {
            args.extend(["--history-streams", "g:", "--history-size", "1000"]);
        }
        let query = if load.history { "?recover=1" } else { "" };
        let groups = load.groups;
        let nodes: Vec<Node> = node_hosts.iter().map(|h| lab.node(h, &args)).collect();
        for node in &nodes {
            node.wait_ready().await;
        }
        // Clients spread over the nodes, bound and joined through another.
        let mut clients = Vec::new();
        for i in 0..n {
            clients.push(Client::connect(&nodes[i % 3].ws_url(query)).await);
        }
        let mut commands = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            commands.push(json!({"method": "bind_uid", "params": {"client_id": c.id, "uid": format!("u{i}")}}));
            commands.push(json!({"method": "join_group", "params": {"client_id": c.id, "group": format!("g{}", i % groups)}}));
        }
        batch_ok(&nodes[1], commands).await;

        let ids: Vec<String> = clients.iter().map(|c| c.id.clone()).collect();
        let received: Vec<Mutex<Vec<String>>> = (0..n).map(|_| Mutex::new(Vec::new())).collect();
        let stop = tokio_util::sync::CancellationToken::new();
        let stop_readers = tokio_util::sync::CancellationToken::new();
        let readers = futures_util::future::join_all(clients.iter_mut().enumerate().map(
            |(i, c)| {
                let (received, stop) = (&received[i], &stop_readers);
                async move {
                    loop {
                        tokio::select! {
                            seen = c.next_within(Duration::from_secs(120)) => match seen {
                                Some(common::Seen::Text(t)) => {
                                    received.lock().unwrap().extend(payload(&t));
                                }
                                other => panic!("client {i}: {other:?}"),
                            },
                            () = stop.cancelled() => return,
                        }
                    }
                }
            },
        ));
        // Pushes through every node in turn, ~50 a second: (number, node,
        // when, accepted).
        let log = Mutex::new(Vec::<(u64, usize, Instant, bool)>::new());
        // `per_tick` pushes at once every 20 ms (1 for 50 a second).
        let per_tick = (load.rate / 50).max(1) as u64;
        let pusher = async {
            let mut k = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while !stop.is_cancelled() {
                tick.tick().await;
                let sends = (k..k + per_tick).map(|k| {
                    let params = json!({"group": format!("g{}", k % groups as u64), "data": format!("p{k}")});
                    let node = (k % 3) as usize;
                    let log = &log;
                    let nodes = &nodes;
                    async move {
                        let status = nodes[node].call("send_to_group", params).await.0;
                        log.lock().unwrap().push((k, node, Instant::now(), status == 200));
                    }
                });
                futures_util::future::join_all(sends).await;
                k += per_tick;
            }
        };
        // Membership commands the whole time: one client after another
        // joins `churn`, through the nodes in turn; the ids that failed.
        let churned = Mutex::new((0usize, Vec::<(String, usize, u16)>::new()));
        // And queries: the members of a group, through the nodes in turn
        // (answered, refused).
        let queried = Mutex::new((0usize, 0usize));
        let churn = async {
            let mut j = 0;
            while !stop.is_cancelled() && j < n {
                let node = j % 3;
                let params = json!({"group": format!("g{}", j % groups)});
                let (status, _) = nodes[node].call("get_client_id_list_by_group", params).await;
                {
                    let mut q = queried.lock().unwrap();
                    q.0 += 1;
                    q.1 += usize::from(status != 200);
                }
                let params = json!({"client_id": ids[j], "group": "churn"});
                let (status, _) = nodes[node].call("join_group", params).await;
                {
                    let mut c = churned.lock().unwrap();
                    c.0 = j + 1;
                    if status != 200 {
                        c.1.push((ids[j].clone(), node, status));
                    }
                }
                j += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let control = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            // Membership written just before the cut: the replica may not
            // have it when it is promoted.
            let late: Vec<Value> = ids
                .iter()
                .take(50)
                .map(|id| json!({"method": "join_group", "params": {"client_id": id, "group": "late"}}))
                .collect();
            batch_ok(&nodes[2], late).await;
            let watches: Vec<_> = node_hosts.iter().map(netns::ReadyWatch::start).collect();
            let cut = Instant::now();
            tokio::task::block_in_place(|| (fault.start)());
            within("the fault is over (the replica promoted, the slots moved)", Duration::from_secs(30), || async {
                (fault.over)()
            })
            .await;
            let promoted = cut.elapsed();
            within("every node ready again", Duration::from_secs(60), || async {
                let mut all = true;
                for node in &nodes {
                    all &= node.get_status(false, "/readyz").await == 200;
                }
                all
            })
            .await;
            let ready = cut.elapsed();
            // Pushes flow for a while on the new primary.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let unready: Vec<usize> = watches.into_iter().map(|w| w.finish().0.len()).collect();
            stop.cancel();
            // The last pushes reach their clients before they stop reading.
            tokio::time::sleep(Duration::from_secs(2)).await;
            stop_readers.cancel();
            (cut, promoted, ready, unready)
        };
        let (_, (), (), (cut, promoted, ready, unready)) =
            tokio::join!(readers, pusher, churn, control);
        let (churn_tried, churn_failed) = churned.into_inner().unwrap();
        let (queries, queries_refused) = queried.into_inner().unwrap();
        eprintln!(
            "FIGURES {what}: /readyz polled every 100 ms on each node's host: not 200 {unready:?} times; membership commands during the test: {churn_tried} join_group, {} refused: {churn_failed:?}; group queries: {queries}, {queries_refused} refused",
            churn_failed.len()
        );
        if load.strict {
            assert_eq!(unready, vec![0; nodes.len()], "every node ready throughout");
            assert_eq!(churn_failed, Vec::new(), "every membership command worked");
            assert_eq!(queries_refused, 0, "every group query answered");
        }
        // The refused ones again, now: they must work.
        for (id, node, _) in &churn_failed {
            nodes[*node]
                .ok("join_group", json!({"client_id": id, "group": "churn"}))
                .await;
        }
        for node in &nodes {
            let members = node
                .ok("get_client_id_list_by_group", json!({"group": "churn"}))
                .await;
            let mut want: Vec<String> = ids[..churn_tried].to_vec();
            want.sort();
            assert_eq!(sorted_strings(&members), want, "group churn");
        }

        // What got through: a push is delivered when every member of its
        // group got it.
        let got: Vec<std::collections::HashSet<String>> = received
            .iter()
            .map(|r| r.lock().unwrap().iter().cloned().collect())
            .collect();
        for (i, r) in received.iter().enumerate() {
            let r = r.lock().unwrap();
            let distinct: std::collections::HashSet<&String> = r.iter().collect();
            assert_eq!(distinct.len(), r.len(), "client {i} got a push twice");
        }
        let log = log.into_inner().unwrap();
        let delivered = |k: u64| {
            let text = format!("p{k}");
            let g = groups as u64;
            (0..n).filter(|i| (*i as u64) % g == k % g).all(|i| got[i].contains(&text))
        };
        let accepted_lost: Vec<u64> = log
            .iter()
            .filter(|(k, _, _, ok)| *ok && !delivered(*k))
            .map(|(k, ..)| *k)
            .collect();
        let refused = log.iter().filter(|(.., ok)| !ok).count();
        let flowing_again = log
            .iter()
            .filter(|(k, _, at, ok)| *at > cut && *ok && delivered(*k))
            .map(|(_, _, at, _)| *at - cut)
            .min();
        let last_refused = log
            .iter()
            .filter(|(_, _, at, ok)| *at > cut && !*ok)
            .map(|(_, _, at, _)| *at - cut)
            .max();
        // The longest stretch after the cut with no push delivered (by
        // when their calls returned).
        let mut delivered_at: Vec<Duration> = log
            .iter()
            .filter(|(k, _, at, ok)| *at > cut && *ok && delivered(*k))
            .map(|(_, _, at, _)| *at - cut)
            .collect();
        delivered_at.sort();
        let longest_gap = delivered_at
            .windows(2)
            .map(|w| w[1] - w[0])
            .chain(delivered_at.first().copied())
            .max();
        eprintln!("FIGURES {what}: longest stretch after the cut without a delivered push: {longest_gap:?}");
        if load.strict {
            let gap = longest_gap.expect("pushes delivered after the cut");
            assert!(gap < Duration::from_secs(5), "pushes stalled for {gap:?}");
        }
        eprintln!(
            "FIGURES {what}, {n} clients, {} pushes (~{}/s): replica promoted {promoted:?} after the cut; every node ready {ready:?} after; first push delivered after the cut at {flowing_again:?}; last push refused at {last_refused:?}; {refused} refused (503), {} accepted but not delivered to every member: {accepted_lost:?}",
            log.len(),
            load.rate,
            accepted_lost.len()
        );
        assert!(ready < Duration::from_secs(60));
        if load.history {
            // Kept in history: a push the API accepted reaches every member
            // (the nodes read back what their subscribers missed).
            assert_eq!(accepted_lost, Vec::<u64>::new(), "accepted pushes lost with history on");
        }

        // Membership on the new primary exact, the late joins included:
        // the nodes wrote their partitions there again.
        for node in &nodes {
            assert_eq!(node.ok("get_all_client_count", json!({})).await, json!(n));
            let members = node
                .ok("get_client_id_list_by_group", json!({"group": "late"}))
                .await;
            let mut want: Vec<String> = clients.iter().take(50).map(|c| c.id.clone()).collect();
            want.sort();
            assert_eq!(sorted_strings(&members), want, "the late joins");
            let uids: Vec<Value> = (0..n)
                .map(|i| json!({"method": "get_client_id_by_uid", "params": {"uid": format!("u{i}")}}))
                .collect();
            for (i, ids) in batch_ok(node, uids).await.iter().enumerate() {
                assert_eq!(sorted_strings(ids), vec![clients[i].id.clone()], "uid u{i}");
            }
        }
        // Pushes after the failover through every node reach every member once.
        for (j, node) in nodes.iter().enumerate() {
            node.ok("send_to_group", json!({"group": "late", "data": format!("after-{j}")}))
                .await;
        }
        for c in clients.iter_mut().take(50) {
            let mut got: Vec<String> = Vec::new();
            while got.len() < 3 {
                match c.next().await {
                    common::Seen::Text(t) => got.extend(payload(&t)),
                    other => panic!("{other:?}"),
                }
            }
            got.sort();
            assert_eq!(got, ["after-0", "after-1", "after-2"]);
        }
    });
}

/// A Redis Cluster of three masters and three replicas, each on its own
/// host (cluster-node-timeout 2 s); the same load and checks as the
/// Sentinel test; the first master's link is cut, its replica takes over.
fn cluster_failover(test: &str, n: usize) {
    if !netns::available(test) {
        return;
    }
    let _serial = serial();
    let lab = Lab::new();
    let hosts: Vec<Host> = (1..=6).map(|i| lab.host(&format!("r{i}"))).collect();
    let node_hosts: Vec<Host> = ["a", "b", "c"].iter().map(|r| lab.host(r)).collect();
    let client = lab.host("client");
    let servers: Vec<_> = hosts
        .iter()
        .map(|h| {
            lab.redis(
                h,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "2000",
                    // The replicas' first sync at once, not after 5 s.
                    "--repl-diskless-sync-delay",
                    "0",
                ],
            )
        })
        .collect();
    let addrs: Vec<String> = hosts.iter().map(|h| format!("{}:6379", h.ip)).collect();
    let mut create = vec!["--cluster", "create"];
    create.extend(addrs.iter().map(String::as_str));
    create.extend(["--cluster-replicas", "1", "--cluster-yes"]);
    hosts[0].sh("redis-cli", &create);
    let deadline = Instant::now() + Duration::from_secs(30);
    for s in &servers {
        while !s.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
            assert!(Instant::now() < deadline, "cluster not ok");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Every replica in sync with its master before the load starts: a
    // replica that never had its master's link refuses to take over
    // ("Disconnected from master for longer than allowed"), and the
    // Cluster stays down for good (the test's own set-up, not gatecast).
    for s in &servers {
        loop {
            let info = s.cli(&["INFO", "replication"]);
            if info.contains("role:master") || info.contains("master_link_status:up") {
                break;
            }
            assert!(Instant::now() < deadline, "replica not in sync: {info}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // The master cut: the first (masters are the first three given);
    // its replica must be up to date before the cut.
    let cut = &hosts[0];
    let nodes_line = |s: &netns::NsRedis, ip: std::net::Ipv4Addr| {
        s.cli(&["CLUSTER", "NODES"])
            .lines()
            .find(|l| l.contains(&format!(" {ip}:6379@")))
            .map(str::to_owned)
            .unwrap_or_default()
    };
    let url = format!(
        "redis-cluster://{}:6379?node={}:6379&node={}:6379",
        hosts[0].ip, hosts[1].ip, hosts[2].ip
    );
    // Promoted: another master sees the cut one failed and the cluster ok
    // again (its replica took the slots).
    // (Flags `fail`, not `fail?`: a master only suspected keeps its slots,
    // and the state is still ok before the Cluster agrees it failed.)
    let promoted = || {
        let s = &servers[1];
        let line = nodes_line(s, cut.ip);
        let failed = line
            .split_whitespace()
            .nth(2)
            .is_some_and(|flags| flags.split(',').any(|f| f == "fail"));
        failed && s.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
    };
    failover_under_load(
        &lab,
        &client,
        &node_hosts,
        &url,
        Fault::cut(&lab, cut, &promoted),
        Load::failover(n),
        "cluster master failover",
        &["--redis-lost-grace", "60s"],
    );
    drop(servers);
}

/// Failed before `TCP_USER_TIMEOUT` was set on fred's connections
/// (`client::UNACKED_TIMEOUT`): once the socket to the cut master had a
/// full send buffer, fred's router waited on that write for ever, so no
/// command, no forced reconnection and no cluster re-sync ran again, and
/// the nodes stayed unready (60 s and more) while the Cluster had long
/// promoted the replica.
#[test]
fn a_cluster_master_failover_under_load_rewrites_membership_and_pushes_flow_again() {
    cluster_failover(
        "a_cluster_master_failover_under_load_rewrites_membership_and_pushes_flow_again",
        300,
    );
}

/// The id of the node on `host` (its address and the inner port, hex).
fn node_id(host: &Host) -> String {
    format!("{:08x}{INNER_PORT:04x}", u32::from(host.ip))
}

/// Whether a `CLUSTER NODES` line owns `slot`.
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

/// Moves `slot` with its keys from its master to the next one of
/// `masters` (hosts of Redis on port 6379, masters only), as `redis-cli
/// --cluster reshard` does: the target IMPORTING, the source MIGRATING,
/// the keys moved `batch` at a time with MIGRATE (a pause between
/// batches, so the load meets a slot half moved), then SETSLOT NODE on
/// every master. Returns the keys moved.
fn migrate_slot(masters: &[Host], slot: u16, batch: usize, pause: Duration) -> usize {
    let cli = |h: &Host, args: &[&str]| -> String {
        let mut all = vec!["-p", REDIS_PORT_STR];
        all.extend_from_slice(args);
        h.sh("redis-cli", &all)
    };
    let ids: Vec<String> = masters
        .iter()
        .map(|h| cli(h, &["CLUSTER", "MYID"]))
        .collect();
    let owner = masters
        .iter()
        .position(|h| {
            cli(h, &["CLUSTER", "NODES"])
                .lines()
                .any(|l| l.contains("myself") && owns(l, slot))
        })
        .expect("an owner of the slot");
    let to = (owner + 1) % masters.len();
    let (src, dst) = (&masters[owner], &masters[to]);
    let s = slot.to_string();
    assert_eq!(
        cli(dst, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &ids[owner]]),
        "OK"
    );
    assert_eq!(
        cli(src, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &ids[to]]),
        "OK"
    );
    let dst_ip = dst.ip.to_string();
    let mut moved = 0;
    loop {
        let keys = cli(src, &["CLUSTER", "GETKEYSINSLOT", &s, &batch.to_string()]);
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        if keys.is_empty() {
            break;
        }
        let mut args = vec!["MIGRATE", &dst_ip, REDIS_PORT_STR, "", "0", "5000", "KEYS"];
        args.extend(keys.iter().copied());
        let answer = cli(src, &args);
        assert!(answer == "OK" || answer == "NOKEY", "MIGRATE: {answer}");
        moved += keys.len();
        std::thread::sleep(pause);
    }
    // The target first, then the source, then the others (as redis-cli).
    assert_eq!(
        cli(dst, &["CLUSTER", "SETSLOT", &s, "NODE", &ids[to]]),
        "OK"
    );
    assert_eq!(
        cli(src, &["CLUSTER", "SETSLOT", &s, "NODE", &ids[to]]),
        "OK"
    );
    for (i, other) in masters.iter().enumerate() {
        if i != owner && i != to {
            cli(other, &["CLUSTER", "SETSLOT", &s, "NODE", &ids[to]]);
        }
    }
    moved
}

/// A Redis Cluster of three masters, each on its own host; three nodes
/// with `load.n` clients (uid `u<i>`, group `g<i % 10>`) and pushes on
/// sharded pub/sub; the slots of node A's partition (its membership
/// keys), of A's node channel and of group g0's channel are migrated with
/// their keys while pushes and membership commands flow. Shows: every
/// node stays ready, every membership command works (ASK and MOVED
/// followed), pushes flow on, what is lost in the window is counted, and
/// the queries are exact after.
fn cluster_slot_migration(test: &str, load: Load) {
    if !netns::available(test) {
        return;
    }
    let _serial = serial();
    let lab = Lab::new();
    let hosts: Vec<Host> = (1..=3).map(|i| lab.host(&format!("r{i}"))).collect();
    let node_hosts: Vec<Host> = ["a", "b", "c"].iter().map(|r| lab.host(r)).collect();
    let client = lab.host("client");
    let servers: Vec<_> = hosts
        .iter()
        .map(|h| {
            lab.redis(
                h,
                &["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
            )
        })
        .collect();
    let addrs: Vec<String> = hosts.iter().map(|h| format!("{}:6379", h.ip)).collect();
    let mut create = vec!["--cluster", "create"];
    create.extend(addrs.iter().map(String::as_str));
    create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
    // Longer than the usual 10 s: on a loaded box `--cluster create` waits
    // for the masters to agree for longer (seen once).
    let out = hosts[0]
        .command("redis-cli")
        .args(&create)
        .output_within(Duration::from_secs(30));
    assert!(out.status.success(), "redis-cli {create:?}: {out:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    for s in &servers {
        while !s.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
            assert!(Instant::now() < deadline, "cluster not ok");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let slot_of = |key: &str| -> u16 {
        servers[0]
            .cli(&["CLUSTER", "KEYSLOT", key])
            .parse()
            .expect("a slot")
    };
    let a = node_id(&node_hosts[0]);
    let mut slots = vec![
        slot_of(&format!("{{{a}}}")),
        slot_of(&format!("gatecast:node:{a}")),
        slot_of("gatecast:group:g0"),
    ];
    slots.dedup();
    // The migration runs on a thread of its own while the load goes on;
    // over when it has finished.
    let migration: Mutex<Option<std::thread::JoinHandle<usize>>> = Mutex::new(None);
    let start = || {
        let (masters, slots) = (hosts.clone(), slots.clone());
        let thread = std::thread::spawn(move || {
            slots
                .iter()
                .map(|slot| migrate_slot(&masters, *slot, 10, Duration::from_millis(100)))
                .sum::<usize>()
        });
        *migration.lock().unwrap() = Some(thread);
    };
    let over = || {
        migration
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|t| t.is_finished())
    };
    let url = format!(
        "redis-cluster://{}:6379?node={}:6379&node={}:6379",
        hosts[0].ip, hosts[1].ip, hosts[2].ip
    );
    failover_under_load(
        &lab,
        &client,
        &node_hosts,
        &url,
        Fault {
            start: Box::new(start),
            over: &over,
        },
        load,
        "cluster slot migration",
        &[],
    );
    let thread = migration.lock().unwrap().take().expect("the migration ran");
    let moved = match thread.join() {
        Ok(moved) => moved,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    eprintln!("FIGURES cluster slot migration: slots {slots:?} migrated, {moved} keys moved");
    // A's partition was among them: its membership keys moved.
    assert!(moved >= load.n / 3, "{moved} keys moved");
    drop(servers);
}

#[test]
fn a_cluster_slot_migration_under_load_keeps_membership_and_pushes_flowing() {
    cluster_slot_migration(
        "a_cluster_slot_migration_under_load_keeps_membership_and_pushes_flowing",
        Load {
            strict: true,
            ..Load::failover(150)
        },
    );
}

const REDIS_PORT_STR: &str = "6379";

#[test]
fn a_sentinel_failover_under_load_rewrites_membership_and_pushes_flow_again() {
    sentinel_failover(
        "a_sentinel_failover_under_load_rewrites_membership_and_pushes_flow_again",
        Load::failover(300),
        &[],
    );
}

/// The same failover with every client opted in to recovery and every
/// push to a group kept in history: no push the API accepted is lost. On
/// the default heartbeat (5 s): the nodes close opted-in clients only
/// after 2.5 heartbeats without Redis (they would resume elsewhere), and
/// the failover is shorter, so this shows the nodes reading back from
/// history what their subscribers missed (gap repair).
#[test]
fn a_sentinel_failover_with_history_loses_no_accepted_push() {
    sentinel_failover(
        "a_sentinel_failover_with_history_loses_no_accepted_push",
        Load {
            history: true,
            heartbeat: "5s",
            ..Load::failover(300)
        },
        &[],
    );
}

/// The issue's size: 3 nodes, 3,000 clients (in 300 groups of 10), 1,000
/// pushes a second. Run by hand:
/// `cargo test --release --test netns -- --ignored full_size_a_sentinel`.
#[test]
#[ignore]
fn full_size_a_sentinel_failover_with_3000_clients_at_1000_pushes_a_second() {
    sentinel_failover(
        "full_size_a_sentinel_failover_with_3000_clients_at_1000_pushes_a_second",
        Load {
            rate: 1000,
            groups: 300,
            ..Load::failover(3000)
        },
        &[],
    );
}

/// The same with recovery and history on.
#[test]
#[ignore]
fn full_size_a_sentinel_failover_with_history_3000_clients_at_1000_pushes_a_second() {
    sentinel_failover(
        "full_size_a_sentinel_failover_with_history_3000_clients_at_1000_pushes_a_second",
        Load {
            rate: 1000,
            groups: 300,
            history: true,
            heartbeat: "5s",
            ..Load::failover(3000)
        },
        &[],
    );
}

// ---------------------------------------------------------------------------
// Node identity across hosts.

/// Two nodes on different hosts, both on inner port 2900: B is told A's
/// address by mistake (`--advertise-ip`), so it would have A's node id.
/// B stops (exit status not 0); A, its clients and its partition are
/// untouched; a third node on its own address joins as usual.
#[test]
fn a_node_advertising_another_hosts_address_is_refused() {
    let test = "a_node_advertising_another_hosts_address_is_refused";
    if !netns::available(test) {
        return;
    }
    let _serial = serial();
    let lab = Lab::new();
    let (redis_host, a_host, b_host, c_host, client) = (
        lab.host("redis"),
        lab.host("a"),
        lab.host("b"),
        lab.host("c"),
        lab.host("client"),
    );
    let redis = lab.redis(&redis_host, &[]);
    lab.run(&client, async {
        let url = redis.url();
        let args = ["--redis-url", &url, "--node-heartbeat", HEARTBEAT];
        let a = lab.node(&a_host, &args);
        a.wait_ready().await;
        let mut on_a = Client::connect(&a.ws_url("")).await;
        a.ok("join_group", json!({"client_id": on_a.id, "group": "g"}))
            .await;
        let a_ip = a_host.ip.to_string();
        let mut wrong = args.to_vec();
        wrong.extend(["--advertise-ip", &a_ip]);
        let mut b = lab.node(&b_host, &wrong);
        let status = b.wait_exit(Duration::from_secs(20)).await;
        assert!(!status.success(), "B must stop: {status:?}");

        let c = lab.node(&c_host, &args);
        c.wait_ready().await;
        assert_eq!(a.get_status(false, "/readyz").await, 200);
        assert_eq!(
            c.ok("get_client_id_list_by_group", json!({"group": "g"}))
                .await,
            json!([on_a.id])
        );
        c.ok("send_to_group", json!({"group": "g", "data": "still A's"}))
            .await;
        on_a.expect_text("still A's").await;
    });
}

// ---------------------------------------------------------------------------
// A slow link.

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Node A's link limited to 1 Mbit/s (tbf, both ways) while ~1.6 Mbit/s of
/// pushes for its client flow through B: A falls behind (its inbox full,
/// the rest waits in Redis's output buffer), loses nothing, keeps its
/// memory bounded, and catches up once the link is restored: the client
/// gets every push once, in order. Figures printed.
#[test]
fn a_node_on_a_slow_link_falls_behind_and_catches_up_losing_nothing() {
    let test = "a_node_on_a_slow_link_falls_behind_and_catches_up_losing_nothing";
    if !netns::available(test) {
        return;
    }
    let _serial = serial();
    let lab = Lab::new();
    let (redis_host, a_host, b_host, client) = (
        lab.host("redis"),
        lab.host("a"),
        lab.host("b"),
        lab.host("client"),
    );
    let redis = lab.redis(&redis_host, &[]);
    lab.run(&client, async {
        let url = redis.url();
        // A grace longer than the test: a slow link is not a lost one. The
        // default heartbeat (5 s, liveness TTL 10 s): the lab's 1 s (TTL
        // 2 s) is shorter than two retransmissions of a lost segment on a
        // link whose queue holds 400 ms, so B purged A now and then and A
        // was unready while it wrote itself back over the slow link.
        let args = [
            "--redis-url",
            &url,
            "--node-heartbeat",
            "5s",
            "--redis-lost-grace",
            "120s",
        ];
        let a = lab.node(&a_host, &args);
        let b = lab.node(&b_host, &args);
        a.wait_ready().await;
        b.wait_ready().await;
        let mut c = Client::connect(&a.ws_url("")).await;
        b.ok("join_group", json!({"client_id": c.id, "group": "slow"}))
            .await;
        let rss_before = rss_kib(a.pid());

        let watch = netns::ReadyWatch::start(&a_host);
        lab.slow(&a_host, "1mbit");
        const PUSHES: usize = 400;
        let body = "x".repeat(2000);
        let started = Instant::now();
        let pushes = async {
            for i in 0..PUSHES {
                let data = format!("{i:04}{body}");
                b.ok("send_to_group", json!({"group": "slow", "data": data}))
                    .await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            started.elapsed()
        };
        let mut got = Vec::new();
        let delivered = std::sync::atomic::AtomicUsize::new(0);
        let mut readiness = Vec::new();
        let reader = async {
            while got.len() < PUSHES {
                match c.next_within(Duration::from_secs(60)).await {
                    Some(common::Seen::Text(t)) => {
                        got.push(t[..4].to_owned());
                        delivered.store(got.len(), std::sync::atomic::Ordering::Relaxed);
                    }
                    other => panic!("after {}: {other:?}", got.len()),
                }
                if got.len() == PUSHES / 2 {
                    readiness.push(a.get_status(false, "/readyz").await);
                }
            }
        };
        let restore = async {
            // Slow for 8 s, then the link is restored.
            tokio::time::sleep(Duration::from_secs(8)).await;
            let page = a.get_text("/metrics").await;
            let rss_slow = rss_kib(a.pid());
            let by_then = delivered.load(std::sync::atomic::Ordering::Relaxed);
            lab.unslow(&a_host);
            (page, rss_slow, started.elapsed(), by_then)
        };
        let (sent_in, (), (page, rss_slow, restored_at, by_then)) = tokio::join!(pushes, reader, restore);
        let done = started.elapsed();
        let (unready, polls) = watch.finish();
        eprintln!("FIGURES slow link: /readyz polled {polls} times from A's own host, not 200: {unready:?}");
        // A slow link is not a lost one: A stays ready (its probe's PING on
        // a connection of its own, and late answers taken while the
        // subscriber still hears from Redis). Where a lost segment stalls
        // both the PING and the subscriber past a second, /readyz may say
        // 503 for a moment; never for as long as the manifests' readiness
        // probe needs to take the pod out of its Service (two failures, 5 s
        // apart: k8s/deployment.yaml, the helm chart).
        assert!(polls > 50, "{polls} polls");
        let longest = netns::longest_unready(&unready);
        assert!(
            longest < Duration::from_secs(5),
            "A unready for {longest:?} on a slow link: {unready:?}"
        );
        assert!(metric(&page, "gatecast_redis_probe_late_total") >= 0.0);
        let want: Vec<String> = (0..PUSHES).map(|i| format!("{i:04}")).collect();
        assert_eq!(got, want, "every push once, in order");
        assert_eq!(metric(&page, "gatecast_pubsub_dropped_total"), 0.0);
        // It said it was behind while slow, and says it caught up after.
        assert_eq!(metric(&page, "gatecast_redis_subscriber_behind"), 1.0, "{page}");
        let lag_slow = metric(&page, "gatecast_redis_subscriber_lag_seconds");
        assert!(lag_slow >= 1.0, "lag while slow: {lag_slow}");
        within("A says it caught up", Duration::from_secs(30), || async {
            metric(&a.get_text("/metrics").await, "gatecast_redis_subscriber_behind") == 0.0
        })
        .await;
        let caught_up = started.elapsed();
        eprintln!(
            "FIGURES slow link: lag {lag_slow} s at {restored_at:?}, behind until {caught_up:?};"
        );
        eprintln!(
            "FIGURES slow link: {PUSHES} pushes of 2 KB sent in {sent_in:?} (~{:.1} Mbit/s), link restored at {restored_at:?} with {by_then} delivered, all delivered at {done:?}; A's RSS {rss_before} KiB before, {rss_slow} KiB while slow; /readyz mid-way {readiness:?}",
            (PUSHES * 2004 * 8) as f64 / sent_in.as_secs_f64() / 1e6
        );
        assert!(
            rss_slow < rss_before + 64 * 1024,
            "bounded memory: {rss_before} -> {rss_slow} KiB"
        );
    });
}

/// Node A's link limited to 1 Mbit/s while ~3 Mbit/s of pushes for its
/// (opted-in) client flow through B, on a Redis whose pub/sub output
/// buffer limit is low (`client-output-buffer-limit pubsub 256kb 128kb 1`):
/// Redis closes A's subscriber. A says so (counted as `closed_behind`,
/// logged), connects again, subscribes again, keeps its memory bounded,
/// and once the link is restored delivers again, in order, never twice.
/// With `whole`, its client must also have every push: A reads back from
/// history what its subscriber missed. That fails today (see
/// [`a_slow_node_cut_at_the_pubsub_output_buffer_limit_loses_nothing_with_history`]).
fn slow_past_the_output_buffer_limit(test: &str, whole: bool) {
    if !netns::available(test) {
        return;
    }
    let _serial = serial();
    let lab = Lab::new();
    let (redis_host, a_host, b_host, client) = (
        lab.host("redis"),
        lab.host("a"),
        lab.host("b"),
        lab.host("client"),
    );
    let redis = lab.redis(
        &redis_host,
        &["--client-output-buffer-limit", "pubsub 256kb 128kb 1"],
    );
    lab.run(&client, async {
        let url = redis.url();
        let args = [
            "--redis-url",
            &url,
            "--node-heartbeat",
            "5s",
            "--redis-lost-grace",
            "120s",
            "--history-streams",
            "g:",
            "--history-size",
            "2000",
        ];
        let a = lab.node(&a_host, &args);
        let b = lab.node(&b_host, &args);
        a.wait_ready().await;
        b.wait_ready().await;
        // Opted in only for the whole variant: a node that cannot read a
        // gap back closes its opted-in clients to resume (never a silent
        // gap), and this test's client does not resume.
        let mut c = Client::connect(&a.ws_url(if whole { "?recover=1" } else { "" })).await;
        b.ok("join_group", json!({"client_id": c.id, "group": "slow"}))
            .await;
        let rss_before = rss_kib(a.pid());

        lab.slow(&a_host, "1mbit");
        const PUSHES: usize = 600;
        let body = "x".repeat(2000);
        let started = Instant::now();
        let pushes = async {
            for i in 0..PUSHES {
                let data = format!("{i:04}{body}");
                b.ok("send_to_group", json!({"group": "slow", "data": data}))
                    .await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            started.elapsed()
        };
        // Every payload until "after", the push sent once the link is back.
        let mut got = Vec::new();
        let mut told_to_resume = false;
        let reader = async {
            loop {
                match c.next_within(Duration::from_secs(60)).await {
                    Some(common::Seen::Close(Some(1001))) if whole => {
                        told_to_resume = true;
                        return;
                    }
                    Some(common::Seen::Text(t)) => match payload(&t) {
                        Some(p) if p == "after" => {
                            got.push(p);
                            return;
                        }
                        Some(p) => got.push(p[..4].to_owned()),
                        None => {}
                    },
                    other => panic!("after {}: {other:?}", got.len()),
                }
            }
        };
        let closed = r#"gatecast_redis_subscriber_reconnects_total{reason="closed_behind"}"#;
        let control = async {
            // Slow until Redis closed the subscriber, and 4 s more (the
            // node reconnects and reads back over the slow link), then the
            // link is restored.
            within("redis closes A's subscriber", Duration::from_secs(60), || async {
                metric(&a.get_text("/metrics").await, closed) >= 1.0
            })
            .await;
            let cut_at = started.elapsed();
            tokio::time::sleep(Duration::from_secs(4)).await;
            let rss_slow = rss_kib(a.pid());
            let page_slow = a.get_text("/metrics").await;
            lab.unslow(&a_host);
            let restored_at = started.elapsed();
            a.wait_ready().await;
            let ready_at = started.elapsed();
            // The next push on the stream shows the gap; A reads it back.
            b.ok("send_to_group", json!({"group": "slow", "data": "after"}))
                .await;
            (cut_at, rss_slow, page_slow, restored_at, ready_at)
        };
        let (sent_in, (), (cut_at, rss_slow, page_slow, restored_at, ready_at)) =
            tokio::join!(pushes, reader, control);
        let done = started.elapsed();
        let page = a.get_text("/metrics").await;
        let mut want: Vec<String> = (0..PUSHES).map(|i| format!("{i:04}")).collect();
        want.push("after".into());
        let missing = want.iter().filter(|w| !got.contains(w)).count();
        eprintln!(
            "FIGURES output buffer limit: {PUSHES} pushes of 2 KB sent in {sent_in:?} (~{:.1} Mbit/s); subscriber closed by redis by {cut_at:?} ({} times in all, {} while slow); link restored at {restored_at:?}, A ready at {ready_at:?}; all delivered at {done:?}; {} received before the restoration's push, {missing} missing at the end; gap repairs {}; A's RSS {rss_before} KiB before, {rss_slow} KiB while slow",
            (PUSHES * 2004 * 8) as f64 / sent_in.as_secs_f64() / 1e6,
            metric(&page, closed),
            metric(&page_slow, closed),
            got.len() - 1,
            metric(&page, "gatecast_history_gap_repairs_total"),
        );
        assert!(metric(&page, closed) >= 1.0, "{page}");
        // In order, never twice; "after" last.
        assert!(got.windows(2).all(|w| w[0] < w[1] || w[1] == "after"), "{got:?}");
        assert!(told_to_resume || got.last().map(String::as_str) == Some("after"));
        if whole && told_to_resume {
            // The read-back failed on the slow link: what came before the
            // close has no gap, and the client was told to resume.
            assert!(got.iter().zip(&want).all(|(g, w)| g == w), "{got:?}");
            eprintln!("FIGURES output buffer limit: closed 1001 to resume after {} pushes", got.len());
        } else if whole {
            assert_eq!(got, want, "every push once, in order");
            assert!(
                metric(&page, "gatecast_history_gap_repairs_total") >= 1.0,
                "read back from history: {page}"
            );
        }
        assert!(
            rss_slow < rss_before + 64 * 1024,
            "bounded memory: {rss_before} -> {rss_slow} KiB"
        );
    });
}

#[test]
fn a_slow_node_cut_at_the_pubsub_output_buffer_limit_reconnects_and_delivers_again() {
    slow_past_the_output_buffer_limit(
        "a_slow_node_cut_at_the_pubsub_output_buffer_limit_reconnects_and_delivers_again",
        false,
    );
}

/// Not in CI: the same with an opted-in client. After the subscriber's
/// reconnection the node reads back from history what it missed (3 tries
/// of at most 2 s, within 5 s); on a 1 Mbit/s link ~0.6 MB of missed
/// pushes often take longer. Then the node closes the client with 1001
/// (`history_gap`) to resume from its position rather than deliver past
/// the gap; this test passes when every push came once, in order, or the
/// client was closed so with no gap before the close. (Before the fix, one
/// run lost 293 of 600 pushes without a word.) Run by hand:
/// `cargo test --test netns -- --ignored loses_nothing_with_history`.
#[test]
#[ignore]
fn a_slow_node_cut_at_the_pubsub_output_buffer_limit_loses_nothing_with_history() {
    slow_past_the_output_buffer_limit(
        "a_slow_node_cut_at_the_pubsub_output_buffer_limit_loses_nothing_with_history",
        true,
    );
}
