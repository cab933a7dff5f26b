//! Rebalancing after a scale-out, behind a real load balancer: HAProxy
//! from Debian (`balance roundrobin`, health checks on `/readyz`), with
//! servers added through its runtime API as an autoscaler would. Two
//! nodes on one Redis hold the clients; a third is added; clients that
//! reconnect as the browser client does (wait the close frame's
//! `retry_ms`, then connect through the balancer again) end up spread
//! within the tolerance, with no more moves than a few times the ideal.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::redis::{free_port, RedisServer};
use common::{metric, Node, WAIT};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// HAProxy in front of the nodes, killed when dropped.
struct Haproxy {
    child: Child,
    dir: PathBuf,
    /// Where clients connect.
    port: u16,
}

impl Haproxy {
    /// Starts HAProxy balancing over `servers` (name, public address).
    fn start(servers: &[(&str, std::net::SocketAddr)]) -> Haproxy {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("gatecast-haproxy-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = format!(
            "global\n  stats socket {}/admin.sock level admin\n  maxconn 9000\n\
             defaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n\
             timeout server 60s\n  timeout tunnel 1h\n\
             frontend ws\n  bind 127.0.0.1:{port}\n  default_backend nodes\n\
             backend nodes\n  balance roundrobin\n  option httpchk GET /readyz\n\
             timeout check 2s\n  default-server check inter 200ms fall 3 rise 1\n",
            dir.display()
        );
        for (name, addr) in servers {
            config.push_str(&format!("  server {name} {addr}\n"));
        }
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("haproxy starts (scripts/test installs it)");
        Haproxy { child, dir, port }
    }

    /// One command on the runtime API; its answer.
    async fn command(&self, line: &str) -> String {
        let exchange = async {
            let mut socket = tokio::net::UnixStream::connect(self.dir.join("admin.sock")).await?;
            socket.write_all(format!("{line}\n").as_bytes()).await?;
            let mut answer = String::new();
            socket.read_to_string(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        tokio::time::timeout(WAIT, exchange)
            .await
            .expect("the runtime API answers in time")
            .unwrap_or_else(|e| panic!("runtime API: {e}"))
    }

    /// Adds a server as an autoscaler would, checked like the others.
    async fn add_server(&self, name: &str, addr: std::net::SocketAddr) {
        let added = self
            .command(&format!(
                "add server nodes/{name} {addr} check inter 200ms fall 1 rise 1"
            ))
            .await;
        assert!(added.contains("New server registered"), "{added}");
        for what in ["enable health", "enable server"] {
            let answer = self.command(&format!("{what} nodes/{name}")).await;
            assert!(answer.trim().is_empty(), "{what}: {answer}");
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the reconnecting clients saw.
#[derive(Default)]
struct Stats {
    /// Closes with a `retry_ms` they waited.
    honoured: AtomicUsize,
    /// Handshakes refused with 503.
    refused: AtomicUsize,
}

/// A client that reconnects as the browser client does: after a close
/// with `retry_ms` it waits that long, after a refused handshake its
/// `Retry-After`, else a short jittered backoff, then connects through the
/// balancer again. Counts the closes it honoured.
async fn reconnecting_client(url: String, stats: Arc<Stats>) {
    use rand::Rng;
    let jitter = || Duration::from_millis(rand::rng().random_range(0..200));
    loop {
        let mut ws = match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(&url)).await
        {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
                if response.status() == 503 {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                }
                let after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_secs(after) + jitter()).await;
                continue;
            }
            _ => {
                tokio::time::sleep(Duration::from_millis(100) + jitter()).await;
                continue;
            }
        };
        let mut wait = Duration::from_millis(100) + jitter();
        while let Some(Ok(message)) = ws.next().await {
            if let Message::Close(Some(frame)) = message {
                if let Ok(reason) = serde_json::from_str::<Value>(&frame.reason) {
                    if let Some(ms) = reason["retry_ms"].as_u64() {
                        wait = Duration::from_millis(ms);
                        stats.honoured.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        tokio::time::sleep(wait).await;
    }
}

/// A node on Redis `url` (heartbeat 1s) with `GATECAST_<name>` options
/// from the environment, so that a binary without them still starts and
/// the test fails on what it checks.
fn node_on(url: &str, options: &[(&str, &str)]) -> Node {
    let mut command = common::gatecast_command();
    for (name, value) in options {
        command.env(format!("GATECAST_{name}"), value);
    }
    Node::start_command(command, &["--redis-url", url, "--node-heartbeat", "1s"])
}

async fn connections(node: &Node) -> usize {
    metric(&node.get_text("/metrics").await, "gatecast_connections") as usize
}

/// Every node's connection count.
async fn counts(nodes: &[impl std::borrow::Borrow<Node>]) -> Vec<usize> {
    let mut out = Vec::new();
    for node in nodes {
        out.push(connections(node.borrow()).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_node_added_to_the_balancer_gets_its_share() {
    const CLIENTS: usize = 60;
    let redis = RedisServer::start();
    let url = redis.url();
    let options = [
        ("REBALANCE", "on"),
        ("REBALANCE_INTERVAL", "500ms"),
        // Fast enough for CI: a tenth of the connections a second.
        ("REBALANCE_RATE", "0.1"),
        ("RECONNECT_WINDOW", "300ms"),
    ];
    let start = || node_on(&url, &options);
    let a = start();
    let b = start();
    a.wait_ready().await;
    b.wait_ready().await;
    let lb = Haproxy::start(&[("a", a.public), ("b", b.public)]);
    let lb_url = format!("ws://127.0.0.1:{}/ws", lb.port);
    let stats = Arc::new(Stats::default());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(reconnecting_client(lb_url.clone(), stats.clone())))
        .collect();
    // Roundrobin spreads them evenly (or, had a health check failed on the
    // loaded machine, rebalancing evens them out).
    common::eventually("every client connected, 30 on each node", || async {
        counts(&[&a, &b]).await == [CLIENTS / 2, CLIENTS / 2]
    })
    .await;
    // Two nodes evenly loaded: nothing moves, round after round.
    let before = stats.honoured.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stats.honoured.load(Ordering::Relaxed), before);
    assert_eq!(counts(&[&a, &b]).await, [CLIENTS / 2, CLIENTS / 2]);

    // Scale out: a third node, added once ready as an autoscaler's pod.
    let c = start();
    c.wait_ready().await;
    lb.add_server("c", c.public).await;
    let nodes = [&a, &b, &c];
    let mean = CLIENTS / 3;
    common::within(
        "the three nodes balanced within the tolerance",
        Duration::from_secs(40),
        || async {
            let mut counts = Vec::new();
            for node in nodes {
                counts.push(connections(node).await);
            }
            let total: usize = counts.iter().sum();
            // Within 10 %, and every client back.
            total == CLIENTS && counts.iter().all(|&n| n * 10 <= mean * 11)
        },
    )
    .await;
    let moved = stats.honoured.load(Ordering::Relaxed);
    eprintln!("rebalanced: {moved} connections moved (ideal {mean})");
    assert!(moved >= mean / 2, "moved {moved}");
    assert!(moved <= mean * 4, "moved {moved}: far more than needed");
    for client in clients {
        client.abort();
    }
}

/// A node lost under load: one of three nodes behind HAProxy is killed
/// and its clients all reconnect at once through the balancer. The
/// survivors admit them at their handshake rate (here 5 a second each, a
/// bucket of 5) and answer the rest 503 with `Retry-After`; clients that
/// wait what they are told are all back on the survivors within a bound
/// the rate allows, and the refusals are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_s_clients_come_back_through_the_survivors_at_their_rate() {
    const CLIENTS: usize = 60;
    let redis = RedisServer::start();
    let url = redis.url();
    let options = [("HANDSHAKE_RATE", "5"), ("HANDSHAKE_RAMP", "0s")];
    let nodes: Vec<Node> = (0..3).map(|_| node_on(&url, &options)).collect();
    for node in &nodes {
        node.wait_ready().await;
    }
    let lb = Haproxy::start(&[
        ("a", nodes[0].public),
        ("b", nodes[1].public),
        ("c", nodes[2].public),
    ]);
    let lb_url = format!("ws://127.0.0.1:{}/ws", lb.port);
    let stats = Arc::new(Stats::default());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(reconnecting_client(lb_url.clone(), stats.clone())))
        .collect();
    common::within(
        "every client connected",
        Duration::from_secs(40),
        || async { counts(&nodes).await.iter().sum::<usize>() == CLIENTS },
    )
    .await;
    let refused_before = stats.refused.load(Ordering::Relaxed);
    let lost = counts(&nodes[2..]).await[0];
    assert!(lost > 5, "node c holds {lost}");
    nodes[2].signal("KILL");
    // `lost` clients at 5 a second on each of two nodes: a few seconds,
    // plus the turns they are given; 30 s is far more.
    common::within(
        "every client back on the survivors",
        Duration::from_secs(30),
        || async { counts(&nodes[..2]).await.iter().sum::<usize>() == CLIENTS },
    )
    .await;
    let refused = stats.refused.load(Ordering::Relaxed) - refused_before;
    let mut counted = 0.0;
    for node in &nodes[..2] {
        counted += metric(
            &node.get_text("/metrics").await,
            r#"gatecast_connections_refused_total{reason="handshake_rate"}"#,
        );
    }
    eprintln!("{lost} clients of the lost node back; {refused} handshakes refused with 503");
    assert!(refused > 0, "the herd of {lost} never met the rate");
    assert!(
        counted as usize >= refused,
        "{counted} counted, {refused} seen"
    );
    for client in clients {
        client.abort();
    }
}

/// A rolling restart behind HAProxy, as a Deployment does it: for each of
/// two nodes a replacement starts and joins the balancer, the old one is
/// put in maintenance there and gets SIGTERM; its clients get a drain
/// close with `retry_ms` and reconnect through the balancer. Every client
/// ends up on the new nodes, and API calls (`send_to_all`, a query) made
/// all along through a node that is not restarting never fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_brings_every_client_back_without_api_errors() {
    const CLIENTS: usize = 40;
    let redis = RedisServer::start();
    let url = redis.url();
    let args = [
        "--redis-url",
        url.as_str(),
        "--node-heartbeat",
        "1s",
        "--shutdown-grace",
        "4s",
        "--drain-spread",
        "1s",
    ];
    let mut old: Vec<Node> = (0..2).map(|_| Node::start(&args)).collect();
    for node in &old {
        node.wait_ready().await;
    }
    let lb = Haproxy::start(&[("old0", old[0].public), ("old1", old[1].public)]);
    let lb_url = format!("ws://127.0.0.1:{}/ws", lb.port);
    let stats = Arc::new(Stats::default());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(reconnecting_client(lb_url.clone(), stats.clone())))
        .collect();
    common::eventually("every client connected", || async {
        counts(&old).await.iter().sum::<usize>() == CLIENTS
    })
    .await;
    let mut new = Vec::new();
    for (i, retiring) in old.iter_mut().enumerate() {
        let node = Node::start(&args);
        node.wait_ready().await;
        lb.add_server(&format!("new{i}"), node.public).await;
        new.push(node);
        // API calls all along, through the newest node (never the one
        // restarting), as a backend behind the internal Service.
        let api = new.last().unwrap();
        let calls = async {
            let mut failures = Vec::new();
            for _ in 0..30 {
                for (method, params) in [
                    ("send_to_all", serde_json::json!({"data": "tick"})),
                    ("get_all_client_count", serde_json::json!({})),
                ] {
                    let (status, body) = api.call(method, params).await;
                    if status != 200 {
                        failures.push(format!("{method}: {status} {body}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            failures
        };
        let restart = async {
            let answer = lb
                .command(&format!("set server nodes/old{i} state maint"))
                .await;
            assert!(answer.trim().is_empty(), "{answer}");
            retiring.signal("TERM");
            assert!(retiring.wait_exit(Duration::from_secs(8)).await.success());
        };
        let (failures, ()) = tokio::join!(calls, restart);
        assert!(
            failures.is_empty(),
            "API errors during the restart: {failures:?}"
        );
        let answer = lb.command(&format!("del server nodes/old{i}")).await;
        assert!(answer.contains("Server deleted"), "{answer}");
    }
    common::within(
        "every client back on the new nodes",
        Duration::from_secs(20),
        || async { counts(&new).await.iter().sum::<usize>() == CLIENTS },
    )
    .await;
    assert_eq!(
        new[0]
            .ok("get_all_client_count", serde_json::json!({}))
            .await,
        CLIENTS
    );
    // Each client was drained at least once, and waited its retry_ms.
    assert!(stats.honoured.load(Ordering::Relaxed) >= CLIENTS);
    drop(old.drain(..));
    for client in clients {
        client.abort();
    }
}

/// The scale-out of the issue at full size, for docs/benchmarks.md (not
/// part of the suite): 3 nodes behind HAProxy hold 15,000 connections,
/// 3 more are added, and the test reports how long until max/mean is at
/// most 1.15 and 1.1, and how many connections moved. Default options
/// (handshake rate and ramp, rebalancing). Two HAProxy processes share the
/// clients (one process may hold 20,000 descriptors, and a proxied
/// connection takes two). Run with
/// `GATECAST_BENCH_CLIENTS=15000 cargo test --release --test rebalance -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: minutes and 15,000 connections"]
async fn scale_out_full_size() {
    let clients: usize = std::env::var("GATECAST_BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15_000);
    let redis = RedisServer::start();
    let url = redis.url();
    let args = [
        "--redis-url",
        url.as_str(),
        "--rebalance",
        "on",
        "--handshake-rate",
        "2000",
    ];
    let mut nodes: Vec<Node> = (0..3).map(|_| Node::start(&args)).collect();
    for node in &nodes {
        node.wait_ready().await;
    }
    let named: Vec<(String, std::net::SocketAddr)> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("n{i}"), n.public))
        .collect();
    let servers: Vec<(&str, std::net::SocketAddr)> =
        named.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    let lbs = [Haproxy::start(&servers), Haproxy::start(&servers)];
    let stats = Arc::new(Stats::default());
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let url = format!("ws://127.0.0.1:{}/ws", lbs[i % 2].port);
            tokio::spawn(reconnecting_client(url, stats.clone()))
        })
        .collect();
    loop {
        let now = counts(&nodes).await;
        if now.iter().sum::<usize>() == clients {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "{now:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!(
        "bench: {clients} connected through HAProxy in {:?}: {:?}",
        started.elapsed(),
        counts(&nodes).await
    );
    stats.honoured.store(0, Ordering::Relaxed);
    for i in 3..6 {
        let node = Node::start(&args);
        node.wait_ready().await;
        for lb in &lbs {
            lb.add_server(&format!("n{i}"), node.public).await;
        }
        nodes.push(node);
    }
    let added = std::time::Instant::now();
    let mean = clients as f64 / 6.0;
    let mut at_115 = None;
    let mut at_110 = None;
    while added.elapsed() < Duration::from_secs(600) && at_110.is_none() {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = counts(&nodes).await;
        let ratio = *now.iter().max().unwrap() as f64 / mean;
        eprintln!(
            "bench: +{:>3}s {now:?} max/mean {ratio:.3} moved {}",
            added.elapsed().as_secs(),
            stats.honoured.load(Ordering::Relaxed)
        );
        // Against the mean of all clients: those between two nodes
        // (waiting their delay) only lower the counts.
        if ratio <= 1.15 && at_115.is_none() {
            at_115 = Some(added.elapsed());
        }
        if ratio <= 1.10 {
            at_110 = Some(added.elapsed());
        }
    }
    let mut moved_by_nodes = 0.0;
    for node in &nodes {
        moved_by_nodes += metric(
            &node.get_text("/metrics").await,
            r#"gatecast_operational_closes_total{reason="rebalance"}"#,
        );
    }
    eprintln!(
        "bench: max/mean <= 1.15 after {at_115:?}, <= 1.10 after {at_110:?}; \
         {moved_by_nodes} connections moved (ideal {})",
        clients / 2
    );
    assert!(at_115.is_some_and(|t| t <= Duration::from_secs(300)));
    for task in tasks {
        task.abort();
    }
}

/// A node that stops leaves no load record behind: it deletes its field
/// of `gatecast:load` when it leaves the cluster, and nothing writes it
/// again afterwards (a late write would count until it expires, and with
/// `--rebalance off` on every node nobody would ever prune it). Redis
/// pauses writes for a moment as the node stops, so that the node's load
/// task (every 100 ms here) has writes queued around the delete. Today's
/// code writes the field again after deleting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_leaves_no_load_record_behind() {
    let redis = RedisServer::start();
    let url = redis.url();
    for round in 0..3 {
        let mut node = node_on(&url, &[("REBALANCE_INTERVAL", "100ms")]);
        node.wait_ready().await;
        common::eventually("the node published its load", || async {
            !redis.cli(&["HKEYS", "gatecast:load"]).trim().is_empty()
        })
        .await;
        redis.cli(&["CLIENT", "PAUSE", "1000", "WRITE"]);
        node.signal("TERM");
        node.wait_exit(Duration::from_secs(15)).await;
        let left = redis.cli(&["HGETALL", "gatecast:load"]);
        assert!(left.trim().is_empty(), "round {round}: left behind: {left}");
    }
}
