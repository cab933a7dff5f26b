//! `idle`: memory per idle connection, optionally after each connection was
//! bound to a uid and a group through an API (another node's, for the
//! cluster case) and received one push.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::util::{connect_many, rss_kib, Api, WAIT};

/// What `idle` does besides connecting (its command-line options).
#[derive(clap::Args)]
pub struct Options {
    /// The clients' node's process ids (to read /proc/<pid>/status; RSS
    /// is summed over them, e.g. a multi-process node's workers).
    #[arg(long = "pid", value_delimiter = ',', required = true)]
    pub pids: Vec<u32>,
    /// Other processes whose RSS growth is reported too (the API node).
    #[arg(long = "other-pid", value_delimiter = ',')]
    pub other_pids: Vec<u32>,
    /// The node's public address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub count: usize,
    /// Bind every client to a uid (and a group) through this API, then
    /// push: give another node's API for the cluster case. Nothing is
    /// bound when absent.
    #[arg(long)]
    pub api: Option<SocketAddr>,
    /// Groups the clients join, round robin (0: none).
    #[arg(long, default_value_t = 10)]
    pub groups: usize,
    /// The push every client receives once: uid (one send_to_uid per
    /// client), group (one send_to_group per group), all, none.
    #[arg(long, default_value = "uid")]
    pub push: String,
    /// Concurrent API callers.
    #[arg(long, default_value_t = 16)]
    pub callers: usize,
    /// Prefix of uid and group names (distinct per run or per process).
    #[arg(long, default_value = "idle-")]
    pub prefix: String,
    /// Seconds to wait before the last reading (the allocator returns
    /// freed memory with a delay).
    #[arg(long, default_value_t = 3)]
    pub settle: u64,
    /// Seconds to keep the connections open after the reading (for a heap
    /// profiler's snapshot).
    #[arg(long, default_value_t = 0)]
    pub hold: u64,
}

/// Runs the scenario; prints one JSON line.
pub async fn run(o: Options) {
    let rss = |o: &Options| {
        let mut all = vec![o.pids.iter().map(|p| rss_kib(*p)).sum::<u64>()];
        all.extend(o.other_pids.iter().map(|p| rss_kib(*p)));
        all
    };
    let before = rss(&o);
    let conns = connect_many(o.addr, o.count).await;
    let received = Arc::new(AtomicUsize::new(0));
    let mut ids = Vec::with_capacity(conns.len());
    let mut readers = Vec::with_capacity(conns.len());
    for (ws, id) in conns {
        ids.push(id);
        let received = received.clone();
        // Reading keeps the client answering pings while the run lasts.
        readers.push(tokio::spawn(async move {
            let (_write, mut read) = ws.split();
            while let Some(Ok(m)) = read.next().await {
                match m {
                    Message::Text(_) | Message::Binary(_) => {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let connected = rss(&o);

    let mut bind_seconds = 0.0;
    let mut push_seconds = 0.0;
    let mut bound = connected.clone();
    if let Some(api) = o.api {
        let api = Api::new(api);
        let started = Instant::now();
        let p = &o.prefix;
        let mut calls = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            calls.push((
                "bind_uid",
                json!({"client_id": id, "uid": format!("{p}u{i}")}),
            ));
            if o.groups > 0 {
                let group = format!("{p}g{}", i % o.groups);
                calls.push(("join_group", json!({"client_id": id, "group": group})));
            }
        }
        api.call_all(o.callers, calls).await;
        bind_seconds = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        bound = rss(&o);

        let started = Instant::now();
        let data = "x".repeat(100);
        let calls: Vec<_> = match o.push.as_str() {
            "uid" => (0..ids.len())
                .map(|i| {
                    (
                        "send_to_uid",
                        json!({"uid": format!("{p}u{i}"), "data": data}),
                    )
                })
                .collect(),
            "group" => (0..o.groups)
                .map(|g| {
                    (
                        "send_to_group",
                        json!({"group": format!("{p}g{g}"), "data": data}),
                    )
                })
                .collect(),
            "all" => vec![("send_to_all", json!({ "data": data }))],
            _ => Vec::new(),
        };
        let expected = if calls.is_empty() { 0 } else { ids.len() };
        api.call_all(o.callers, calls).await;
        let deadline = Instant::now() + WAIT;
        while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        push_seconds = started.elapsed().as_secs_f64();
    }
    tokio::time::sleep(Duration::from_secs(o.settle)).await;
    let after = rss(&o);
    let per =
        |i: usize, at: &[u64]| (at[i].saturating_sub(before[i])) as f64 * 1024.0 / o.count as f64;
    println!(
        "{}",
        json!({
            "scenario": "idle",
            "connections": o.count,
            "processes": o.pids.len(),
            "bound_via": o.api.map(|a| a.to_string()),
            "groups": o.groups,
            "push": o.push,
            "received": received.load(Ordering::Relaxed),
            "bind_seconds": (bind_seconds * 100.0).round() / 100.0,
            "push_seconds": (push_seconds * 100.0).round() / 100.0,
            "rss_kib": {"before": before, "connected": connected, "bound": bound, "after": after},
            "bytes_per_connection": {
                "connected": per(0, &connected).round(),
                "bound": per(0, &bound).round(),
                "after": per(0, &after).round(),
            },
            "other_bytes_per_connection": (1..after.len()).map(|i| per(i, &after).round()).collect::<Vec<_>>(),
        })
    );
    tokio::time::sleep(Duration::from_secs(o.hold)).await;
    for r in readers {
        r.abort();
    }
}
