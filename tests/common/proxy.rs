//! A TCP proxy between a node and Redis that can stop forwarding without
//! closing anything, as a switch or a NetworkPolicy dropping packets does:
//! the Redis outages of tests/outages.rs, tests/resume.rs and
//! tests/recovery.rs.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Which ways the proxy forwards.
#[derive(Debug, Clone, Copy)]
pub struct Flow {
    /// Node to Redis.
    pub up: bool,
    /// Redis to node.
    pub down: bool,
}

/// A TCP proxy in front of Redis. Cut, it stops reading: bytes wait in the
/// sockets' buffers, nothing is dropped or reset, and they flow again when
/// it resumes.
pub struct Proxy {
    /// Where nodes connect instead of Redis.
    pub addr: SocketAddr,
    flow: watch::Sender<Flow>,
    trap: Trap,
}

/// A stall armed for the next node-to-Redis bytes holding a pattern.
type Trap = Arc<Mutex<Option<(Vec<u8>, Duration)>>>;

impl Proxy {
    /// Starts forwarding to the Redis on `redis_port`.
    pub async fn start(redis_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (flow, _) = watch::channel(Flow {
            up: true,
            down: true,
        });
        let flows = flow.clone();
        let trap: Trap = Arc::default();
        let traps = trap.clone();
        // Ends with the test's runtime, with every pump.
        tokio::spawn(async move {
            while let Ok((node, _)) = listener.accept().await {
                let Ok(redis) = TcpStream::connect(("127.0.0.1", redis_port)).await else {
                    continue;
                };
                let (node_read, node_write) = node.into_split();
                let (redis_read, redis_write) = redis.into_split();
                let up = flows.subscribe();
                tokio::spawn(pump(
                    node_read,
                    redis_write,
                    up,
                    |f| f.up,
                    Some(traps.clone()),
                ));
                tokio::spawn(pump(
                    redis_read,
                    node_write,
                    flows.subscribe(),
                    |f| f.down,
                    None,
                ));
            }
        });
        Proxy { addr, flow, trap }
    }

    /// `redis://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Holds the next bytes from a node that contain `pattern` (and all
    /// that follow on that connection) for `stall` before forwarding them:
    /// one command stalled as a Redis busy for a moment stalls it.
    pub fn stall_next(&self, pattern: &[u8], stall: Duration) {
        *self.trap.lock().unwrap() = Some((pattern.to_vec(), stall));
    }

    /// Forwards node to Redis (`up`) and Redis to node (`down`) or not.
    pub fn set(&self, up: bool, down: bool) {
        self.flow.send_replace(Flow { up, down });
    }
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut flow: watch::Receiver<Flow>,
    open: fn(&Flow) -> bool,
    trap: Option<Trap>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if flow.wait_for(open).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        let stall = trap.as_ref().and_then(|t| {
            let mut armed = t.lock().unwrap();
            let hit = armed
                .as_ref()
                .is_some_and(|(p, _)| buf[..n].windows(p.len()).any(|w| w == p));
            hit.then(|| armed.take().map(|(_, d)| d)).flatten()
        });
        if let Some(stall) = stall {
            tokio::time::sleep(stall).await;
        }
        // Read just before a cut: held until the link is back.
        if flow.wait_for(open).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
