//! The BusinessWorkers connected to this node, and the events they get.
//!
//! A BusinessWorker finds every node through the Register and connects to
//! each node's inner port with `WORKER_CONNECT`, as it does to every
//! GatewayWorker gateway (a full mesh). The node then sends it the events of
//! the node's own connections: connect, websocket-connect, message, close,
//! each with the client's address and the connection's session, and the
//! worker runs `Events.php` on them and answers with commands on the same
//! connection (read by [`super::inner`], like any other inner connection).
//!
//! Routing is GatewayWorker's default (`routerBind`): a connection's events
//! all go to one worker, picked when its first event is sent, and to another
//! live worker once that one has gone. The choice is kept with the
//! connection ([`Route`]), so nothing here grows with the connections.
//!
//! Delivery is at most once, as in GatewayWorker: an event for which no
//! worker is connected, or that a worker's full queue cannot take, is dropped
//! and counted (`gatecast_worker_events_dropped_total`). Unlike
//! GatewayWorker, the client connection stays open. A worker whose queue
//! stays full (more than [`QUEUE_BYTES`] waiting, or a write stalled for
//! [`WRITE_TIMEOUT`]) is disconnected; its connections move to the others.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::protocol::{self, cmd, flag, Packet};
use crate::accept::Throttle;
use crate::ids::ClientId;
use crate::metrics::{Metrics, ReasonLabel};

/// Bytes waiting for one worker before it counts as stuck and is
/// disconnected: GatewayWorker's `sendToWorkerBufferSize`.
pub const QUEUE_BYTES: usize = 10_240_000;

/// Largest event sent to a worker: a larger one (a huge session, with
/// `--max-session-bytes` raised) is dropped and counted (`too_large`),
/// never taken as the worker being slow.
pub const MAX_EVENT_BYTES: usize = QUEUE_BYTES / 4;

/// Packets waiting for one worker, whatever their size.
const QUEUE_PACKETS: usize = 65_536;

/// Longest a write to a worker may stall before it is disconnected.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A worker that got nothing for this long gets a `PING` (GatewayWorker's
/// `PERSISTENCE_CONNECTION_PING_INTERVAL`): a dead peer is found by the
/// write failing, and middleboxes keep the connection.
const PING_EVERY: Duration = Duration::from_secs(25);

/// Packets written to a worker with one flush.
const WRITE_BATCH: usize = 64;

/// Which worker a connection's events go to: kept by the connection, so the
/// choice sticks for its life (`0`: none chosen yet). Also holds the
/// client's address, which every event carries.
#[derive(Debug)]
pub struct Route {
    worker: AtomicU64,
    client_ip: u32,
    client_port: u16,
}

impl Route {
    /// A connection from `client` (an IPv6 client is `0.0.0.0`, as
    /// GatewayWorker's IPv4-only header can say nothing better).
    pub fn new(client: std::net::SocketAddr) -> Route {
        let client_ip = match client.ip() {
            std::net::IpAddr::V4(ip) => u32::from(ip),
            std::net::IpAddr::V6(ip) => ip.to_ipv4_mapped().map_or(0, u32::from),
        };
        Route {
            worker: AtomicU64::new(0),
            client_ip,
            client_port: client.port(),
        }
    }
}

/// What happened to a connection, as a worker hears it.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// `onConnect`.
    Connect,
    /// `onWebSocketConnect`: the body is the serialized
    /// `['get' => …, 'server' => …, 'cookie' => …]`.
    WebSocketConnect(&'a [u8]),
    /// `onMessage` with what the client sent.
    Message(&'a [u8]),
    /// `onClose`.
    Close,
    /// gatecast's own: the connection resumed the one whose client_id is
    /// given (a stock BusinessWorker ignores it).
    Resumed(&'a [u8]),
    /// gatecast's own: a presence transition, as JSON text (not about a
    /// connection: sent with connection id 0 to any worker).
    Presence(&'a [u8]),
}

/// One connected worker.
struct Link {
    id: u64,
    /// `remote ip:worker_key`, unique per worker process.
    key: String,
    queue: mpsc::Sender<Bytes>,
    queued_bytes: Arc<AtomicUsize>,
    /// Ends the worker's inner connection, reader and writer both.
    closed: CancellationToken,
}

/// The workers connected to this node.
pub struct Workers {
    live: RwLock<Vec<Arc<Link>>>,
    /// `live.len()`, read without the lock on every client message.
    count: AtomicUsize,
    /// A worker has connected since the node started: from then on an event
    /// without a worker is a loss worth counting. Before, the node is not
    /// used with workers and says nothing.
    used: AtomicBool,
    next_id: AtomicU64,
    next_pick: AtomicUsize,
    /// The public port, `gateway_port` in every event.
    public_port: u16,
    metrics: Arc<Metrics>,
    log: Mutex<Throttle>,
    writers: TaskTracker,
}

impl Workers {
    /// No workers yet, for a node whose public listener is on
    /// `public_port`.
    pub fn new(public_port: u16, metrics: Arc<Metrics>) -> Workers {
        Workers {
            live: RwLock::new(Vec::new()),
            count: AtomicUsize::new(0),
            used: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            next_pick: AtomicUsize::new(0),
            public_port,
            metrics,
            log: Mutex::new(Throttle::default()),
            writers: TaskTracker::new(),
        }
    }

    /// Whether any worker is connected now.
    pub fn any(&self) -> bool {
        self.count.load(Ordering::Relaxed) > 0
    }

    /// Takes a worker's connection after its `WORKER_CONNECT`: from now on
    /// this node writes to it only through its queue. A worker already
    /// known under `key` is replaced (GatewayWorker does the same on a
    /// name conflict). Returns the worker's id for [`Workers::remove`].
    pub fn add(&self, key: String, write: OwnedWriteHalf, closed: CancellationToken) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (queue, rx) = mpsc::channel(QUEUE_PACKETS);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let link = Arc::new(Link {
            id,
            key,
            queue,
            queued_bytes: queued_bytes.clone(),
            closed: closed.clone(),
        });
        let replaced = {
            let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
            let old = live
                .iter()
                .position(|l| l.key == link.key)
                .map(|i| live.swap_remove(i));
            live.push(link.clone());
            self.count.store(live.len(), Ordering::Relaxed);
            old
        };
        if let Some(old) = replaced {
            tracing::warn!(worker = %old.key, "a second worker with this key connected: the first is closed");
            self.disconnected(&old, "replaced");
        }
        self.used.store(true, Ordering::Relaxed);
        self.metrics
            .workers
            .set(self.count.load(Ordering::Relaxed) as i64);
        tracing::info!(worker = %link.key, "BusinessWorker connected");
        self.writers.spawn(write_loop(
            write,
            rx,
            queued_bytes,
            closed,
            self.metrics.clone(),
            link.key.clone(),
        ));
        id
    }

    /// Forgets the worker `id` (its connection ended); its connections'
    /// next events go to another worker.
    pub fn remove(&self, id: u64) -> bool {
        let removed = {
            let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
            let found = live
                .iter()
                .position(|l| l.id == id)
                .map(|i| live.swap_remove(i));
            self.count.store(live.len(), Ordering::Relaxed);
            found
        };
        if let Some(link) = removed {
            self.metrics
                .workers
                .set(self.count.load(Ordering::Relaxed) as i64);
            tracing::info!(worker = %link.key, "BusinessWorker disconnected");
            link.closed.cancel();
            return true;
        }
        false
    }

    /// Writes `bytes` to worker `id` as they are (a reply to a query a
    /// worker sent on its own connection); false when it cannot take them.
    pub fn send_raw(&self, id: u64, bytes: Bytes) -> bool {
        let link = {
            let live = self.live.read().unwrap_or_else(|e| e.into_inner());
            live.iter().find(|l| l.id == id).cloned()
        };
        link.is_some_and(|link| self.enqueue(&link, bytes))
    }

    /// Sends `event` of connection `id` to its worker, picking one if it
    /// has none or its worker is gone. `session` is asked for only once a
    /// worker was found: the connection's session, serialized.
    pub fn send(
        &self,
        route: &Route,
        id: ClientId,
        event: Event<'_>,
        session: impl FnOnce() -> Vec<u8>,
    ) {
        if !self.any() {
            if self.used.load(Ordering::Relaxed) {
                self.dropped("no_worker", id);
            }
            return;
        }
        let Some(link) = self.pick(route) else {
            self.dropped("no_worker", id);
            return;
        };
        let (command, body, scalar) = match event {
            Event::Connect => (cmd::ON_CONNECT, &[][..], true),
            Event::WebSocketConnect(data) => (cmd::ON_WEBSOCKET_CONNECT, data, false),
            Event::Message(data) => (cmd::ON_MESSAGE, data, true),
            Event::Close => (cmd::ON_CLOSE, &[][..], true),
            Event::Resumed(old) => (cmd::ON_RESUMED, old, true),
            Event::Presence(body) => (cmd::ON_PRESENCE, body, true),
        };
        let session = session();
        if session.len() + body.len() > MAX_EVENT_BYTES {
            self.dropped("too_large", id);
            return;
        }
        let packet = Packet {
            cmd: command,
            // The connection's node: this one, or a dead one whose
            // connections this node purged (their onClose).
            local_ip: u32::from(*id.node().addr().ip()),
            local_port: id.node().addr().port(),
            client_ip: route.client_ip,
            client_port: route.client_port,
            connection_id: id.number(),
            // PHP's encoder sets it for a scalar body (a string here).
            flag: if scalar { flag::BODY_IS_SCALAR } else { 0 },
            gateway_port: self.public_port,
            ext_data: Bytes::from(session),
            body: Bytes::copy_from_slice(body),
        };
        // Only a session past 4 GiB could fail: dropped, never a panic.
        let Ok(bytes) = protocol::try_encode(&packet) else {
            self.dropped("too_large", id);
            return;
        };
        if self.enqueue(&link, bytes) {
            self.metrics.worker_events_sent.inc();
        } else {
            self.dropped("worker_full", id);
        }
    }

    /// The worker of `route`, or a new one for it (round robin).
    fn pick(&self, route: &Route) -> Option<Arc<Link>> {
        let chosen = route.worker.load(Ordering::Relaxed);
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        if chosen != 0 {
            if let Some(link) = live.iter().find(|l| l.id == chosen) {
                return Some(link.clone());
            }
        }
        if live.is_empty() {
            return None;
        }
        let i = self.next_pick.fetch_add(1, Ordering::Relaxed) % live.len();
        let link = live[i].clone();
        route.worker.store(link.id, Ordering::Relaxed);
        Some(link)
    }

    /// Queues `bytes` for `link`; a worker that cannot take them is
    /// disconnected (everything queued for it is lost with it).
    fn enqueue(&self, link: &Arc<Link>, bytes: Bytes) -> bool {
        let len = bytes.len();
        let queued = link.queued_bytes.fetch_add(len, Ordering::Relaxed) + len;
        if queued > QUEUE_BYTES || link.queue.try_send(bytes).is_err() {
            link.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            // A connection that just failed (its writer gone) is not a slow
            // worker: the reader's end removes it.
            if !link.closed.is_cancelled() && self.remove(link.id) {
                tracing::warn!(
                    worker = %link.key,
                    queued,
                    "BusinessWorker too slow: disconnected (its connections move to the others)"
                );
                self.disconnected(link, "slow");
            }
            return false;
        }
        true
    }

    fn disconnected(&self, link: &Link, reason: &'static str) {
        link.closed.cancel();
        self.metrics
            .worker_disconnects
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    fn dropped(&self, reason: &'static str, id: ClientId) {
        self.metrics
            .worker_events_dropped
            .get_or_create(&ReasonLabel { reason })
            .inc();
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(suppressed) = log.allow(Instant::now()) {
            tracing::warn!(
                reason,
                client_id = %id,
                suppressed,
                "event for BusinessWorkers dropped (logged at most once a second, \
                 `suppressed` since the last line)"
            );
        }
    }

    /// At shutdown, once the connections are closed: lets every worker take
    /// what is queued for it (their close events), for at most `limit`.
    pub async fn close(&self, limit: Duration) {
        let links = std::mem::take(&mut *self.live.write().unwrap_or_else(|e| e.into_inner()));
        self.count.store(0, Ordering::Relaxed);
        self.metrics.workers.set(0);
        // Dropping the last senders ends each writer once its queue is
        // written.
        drop(links);
        self.writers.close();
        if tokio::time::timeout(limit, self.writers.wait())
            .await
            .is_err()
        {
            tracing::warn!("BusinessWorkers did not take their last events in time");
        }
    }
}

/// Writes a worker's queue to its socket until the queue closes (the worker
/// was removed, or the node stops) or the worker fails or stalls.
async fn write_loop(
    mut write: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Bytes>,
    queued_bytes: Arc<AtomicUsize>,
    closed: CancellationToken,
    metrics: Arc<Metrics>,
    key: String,
) {
    let ping = protocol::encode(&Packet {
        flag: flag::BODY_IS_SCALAR,
        ..Packet::new(cmd::PING)
    });
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let outcome: Result<(), &'static str> = loop {
        let got = tokio::select! {
            () = closed.cancelled() => break Ok(()),
            n = tokio::time::timeout(PING_EVERY, rx.recv_many(&mut batch, WRITE_BATCH)) => n,
        };
        // What the batch takes off the queue's byte count once written.
        let bytes: usize = batch.iter().map(Bytes::len).sum();
        match got {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(_) => batch.push(ping.clone()),
        }
        let write_all = async {
            for packet in batch.drain(..) {
                write.write_all(&packet).await?;
            }
            write.flush().await
        };
        let written = tokio::select! {
            () = closed.cancelled() => break Ok(()),
            r = tokio::time::timeout(WRITE_TIMEOUT, write_all) => r,
        };
        queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        match written {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break Err("write_error"),
            Err(_) => break Err("stalled"),
        }
    };
    if let Err(reason) = outcome {
        tracing::warn!(worker = %key, reason, "BusinessWorker connection closed");
        metrics
            .worker_disconnects
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
    // What was still queued is lost with the connection.
    rx.close();
    let mut lost = 0u64;
    while rx.try_recv().is_ok() {
        lost += 1;
    }
    if lost > 0 {
        metrics
            .worker_events_dropped
            .get_or_create(&ReasonLabel {
                reason: "worker_closed",
            })
            .inc_by(lost);
    }
    closed.cancel();
    let _ = write.shutdown().await;
}
