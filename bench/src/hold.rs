//! `hold` and `push`: the pieces of a run too big for one process
//! (bench/100k.sh, bench/cluster-scale.sh).
//!
//! `hold` opens many clients over several nodes, binds each to a uid and
//! puts it in a few groups (in `/api/batch` calls spread over the nodes'
//! APIs), then reads every frame. A payload starting with a wall-clock
//! send time (20 digits, µs since the epoch) and a tag letter is timed,
//! per tag; on SIGUSR1 the holder prints what it got since the last report
//! (as one JSON line with every latency, so several holders' reports can
//! be merged), on SIGTERM the same, then it exits. `push` sends such
//! pushes through the APIs, at a rate or as fast as its callers go. The
//! wall clock is the machine's, shared by every process on the box, so a
//! push sent by one process is timed by another.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio::signal::unix::{signal, SignalKind};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::util::{percentile, SOURCE_NET, WAIT};

/// `hold`'s command-line options.
#[derive(clap::Args)]
pub struct HoldOptions {
    /// Nodes the clients connect to, comma-separated (client i to node
    /// i mod n).
    #[arg(long, value_delimiter = ',', required = true)]
    addr: Vec<SocketAddr>,
    /// APIs the binds and joins go through, comma-separated (one batch
    /// call to each in turn).
    #[arg(long, value_delimiter = ',', required = true)]
    api: Vec<SocketAddr>,
    /// Clients.
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// Number of this holder's first client: client i is bound to uid
    /// `<prefix>u<first + i>`, so holders given disjoint ranges share
    /// one uid space.
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// Groups in all (`<prefix>g0` …).
    #[arg(long, default_value_t = 1000)]
    groups: usize,
    /// Groups each client joins: client x joins groups x, x+1, … mod
    /// `--groups`.
    #[arg(long, default_value_t = 3)]
    groups_per_client: usize,
    /// Prefix of uid and group names.
    #[arg(long, default_value = "h-")]
    prefix: String,
    /// Commands per `/api/batch` call.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Batch calls in flight at once.
    #[arg(long, default_value_t = 4)]
    callers: usize,
    /// Connections opened at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Rounds in which the bind and join commands that failed are sent
    /// again.
    #[arg(long, default_value_t = 5)]
    retries: usize,
}

/// What arrived under one tag since the last report.
#[derive(Default)]
struct Tag {
    count: usize,
    min_sent_us: u64,
    max_recv_us: u64,
    latencies_ms: Vec<f64>,
}

type Books = Arc<Mutex<BTreeMap<char, Tag>>>;

/// Microseconds since the epoch, the clock every process on the box shares.
pub fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Runs `hold`: prints a `ready` line, then a `report` line per SIGUSR1
/// and a last one on SIGTERM.
pub async fn hold(o: HoldOptions) {
    let mut usr1 = signal(SignalKind::user_defined1()).expect("SIGUSR1 handler");
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let started = Instant::now();
    let failed = AtomicUsize::new(0);
    let errors = Mutex::new(BTreeMap::<String, usize>::new());
    let conns: Vec<(Ws, String)> = futures_util::stream::iter(0..o.count)
        .map(|i| {
            let addr = o.addr[i % o.addr.len()];
            let (failed, errors) = (&failed, &errors);
            async move {
                match tokio::time::timeout(WAIT, connect(addr, i)).await {
                    Ok(Ok(c)) => Some(c),
                    outcome => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let why = match outcome {
                            Ok(Err(e)) => e,
                            _ => "timed out".to_owned(),
                        };
                        *errors.lock().unwrap().entry(why).or_default() += 1;
                        None
                    }
                }
            }
        })
        .buffer_unordered(o.concurrency.max(1))
        .filter_map(|c| async move { c })
        .collect()
        .await;
    let connect_seconds = started.elapsed().as_secs_f64();

    let books: Books = Arc::default();
    let closed = Arc::new(AtomicUsize::new(0));
    let mut ids = Vec::with_capacity(conns.len());
    let mut readers = Vec::with_capacity(conns.len());
    for (ws, id) in conns {
        ids.push(id);
        readers.push(tokio::spawn(read(ws, books.clone(), closed.clone())));
    }

    let started = Instant::now();
    let mut commands = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let x = o.first + i;
        let p = &o.prefix;
        commands.push(
            json!({"method": "bind_uid", "params": {"client_id": id, "uid": format!("{p}u{x}")}}),
        );
        for j in 0..o.groups_per_client.min(o.groups) {
            let g = format!("{p}g{}", (x + j) % o.groups);
            commands.push(json!({"method": "join_group", "params": {"client_id": id, "group": g}}));
        }
    }
    let api = Batcher::new(&o.api);
    let total = commands.len();
    // A command that failed (e.g. "node ... did not answer" on a box at
    // its limits) is sent again, up to `--retries` more rounds: the
    // measurements need every client bound. Each round's failures are
    // reported.
    let mut pending = commands;
    let mut failed_per_round = Vec::new();
    for _ in 0..=o.retries {
        if pending.is_empty() {
            break;
        }
        let batches: Vec<Vec<Value>> = pending.chunks(o.batch.max(1)).map(|c| c.to_vec()).collect();
        let again = Mutex::new(Vec::new());
        futures_util::stream::iter(batches)
            .for_each_concurrent(o.callers.max(1), |b| {
                let (api, again, errors) = (&api, &again, &errors);
                async move {
                    match api.batch(b.clone()).await {
                        Ok(failed) => {
                            for i in failed {
                                let why = format!("batch: {}", i.1);
                                *errors.lock().unwrap().entry(why).or_default() += 1;
                                again.lock().unwrap().push(b[i.0].clone());
                            }
                        }
                        Err(why) => {
                            *errors.lock().unwrap().entry(why).or_default() += b.len();
                            again.lock().unwrap().extend(b);
                        }
                    }
                }
            })
            .await;
        pending = again.into_inner().unwrap();
        failed_per_round.push(pending.len());
    }
    let command_errors = AtomicUsize::new(pending.len());
    let bind_seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "event": "ready",
            "first": o.first,
            "connected": ids.len(),
            "failed": failed.load(Ordering::Relaxed),
            "connect_seconds": round(connect_seconds, 2),
            "commands": total,
            "failed_per_round": failed_per_round,
            "command_errors": command_errors.load(Ordering::Relaxed),
            "bind_seconds": round(bind_seconds, 2),
            "errors": errors.lock().unwrap().clone(),
        })
    );
    loop {
        let last = tokio::select! {
            _ = usr1.recv() => false,
            _ = term.recv() => true,
        };
        report(&books, &closed);
        if last {
            break;
        }
    }
    for r in readers {
        r.abort();
    }
}

/// Prints and clears what arrived since the last report.
fn report(books: &Books, closed: &AtomicUsize) {
    let taken = std::mem::take(&mut *books.lock().unwrap());
    let tags: serde_json::Map<String, Value> = taken
        .into_iter()
        .map(|(tag, mut t)| {
            t.latencies_ms.sort_by(f64::total_cmp);
            let v = json!({
                "count": t.count,
                "min_sent_us": t.min_sent_us,
                "max_recv_us": t.max_recv_us,
                "p50_ms": round(percentile(&t.latencies_ms, 0.5), 3),
                "p99_ms": round(percentile(&t.latencies_ms, 0.99), 3),
                "max_ms": round(t.latencies_ms.last().copied().unwrap_or(0.0), 3),
                "latencies_ms": t.latencies_ms.iter().map(|l| round(*l, 3)).collect::<Vec<_>>(),
            });
            (tag.to_string(), v)
        })
        .collect();
    println!(
        "{}",
        json!({"event": "report", "closed": closed.load(Ordering::Relaxed), "tags": tags})
    );
}

/// Reads one client's frames until it closes, booking the stamped ones.
async fn read(ws: Ws, books: Books, closed: Arc<AtomicUsize>) {
    let (_write, mut read) = ws.split();
    while let Some(Ok(m)) = read.next().await {
        let data = match &m {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
            Message::Close(_) => break,
            _ => continue,
        };
        let now = wall_us();
        let sent = data
            .get(..20)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| d.parse::<u64>().ok());
        let tag = data.get(20).map(|t| *t as char).unwrap_or('?');
        let mut books = books.lock().unwrap();
        let t = books
            .entry(if sent.is_some() { tag } else { '?' })
            .or_default();
        t.count += 1;
        t.max_recv_us = t.max_recv_us.max(now);
        if let Some(sent) = sent {
            if t.min_sent_us == 0 || sent < t.min_sent_us {
                t.min_sent_us = sent;
            }
            t.latencies_ms
                .push(now.saturating_sub(sent) as f64 / 1000.0);
        }
    }
    closed.fetch_add(1, Ordering::Relaxed);
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Connects client `i` from 127.0.NET.<2 + i / 10000> (so one source
/// address never runs out of ports) and reads its welcome; an error is
/// returned, not a panic, so a run at its limits says what stopped it.
async fn connect(addr: SocketAddr, i: usize) -> Result<(Ws, String), String> {
    let net = SOURCE_NET.load(Ordering::Relaxed);
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, net, 2 + (i / 10_000) as u8));
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    socket.set_reuseaddr(true).map_err(|e| e.to_string())?;
    // No TIME_WAIT left behind (see util::connect).
    #[allow(deprecated)]
    socket
        .set_linger(Some(Duration::ZERO))
        .map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| format!("bind: {e}"))?;
    let stream = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 4096;
    config.write_buffer_size = 0;
    let url = format!("ws://{addr}/ws");
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let welcome = match ws.next().await {
        Some(Ok(m)) => m,
        Some(Err(e)) => return Err(format!("welcome: {e}")),
        None => return Err("closed before the welcome".to_owned()),
    };
    let v: Value = serde_json::from_str(welcome.to_text().unwrap_or(""))
        .map_err(|e| format!("welcome: {e}"))?;
    let id = v["client_id"]
        .as_str()
        .ok_or("welcome without client_id")?
        .to_owned();
    Ok((ws, id))
}

/// HTTP calls spread over several APIs, one to each in turn, returning
/// errors instead of panicking.
struct Batcher {
    http: reqwest::Client,
    bases: Vec<String>,
    next: AtomicUsize,
}

impl Batcher {
    fn new(addrs: &[SocketAddr]) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(WAIT)
            .pool_max_idle_per_host(256)
            .build()
            .expect("HTTP client");
        Batcher {
            http,
            bases: addrs.iter().map(|a| format!("http://{a}/api")).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// One call; Err(why) when it failed as a whole.
    async fn call(&self, method: &str, body: &Value) -> Result<Value, String> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let base = &self.bases[n % self.bases.len()];
        let response = self
            .http
            .post(format!("{base}/{method}"))
            .json(body)
            .send()
            .await
            .map_err(|e| format!("{method}: {e}"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(format!(
                "{method}: {status} {}",
                text.chars().take(200).collect::<String>()
            ));
        }
        serde_json::from_str(&text).map_err(|e| format!("{method}: {e}"))
    }

    /// One `/api/batch` call; the commands that failed: (index, error).
    async fn batch(&self, commands: Vec<Value>) -> Result<Vec<(usize, Value)>, String> {
        let answer = self.call("batch", &json!({ "commands": commands })).await?;
        let replies = answer["result"]["replies"]
            .as_array()
            .or_else(|| answer["replies"].as_array())
            .cloned()
            .unwrap_or_default();
        Ok(replies
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.get("error").map(|e| (i, e.clone())))
            .collect())
    }
}

/// `push`'s command-line options.
#[derive(clap::Args)]
pub struct PushOptions {
    /// APIs, comma-separated: one call to each in turn.
    #[arg(long, value_delimiter = ',', required = true)]
    api: Vec<SocketAddr>,
    /// uid, group or all.
    #[arg(long, default_value = "uid")]
    to: String,
    /// Pushes to send.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Pushes per second (0: as fast as the callers go).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Calls in flight at most; at a rate, a push due while every caller
    /// is busy is skipped (counted), not queued.
    #[arg(long, default_value_t = 16)]
    callers: usize,
    /// uids (or groups) picked from: `<prefix>u0` … `<prefix>u<targets-1>`.
    #[arg(long, default_value_t = 100_000)]
    targets: usize,
    /// Prefix of uid and group names (the holders').
    #[arg(long, default_value = "h-")]
    prefix: String,
    /// Tag letter after the send time: the holders report per tag.
    #[arg(long, default_value = "U")]
    tag: char,
    /// Payload bytes (at least 21: the send time and the tag).
    #[arg(long, default_value_t = 100)]
    size: usize,
}

/// Runs `push`: prints one JSON line.
pub async fn push(o: PushOptions) {
    let method = match o.to.as_str() {
        "uid" => "send_to_uid",
        "group" => "send_to_group",
        "all" => "send_to_all",
        other => {
            eprintln!("gatecast-bench: --to uid|group|all, not {other}");
            std::process::exit(2)
        }
    };
    let api = Arc::new(Batcher::new(&o.api));
    let limit = Arc::new(tokio::sync::Semaphore::new(o.callers.max(1)));
    let errors = Arc::new(AtomicUsize::new(0));
    let call_ms = Arc::new(Mutex::new(Vec::with_capacity(o.count)));
    let first_sent = wall_us();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(o.count);
    let mut skipped = 0usize;
    for n in 0..o.count {
        let permit = if o.rate > 0.0 {
            let due = started + Duration::from_secs_f64(n as f64 / o.rate);
            tokio::time::sleep_until(due.into()).await;
            match limit.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    skipped += 1;
                    continue;
                }
            }
        } else {
            limit.clone().acquire_owned().await.expect("open semaphore")
        };
        let target = (n.wrapping_mul(2_654_435_761) >> 7) % o.targets.max(1);
        let body_of = {
            let (to, prefix, tag, size) = (o.to.clone(), o.prefix.clone(), o.tag, o.size);
            move |sent: u64| {
                let mut data = format!("{sent:020}{tag}");
                data.extend(std::iter::repeat_n('x', size.saturating_sub(21)));
                match to.as_str() {
                    "uid" => json!({"uid": format!("{prefix}u{target}"), "data": data}),
                    "group" => json!({"group": format!("{prefix}g{target}"), "data": data}),
                    _ => json!({ "data": data }),
                }
            }
        };
        let (api, errors, call_ms) = (api.clone(), errors.clone(), call_ms.clone());
        tasks.push(tokio::spawn(async move {
            let at = Instant::now();
            if api.call(method, &body_of(wall_us())).await.is_err() {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            call_ms
                .lock()
                .unwrap()
                .push(at.elapsed().as_secs_f64() * 1000.0);
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut l = std::mem::take(&mut *call_ms.lock().unwrap());
    l.sort_by(f64::total_cmp);
    let sent = o.count - skipped;
    println!(
        "{}",
        json!({
            "event": "push",
            "to": o.to,
            "tag": o.tag.to_string(),
            "sent": sent,
            "skipped_callers_busy": skipped,
            "errors": errors.load(Ordering::Relaxed),
            "first_sent_us": first_sent,
            "seconds": round(seconds, 3),
            "pushes_per_s": round(sent as f64 / seconds, 0),
            "call_p50_ms": round(percentile(&l, 0.5), 3),
            "call_p99_ms": round(percentile(&l, 0.99), 3),
        })
    );
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}
