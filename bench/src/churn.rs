//! `churn`: connect/push/disconnect churn on several nodes for a while, the
//! load `bench/soak.sh` runs while it samples the nodes' memory and
//! descriptors. Every client connects to one node, gets a uid and a group
//! through another node's API, reads pushes for a moment and leaves (half
//! with a close frame, half by dropping the connection), then does it all
//! again. Pushes to groups, uids and everyone run the whole time. At the
//! end every client is gone, so the cluster must report 0 connections.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

/// Every wait of the load generator: a node that does not answer within it
/// counts as an error, the run goes on.
const WAIT: Duration = Duration::from_secs(5);

/// Groups and uids the clients spread over.
const GROUPS: usize = 10;
const UIDS: usize = 100;

/// What happened during the run.
#[derive(Default)]
struct Stats {
    connects: AtomicU64,
    closes: AtomicU64,
    drops: AtomicU64,
    received: AtomicU64,
    pushes: AtomicU64,
    errors: AtomicU64,
}

/// Runs churn for `seconds` with `clients` clients at a time spread over
/// `addrs` (public listeners), memberships and pushes through `apis`.
pub async fn run(addrs: Vec<SocketAddr>, apis: Vec<SocketAddr>, clients: usize, seconds: u64) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let stats = Arc::new(Stats::default());

    let pusher = {
        let (http, apis, stats) = (http.clone(), apis.clone(), stats.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            while Instant::now() < deadline {
                let mut commands = Vec::new();
                for k in 0..10 {
                    let i = n * 10 + k;
                    let data = format!("push-{i}");
                    commands.push(match i % 10 {
                        0 => serde_json::json!({"method": "send_to_all", "params": {"data": data}}),
                        1..=5 => serde_json::json!({"method": "send_to_group",
                            "params": {"group": format!("soak-g{}", i % GROUPS), "data": data}}),
                        _ => serde_json::json!({"method": "send_to_uid",
                            "params": {"uid": format!("soak-u{}", i % UIDS), "data": data}}),
                    });
                }
                let api = apis[n % apis.len()];
                let ok = post(
                    &http,
                    api,
                    "batch",
                    serde_json::json!({ "commands": commands }),
                )
                .await;
                if ok {
                    stats.pushes.fetch_add(10, Ordering::Relaxed);
                } else {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let workers: Vec<_> = (0..clients)
        .map(|w| {
            let (http, addrs, apis, stats) =
                (http.clone(), addrs.clone(), apis.clone(), stats.clone());
            tokio::spawn(async move {
                let mut round = 0usize;
                while Instant::now() < deadline {
                    if !one_life(w, round, &http, &addrs, &apis, &stats).await {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    round += 1;
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let _ = pusher.await;

    // Every client left: the cluster must say so.
    let settle = Instant::now();
    let mut left = u64::MAX;
    while settle.elapsed() < Duration::from_secs(30) {
        left = count(&http, apis[0]).await.unwrap_or(u64::MAX);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "churn seconds={} clients={clients} connects={} closes={} drops={} \
         pushes={} received={} errors={} final_client_count={left}",
        started.elapsed().as_secs(),
        s(&stats.connects),
        s(&stats.closes),
        s(&stats.drops),
        s(&stats.pushes),
        s(&stats.received),
        s(&stats.errors),
    );
}

/// One client's life: connect, memberships, read for a while, leave.
/// False on an error.
async fn one_life(
    w: usize,
    round: usize,
    http: &reqwest::Client,
    addrs: &[SocketAddr],
    apis: &[SocketAddr],
    stats: &Stats,
) -> bool {
    let node = (w + round) % addrs.len();
    let Some((mut ws, id)) = connect(addrs[node], w).await else {
        return false;
    };
    stats.connects.fetch_add(1, Ordering::Relaxed);
    // Through another node, so each change crosses Redis.
    let api = apis[(node + 1) % apis.len()];
    let k = w * 7 + round;
    let commands = serde_json::json!({"commands": [
        {"method": "bind_uid", "params": {"client_id": id, "uid": format!("soak-u{}", k % UIDS)}},
        {"method": "join_group", "params": {"client_id": id, "group": format!("soak-g{}", k % GROUPS)}},
    ]});
    if !post(http, api, "batch", commands).await {
        return false;
    }
    // 0.5 to 3 s, spread by client and round.
    let hold = Duration::from_millis(500 + ((w * 131 + round * 977) % 2500) as u64);
    let until = tokio::time::Instant::now() + hold;
    loop {
        match tokio::time::timeout_at(until, ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Text(_)))) => {
                stats.received.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(Ok(_))) => {}
            Ok(None | Some(Err(_))) => return false,
        }
    }
    if round % 2 == 1 {
        drop(ws);
        stats.drops.fetch_add(1, Ordering::Relaxed);
    } else {
        let _ = tokio::time::timeout(WAIT, async {
            let _ = ws.send(Message::Close(None)).await;
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        stats.closes.fetch_add(1, Ordering::Relaxed);
    }
    true
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Connects from one of 50 loopback source addresses (so TIME_WAIT never
/// exhausts a source's ports); `None` on any failure.
async fn connect(addr: SocketAddr, w: usize) -> Option<(Ws, String)> {
    let net = crate::util::SOURCE_NET.load(Ordering::Relaxed);
    let source = IpAddr::V4(Ipv4Addr::new(127, net, 1, 2 + (w % 50) as u8));
    let attempt = async {
        let socket = TcpSocket::new_v4().ok()?;
        socket.bind(SocketAddr::new(source, 0)).ok()?;
        let stream = socket.connect(addr).await.ok()?;
        let url = format!("ws://{addr}/ws");
        let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.ok()?;
        let welcome = ws.next().await?.ok()?;
        let v: serde_json::Value = serde_json::from_str(welcome.to_text().ok()?).ok()?;
        let id = v["client_id"].as_str()?.to_owned();
        Some((ws, id))
    };
    tokio::time::timeout(WAIT, attempt).await.ok().flatten()
}

/// POSTs an API call; true on 200.
async fn post(
    http: &reqwest::Client,
    api: SocketAddr,
    method: &str,
    body: serde_json::Value,
) -> bool {
    http.post(format!("http://{api}/api/{method}"))
        .json(&body)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

async fn count(http: &reqwest::Client, api: SocketAddr) -> Option<u64> {
    let resp = http
        .post(format!("http://{api}/api/get_all_client_count"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .ok()?;
    let v: serde_json::Value = resp.json().await.ok()?;
    v["result"].as_u64()
}
