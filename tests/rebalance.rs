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
            "global\n  stats socket {}/admin.sock level admin\n\
             defaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n\
             timeout server 60s\n  timeout tunnel 1h\n\
             frontend ws\n  bind 127.0.0.1:{port}\n  default_backend nodes\n\
             backend nodes\n  balance roundrobin\n  option httpchk GET /readyz\n\
             default-server check inter 200ms fall 1 rise 1\n",
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

/// A client that reconnects as the browser client does: after a close
/// with `retry_ms` it waits that long, else a short backoff, then connects
/// through the balancer again. Counts the closes it honoured.
async fn reconnecting_client(url: String, honoured: Arc<AtomicUsize>) {
    loop {
        let Ok(Ok((mut ws, _))) =
            tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(&url)).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut wait = Duration::from_millis(100);
        while let Some(Ok(message)) = ws.next().await {
            if let Message::Close(Some(frame)) = message {
                if let Ok(reason) = serde_json::from_str::<Value>(&frame.reason) {
                    if let Some(ms) = reason["retry_ms"].as_u64() {
                        wait = Duration::from_millis(ms);
                        honoured.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        tokio::time::sleep(wait).await;
    }
}

async fn connections(node: &Node) -> usize {
    metric(&node.get_text("/metrics").await, "gatecast_connections") as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_node_added_to_the_balancer_gets_its_share() {
    const CLIENTS: usize = 60;
    let redis = RedisServer::start();
    let url = redis.url();
    let args = [
        "--redis-url",
        url.as_str(),
        "--node-heartbeat",
        "1s",
        "--rebalance",
        "on",
        "--rebalance-interval",
        "500ms",
        // Fast enough for CI: a tenth of the connections a second.
        "--rebalance-rate",
        "0.1",
        "--reconnect-window",
        "300ms",
    ];
    let a = Node::start(&args);
    let b = Node::start(&args);
    a.wait_ready().await;
    b.wait_ready().await;
    let lb = Haproxy::start(&[("a", a.public), ("b", b.public)]);
    let lb_url = format!("ws://127.0.0.1:{}/ws", lb.port);
    let honoured = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(reconnecting_client(lb_url.clone(), honoured.clone())))
        .collect();
    common::eventually("every client connected through the balancer", || async {
        connections(&a).await + connections(&b).await == CLIENTS
    })
    .await;
    // Two nodes evenly loaded: nothing moves.
    assert_eq!(honoured.load(Ordering::Relaxed), 0);

    // Scale out: a third node, added once ready as an autoscaler's pod.
    let c = Node::start(&args);
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
    let moved = honoured.load(Ordering::Relaxed);
    eprintln!("rebalanced: {moved} connections moved (ideal {mean})");
    assert!(moved >= mean / 2, "moved {moved}");
    assert!(moved <= mean * 4, "moved {moved}: far more than needed");
    for client in clients {
        client.abort();
    }
}
