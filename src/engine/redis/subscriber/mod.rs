//! The node's subscriber: connections of its own to Redis (not fred's),
//! so that a burst waits in Redis instead of being dropped here.
//!
//! - Back-pressure: each connection's reader hands messages to the
//!   bounded [`Inbox`] and stops reading while its lane is full.
//! - Two lanes: this node's reply channel has its own connection(s), so
//!   replies to the commands it sent never wait behind pushes; the
//!   dispatcher empties that lane first. Everything else, this node's own
//!   channel included, shares one connection per server, in Redis's order.
//! - Confirmed: (un)subscribing returns once Redis confirmed every channel,
//!   and fails with Redis's error (`-NOPERM` from an ACL).
//! - Topologies: one server; Sentinel (the primary the command client is
//!   connected to, checked with ROLE); Cluster (sharded pub/sub, one
//!   connection per primary and lane, routed by slot; a channel Redis
//!   unsubscribed on its own because its slot moved is subscribed again
//!   where the slot went).
//! - Faults: any connection that ends (closed by Redis, reset, silent past
//!   its PING) ends them all; the node turns unready, reconnects and the
//!   mirror resyncs every subscription from the hub
//!   (`registration`). Each is counted in
//!   `gatecast_redis_subscriber_reconnects_total{reason}` and logged.

mod conn;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fred::clients::Client;
use fred::interfaces::{ClientLike, ClusterInterface};
use fred::types::config::{Config as RedisConfig, ServerConfig, TlsConnector};
use futures_util::future::join_all;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use self::conn::{Conn, Endpoint, Event, Kind, Login};
use super::client::COMMAND_TIMEOUT;
use super::inbox::{Inbox, Lane};
use crate::metrics::{Metrics, ReasonLabel};

/// Channels per (S)SUBSCRIBE command (centrifuge batches up to 512 as well).
const CHUNK: usize = 512;

/// Times a command refused with MOVED or ASK is routed again.
const REROUTES: usize = 5;

/// Channels Redis refused to subscribe (an ACL without them), each with
/// Redis's error.
pub type Refused = Vec<(String, String)>;

/// Whether the node still needs a channel (after Redis dropped it).
pub type Wanted = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// Where the subscriber connects.
enum Topology {
    Single(Endpoint),
    /// The primary the command client follows.
    Sentinel,
    /// Routed by slot, from the command client's cluster state.
    Cluster,
}

/// The subscriber. Cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct Subscriber {
    inner: Arc<Inner>,
}

struct Inner {
    login: Login,
    topology: Topology,
    /// fred's command client: the primary (Sentinel) and the slot map
    /// (Cluster) it knows.
    client: Client,
    node_channel: String,
    /// Read on the control lane.
    reply_channel: String,
    inbox: Arc<Inbox>,
    conns: tokio::sync::Mutex<HashMap<(Endpoint, Lane), Arc<Conn>>>,
    /// The server subscribed to (one server, Sentinel).
    primary: parking_lot::Mutex<Option<Endpoint>>,
    connected: AtomicBool,
    /// Connections of an older generation were ended on purpose.
    generation: AtomicU64,
    up: broadcast::Sender<()>,
    down: broadcast::Sender<()>,
    events: mpsc::UnboundedSender<Event>,
    events_rx: parking_lot::Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
    wanted: Wanted,
    metrics: Arc<Metrics>,
}

fn endpoint(server: &fred::types::config::Server) -> Endpoint {
    Endpoint {
        host: server.host.to_string(),
        port: server.port,
        tls_name: server.tls_server_name.as_ref().map(|n| n.to_string()),
    }
}

impl Subscriber {
    /// A subscriber for the Redis of `config` (its password already
    /// replaced by `--redis-password`); connects nothing yet.
    pub fn new(
        config: &RedisConfig,
        client: Client,
        node_channel: String,
        reply_channel: String,
        inbox: Arc<Inbox>,
        metrics: Arc<Metrics>,
        wanted: Wanted,
    ) -> Result<Self, String> {
        let topology = match &config.server {
            ServerConfig::Centralized { server } => Topology::Single(endpoint(server)),
            ServerConfig::Sentinel { .. } => Topology::Sentinel,
            ServerConfig::Clustered { .. } => Topology::Cluster,
        };
        let tls = config.tls.as_ref().map(|tls| match &tls.connector {
            TlsConnector::Rustls(connector) => connector.clone(),
        });
        let login = Login {
            username: config.username.clone(),
            password: config.password.clone(),
            tls,
            name: format!(
                "gatecast-sub-{}",
                node_channel.rsplit(':').next().unwrap_or("")
            ),
        };
        let (events, events_rx) = mpsc::unbounded_channel();
        Ok(Subscriber {
            inner: Arc::new(Inner {
                login,
                topology,
                client,
                node_channel,
                reply_channel,
                inbox,
                conns: Default::default(),
                primary: Default::default(),
                connected: AtomicBool::new(false),
                generation: AtomicU64::new(0),
                up: broadcast::channel(16).0,
                down: broadcast::channel(16).0,
                events,
                events_rx: parking_lot::Mutex::new(Some(events_rx)),
                wanted,
                metrics,
            }),
        })
    }

    /// Starts connecting, and reconnecting after every loss, until `stop`.
    pub fn connect(&self, stop: CancellationToken) {
        if let Some(events) = self.inner.events_rx.lock().take() {
            tokio::spawn(supervise(self.inner.clone(), events, stop));
        }
    }

    /// Connected, and no connection lost since.
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Acquire)
    }

    /// Whether a connection of the subscriber read something from Redis
    /// within `window`: Redis is alive and sending, however late its
    /// answers to commands come (the readiness probe, `probe`). False when
    /// not connected, or when the connections are being changed.
    pub fn heard_within(&self, window: Duration) -> bool {
        if !self.is_connected() {
            return false;
        }
        let Ok(conns) = self.inner.conns.try_lock() else {
            return false;
        };
        conns.values().any(|c| c.silent_for() < window)
    }

    /// Fires each time the subscriber is connected (again): every
    /// subscription must then be written (again).
    pub fn reconnect_rx(&self) -> broadcast::Receiver<()> {
        self.inner.up.subscribe()
    }

    /// Fires each time a connection was lost.
    pub fn error_rx(&self) -> broadcast::Receiver<()> {
        self.inner.down.subscribe()
    }

    /// Subscribes, and returns once Redis confirmed every channel but
    /// those it refused for this user's ACL (`-NOPERM`), returned with
    /// Redis's error. Any other error fails the whole call.
    pub async fn subscribe(&self, channels: Vec<String>) -> Result<Refused, fred::error::Error> {
        self.inner.request(true, channels).await.map_err(to_fred)
    }

    /// Unsubscribes, and returns once Redis confirmed every channel.
    pub async fn unsubscribe(&self, channels: Vec<String>) -> Result<(), fred::error::Error> {
        self.inner
            .request(false, channels)
            .await
            .map(|_| ())
            .map_err(to_fred)
    }

    /// Closes every connection (the node is stopping).
    pub async fn quit(&self) {
        self.inner.connected.store(false, Ordering::Release);
        self.inner.close_all().await;
    }
}

fn to_fred(e: String) -> fred::error::Error {
    fred::error::Error::new(fred::error::ErrorKind::Unknown, e)
}

impl Inner {
    /// Every channel, this node's own included, shares one connection per
    /// server: a push to a single client or a close must keep its order
    /// with the group and uid pushes published before it (the examples of
    /// docs/publishing.md rely on it). Back-pressure means a command waits
    /// behind a flood but is never dropped. Only replies, which have no
    /// order with anything, go on a connection of their own, read first.
    fn lane(&self, channel: &str) -> Lane {
        if channel == self.reply_channel {
            Lane::Control
        } else {
            Lane::Bulk
        }
    }

    fn sharded(&self) -> bool {
        matches!(self.topology, Topology::Cluster)
    }

    /// The server that serves `channel`.
    fn route(&self, channel: &str) -> Result<Endpoint, String> {
        match &self.topology {
            Topology::Single(e) => Ok(e.clone()),
            Topology::Sentinel => self
                .primary
                .lock()
                .clone()
                .ok_or_else(|| "no primary known yet".to_owned()),
            Topology::Cluster => {
                let slot = fred::util::redis_keyslot(channel.as_bytes());
                self.client
                    .cached_cluster_state()
                    .and_then(|state| state.get_server(slot).map(endpoint))
                    .ok_or_else(|| format!("no cluster node known for slot {slot}"))
            }
        }
    }

    /// The open connection to `endpoint` for `lane`, opened if need be.
    async fn conn(&self, endpoint: &Endpoint, lane: Lane) -> Result<Arc<Conn>, String> {
        let mut conns = self.conns.lock().await;
        let key = (endpoint.clone(), lane);
        if let Some(conn) = conns.get(&key).filter(|c| c.is_open()) {
            return Ok(conn.clone());
        }
        let conn = Conn::open(
            endpoint.clone(),
            &self.login,
            lane,
            self.inbox.clone(),
            self.generation.load(Ordering::Acquire),
            self.events.clone(),
            matches!(self.topology, Topology::Sentinel),
        )
        .await?;
        let conn = Arc::new(conn);
        conns.insert(key, conn.clone());
        Ok(conn)
    }

    async fn close_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        for (_, conn) in self.conns.lock().await.drain() {
            conn.close();
        }
    }

    /// Opens the connections that prove Redis reachable: those of this
    /// node's channel and of its reply channel.
    async fn establish(&self) -> Result<(), String> {
        match &self.topology {
            Topology::Single(_) => {}
            Topology::Sentinel => {
                let server = self
                    .client
                    .active_connections()
                    .first()
                    .map(endpoint)
                    .ok_or("the command connection is not up yet")?;
                *self.primary.lock() = Some(server);
            }
            Topology::Cluster => {
                if self.route(&self.node_channel).is_err() {
                    self.client
                        .sync_cluster()
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        for channel in [&self.node_channel, &self.reply_channel] {
            let home = self.route(channel)?;
            self.conn(&home, self.lane(channel)).await?;
        }
        Ok(())
    }

    /// (Un)subscribes `channels`: batched per server, lane and (Cluster)
    /// slot; routed again after MOVED or ASK. Redis refuses a whole
    /// SUBSCRIBE for one channel its ACL denies (`-NOPERM`): such a batch
    /// is sent again one channel per command, to tell which, and those are
    /// returned rather than failing the rest.
    async fn request(&self, on: bool, channels: Vec<String>) -> Result<Refused, String> {
        if !self.connected.load(Ordering::Acquire) {
            return Err("the subscriber is not connected to redis".into());
        }
        let kind = match (self.sharded(), on) {
            (false, true) => Kind::Subscribe,
            (false, false) => Kind::Unsubscribe,
            (true, true) => Kind::SSubscribe,
            (true, false) => Kind::SUnsubscribe,
        };
        let mut todo: Vec<String> = channels
            .into_iter()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut alone: HashSet<String> = HashSet::new();
        let mut refused = Refused::new();
        let mut attempt = 0;
        while attempt < REROUTES {
            // Channels to send one per command get a batch of their own.
            let mut groups: HashMap<(Endpoint, Lane, u16, Option<String>), Vec<String>> =
                HashMap::new();
            for channel in todo.drain(..) {
                let endpoint = self.route(&channel)?;
                let slot = if self.sharded() {
                    fred::util::redis_keyslot(channel.as_bytes())
                } else {
                    0
                };
                let lane = self.lane(&channel);
                let single = alone.contains(&channel).then(|| channel.clone());
                groups
                    .entry((endpoint, lane, slot, single))
                    .or_default()
                    .push(channel);
            }
            let mut sends = Vec::new();
            for ((endpoint, lane, _, _), channels) in groups {
                let conn = self.conn(&endpoint, lane).await?;
                for chunk in channels.chunks(CHUNK) {
                    let conn = conn.clone();
                    let chunk = chunk.to_vec();
                    sends.push(async move {
                        let sent = conn.request(kind, chunk.clone());
                        let reply = tokio::time::timeout(COMMAND_TIMEOUT, sent)
                            .await
                            .unwrap_or_else(|_| {
                                Err(format!("{}: no confirmation in time", conn.endpoint))
                            });
                        (chunk, reply)
                    });
                }
            }
            let mut moved = false;
            for (chunk, reply) in join_all(sends).await {
                match reply {
                    Ok(()) => {}
                    Err(e) if e.starts_with("MOVED") || e.starts_with("ASK") => {
                        // An unsubscribe from a slot that moved is done:
                        // Redis dropped the channel when the slot left.
                        if on {
                            moved = true;
                            todo.extend(chunk);
                        }
                    }
                    Err(e) if on && e.starts_with("NOPERM") => {
                        if let [channel] = &chunk[..] {
                            refused.push((channel.clone(), e));
                        } else {
                            alone.extend(chunk.iter().cloned());
                            todo.extend(chunk);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            if todo.is_empty() {
                return Ok(refused);
            }
            if !moved {
                // Only the split of a refused batch: no slot to refresh.
                continue;
            }
            tracing::debug!(attempt, channels = todo.len(), "slot moved: routing again");
            if let Err(e) = self.client.sync_cluster().await {
                tracing::debug!(error = %e, "cannot refresh the cluster's slots");
            }
            tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            attempt += 1;
        }
        Err(format!(
            "{} channels kept moving between cluster nodes",
            todo.len()
        ))
    }

    /// Channels Redis unsubscribed on its own (their slot moved): those
    /// still needed are subscribed again where the slot went.
    async fn resubscribe(&self, channels: Vec<String>) -> Result<(), String> {
        let wanted: Vec<String> = channels.into_iter().filter(|c| (self.wanted)(c)).collect();
        if wanted.is_empty() {
            return Ok(());
        }
        if self.sharded() {
            if let Err(e) = self.client.sync_cluster().await {
                tracing::debug!(error = %e, "cannot refresh the cluster's slots");
            }
        }
        let n = wanted.len();
        let refused = self.request(true, wanted).await?;
        if let Some((channel, e)) = refused.first() {
            return Err(format!("{channel}: {e}"));
        }
        self.metrics.redis_resubscribed.inc_by(n as u64);
        tracing::info!(
            channels = n,
            "redis unsubscribed channels on its own (a cluster slot moved): subscribed again"
        );
        Ok(())
    }
}

/// Connects, watches, reconnects.
async fn supervise(
    inner: Arc<Inner>,
    mut events: mpsc::UnboundedReceiver<Event>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut failures = 0u32;
    loop {
        loop {
            let connected = tokio::select! {
                r = inner.establish() => r,
                () = stop.cancelled() => return,
            };
            match connected {
                Ok(()) => break,
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures % 20 == 0 {
                        tracing::warn!(error = %e, "subscriber cannot connect to redis; retrying");
                    }
                    inner.close_all().await;
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        if failures > 0 {
            tracing::info!("subscriber connected to redis");
        }
        failures = 0;
        backoff = Duration::from_millis(100);
        inner.connected.store(true, Ordering::Release);
        let _ = inner.up.send(());
        let reason = watch(&inner, &mut events, &stop).await;
        inner.connected.store(false, Ordering::Release);
        let _ = inner.down.send(());
        inner.close_all().await;
        let Some(reason) = reason else {
            return;
        };
        inner
            .metrics
            .redis_subscriber_reconnects
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

/// Waits until a connection of this generation is lost (its reason) or
/// the node stops (`None`); resubscribes what slot moves dropped.
async fn watch(
    inner: &Inner,
    events: &mut mpsc::UnboundedReceiver<Event>,
    stop: &CancellationToken,
) -> Option<&'static str> {
    loop {
        let event = tokio::select! {
            e = events.recv() => e?,
            () = stop.cancelled() => return None,
        };
        let mut moved = Vec::new();
        let mut lost = None;
        note(inner, event, &mut moved, &mut lost);
        if !moved.is_empty() && lost.is_none() {
            // Redis sends one notice per channel of the moved slots: take
            // them together.
            tokio::time::sleep(Duration::from_millis(20)).await;
            while let Ok(event) = events.try_recv() {
                note(inner, event, &mut moved, &mut lost);
            }
        }
        if let Some(reason) = lost {
            return Some(reason);
        }
        if let Err(e) = inner.resubscribe(moved).await {
            tracing::warn!(error = %e, "cannot subscribe again after a slot move: reconnecting");
            return Some("resubscribe_failed");
        }
    }
}

/// Takes in one event: a channel Redis dropped, or a lost connection (of
/// this generation; older ones were closed on purpose).
fn note(inner: &Inner, event: Event, moved: &mut Vec<String>, lost: &mut Option<&'static str>) {
    match event {
        Event::Unsubscribed(channel) => moved.push(channel),
        Event::Lost {
            generation,
            endpoint,
            why,
            behind,
        } if generation == inner.generation.load(Ordering::Acquire) => {
            // Behind: waiting on the inbox, or pushes arriving late (a
            // slow link: the node reads as fast as the link goes). Redis
            // closing a connection whose output it had not sent yet
            // resets it, so a read error counts too.
            let late = inner.metrics.redis_subscriber_behind.get() == 1;
            let reason = match why {
                conn::Ended::Closed | conn::Ended::Error if behind || late => "closed_behind",
                why => why.label(),
            };
            tracing::warn!(
                server = %endpoint,
                reason,
                "subscriber connection lost ({}): not ready until reconnected and every subscription written again",
                match reason {
                    "closed_behind" => "closed by redis while this node was behind: most likely past client-output-buffer-limit pubsub; what redis had buffered is lost",
                    "closed" => "closed by redis: a restart, a failover, CLIENT KILL or client-output-buffer-limit",
                    "unresponsive" => "no answer to PING: the connection went silent",
                    "error" => "a read or write failed",
                    _ => "redis sent something unexpected",
                }
            );
            lost.get_or_insert(reason);
        }
        Event::Lost { .. } => {}
    }
}
