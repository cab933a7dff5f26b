//! `fanout` and `broadcast`: deliveries per second and server CPU per
//! delivery; `unicast`: latency at a fixed rate of pushes to uids.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::util::{connect_many, cpu_of, percentile, Api, Ws, WAIT};

/// How a scenario pushes through the API.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Mode {
    /// Every push one HTTP call, from `--callers` concurrent callers: what
    /// backends do.
    Single,
    /// 100 pushes per `/api/batch` call (gatecast only).
    Batch,
}

/// Where the clients are and how pushes reach them.
pub struct Target {
    /// Processes whose CPU time is the server's (every node, and Redis
    /// if wanted).
    pub pids: Vec<u32>,
    /// The clients' node.
    pub addr: SocketAddr,
    /// The API the pushes go through (may be another node's).
    pub api: SocketAddr,
    /// Concurrent API callers.
    pub callers: usize,
    /// Single calls or batches.
    pub mode: Mode,
    /// Prefix of groups and uids, distinct per run.
    pub prefix: String,
}

/// Pushes to groups (`groups` > 0, `group_size` clients each) or to all
/// (`groups` = 0, `group_size` clients): `pushes` per group (or in all),
/// `size` bytes each. Prints one JSON line.
pub async fn throughput(t: Target, groups: usize, group_size: usize, pushes: usize, size: usize) {
    let api = Api::new(t.api);
    let clients = group_size * groups.max(1);
    let conns = connect_many(t.addr, clients).await;
    let p = &t.prefix;
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
    let delivered = Arc::new(AtomicUsize::new(0));
    let complete = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = conns
        .into_iter()
        .map(|(ws, _)| count_until(ws, pushes, delivered.clone(), complete.clone()))
        .collect();

    let payload = "x".repeat(size);
    let mut pushes_list = Vec::new();
    for _ in 0..pushes {
        if groups == 0 {
            pushes_list.push(("send_to_all", json!({ "data": payload })));
        }
        for g in 0..groups {
            pushes_list.push((
                "send_to_group",
                json!({"group": format!("{p}g{g}"), "data": payload}),
            ));
        }
    }
    let calls = pushes_list.len();
    let cpu_before = cpu_of(&t.pids);
    let started = Instant::now();
    match t.mode {
        Mode::Single => api.call_all(t.callers, pushes_list).await,
        Mode::Batch => {
            let batches = pushes_list
                .chunks(100)
                .map(|c| {
                    let commands: Vec<_> = c
                        .iter()
                        .map(|(m, params)| json!({"method": m, "params": params}))
                        .collect();
                    ("batch", json!({ "commands": commands }))
                })
                .collect();
            api.call_all(t.callers, batches).await;
        }
    }
    let pushed = started.elapsed().as_secs_f64();
    // Bounded: a lost delivery ends the wait after WAIT without progress.
    let mut last = (0, Instant::now());
    while complete.load(Ordering::Relaxed) < clients {
        let now = delivered.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > WAIT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_of(&t.pids) - cpu_before;
    let expected = pushes * clients;
    let got = delivered.load(Ordering::Relaxed);
    for r in readers {
        r.abort();
    }
    println!(
        "{}",
        json!({
            "scenario": if groups == 0 { "broadcast" } else { "fanout" },
            "mode": format!("{:?}", t.mode).to_lowercase(),
            "callers": t.callers,
            "clients": clients,
            "groups": groups,
            "pushes": calls,
            "size": size,
            "seconds": round(elapsed, 3),
            "pushes_per_s": round(calls as f64 / pushed, 0),
            "deliveries_per_s": round(got as f64 / elapsed, 0),
            "server_cpu_us_per_delivery": round(cpu * 1e6 / got.max(1) as f64, 2),
            "lost": expected - got.min(expected),
        })
    );
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Reads `ws` until it got `expected` messages (or closed), counting.
fn count_until(
    ws: Ws,
    expected: usize,
    delivered: Arc<AtomicUsize>,
    complete: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (_write, mut read) = ws.split();
        let mut got = 0;
        while got < expected {
            match read.next().await {
                Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                    got += 1;
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
                // Closed (e.g. 1013: this load generator read too slowly).
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            }
        }
        complete.fetch_add(1, Ordering::Relaxed);
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
    let api = Api::new(t.api);
    clock();
    let conns = connect_many(t.addr, clients).await;
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
        let api = api.clone();
        let uid = format!("{p}u{}", rand_index(n, clients));
        tasks.push(tokio::spawn(async move {
            let sent = clock().elapsed().as_micros() as u64;
            let mut data = format!("{sent:020}");
            data.extend(std::iter::repeat_n('x', size.saturating_sub(20)));
            api.call("send_to_uid", json!({"uid": uid, "data": data}))
                .await;
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
