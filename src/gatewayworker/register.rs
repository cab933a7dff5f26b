//! GatewayWorker's Register, served by every node (`--register-listen`,
//! SPEC section 7).
//!
//! GatewayClient and BusinessWorker find the gateways through the Register:
//! they send `{"event":"worker_connect","secret_key":"..."}` as one JSON
//! line and get `{"event":"broadcast_addresses","addresses":["ip:port",...]}`
//! back, the inner address of every gateway. Here the gateways are the live
//! nodes, so every node answers with the same list (from the engine), and a
//! Service in front of the replicas replaces the Register's single point of
//! failure. Connections that stay open (BusinessWorker's) get a new list
//! whenever it changes.
//!
//! As GatewayWorker's Register does: a wrong `secret_key` or an unknown event
//! closes the connection without an answer, `ping` is accepted and not
//! answered, and a connection that has not sent a good `worker_connect`
//! within 10 s is closed. Unlike it, a `ping` does not stop that clock (it
//! would keep an unauthenticated connection open for ever), and
//! `gateway_connect` is refused: the nodes are the gateways, a GatewayWorker
//! Gateway process cannot join them.
//!
//! Hostile input only costs its own connection: a line that is not JSON or
//! longer than [`MAX_LINE`] closes it (counted in
//! `gatecast_register_errors_total`, logged at most once a second), and
//! past [`MAX_CONNECTIONS`] (or [`MAX_PER_ADDRESS`] from one address, or
//! [`MAX_UNAUTHENTICATED`] not yet past `worker_connect`) new connections
//! are refused. Even without a key, a worker connection silent for [`IDLE`]
//! is closed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::secret::GatewayKey;
use crate::accept::{Acceptor, Throttle};
use crate::engine::Engine;
use crate::gateway::Gateway;
use crate::metrics::{Metrics, ReasonLabel};

/// Time a new connection has to send a good `worker_connect`, as in
/// GatewayWorker's Register.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest line accepted, in bytes (without its `\n`). A `worker_connect`
/// is about 100 bytes; the bound only stops a peer from growing the buffer
/// (10,000 connections hold at most 40 MiB of lines).
pub const MAX_LINE: usize = 4 * 1024;

/// A worker connection (past `worker_connect`) silent for this long is
/// closed: BusinessWorkers ping every 25 s, GatewayClient leaves at once.
pub const IDLE: Duration = Duration::from_secs(120);

/// Register connections from one source address at once.
pub const MAX_PER_ADDRESS: usize = 1_024;

/// Connections that have not yet sent a good `worker_connect`, node-wide.
pub const MAX_UNAUTHENTICATED: usize = 2_048;

/// Most Register connections open at once on a node; past it new ones are
/// closed at once. GatewayClient under PHP-FPM opens one per request and
/// closes it, so this is far above what a busy backend fleet holds.
pub const MAX_CONNECTIONS: usize = 10_000;

/// How often the node list is read from the engine. GatewayClient caches
/// the list for 1 s, so fresher would not help it.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// Pause between reads of the node list until the first one succeeds.
const FIRST_POLL_RETRY: Duration = Duration::from_millis(50);

/// Time a peer has to take an address list before it counts as stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the Register on `listener` until `stop`: one task follows the
/// node list for every connection, each connection only reads its lines
/// and writes the list it is given.
pub async fn serve(mut listener: Acceptor, gw: Arc<Gateway>, stop: CancellationToken) {
    let (addresses, _) = watch::channel(None);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let unauthenticated = Arc::new(Semaphore::new(MAX_UNAUTHENTICATED));
    let per_address: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let closes = Arc::new(Mutex::new(Throttle::default()));
    let connections = TaskTracker::new();
    let mut refusals = Throttle::default();
    let secret_key = Arc::new(GatewayKey::new(&gw.config.gateway_secret_key));
    let accept_loop = async {
        loop {
            let (stream, peer) = listener.accept().await;
            // Which cap refused it, as the `reason` label.
            let admitted = (|| {
                let slot = slots
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| "too_many_connections")?;
                let pending = unauthenticated
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| "unauthenticated_full")?;
                let address = AddressSlot::new(&per_address, peer.ip()).ok_or("address_full")?;
                Ok((slot, pending, address))
            })();
            let (permit, pending, address) = match admitted {
                Ok(admitted) => admitted,
                Err(reason) => {
                    count(&gw.metrics, reason);
                    if let Some(suppressed) = refusals.allow(Instant::now()) {
                        tracing::warn!(
                            %peer,
                            reason,
                            suppressed,
                            "register connection refused: a connection cap is reached \
                             (logged at most once a second, `suppressed` since the last line)"
                        );
                    }
                    continue;
                }
            };
            let slot = Slot::new(permit, gw.metrics.clone());
            let peer_conn = PeerConnection {
                secret_key: secret_key.clone(),
                addresses: addresses.subscribe(),
                metrics: gw.metrics.clone(),
                pending: Some(pending),
                closes: closes.clone(),
            };
            let stop = stop.clone();
            let span = tracing::info_span!("register", %peer);
            connections.spawn(
                async move {
                    let _slot = slot;
                    let _address = address;
                    tokio::select! {
                        () = peer_conn.serve(stream) => {}
                        () = stop.cancelled() => {}
                    }
                }
                .instrument(span),
            );
        }
    };
    tokio::select! {
        () = accept_loop => {}
        () = follow_nodes(gw.engine.clone(), &addresses) => {}
        () = stop.cancelled() => {}
    }
    connections.close();
    connections.wait().await;
}

/// Reads the node list from the engine every [`POLL_EVERY`] and publishes
/// it, encoded once, when it changes. While the engine is not ready or
/// cannot answer, the last list stays published (the nodes on it are most
/// likely still there); before the first one, workers wait for it.
async fn follow_nodes(engine: Arc<dyn Engine>, addresses: &watch::Sender<Option<Bytes>>) {
    let mut failing = false;
    loop {
        // Not connected or not registered yet: the engine logs why.
        if engine.is_ready() {
            poll_nodes(&*engine, addresses, &mut failing).await;
        }
        // Workers wait for the first list: try often until there is one.
        let pause = if addresses.borrow().is_some() {
            POLL_EVERY
        } else {
            FIRST_POLL_RETRY
        };
        tokio::time::sleep(pause).await;
    }
}

/// One read of the node list; `failing` remembers whether the last read
/// failed, so a failing engine is logged once, not every second.
async fn poll_nodes(
    engine: &dyn Engine,
    addresses: &watch::Sender<Option<Bytes>>,
    failing: &mut bool,
) {
    match engine.node_addresses().await {
        Ok(nodes) => {
            if std::mem::take(failing) {
                tracing::info!("register: the node list can be read again");
            }
            let line = broadcast_addresses(nodes);
            let changed = addresses.send_if_modified(|current| {
                let changed = current.as_ref() != Some(&line);
                if changed {
                    *current = Some(line.clone());
                }
                changed
            });
            if changed {
                let list = String::from_utf8_lossy(&line);
                tracing::debug!(list = %list.trim_end(), "register: node list changed");
            }
        }
        Err(e) if !*failing => {
            *failing = true;
            tracing::warn!(
                error = %e,
                "register: cannot read the node list; answering with the last one"
            );
        }
        Err(_) => {}
    }
}

/// The `broadcast_addresses` line for `nodes`, sorted and without
/// duplicates so that equal lists encode equally.
fn broadcast_addresses(mut nodes: Vec<SocketAddrV4>) -> Bytes {
    nodes.sort();
    nodes.dedup();
    let addresses: Vec<String> = nodes.iter().map(ToString::to_string).collect();
    let message = serde_json::json!({"event": "broadcast_addresses", "addresses": addresses});
    let mut line = serde_json::to_vec(&message).expect("a JSON value encodes");
    line.push(b'\n');
    Bytes::from(line)
}

/// One Register connection: what it needs from the node.
struct PeerConnection {
    /// Its place among the unauthenticated connections, given back at
    /// `worker_connect`.
    pending: Option<OwnedSemaphorePermit>,
    /// Throttles the log of closed connections, node-wide (not per peer,
    /// so many source addresses cannot multiply the lines; the metric
    /// counts every close).
    closes: Arc<Mutex<Throttle>>,
    /// `--gateway-secret-key` (empty: no key).
    secret_key: Arc<GatewayKey>,
    /// The current `broadcast_addresses` line (`None` before the first
    /// read of the node list).
    addresses: watch::Receiver<Option<Bytes>>,
    metrics: Arc<Metrics>,
}

/// Why the node closed a Register connection.
#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error("line is not a JSON object with a non-empty \"event\" string")]
    Malformed,
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("secret_key does not match --gateway-secret-key")]
    SecretKey,
    #[error(
        "a GatewayWorker Gateway process (address {0}) tried to register: gatecast \
         nodes are the gateways and a GatewayWorker Gateway cannot join them; \
         connect its clients to gatecast instead"
    )]
    GatewayConnect(String),
    #[error("unknown event {0:?}")]
    UnknownEvent(String),
    #[error("no worker_connect within {AUTH_TIMEOUT:?}")]
    AuthTimeout,
    #[error("silent for {IDLE:?}")]
    Idle,
    #[error("the peer did not take the address list within {WRITE_TIMEOUT:?}")]
    WriteTimeout,
}

impl Closed {
    /// The `reason` label of `gatecast_register_errors_total`.
    fn reason(&self) -> &'static str {
        match self {
            Closed::Malformed => "malformed",
            Closed::TooLong => "too_long",
            Closed::SecretKey => "secret_key",
            Closed::GatewayConnect(_) => "gateway_connect",
            Closed::UnknownEvent(_) => "unknown_event",
            Closed::AuthTimeout => "auth_timeout",
            Closed::Idle => "idle",
            Closed::WriteTimeout => "write_timeout",
        }
    }
}

/// One line from a Register client. Only the fields the Register reads.
#[derive(Deserialize)]
struct Request {
    event: String,
    /// A string; missing or `null` means no key, anything else never
    /// matches (GatewayWorker compares with `!==`).
    #[serde(default)]
    secret_key: Option<Value>,
    /// A gateway's inner address (`gateway_connect`), only for the log.
    #[serde(default)]
    address: Option<Value>,
}

impl PeerConnection {
    /// Serves the connection until the peer leaves or breaks the protocol.
    async fn serve(mut self, mut stream: TcpStream) {
        match self.run(&mut stream).await {
            Ok(()) => tracing::debug!("register connection closed"),
            Err(closed) => {
                count(&self.metrics, closed.reason());
                let mut log = self.closes.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(suppressed) = log.allow(Instant::now()) {
                    tracing::warn!(
                        reason = closed.reason(),
                        suppressed,
                        "register connection closed: {closed} (logged at most once a \
                         second, `suppressed` since the last line)"
                    );
                }
            }
        }
    }

    async fn run(&mut self, stream: &mut TcpStream) -> Result<(), Closed> {
        let (mut read, mut write) = stream.split();
        let mut lines = LineReader::default();
        let auth_timeout = tokio::time::sleep(AUTH_TIMEOUT);
        tokio::pin!(auth_timeout);
        let mut worker = false;
        loop {
            let line = tokio::select! {
                line = lines.next(&mut read) => line,
                () = tokio::time::sleep(IDLE), if worker => return Err(Closed::Idle),
                () = &mut auth_timeout, if !worker => return Err(Closed::AuthTimeout),
                changed = self.addresses.changed(), if worker => {
                    if changed.is_err() {
                        // The node is stopping.
                        return Ok(());
                    }
                    self.send_current(&mut write).await?;
                    continue;
                }
            };
            let line = match line {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(()),
                Err(LineError::TooLong) => return Err(Closed::TooLong),
                Err(LineError::Io(e)) => {
                    tracing::debug!(error = %e, "register connection failed");
                    return Ok(());
                }
            };
            if line.trim_ascii().is_empty() {
                continue;
            }
            let request: Request = serde_json::from_slice(&line).map_err(|_| Closed::Malformed)?;
            match request.event.as_str() {
                "" => return Err(Closed::Malformed),
                "worker_connect" => {
                    if !self.key_matches(request.secret_key.as_ref()) {
                        return Err(Closed::SecretKey);
                    }
                    worker = true;
                    self.pending = None;
                    self.send_current(&mut write).await?;
                }
                "ping" => {}
                "gateway_connect" => {
                    let address = match &request.address {
                        Some(Value::String(a)) => shorten(a),
                        _ => "none".to_owned(),
                    };
                    return Err(Closed::GatewayConnect(address));
                }
                other => return Err(Closed::UnknownEvent(shorten(other))),
            }
        }
    }

    /// Whether `given` is `--gateway-secret-key`, compared by digest in
    /// constant time.
    fn key_matches(&self, given: Option<&Value>) -> bool {
        let given = match given {
            None | Some(Value::Null) => "",
            Some(Value::String(key)) => key,
            Some(_) => return false,
        };
        self.secret_key.matches(given.as_bytes())
    }

    /// Writes the current address list, if there is one yet (else the
    /// first one goes out when it comes, as a change).
    async fn send_current(
        &mut self,
        write: &mut (impl AsyncWriteExt + Unpin),
    ) -> Result<(), Closed> {
        let Some(line) = self.addresses.borrow_and_update().clone() else {
            return Ok(());
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&line)).await {
            Ok(Ok(())) => Ok(()),
            // A write error means the peer is gone; the read side ends the
            // connection next.
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "register write failed");
                Ok(())
            }
            Err(_) => Err(Closed::WriteTimeout),
        }
    }
}

/// At most 64 characters of peer-supplied text, escaped, for the log.
fn shorten(text: &str) -> String {
    super::printable(text, 64)
}

/// A connection's count against [`MAX_PER_ADDRESS`], given back when it
/// ends.
struct AddressSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl AddressSlot {
    fn new(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<AddressSlot> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_default();
        if *n >= MAX_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Keeps the connection's slot and its place in
/// `gatecast_register_connections` until the connection ends.
struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, metrics: Arc<Metrics>) -> Self {
        metrics.register_connections.inc();
        Slot {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.register_connections.dec();
    }
}

/// Counts a refusal in `gatecast_register_errors_total`.
fn count(metrics: &Metrics, reason: &'static str) {
    metrics
        .register_errors
        .get_or_create(&ReasonLabel { reason })
        .inc();
}

/// Why no line could be read.
#[derive(Debug)]
enum LineError {
    /// No `\n` within [`MAX_LINE`] bytes.
    TooLong,
    /// The socket failed.
    Io(std::io::Error),
}

/// Splits a byte stream into `\n`-terminated lines of at most [`MAX_LINE`]
/// bytes. The buffer holds only what has been read and not yet returned.
#[derive(Default)]
struct LineReader {
    buf: BytesMut,
}

impl LineReader {
    /// The next line without its `\n` (a `\r` before it stays: JSON
    /// parsing skips it); `None` at end of stream. Bytes after the last
    /// `\n` are dropped at end of stream, as a half-sent line means
    /// nothing. Cancel-safe: bytes read stay in the buffer.
    async fn next(
        &mut self,
        read: &mut (impl AsyncRead + Unpin),
    ) -> Result<Option<Bytes>, LineError> {
        loop {
            let scanned = self.buf.len().min(MAX_LINE + 1);
            if let Some(end) = self.buf[..scanned].iter().position(|&b| b == b'\n') {
                let mut line = self.buf.split_to(end + 1);
                line.truncate(end);
                return Ok(Some(line.freeze()));
            }
            if self.buf.len() > MAX_LINE {
                return Err(LineError::TooLong);
            }
            self.buf.reserve(4096);
            match read.read_buf(&mut self.buf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) => return Err(LineError::Io(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines_of(input: &[u8]) -> Vec<Result<Option<Bytes>, String>> {
        let mut reader = LineReader::default();
        let mut input = input;
        let mut out = Vec::new();
        loop {
            let next = reader.next(&mut input).await;
            let end = !matches!(next, Ok(Some(_)));
            out.push(next.map_err(|e| format!("{e:?}")));
            if end {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn lines_split_on_newline_and_a_partial_last_line_is_dropped() {
        let got = lines_of(b"{\"a\":1}\n\r\n{\"b\":2}\r\npartial").await;
        assert_eq!(
            got,
            vec![
                Ok(Some(Bytes::from_static(b"{\"a\":1}"))),
                Ok(Some(Bytes::from_static(b"\r"))),
                Ok(Some(Bytes::from_static(b"{\"b\":2}\r"))),
                Ok(None),
            ]
        );
    }

    #[tokio::test]
    async fn a_line_of_max_length_passes_and_one_byte_more_does_not() {
        let mut exact = vec![b'x'; MAX_LINE];
        exact.push(b'\n');
        assert_eq!(
            lines_of(&exact).await[0]
                .as_ref()
                .unwrap()
                .as_ref()
                .unwrap()
                .len(),
            MAX_LINE
        );
        let mut over = vec![b'x'; MAX_LINE + 1];
        over.push(b'\n');
        assert_eq!(lines_of(&over).await, vec![Err("TooLong".to_owned())]);
        // Refused before the end of the line arrives.
        let endless = vec![b'x'; MAX_LINE + 2];
        assert_eq!(lines_of(&endless).await, vec![Err("TooLong".to_owned())]);
    }

    #[test]
    fn address_lists_encode_sorted_and_once() {
        let a: SocketAddrV4 = "10.0.0.2:2900".parse().unwrap();
        let b: SocketAddrV4 = "10.0.0.1:2900".parse().unwrap();
        let line = broadcast_addresses(vec![a, b, a]);
        assert_eq!(
            &line[..],
            b"{\"event\":\"broadcast_addresses\",\"addresses\":[\"10.0.0.1:2900\",\"10.0.0.2:2900\"]}\n"
        );
        assert_eq!(broadcast_addresses(vec![b, a]), line);
    }
}
