//! What every scenario shares: connecting clients, reading a process's RSS
//! and CPU time, and pushing through the HTTP API one call at a time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// `--source-net`, read by [`connect_with`].
pub static SOURCE_NET: AtomicU8 = AtomicU8::new(0);

/// A client's WebSocket.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Longest any single wait of the load generator lasts (a connect, an
/// API call): a server that stops answering ends the run with an error
/// instead of hanging it.
pub const WAIT: Duration = Duration::from_secs(30);

/// VmRSS of a process, KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Summed CPU seconds of several processes.
pub fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

/// Connects from 127.0.NET.<2 + i / 10000> so one source address never
/// runs out of ports; returns the stream and the client_id of the welcome.
pub async fn connect(addr: SocketAddr, i: usize) -> (Ws, String) {
    connect_with(addr, i, "").await
}

/// [`connect`] with a query string (`?token=...`).
pub async fn connect_with(addr: SocketAddr, i: usize, query: &str) -> (Ws, String) {
    tokio::time::timeout(WAIT, connect_inner(addr, i, query))
        .await
        .unwrap_or_else(|_| panic!("connection {i} to {addr} timed out"))
}

async fn connect_inner(addr: SocketAddr, i: usize, query: &str) -> (Ws, String) {
    let net = SOURCE_NET.load(Ordering::Relaxed);
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, net, 2 + (i / 10_000) as u8));
    let socket = TcpSocket::new_v4().unwrap();
    // Ports of a previous run may still be in TIME_WAIT on this address.
    socket.set_reuseaddr(true).unwrap();
    // Closed with a reset, leaving no TIME_WAIT: ports taken by bind()
    // are out of every connect()'s ephemeral range on the machine, so
    // 5,000 connections a run would starve other processes' connects for
    // a minute. A zero linger never blocks the thread on drop.
    #[allow(deprecated)]
    socket.set_linger(Some(Duration::ZERO)).unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 4096;
    config.write_buffer_size = 0;
    let url = format!("ws://{addr}/ws{query}");
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .unwrap();
    let welcome = ws.next().await.unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_str(welcome.to_text().unwrap()).unwrap();
    (ws, v["client_id"].as_str().unwrap().to_owned())
}

/// Opens `count` connections, 500 at a time.
pub async fn connect_many(addr: SocketAddr, count: usize) -> Vec<(Ws, String)> {
    let mut conns = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(500) {
        let batch = futures_util::future::join_all(chunk.iter().map(|i| connect(addr, *i))).await;
        conns.extend(batch);
    }
    conns
}

/// Opens `count` connections, 500 at a time, spread over the nodes in
/// contiguous blocks (groups are assigned round robin, `i % groups`, so
/// every node gets members of every group).
pub async fn connect_spread(addrs: &[SocketAddr], count: usize) -> Vec<(Ws, String)> {
    let mut conns = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(500) {
        let batch = futures_util::future::join_all(
            chunk
                .iter()
                .map(|i| connect(addrs[i * addrs.len() / count], *i)),
        )
        .await;
        conns.extend(batch);
    }
    conns
}

/// The HTTP push API every server under test speaks: `POST /api/METHOD`
/// with a JSON body, one call per push or membership change (the shape of
/// gatecast's API, which the peers in bench/peers/ copy).
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    /// Every node's API base; calls go to each in turn.
    bases: Arc<[String]>,
    /// Calls made so far (picks the next base).
    next: Arc<std::sync::atomic::AtomicUsize>,
}

impl Api {
    /// A client of the API at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Api::spread(&[addr])
    }

    /// A client of the APIs at `addrs`, one call to each in turn (round
    /// robin per call, as a Service that balances requests spreads them
    /// over its pods).
    pub fn spread(addrs: &[SocketAddr]) -> Self {
        assert!(!addrs.is_empty(), "at least one API address");
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(WAIT)
            .pool_max_idle_per_host(1024)
            .build()
            .unwrap();
        Api {
            http,
            bases: addrs.iter().map(|a| format!("http://{a}/api")).collect(),
            next: Arc::default(),
        }
    }

    fn base(&self) -> &str {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.bases[n % self.bases.len()]
    }

    /// One call; panics on anything but a 2xx (a benchmark with failed
    /// pushes measures nothing).
    pub async fn call(&self, method: &str, body: serde_json::Value) {
        let response = self
            .http
            .post(format!("{}/{method}", self.base()))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            panic!("{method}: {status} {text}");
        }
    }

    /// Runs `calls` with at most `callers` in flight at once.
    pub async fn call_all(&self, callers: usize, calls: Vec<(&'static str, serde_json::Value)>) {
        futures_util::stream::iter(calls)
            .for_each_concurrent(callers.max(1), |(method, body)| async move {
                self.call(method, body).await;
            })
            .await;
    }
}

/// Percentile `p` (0..1) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
