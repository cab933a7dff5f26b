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

/// A stall armed for node-to-Redis bytes holding a pattern: the next
/// ones only, or (`each`) every one until disarmed.
type Trap = Arc<Mutex<Option<Stall>>>;

struct Stall {
    pattern: Vec<u8>,
    stall: Duration,
    each: bool,
}

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
        self.arm(pattern, stall, false);
    }

    /// As [`Proxy::stall_next`], for every such write until
    /// [`Proxy::disarm`]: a command Redis is always too slow to answer.
    pub fn stall_each(&self, pattern: &[u8], stall: Duration) {
        self.arm(pattern, stall, true);
    }

    /// Stalls nothing more.
    pub fn disarm(&self) {
        *self.trap.lock().unwrap() = None;
    }

    fn arm(&self, pattern: &[u8], stall: Duration, each: bool) {
        *self.trap.lock().unwrap() = Some(Stall {
            pattern: pattern.to_vec(),
            stall,
            each,
        });
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
            let hit = armed.as_ref().filter(|s| {
                buf[..n]
                    .windows(s.pattern.len())
                    .any(|w| w == s.pattern.as_slice())
            })?;
            let stall = hit.stall;
            if !hit.each {
                *armed = None;
            }
            Some(stall)
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
