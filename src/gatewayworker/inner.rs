//! GatewayWorker's gateway protocol on the inner port: what a GatewayClient
//! (or a BusinessWorker's `Gateway::` calls) sends to a gateway process, and
//! the BusinessWorkers' own connections ([`super::workers`]).
//!
//! A GatewayClient asks the Register for every gateway's address, sends a
//! call for one client to the address inside its client_id, and a call for
//! everyone (a broadcast, a group, a query) to every address; it credits
//! each answer to the address it asked, rebuilding client_ids from that
//! address and the connection numbers in the answer. So each node answers
//! and delivers for its own connections only, exactly as one GatewayWorker
//! gateway does, and membership and session changes go through the engine,
//! so the HTTP API, the Redis path and the PHP path see one state.
//!
//! One task, the sequencer, reads every inner connection's packets
//! ([`reader`], within a node-wide byte budget) and applies them in the
//! order they arrive ([`sequencer`]), packets already read before new
//! connections: a GatewayClient opens a connection per call, so
//! `setSession` then `updateSession`, or a BusinessWorker's session write
//! then its `getSession` on a new connection, must apply in that order, as
//! GatewayWorker's event loop applies them. That task only changes the hub
//! and queues frames: it never writes to a socket, never waits on Redis and
//! never answers a query. Each connection has its own task for that, fed by
//! a bounded queue: it answers its queries ([`queries`]), writes its
//! replies and waits for room for its Redis writes. A peer that is slow,
//! silent or hostile costs only its own task; one whose queue overflows is
//! closed.
//!
//! Before a peer authenticates (`--gateway-secret-key`), its packets are at
//! most [`PREAUTH_PACKET`] bytes and it has [`AUTH_TIMEOUT`] to send its
//! first packet; such peers are capped node-wide and per source address.

mod queries;
mod reader;
mod sequencer;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;

use bytes::Bytes;
use futures_util::stream::{BoxStream, SelectAll};
use futures_util::StreamExt;
use serde_json::Value as Json;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::protocol::{cmd, Packet};
use super::secret::GatewayKey;
use crate::accept::{Acceptor, Throttle};
use crate::gateway::Gateway;
use crate::metrics::ReasonLabel;
use reader::{Held, PacketReader, ReadError};
use sequencer::{Mirror, Outcome};

pub use queries::MAX_REPLY;

/// Inner connections served at once; more are refused.
pub const MAX_CONNECTIONS: usize = 10_000;

/// Connections from one source address at once (a PHP-FPM host opens one
/// per call, or one per worker process with persistent connections).
pub const MAX_PER_ADDRESS: usize = 2_048;

/// Connections that have not yet sent their first good packet (the key,
/// with one), node-wide and per source address: a peer that only opens
/// sockets fills these, not the slots PHP needs.
pub const MAX_UNAUTHENTICATED: usize = 2_048;

/// See [`MAX_UNAUTHENTICATED`].
pub const MAX_UNAUTHENTICATED_PER_ADDRESS: usize = 256;

/// Largest packet before authentication: `GATEWAY_CLIENT_CONNECT` and
/// `WORKER_CONNECT` carry a key and a worker name.
pub const PREAUTH_PACKET: usize = 4096;

/// Time a new connection has to send its first packet (the key, when one is
/// set), as GatewayWorker's Register gives.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection silent for this long is closed (GatewayClient opens one per
/// call, or keeps one per PHP worker with persistent connections). Not a
/// BusinessWorker's: it may have nothing to say for hours; the pings this
/// node sends it find it dead instead.
const IDLE: Duration = Duration::from_secs(600);

/// A packet that began must arrive whole within this (10 MiB at 350 KB/s).
const WHOLE_PACKET: Duration = Duration::from_secs(30);

/// Longest a reply may take to write; past it the connection is closed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Membership writes to Redis still in flight after their change was
/// applied in memory; past this, the connection that asks for one more
/// waits (only that connection's task).
const IN_FLIGHT: usize = 10_000;

/// Work waiting in one connection's task (queries, Redis writes); a peer
/// that lets more pile up (it sends queries and does not read the answers)
/// is closed.
const CONNECTION_QUEUE: usize = 64;

/// Packets the sequencer applies before it looks at the listener again, so
/// that a flood of packets cannot starve new connections.
const TURNS: u32 = 256;

/// The node-wide budget for inner read buffers, in bytes: enough for
/// several packets of `--inner-max-packet` at once.
pub fn read_budget(max_packet: usize) -> usize {
    (128 << 20).max(max_packet.saturating_mul(4))
}

/// What every inner connection shares.
struct Shared {
    gw: Arc<Gateway>,
    key: GatewayKey,
    max_packet: usize,
    /// Bytes of the read budget ([`read_budget`]).
    budget: Arc<Semaphore>,
    slots: Arc<Semaphore>,
    unauthenticated: Arc<Semaphore>,
    /// Per source address: (connections, unauthenticated ones).
    per_address: Mutex<HashMap<IpAddr, (usize, usize)>>,
    in_flight: Arc<Semaphore>,
    /// Failure logs: at most a line a second, whoever the peers. Node-wide
    /// on purpose: a throttle per peer address would let a peer with many
    /// addresses write a line a second from each; the metrics count every
    /// failure and each line says how many it stands for (`suppressed`).
    log: Mutex<Throttle>,
    refusals: Mutex<Throttle>,
}

impl Shared {
    /// Counts and logs (at most once a second) a connection closed on an
    /// error; peer-supplied text in `reason` is escaped and cut.
    fn failed(&self, addr: SocketAddr, reason: &str) {
        self.gw.metrics.inner_errors.inc();
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(suppressed) = log.allow(Instant::now()) {
            tracing::warn!(
                peer = %addr,
                reason = %super::printable(reason, 256),
                suppressed,
                "inner connection closed (logged at most once a second, `suppressed` \
                 since the last line)"
            );
        }
    }
}

/// What a connection's reader yields: a packet (with the read budget it
/// holds), a failure, or its end (`None`).
type Inbound = (u64, Option<Result<(Packet, Held), ReadError>>);

/// Serves the inner listener until `stop`.
pub async fn serve(gw: Arc<Gateway>, mut listener: Acceptor, stop: CancellationToken) {
    let max_packet = gw.config.inner_max_packet;
    let shared = Arc::new(Shared {
        key: GatewayKey::new(&gw.config.gateway_secret_key),
        max_packet,
        budget: Arc::new(Semaphore::new(read_budget(max_packet))),
        slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        unauthenticated: Arc::new(Semaphore::new(MAX_UNAUTHENTICATED)),
        per_address: Mutex::new(HashMap::new()),
        in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
        log: Mutex::new(Throttle::default()),
        refusals: Mutex::new(Throttle::default()),
        gw: gw.clone(),
    });
    let mut inbound: SelectAll<BoxStream<'static, Inbound>> = SelectAll::new();
    let mut peers: HashMap<u64, Peer> = HashMap::new();
    let mut refused_pushes = Throttle::default();
    let mut next_id = 0u64;
    let mut turns = TURNS;
    loop {
        let accepted = if turns == 0 {
            // A turn for the listener even while packets keep coming.
            turns = TURNS;
            let accept = std::pin::pin!(listener.accept());
            match futures_util::poll!(accept) {
                Poll::Ready(accepted) => Some(accepted),
                Poll::Pending => None,
            }
        } else {
            tokio::select! {
                // Packets already read before new connections: arrival
                // order.
                biased;
                () = stop.cancelled() => return,
                Some((id, item)) = inbound.next() => {
                    turns -= 1;
                    let Some(peer) = peers.get_mut(&id) else { continue };
                    let outcome = match item {
                        Some(Ok((packet, _held))) => peer.handle(&shared, packet, &mut refused_pushes),
                        Some(Err(ReadError::Idle(_))) if !peer.pending() => Ok(()),
                        Some(Err(ReadError::Idle(_))) => Err(format!("no packet within {AUTH_TIMEOUT:?}")),
                        Some(Err(e)) => Err(e.to_string()),
                        None => {
                            peers.remove(&id);
                            continue;
                        }
                    };
                    if let Err(reason) = outcome {
                        shared.failed(peer.addr, &reason);
                        // The reader and the connection's task end too.
                        peers.remove(&id);
                    }
                    None
                }
                accepted = listener.accept() => Some(accepted),
            }
        };
        let Some((socket, addr)) = accepted else {
            continue;
        };
        let Some(admission) = Admission::new(&shared, addr.ip()) else {
            continue;
        };
        next_id += 1;
        let (read, write) = socket.into_split();
        let flags = Arc::new(Flags {
            authorized: AtomicBool::new(shared.key.is_empty()),
            pending: AtomicBool::new(true),
            worker: AtomicU64::new(0),
        });
        let closed = stop.child_token();
        let (work, rx) = mpsc::channel(CONNECTION_QUEUE);
        inbound.push(reader_stream(
            next_id,
            PacketReader::new(read, shared.budget.clone()),
            flags.clone(),
            shared.max_packet,
            closed.clone(),
        ));
        tokio::spawn(connection_task(
            shared.clone(),
            write,
            rx,
            flags.clone(),
            closed.clone(),
            addr,
        ));
        peers.insert(
            next_id,
            Peer {
                addr,
                admission,
                flags,
                work,
                closed,
            },
        );
    }
}

/// A connection's place in the node's caps, given back when it ends.
struct Admission {
    shared: Arc<Shared>,
    ip: IpAddr,
    _slot: OwnedSemaphorePermit,
    /// Held until the first good packet.
    unauthenticated: Option<OwnedSemaphorePermit>,
}

impl Admission {
    /// A place for a connection from `ip`, or `None` (counted and logged)
    /// when a cap is reached.
    fn new(shared: &Arc<Shared>, ip: IpAddr) -> Option<Admission> {
        let refused = |reason: &'static str| {
            shared
                .gw
                .metrics
                .inner_refused
                .get_or_create(&ReasonLabel { reason })
                .inc();
            let mut log = shared.refusals.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(suppressed) = log.allow(Instant::now()) {
                tracing::warn!(
                    peer = %ip,
                    reason,
                    suppressed,
                    "inner connection refused (logged at most once a second, `suppressed` \
                     since the last line)"
                );
            }
            None
        };
        let Ok(slot) = shared.slots.clone().try_acquire_owned() else {
            return refused("too_many");
        };
        let Ok(unauthenticated) = shared.unauthenticated.clone().try_acquire_owned() else {
            return refused("unauthenticated_full");
        };
        {
            let mut per = shared.per_address.lock().unwrap_or_else(|e| e.into_inner());
            let (all, pending) = per.entry(ip).or_default();
            if *all >= MAX_PER_ADDRESS {
                drop(per);
                return refused("address_full");
            }
            if *pending >= MAX_UNAUTHENTICATED_PER_ADDRESS {
                drop(per);
                return refused("address_unauthenticated_full");
            }
            *all += 1;
            *pending += 1;
        }
        Some(Admission {
            shared: shared.clone(),
            ip,
            _slot: slot,
            unauthenticated: Some(unauthenticated),
        })
    }

    /// The first good packet came: the connection leaves the
    /// unauthenticated caps.
    fn settled(&mut self) {
        if self.unauthenticated.take().is_some() {
            let mut per = self
                .shared
                .per_address
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some((_, pending)) = per.get_mut(&self.ip) {
                *pending = pending.saturating_sub(1);
            }
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let pending = usize::from(self.unauthenticated.is_some());
        let mut per = self
            .shared
            .per_address
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((all, unauthenticated)) = per.get_mut(&self.ip) {
            *all = all.saturating_sub(1);
            *unauthenticated = unauthenticated.saturating_sub(pending);
            if *all == 0 {
                per.remove(&self.ip);
            }
        }
    }
}

/// A connection's state, shared by the sequencer, its reader and its task.
struct Flags {
    /// The key was given (or none is set).
    authorized: AtomicBool,
    /// The first good packet is still to come (10 s from accept).
    pending: AtomicBool,
    /// Its id among the node's workers (0: not a worker).
    worker: AtomicU64,
}

/// The packets of one connection, then `None`; ends when `closed` is
/// cancelled, on the first failure, or at the end of the stream.
fn reader_stream(
    id: u64,
    reader: PacketReader,
    flags: Arc<Flags>,
    max_packet: usize,
    closed: CancellationToken,
) -> BoxStream<'static, Inbound> {
    let deadline = tokio::time::Instant::now() + AUTH_TIMEOUT;
    let packets = futures_util::stream::unfold(Some(reader), move |state| {
        let flags = flags.clone();
        async move {
            let mut reader = state?;
            let max = if flags.authorized.load(Ordering::Relaxed) {
                max_packet
            } else {
                PREAUTH_PACKET
            };
            let worker = flags.worker.load(Ordering::Relaxed) != 0;
            let next = reader.next(max, (!worker).then_some(IDLE), WHOLE_PACKET);
            let item = if flags.pending.load(Ordering::Relaxed) {
                tokio::time::timeout_at(deadline, next)
                    .await
                    .unwrap_or(Err(ReadError::Idle(AUTH_TIMEOUT)))
            } else {
                next.await
            };
            match item {
                Ok(Some(packet)) => Some((Ok(packet), Some(reader))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        }
    });
    packets
        .take_until(closed.cancelled_owned())
        .map(move |item| (id, Some(item)))
        .chain(futures_util::stream::once(async move { (id, None) }))
        .boxed()
}

/// What a connection's task does for the sequencer.
enum Work {
    /// Answer this query and write the answer.
    Query(Packet),
    /// Let this Redis write finish, within the node's in-flight bound.
    Mirror(&'static str, Mirror),
    /// The peer is a BusinessWorker (`worker_key` escaped): hand the
    /// writing side to its queue.
    BecomeWorker(String),
}

/// One inner connection, as the sequencer holds it.
struct Peer {
    addr: SocketAddr,
    admission: Admission,
    flags: Arc<Flags>,
    work: mpsc::Sender<Work>,
    /// Ends the reader and the connection's task.
    closed: CancellationToken,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

impl Peer {
    fn pending(&self) -> bool {
        self.flags.pending.load(Ordering::Relaxed)
    }

    /// The first good packet came: the connection leaves the
    /// unauthenticated caps.
    fn settled(&mut self) {
        self.flags.pending.store(false, Ordering::Relaxed);
        self.admission.settled();
    }

    /// Hands work to the connection's task; a task that cannot take it (its
    /// peer does not read) closes the connection.
    fn give(&self, work: Work) -> Result<(), String> {
        self.work
            .try_send(work)
            .map_err(|_| "the peer does not read its answers".to_owned())
    }

    /// One packet, in arrival order.
    fn handle(
        &mut self,
        shared: &Shared,
        p: Packet,
        refused_pushes: &mut Throttle,
    ) -> Result<(), String> {
        match p.cmd {
            cmd::GATEWAY_CLIENT_CONNECT => {
                self.authorize(shared, &p)?;
                self.settled();
                return Ok(());
            }
            cmd::WORKER_CONNECT => {
                if self.flags.worker.load(Ordering::Relaxed) != 0 {
                    return Err("WORKER_CONNECT twice on one connection".into());
                }
                self.authorize(shared, &p)?;
                self.settled();
                let body: Json = serde_json::from_slice(&p.body).unwrap_or(Json::Null);
                let worker_key = match &body["worker_key"] {
                    Json::String(k) => k.clone(),
                    Json::Null => String::new(),
                    other => other.to_string(),
                };
                // GatewayWorker's key: a worker process is unique per host
                // and name. Escaped and bounded: it goes into logs.
                let key = format!(
                    "{}:{}",
                    self.addr.ip(),
                    super::printable(&worker_key, MAX_WORKER_KEY)
                );
                return self.give(Work::BecomeWorker(key));
            }
            other if !self.flags.authorized.load(Ordering::Relaxed) => {
                return Err(format!("command {other} before authentication"));
            }
            _ => {}
        }
        self.settled();
        if p.cmd == cmd::PING {
            return Ok(());
        }
        match sequencer::apply(&shared.gw, p, refused_pushes) {
            Outcome::Done => Ok(()),
            Outcome::Mirror(what, change) => self.give(Work::Mirror(what, change)),
            Outcome::Query(p) => self.give(Work::Query(p)),
            Outcome::Failed(reason) => Err(reason),
        }
    }

    fn authorize(&mut self, shared: &Shared, p: &Packet) -> Result<(), String> {
        let body: Json = serde_json::from_slice(&p.body).unwrap_or(Json::Null);
        let given = body["secret_key"].as_str().unwrap_or_default();
        if shared.key.matches(given.as_bytes()) {
            self.flags.authorized.store(true, Ordering::Relaxed);
            Ok(())
        } else {
            Err("wrong secret key".into())
        }
    }
}

/// One connection's own task: answers its queries and writes them, waits
/// for room for its Redis writes, and takes over as a BusinessWorker's
/// queue. Ends with the connection.
async fn connection_task(
    shared: Arc<Shared>,
    write: OwnedWriteHalf,
    mut work: mpsc::Receiver<Work>,
    flags: Arc<Flags>,
    closed: CancellationToken,
    addr: SocketAddr,
) {
    let mut write = Some(write);
    // Until the sequencer drops the connection (its queue then ends): what
    // is queued is still done, so no Redis write of a packet the peer sent
    // just before it left is lost.
    let outcome: Result<(), String> = loop {
        let Some(item) = work.recv().await else {
            break Ok(());
        };
        let done = match item {
            Work::Mirror(what, change) => {
                // Only this connection waits for room.
                let Ok(permit) = shared.in_flight.clone().acquire_owned().await else {
                    break Ok(());
                };
                tokio::spawn(async move {
                    if let Err(e) = change.await {
                        tracing::warn!(what, error = %e, "inner command not mirrored");
                    }
                    drop(permit);
                });
                Ok(())
            }
            Work::BecomeWorker(key) => match write.take() {
                Some(w) => {
                    let id = shared.gw.workers.add(key, w, closed.clone());
                    flags.worker.store(id, Ordering::Relaxed);
                    Ok(())
                }
                None => Err("connection already closed".to_owned()),
            },
            // Nobody is left to read it.
            Work::Query(_) if closed.is_cancelled() => Ok(()),
            Work::Query(p) => match queries::answer(&shared.gw, &p) {
                Ok(reply) => reply_to(&shared, &mut write, &flags, reply, &closed).await,
                Err(e) => Err(e),
            },
        };
        if let Err(reason) = done {
            break Err(reason);
        }
    };
    let worker = flags.worker.load(Ordering::Relaxed);
    if worker != 0 {
        shared.gw.workers.remove(worker);
    }
    if let Err(reason) = outcome {
        shared.failed(addr, &reason);
    }
    closed.cancel();
    if let Some(mut write) = write.take() {
        let _ = tokio::time::timeout(Duration::from_secs(1), write.shutdown()).await;
    }
}

/// Writes a reply back: on the socket, or queued behind a worker's events
/// when the peer is a BusinessWorker asking on its own connection.
async fn reply_to(
    shared: &Shared,
    write: &mut Option<OwnedWriteHalf>,
    flags: &Flags,
    reply: Bytes,
    closed: &CancellationToken,
) -> Result<(), String> {
    match write {
        Some(write) => {
            let written = tokio::select! {
                () = closed.cancelled() => return Ok(()),
                w = tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&reply)) => w,
            };
            written
                .map_err(|_| format!("reply not taken within {WRITE_TIMEOUT:?}"))?
                .map_err(|e| e.to_string())
        }
        None => {
            let worker = flags.worker.load(Ordering::Relaxed);
            if worker != 0 && shared.gw.workers.send_raw(worker, reply) {
                Ok(())
            } else {
                Err("worker cannot take the reply".into())
            }
        }
    }
}

/// Longest worker_key kept (in characters, after escaping).
const MAX_WORKER_KEY: usize = 128;

/// The JSON in `ext_data` (null when absent or not JSON).
fn json_ext(p: &Packet) -> Json {
    serde_json::from_slice(&p.ext_data).unwrap_or(Json::Null)
}

/// Strings of a JSON list or map (its values); numbers as their decimal.
fn strings(v: &Json) -> Vec<String> {
    let items: Box<dyn Iterator<Item = &Json>> = match v {
        Json::Array(a) => Box::new(a.iter()),
        Json::Object(o) => Box::new(o.values()),
        other => Box::new(std::iter::once(other)),
    };
    items
        .filter_map(|v| match v {
            Json::String(s) => Some(s.clone()),
            Json::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// Connection numbers from the values of a JSON list or map.
fn values(v: &Json) -> impl Iterator<Item = u32> + '_ {
    strings(v).into_iter().filter_map(|s| s.parse().ok())
}

/// Connection numbers from the keys of a JSON map.
fn keys(v: Option<&Json>) -> impl Iterator<Item = u32> + '_ {
    v.and_then(Json::as_object)
        .into_iter()
        .flat_map(|o| o.keys())
        .filter_map(|k| k.parse().ok())
}

/// A uid or group as GatewayWorker takes it: PHP's `empty()` refuses "" and
/// "0"; gatecast's limit of 256 bytes applies.
fn name(s: String) -> Option<String> {
    if s.is_empty() || s == "0" {
        return None;
    }
    crate::name::Name::new(s).ok().map(|n| n.0)
}
