//! `fanout` and `broadcast`: deliveries per second and server CPU per
//! delivery; `unicast`: latency at a fixed rate of pushes to uids.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::util::{connect_spread, cpu_of, percentile, rss_kib, Api, Ws, WAIT};

/// How a scenario pushes through the API.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Mode {
    /// Every push one HTTP call, from `--callers` concurrent callers: what
    /// backends do.
    Single,
    /// 100 pushes per `/api/batch` call (gatecast only).
    Batch,
}

/// Which way pushes reach the servers.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Via {
    /// The HTTP push API (`--api`).
    Http,
    /// One PUBLISH of gatecast's envelope per push, straight to Redis
    /// (gatecast's Redis engine only; joins and binds still go through the
    /// API, which waits until they are applied).
    Redis,
}

/// Where the clients are and how pushes reach them.
pub struct Target {
    /// Processes whose CPU time is the server's (every node, and Redis
    /// if wanted).
    pub pids: Vec<u32>,
    /// The clients' nodes (clients spread round robin).
    pub addrs: Vec<SocketAddr>,
    /// The APIs the pushes go through (may be another node's; several:
    /// calls spread round robin).
    pub api: Vec<SocketAddr>,
    /// Concurrent API callers, in total over every API.
    pub callers: usize,
    /// Single calls or batches.
    pub mode: Mode,
    /// Prefix of groups and uids, distinct per run.
    pub prefix: String,
    /// Pushes outstanding at most (sent, not yet received by every
    /// recipient); 0: no limit (open loop).
    pub window: usize,
    /// HTTP API or straight to Redis.
    pub via: Via,
    /// The Redis of `Via::Redis`.
    pub redis_url: Option<String>,
    /// gatecast's `--redis-prefix`, for `Via::Redis`.
    pub redis_prefix: String,
}

/// Where one push goes.
enum To {
    Group(String),
    All,
    Uid(String),
}

/// Sends pushes the way the target says: HTTP calls or PUBLISHes.
#[derive(Clone)]
enum Pusher {
    Http(Api),
    Redis(gatecast_emitter::Emitter),
}

impl Pusher {
    async fn new(t: &Target) -> Self {
        match t.via {
            Via::Http => Pusher::Http(Api::spread(&t.api)),
            Via::Redis => {
                use fred::prelude::{Builder, ClientLike, Config};
                let url = t
                    .redis_url
                    .as_deref()
                    .unwrap_or_else(|| exit("--via redis needs --redis-url"));
                let config = Config::from_url(url).unwrap_or_else(|e| exit(&format!("{url}: {e}")));
                let client = Builder::from_config(config).build().unwrap();
                tokio::time::timeout(WAIT, client.init())
                    .await
                    .unwrap_or_else(|_| exit(&format!("{url}: timed out")))
                    .unwrap_or_else(|e| exit(&format!("{url}: {e}")));
                Pusher::Redis(gatecast_emitter::Emitter::new(client, &t.redis_prefix))
            }
        }
    }

    async fn push(&self, to: To, data: String) {
        match self {
            Pusher::Http(api) => {
                let (method, body) = match to {
                    To::Group(g) => ("send_to_group", json!({"group": g, "data": data})),
                    To::All => ("send_to_all", json!({ "data": data })),
                    To::Uid(u) => ("send_to_uid", json!({"uid": u, "data": data})),
                };
                api.call(method, body).await
            }
            Pusher::Redis(emitter) => {
                use gatecast_emitter::Message;
                let m = Message::text(data);
                let sent = match to {
                    To::Group(g) => emitter.send_to_group(&g, m, &[]).await,
                    To::All => emitter.send_to_all(m, &[]).await,
                    To::Uid(u) => emitter.send_to_uid(&u, m).await,
                };
                sent.unwrap_or_else(|e| panic!("publish: {e}"));
            }
        }
    }
}

fn exit(why: &str) -> ! {
    eprintln!("gatecast-bench: {why}");
    std::process::exit(2)
}

/// Digits of the push number at the start of every fan-out payload.
const SEQ: usize = 10;

/// What the readers share with the senders: per push, its send time and
/// how many recipients have not had it yet.
struct Books {
    sent_us: Vec<AtomicU64>,
    remaining: Vec<AtomicUsize>,
    delivered: AtomicUsize,
    /// Push-to-last-delivery latencies, ms.
    latencies: samples::Samples,
    /// Free places in the window (unused when the window is off).
    window: Semaphore,
}

impl Books {
    /// A delivery of push `seq` (its number, from the payload).
    fn delivered(&self, seq: usize) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        let Some(left) = self.remaining.get(seq) else {
            return;
        };
        if left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let now = clock().elapsed().as_micros() as u64;
            let sent = self.sent_us[seq].load(Ordering::Acquire);
            self.latencies
                .push(now.saturating_sub(sent) as f64 / 1000.0);
            self.window.add_permits(1);
        }
    }
}

/// What `throughput` pushes.
pub struct Shape {
    /// Groups; 0: every push to all.
    pub groups: usize,
    /// Clients per group (or in all).
    pub group_size: usize,
    /// Pushes per group (or in all).
    pub pushes: usize,
    /// Payload bytes.
    pub size: usize,
    /// Pushes per second on a fixed schedule; 0: as fast as the callers go.
    pub rate: u64,
}

/// Pushes to groups (`groups` > 0, `group_size` clients each) or to all
/// (`groups` = 0, `group_size` clients): `pushes` per group (or in all),
/// `size` bytes each, round robin over the groups, at `rate` a second if
/// given. Each payload starts with the push's number, so the readers know
/// when a push has reached every recipient (its latency; a place free in
/// the window). Prints one JSON line.
pub async fn throughput(t: Target, shape: Shape) {
    let Shape {
        groups,
        group_size,
        pushes,
        size,
        rate,
    } = shape;
    if rate > 0 && t.mode == Mode::Batch {
        exit("--rate schedules single pushes: not with --mode batch");
    }
    if t.window > 0 && t.mode == Mode::Batch {
        exit("--window counts single pushes: not with --mode batch");
    }
    if t.via == Via::Redis && t.mode == Mode::Batch {
        exit("--via redis publishes one push at a time: not with --mode batch");
    }
    clock();
    let api = Api::spread(&t.api);
    let pusher = Pusher::new(&t).await;
    let clients = group_size * groups.max(1);
    let conns = connect_spread(&t.addrs, clients).await;
    let p = t.prefix.clone();
    if groups > 0 {
        let joins = conns
            .iter()
            .enumerate()
            .map(|(i, (_, id))| {
                (
                    "join_group",
                    json!({"client_id": id, "group": format!("{p}g{}", i % groups)}),
                )
            })
            .collect();
        api.call_all(t.callers, joins).await;
    }
    let calls = pushes * groups.max(1);
    let books = Arc::new(Books {
        sent_us: (0..calls).map(|_| AtomicU64::new(0)).collect(),
        remaining: (0..calls).map(|_| AtomicUsize::new(group_size)).collect(),
        delivered: AtomicUsize::new(0),
        latencies: samples::Samples::default(),
        window: Semaphore::new(t.window),
    });
    let readers: Vec<_> = conns
        .into_iter()
        .map(|(ws, _)| count_until(ws, pushes, books.clone()))
        .collect();

    let padding = "x".repeat(size.saturating_sub(SEQ));
    let push_of = |n: usize| {
        let to = if groups == 0 {
            To::All
        } else {
            To::Group(format!("{p}g{}", n % groups))
        };
        (to, format!("{n:0SEQ$}{padding}"))
    };
    let window = t.window;
    let sent = AtomicUsize::new(0);
    let stalled = std::sync::atomic::AtomicBool::new(false);
    let cpu_before = cpu_of(&t.pids);
    let started = Instant::now();
    match t.mode {
        Mode::Single => {
            futures_util::stream::iter(0..calls)
                .for_each_concurrent(t.callers.max(1), |n| {
                    let (pusher, books, sent, stalled) = (&pusher, &books, &sent, &stalled);
                    let (to, data) = push_of(n);
                    async move {
                        if rate > 0 {
                            let due = started + Duration::from_secs_f64(n as f64 / rate as f64);
                            tokio::time::sleep_until(due.into()).await;
                        }
                        if stalled.load(Ordering::Relaxed) {
                            return;
                        }
                        if window > 0 {
                            // A push that never arrives keeps its place:
                            // stop sending rather than wait for ever.
                            match tokio::time::timeout(WAIT, books.window.acquire()).await {
                                Ok(Ok(permit)) => permit.forget(),
                                _ => {
                                    stalled.store(true, Ordering::Relaxed);
                                    return;
                                }
                            }
                        }
                        let now = clock().elapsed().as_micros() as u64;
                        books.sent_us[n].store(now, Ordering::Release);
                        sent.fetch_add(1, Ordering::Relaxed);
                        pusher.push(to, data).await;
                    }
                })
                .await
        }
        Mode::Batch => {
            let batches = (0..calls)
                .collect::<Vec<_>>()
                .chunks(100)
                .map(|c| {
                    let commands: Vec<_> = c
                        .iter()
                        .map(|n| {
                            let (to, data) = push_of(*n);
                            let (method, params) = match to {
                                To::Group(g) => {
                                    ("send_to_group", json!({"group": g, "data": data}))
                                }
                                _ => ("send_to_all", json!({ "data": data })),
                            };
                            json!({"method": method, "params": params})
                        })
                        .collect();
                    ("batch", json!({ "commands": commands }))
                })
                .collect();
            let now = clock().elapsed().as_micros() as u64;
            for s in &books.sent_us {
                s.store(now, Ordering::Release);
            }
            sent.store(calls, Ordering::Relaxed);
            api.call_all(t.callers, batches).await;
        }
    }
    let pushed = started.elapsed().as_secs_f64();
    let sent = sent.load(Ordering::Relaxed);
    let expected = sent * group_size;
    // Bounded: a lost delivery ends the wait after WAIT without progress.
    let mut last = (0, Instant::now());
    loop {
        let now = books.delivered.load(Ordering::Relaxed);
        if now >= expected {
            break;
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > WAIT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_of(&t.pids) - cpu_before;
    let got = books.delivered.load(Ordering::Relaxed);
    for r in readers {
        r.abort();
    }
    let mut l = books.latencies.take();
    l.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({
            "scenario": if groups == 0 { "broadcast" } else { "fanout" },
            "mode": format!("{:?}", t.mode).to_lowercase(),
            "via": format!("{:?}", t.via).to_lowercase(),
            "window": t.window,
            "rate": rate,
            "callers": t.callers,
            "apis": t.api.len(),
            "nodes": t.addrs.len(),
            "clients": clients,
            "groups": groups,
            "pushes": sent,
            "size": size,
            "seconds": round(elapsed, 3),
            "pushes_per_s": round(sent as f64 / elapsed, 0),
            "api_pushes_per_s": round(sent as f64 / pushed, 0),
            "deliveries_per_s": round(got as f64 / elapsed, 0),
            "latency_p50_ms": round(percentile(&l, 0.5), 3),
            "latency_p99_ms": round(percentile(&l, 0.99), 3),
            "latency_max_ms": round(l.last().copied().unwrap_or(0.0), 3),
            "server_cpu_us_per_delivery": round(cpu * 1e6 / got.max(1) as f64, 2),
            "server_cpu_us_per_push": round(cpu * 1e6 / sent.max(1) as f64, 1),
            "server_rss_kib": t.pids.iter().map(|p| rss_kib(*p)).sum::<u64>(),
            "lost": expected - got.min(expected),
            "stalled": stalled.load(Ordering::Relaxed),
        })
    );
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Reads `ws` until it got `expected` messages (or closed), booking each
/// delivery under the push number its payload starts with.
fn count_until(ws: Ws, expected: usize, books: Arc<Books>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (_write, mut read) = ws.split();
        let mut got = 0;
        while got < expected {
            let seq = |b: &[u8]| {
                b.get(..SEQ)
                    .and_then(|d| std::str::from_utf8(d).ok())
                    .and_then(|d| d.parse::<usize>().ok())
                    .unwrap_or(usize::MAX)
            };
            match read.next().await {
                Some(Ok(Message::Text(text))) => {
                    got += 1;
                    books.delivered(seq(text.as_bytes()));
                }
                Some(Ok(Message::Binary(data))) => {
                    got += 1;
                    books.delivered(seq(&data));
                }
                // Closed (e.g. 1013: this load generator read too slowly).
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            }
        }
    })
}

/// The load generator's clock, shared by senders and readers.
fn clock() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// `clients` clients bound to uids; `rate` pushes/s to random uids for
/// `seconds`, each carrying its send time; prints latency percentiles.
pub async fn unicast(t: Target, clients: usize, rate: u64, seconds: u64, size: usize) {
    let api = Api::spread(&t.api);
    let pusher = Pusher::new(&t).await;
    clock();
    let conns = connect_spread(&t.addrs, clients).await;
    let p = t.prefix.clone();
    let binds = conns
        .iter()
        .enumerate()
        .map(|(i, (_, id))| {
            (
                "bind_uid",
                json!({"client_id": id, "uid": format!("{p}u{i}")}),
            )
        })
        .collect();
    api.call_all(t.callers, binds).await;
    let latencies = Arc::new(samples::Samples::default());
    let readers: Vec<_> = conns
        .into_iter()
        .map(|(ws, _)| {
            let latencies = latencies.clone();
            tokio::spawn(async move {
                let (_write, mut read) = ws.split();
                while let Some(Ok(m)) = read.next().await {
                    if let Message::Text(text) = m {
                        let sent: u64 = text.get(..20).and_then(|s| s.parse().ok()).unwrap_or(0);
                        let now = clock().elapsed().as_micros() as u64;
                        latencies.push(now.saturating_sub(sent) as f64 / 1000.0);
                    }
                }
            })
        })
        .collect();
    let total = (rate * seconds) as usize;
    let limit = Arc::new(tokio::sync::Semaphore::new(t.callers.max(1)));
    let cpu_before = cpu_of(&t.pids);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    let mut late = 0usize;
    for n in 0..total {
        let due = started + Duration::from_secs_f64(n as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            // Every caller busy: the open loop would queue in the load
            // generator, which is not the server's latency.
            late += 1;
            continue;
        };
        let pusher = pusher.clone();
        let uid = format!("{p}u{}", rand_index(n, clients));
        tasks.push(tokio::spawn(async move {
            let sent = clock().elapsed().as_micros() as u64;
            let mut data = format!("{sent:020}");
            data.extend(std::iter::repeat_n('x', size.saturating_sub(20)));
            pusher.push(To::Uid(uid), data).await;
            drop(permit);
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let sent = total - late;
    let deadline = Instant::now() + WAIT;
    while latencies.len() < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu = cpu_of(&t.pids) - cpu_before;
    for r in readers {
        r.abort();
    }
    let mut l = latencies.take();
    l.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({
            "scenario": "unicast",
            "via": format!("{:?}", t.via).to_lowercase(),
            "callers": t.callers,
            "apis": t.api.len(),
            "nodes": t.addrs.len(),
            "clients": clients,
            "rate": rate,
            "sent": sent,
            "skipped_callers_busy": late,
            "received": l.len(),
            "p50_ms": round(percentile(&l, 0.5), 3),
            "p99_ms": round(percentile(&l, 0.99), 3),
            "p999_ms": round(percentile(&l, 0.999), 3),
            "max_ms": round(l.last().copied().unwrap_or(0.0), 3),
            "server_cpu_us_per_push": round(cpu * 1e6 / sent.max(1) as f64, 1),
        })
    );
}

/// A spread of client indices without a random number generator.
fn rand_index(n: usize, clients: usize) -> usize {
    (n.wrapping_mul(2_654_435_761) >> 7) % clients.max(1)
}

/// Latency samples gathered by many reader tasks.
mod samples {
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct Samples(Mutex<Vec<f64>>);

    impl Samples {
        pub fn push(&self, v: f64) {
            self.0.lock().unwrap().push(v);
        }
        pub fn len(&self) -> usize {
            self.0.lock().unwrap().len()
        }
        pub fn take(&self) -> Vec<f64> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }
}
