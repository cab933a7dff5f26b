//! Measurements of a running gatecast node, for docs/benchmarks.md.
//!
//! `idle`: opens many WebSocket connections (spread over several loopback
//! source addresses) and reports how much the node's RSS grew per
//! connection. `fanout`: clients in groups, pushes through the API, reports
//! deliveries per second and the node's CPU time per delivery. `churn`:
//! clients coming and going on several nodes while pushes run (the load of
//! bench/soak.sh).

mod churn;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    /// Third octet of the client source addresses (127.0.<this>.2, .3, …):
    /// give runs that follow each other different ones, so ports left in
    /// TIME_WAIT by the last run do not slow the next.
    #[arg(long, global = true, default_value_t = 0)]
    source_net: u8,
    #[command(subcommand)]
    command: Cmd,
}

/// `--source-net`, read by [`connect_with`].
static SOURCE_NET: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

#[derive(Subcommand)]
enum Cmd {
    /// RSS per idle connection.
    Idle {
        /// The node's process id (to read /proc/<pid>/status).
        #[arg(long)]
        pid: u32,
        /// The node's public address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        /// Connections to open.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
    },
    /// A reconnect storm: clients, each with a uid of its own (JWT `sub`),
    /// connect at once; reports connects per second (until the last
    /// welcome). With the Redis engine each welcome waits until the node
    /// follows the uid's channel.
    Storm {
        /// The node's public address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        /// Clients.
        #[arg(long, default_value_t = 5000)]
        count: usize,
        /// Connections opened at once.
        #[arg(long, default_value_t = 500)]
        concurrency: usize,
        /// The node's `--client-jwt-secret`.
        #[arg(long)]
        jwt_secret: String,
    },
    /// Group fan-out throughput.
    Fanout {
        /// The node's process id (CPU time).
        #[arg(long)]
        pid: u32,
        /// The node's public address (clients).
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        /// The API address (pushes); may be another node.
        #[arg(long, default_value = "127.0.0.1:8081")]
        api: SocketAddr,
        /// Clients per group.
        #[arg(long, default_value_t = 1000)]
        group_size: usize,
        /// Groups.
        #[arg(long, default_value_t = 2)]
        groups: usize,
        /// Pushes per group.
        #[arg(long, default_value_t = 2000)]
        pushes: usize,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
    /// Connect/push/disconnect churn over several nodes (bench/soak.sh).
    Churn {
        /// The nodes' public addresses, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        addrs: Vec<SocketAddr>,
        /// Their API addresses, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        apis: Vec<SocketAddr>,
        /// Clients at a time.
        #[arg(long, default_value_t = 500)]
        clients: usize,
        /// How long to run.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
}

fn rss_kib(pid: u32) -> u64 {
    proc_field(pid, "status", "VmRSS:")
}

fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Connects from 127.0.0.<2 + i / 10000> so one source address never runs
/// out of ports; returns the stream and its client_id.
async fn connect(addr: SocketAddr, i: usize) -> (Ws, String) {
    connect_with(addr, i, "").await
}

/// [`connect`] with a query string (`?token=...`).
async fn connect_with(addr: SocketAddr, i: usize, query: &str) -> (Ws, String) {
    let net = SOURCE_NET.load(std::sync::atomic::Ordering::Relaxed);
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, net, 2 + (i / 10_000) as u8));
    let socket = TcpSocket::new_v4().unwrap();
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

#[tokio::main]
async fn main() {
    let args = Args::parse();
    SOURCE_NET.store(args.source_net, std::sync::atomic::Ordering::Relaxed);
    match args.command {
        Cmd::Idle { pid, addr, count } => idle(pid, addr, count).await,
        Cmd::Storm {
            addr,
            count,
            concurrency,
            jwt_secret,
        } => storm(addr, count, concurrency, &jwt_secret).await,
        Cmd::Fanout {
            pid,
            addr,
            api,
            group_size,
            groups,
            pushes,
            size,
        } => fanout(pid, addr, api, group_size, groups, pushes, size).await,
        Cmd::Churn {
            addrs,
            apis,
            clients,
            seconds,
        } => churn::run(addrs, apis, clients, seconds).await,
    }
}

async fn idle(pid: u32, addr: SocketAddr, count: usize) {
    let before = rss_kib(pid);
    let mut conns = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(500) {
        let batch = futures_util::future::join_all(chunk.iter().map(|i| connect(addr, *i))).await;
        conns.extend(batch);
    }
    // Let the node settle (no traffic flows on idle connections).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / count as f64;
    println!(
        "idle connections={count} rss_before_kib={before} rss_after_kib={after} bytes_per_connection={per:.0}"
    );
    drop(conns);
}

async fn storm(addr: SocketAddr, count: usize, concurrency: usize, secret: &str) {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let key = EncodingKey::from_secret(secret.as_bytes());
    let queries: Vec<String> = (0..count)
        .map(|i| {
            let claims = serde_json::json!({"sub": format!("storm-{i}"), "exp": 4_000_000_000u64});
            let token = encode(&Header::default(), &claims, &key).unwrap();
            format!("?token={token}")
        })
        .collect();
    let started = Instant::now();
    let conns: Vec<(Ws, String)> = futures_util::stream::iter(queries.iter().enumerate())
        .map(|(i, q)| connect_with(addr, i, q))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "storm clients={count} concurrency={concurrency} seconds={elapsed:.2} connects_per_s={:.0}",
        conns.len() as f64 / elapsed
    );
}

async fn fanout(
    pid: u32,
    addr: SocketAddr,
    api: SocketAddr,
    group_size: usize,
    groups: usize,
    pushes: usize,
    size: usize,
) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let total_clients = group_size * groups;
    let mut readers = Vec::new();
    let expected = pushes; // each client receives every push to its group
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    for i in 0..total_clients {
        let (ws, id) = connect(addr, i).await;
        let group = format!("bench-{}", i % groups);
        http.post(format!("http://{api}/api/join_group"))
            .json(&serde_json::json!({"client_id": id, "group": group}))
            .send()
            .await
            .unwrap();
        let done = done_tx.clone();
        readers.push(tokio::spawn(async move {
            let (_, mut read) = ws.split();
            let mut got = 0;
            while let Some(Ok(m)) = read.next().await {
                match m {
                    Message::Text(_) => {
                        got += 1;
                        if got == expected {
                            break;
                        }
                    }
                    // Closed (e.g. 1013: this load generator read too
                    // slowly): counted as incomplete.
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            let _ = done.send(got == expected);
        }));
    }
    let payload = "x".repeat(size);
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    // Push in batches of 100 commands per HTTP call to keep HTTP overhead
    // out of what is measured.
    for round in (0..pushes).collect::<Vec<_>>().chunks(100) {
        let mut commands = Vec::new();
        for _ in round {
            for g in 0..groups {
                commands.push(serde_json::json!({"method": "send_to_group",
                    "params": {"group": format!("bench-{g}"), "data": payload}}));
            }
        }
        http.post(format!("http://{api}/api/batch"))
            .json(&serde_json::json!({ "commands": commands }))
            .send()
            .await
            .unwrap();
    }
    let mut complete = 0;
    for _ in 0..total_clients {
        if done_rx.recv().await == Some(true) {
            complete += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu_before;
    let deliveries = (pushes * total_clients) as f64;
    println!(
        "fanout clients={total_clients} groups={groups} pushes_per_group={pushes} size={size} \
         seconds={elapsed:.2} deliveries_per_s={:.0} node_cpu_us_per_delivery={:.2} \
         clients_complete={complete}",
        deliveries / elapsed,
        cpu * 1e6 / deliveries
    );
}
