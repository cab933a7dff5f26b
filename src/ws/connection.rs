//! One WebSocket connection: a single task that reads client frames and is
//! the only writer to the socket.
//!
//! Memory is the design constraint (100k connections a node, ≤ 2 KiB each):
//! the task owns no read or write buffer while the connection is idle. Reads
//! go through a stack buffer inside a synchronous function, so it is not part
//! of the task's state; bytes are kept only while a frame is incomplete.
//! Writes take up to 64 queued frames, already encoded and shared with the
//! other recipients, and write them with one vectored write.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::Instrument;

use crate::events::Detail;
use crate::frame::{self, close_code, Incoming, Opcode, Reader};
use crate::gateway::Gateway;
use crate::gatewayworker::handshake::Handshake;
use crate::gatewayworker::workers::{Event as WorkerEvent, Route};
use crate::hub::Membership;
use crate::ids::ClientId;
use crate::outbox::{Close, Limits, Outbox, BATCH};
use crate::recovery::resume::{self, ResumeSetup};
use crate::ws::limits::{MessageBudget, MessageRate, Overspent};

/// How long a closing connection gets to take its last frames and answer the
/// close frame before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes read per `read` call; lives on the stack only during the call.
const READ_CHUNK: usize = 8192;

/// Batches written per wake-up before the task yields.
const WRITES_PER_WAKE: usize = 16;

/// Reads per wake-up before the task yields, so a client that floods cannot
/// starve the others on its worker thread.
const READS_PER_WAKE: usize = 16;

/// What a new connection starts with, boxed: it is needed only until the
/// connection is registered, and an async fn keeps its arguments in the
/// task's state for the task's whole life.
#[derive(Debug)]
pub struct Setup {
    /// Initial uid, groups and session (from the client's token).
    pub membership: Membership,
    /// When its token expires (Unix ms), if the connection must be closed
    /// then (`--client-jwt-enforce-exp`).
    pub close_at_unix_ms: Option<u64>,
    /// Request details for the connect event, when events are on.
    pub request: Option<super::RequestInfo>,
    /// The client's address (after `--trusted-proxies`) and port.
    pub client: std::net::SocketAddr,
    /// The handshake for BusinessWorkers' `onWebSocketConnect`, when any
    /// is connected.
    pub handshake: Option<Handshake>,
    /// Recovery state, when the client opted in (`/ws?recover=1`).
    pub recovery: Option<Box<ResumeSetup>>,
    /// `recover=1`: pushes reach it framed (docs/recovery.md).
    pub recover: bool,
    /// `pos=`: what to replay once registered.
    pub positions: Option<crate::recovery::positions::Positions>,
}

/// An upgraded connection, handed to [`serve`] in one box: the task keeps
/// an async fn's arguments for its whole life (twice, as arguments and as
/// bindings), so one pointer is all it should get.
pub struct Start {
    /// The node.
    pub gw: Arc<Gateway>,
    /// The client's socket.
    pub stream: TcpStream,
    /// Bytes the HTTP layer read past the handshake.
    pub early: Bytes,
    /// What the handshake found out.
    pub setup: Box<Setup>,
}

/// Serves an upgraded connection until it closes, then forgets it.
///
/// The task's state is the connection's largest cost while idle (tokio
/// rounds a task to 128 bytes, and the allocator to its size classes), so
/// everything the connection keeps lives once, in [`Connection`], and the
/// rare paths (registration, close) are boxed futures of their own.
pub async fn serve(start: Box<Start>) {
    let (mut conn, registration) = Connection::new(start);
    // Only a bool crosses the awaits here: a `Result` matched on would be
    // kept in the task's state for the connection's life.
    let result = if Box::pin(conn.register(registration)).await {
        conn.run().await
    } else {
        Ok(())
    };
    match result {
        Ok(()) => tracing::debug!(client_id = %conn.id, "closed"),
        Err(e) => tracing::debug!(client_id = %conn.id, error = %e, "connection ended"),
    }
    Box::pin(conn.leave()).await;
    conn.gw.partial.charge(conn.outbox.swap_partial_bytes(0), 0);
    conn.gw.metrics.connections.dec();
    conn.gw.metrics.connections_closed.inc();
}

/// What registering a connection needs, moved into its boxed future.
struct Registration {
    setup: Setup,
    early: Bytes,
}

/// Replays what the connection missed after `positions`, with the
/// membership it has now, and tells it where it stands in the other
/// streams it is in (and `recovered` when `report`).
async fn replay(
    gw: &Gateway,
    id: ClientId,
    outbox: &Outbox,
    positions: crate::recovery::positions::Positions,
    report: bool,
) {
    let membership = gw.hub.membership(id).unwrap_or_default();
    let cx = crate::recovery::history::ReplayContext {
        engine: &*gw.engine,
        replays: &gw.hub.replays,
        budget: gw.config.client_queue.saturating_sub(outbox.len() + 2),
        budget_bytes: gw.config.client_queue_bytes,
    };
    let (uid, groups) = (membership.uid.as_deref(), &membership.groups);
    crate::recovery::history::replay(cx, id, uid, groups, outbox, positions, report).await;
}

/// The first frame: `--welcome-frame` with the client's id, or for a
/// connection that opted in to recovery, the default welcome with its
/// resume token (and whether it resumed).
fn welcome(gw: &Gateway, id: ClientId, recovery: Option<&ResumeSetup>) -> Bytes {
    let text = match recovery {
        None => gw.config.welcome_frame.render(id),
        Some(r) => resume::welcome(id, &r.token.encode(), r.resumed),
    };
    frame::encode(Opcode::Text, text.as_bytes())
}

/// Everything a connection keeps, once: the task's state is this and the
/// small state of whichever await it is in.
struct Connection {
    gw: Arc<Gateway>,
    id: ClientId,
    /// Its BusinessWorker, if any.
    route: Route,
    stream: TcpStream,
    outbox: Arc<Outbox>,
    /// Already unregistered (and the close event sent).
    left: bool,
    /// The client sent its close frame.
    peer_closed: bool,
    reader: Reader,
    /// What the client may still send while events are on.
    budget: MessageBudget,
    /// Frames taken from the outbox and not yet fully written.
    batch: VecDeque<Bytes>,
    /// Bytes of `batch[0]` already written.
    offset: usize,
    /// Set once the close frame is in `batch` (its deadline is the close
    /// path's own).
    closing: bool,
}

/// Why the connection task woke up.
enum Wake {
    /// The socket has bytes (or EOF) to read.
    Read,
    /// The socket can take more of the batch.
    Write,
    /// Frames were queued or a close was asked for.
    Queued,
}

/// What reading found.
enum ReadOutcome {
    /// Nothing more to read now.
    Pending,
    /// The client closed (close frame answered, or EOF).
    Closed,
}

impl Connection {
    /// Mints the client's id and queues its welcome frame; what only the
    /// registration needs is set apart (and the boxes freed now, not when
    /// the connection ends).
    #[expect(
        clippy::boxed_local,
        reason = "the task holds the box; it is freed here, once unpacked"
    )]
    fn new(start: Box<Start>) -> (Connection, Registration) {
        let Start {
            gw,
            stream,
            early,
            setup,
        } = *start;
        let setup = *setup;
        let id = gw.minter.mint_unused(|id| gw.hub.contains(id));
        let outbox = Arc::new(Outbox::default());
        if setup.recover {
            outbox.set_framed();
        }
        let _ = outbox.push(
            welcome(&gw, id, setup.recovery.as_deref()),
            &Limits {
                frames: usize::MAX,
                bytes: usize::MAX,
            },
        );
        if let Some(at) = setup.close_at_unix_ms {
            // Checked by the node's ping sweep: no timer per connection.
            outbox.expire_at(gw.hub.unix_ms_to_hub_ms(at));
        }
        let conn = Connection {
            route: Route::new(setup.client),
            gw,
            id,
            stream,
            outbox,
            left: false,
            peer_closed: false,
            reader: Reader::default(),
            budget: MessageBudget::default(),
            batch: VecDeque::new(),
            offset: 0,
            closing: false,
        };
        (conn, Registration { setup, early })
    }

    /// Registers the connection with the engine, tells backends, then
    /// reads the bytes the HTTP layer read past the handshake. False if
    /// those ended the connection.
    async fn register(&mut self, registration: Registration) -> bool {
        let Registration { setup, early } = registration;
        let (gw, id, outbox, route) = (&*self.gw, self.id, &self.outbox, &self.route);
        if let Some(recovery) = &setup.recovery {
            // Before the connection is registered: its record is written
            // with its first membership.
            gw.engine.track_resume(id, recovery.token.key());
        }
        let connect = gw.engine.connect(id, outbox.clone(), setup.membership);
        if let Err(e) = connect.instrument(self.span()).await {
            tracing::warn!(client_id = %id, error = %e, "could not register connection");
            outbox.close(close_code::INTERNAL_ERROR, "try again later", true);
        }
        if setup.recover && !outbox.is_closing() {
            // After the membership the connection starts with (its token's,
            // or a resume's), before anything is written: its live pushes
            // wait in the outbox meanwhile. A client that came back (with
            // positions or a token) hears `recovered`; every opted-in one
            // hears where it stands in the streams it starts in.
            let came_back = setup.positions.is_some()
                || setup.recovery.as_ref().is_some_and(|r| r.resumed.is_some());
            let positions = setup.positions.unwrap_or_default();
            Box::pin(replay(gw, id, outbox, positions, came_back)).await;
        }
        if gw.is_draining() {
            // Upgraded while the drain began: close_all did not see it.
            let drain = crate::autoscale::reconnect::Operational::Drain;
            let window = gw
                .config
                .drain_spread()
                .max(std::time::Duration::from_secs(1));
            let retry_ms = crate::autoscale::reconnect::pick_retry_ms(window);
            outbox.close(drain.code(), &drain.reason(retry_ms), false);
        }
        gw.metrics.connections.inc();
        gw.metrics.connections_opened.inc();
        if let Some(request) = setup.request {
            gw.event(
                id,
                Detail::Connect {
                    // The client behind a trusted proxy, as the limits saw it.
                    remote_addr: setup.client.to_string(),
                    query: request.query,
                    headers: request.headers,
                },
            );
        }
        // GatewayWorker sends onConnect at accept, before the handshake; here
        // both come once the connection is registered, back to back.
        gw.worker_event(route, id, WorkerEvent::Connect);
        if let Some(handshake) = setup.handshake {
            let data = handshake.to_php();
            gw.worker_event(route, id, WorkerEvent::WebSocketConnect(&data));
        }
        if let Some(old) = setup.recovery.as_ref().and_then(|r| r.old_client_id) {
            gw.event(id, Detail::Resumed { old_client_id: old });
            let old_text = old.to_string();
            gw.worker_event(route, id, WorkerEvent::Resumed(old_text.as_bytes()));
            // The connection it took over, if its node has not noticed it
            // is gone yet: its client came back, and its record is used.
            let engine = gw.engine.clone();
            tokio::spawn(async move {
                let _ = engine.close_client(old, None).await;
            });
        }
        // They may be a slice of hyper's whole read buffer: read and
        // dropped now, not kept.
        match self.handle_early(early) {
            Ok(closed) => !closed,
            Err(e) => {
                tracing::debug!(client_id = %id, error = %e, "connection ended");
                false
            }
        }
    }

    /// The span of the engine's work for this connection. Not kept for
    /// the connection's life (its state would weigh on every idle task):
    /// the connection's own log lines carry `client_id` themselves.
    fn span(&self) -> tracing::Span {
        tracing::info_span!("conn", client_id = %self.id)
    }

    /// Reads the bytes the HTTP layer read past the handshake; true if
    /// they closed the connection.
    fn handle_early(&mut self, early: Bytes) -> io::Result<bool> {
        Ok(!early.is_empty() && matches!(self.handle_bytes(&early)?, ReadOutcome::Closed))
    }

    async fn run(&mut self) -> io::Result<()> {
        loop {
            // Write until the socket is full or nothing is left queued (a
            // burst may queue many batches), yielding now and then so one
            // busy connection cannot hold its worker thread.
            let mut rounds = 0;
            loop {
                if let Some(close) = self.take_queued() {
                    // Cold path, boxed so its state does not weigh on every
                    // idle connection's task.
                    let span = self.span();
                    return Box::pin(self.close(close).instrument(span)).await;
                }
                if self.batch.is_empty() {
                    break;
                }
                self.write_ready()?;
                if !self.batch.is_empty() {
                    break;
                }
                rounds += 1;
                if rounds == WRITES_PER_WAKE {
                    tokio::task::yield_now().await;
                    rounds = 0;
                }
            }
            match self.ready().await? {
                Wake::Read => {
                    if let ReadOutcome::Closed = self.read_ready()? {
                        return Ok(());
                    }
                }
                Wake::Write | Wake::Queued => {}
            }
        }
    }

    /// Waits until the socket can be read, or written while frames wait,
    /// or frames were queued. A `poll_fn` over the socket's and the
    /// outbox's wakers keeps nothing in the task's state, where `select!`
    /// over `readable()`, `writable()` and `Notify` futures would hold a few
    /// hundred bytes per connection.
    fn ready(&self) -> impl std::future::Future<Output = io::Result<Wake>> + '_ {
        std::future::poll_fn(move |cx| {
            if let Poll::Ready(r) = self.stream.poll_read_ready(cx) {
                return Poll::Ready(r.map(|()| Wake::Read));
            }
            if !self.batch.is_empty() {
                if let Poll::Ready(r) = self.stream.poll_write_ready(cx) {
                    return Poll::Ready(r.map(|()| Wake::Write));
                }
            }
            self.outbox.poll_wake(cx).map(|()| Ok(Wake::Queued))
        })
    }

    /// Takes queued frames when the batch is empty; returns a close that
    /// must happen now.
    fn take_queued(&mut self) -> Option<Box<Close>> {
        if self.batch.is_empty() {
            self.outbox.take(&mut self.batch).close
        } else {
            // An overflow (or ping timeout) close happens at once, even
            // while a batch is being written; a graceful one waits for the
            // queue.
            self.outbox.discarding_close()
        }
    }

    /// Closes: leaves the gateway, sends what must still go and the close
    /// frame, waits for the client's answer; all within CLOSE_TIMEOUT.
    async fn close(&mut self, close: Box<Close>) -> io::Result<()> {
        if close.discard_queued {
            // A frame already half written must be finished, or the stream
            // is corrupt.
            self.batch.truncate(usize::from(self.offset > 0));
            // Nor is the client's unfinished message of any use now: its
            // bytes go back to the node's budget at once.
            if self.reader.is_incomplete() {
                self.reader = Reader::default();
                let held = self.outbox.swap_partial_bytes(0);
                self.gw.partial.charge(held, 0);
            }
        }
        // Leave the uid and groups before the last bytes go out: a slow
        // client may take up to CLOSE_TIMEOUT to read them.
        self.leave().await;
        self.batch.push_back(close.frame);
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        self.closing = true;
        tracing::debug!(code = close.code, "closing");
        loop {
            self.write_ready()?;
            if self.batch.is_empty() {
                if self.peer_closed {
                    // The client closed first and has our answer: the
                    // handshake is complete, drop the connection now.
                    return Ok(());
                }
                return self.linger(deadline).await;
            }
            tokio::select! {
                ready = self.stream.writable() => ready?,
                ready = self.stream.readable() => {
                    ready?;
                    if let ReadOutcome::Closed = self.read_ready()? {
                        return Ok(());
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "close timed out"));
                }
            }
        }
    }

    /// Unregisters the connection once: it leaves its uid and groups, its
    /// session goes, and backends get the close event.
    async fn leave(&mut self) {
        if std::mem::replace(&mut self.left, true) {
            return;
        }
        self.gw.event(self.id, Detail::Close);
        self.gw
            .worker_event(&self.route, self.id, WorkerEvent::Close);
        let span = self.span();
        self.gw.engine.disconnect(self.id).instrument(span).await;
    }

    /// After our close frame went out: wait (bounded) for the client's close
    /// frame or EOF, then drop the socket.
    async fn linger(&mut self, deadline: Instant) -> io::Result<()> {
        loop {
            tokio::select! {
                ready = self.stream.readable() => {
                    ready?;
                    if let ReadOutcome::Closed = self.read_ready()? {
                        return Ok(());
                    }
                }
                () = tokio::time::sleep_until(deadline) => return Ok(()),
            }
        }
    }

    /// Writes from the batch until it is empty or the socket is full.
    fn write_ready(&mut self) -> io::Result<()> {
        while !self.batch.is_empty() {
            let mut slices = [IoSlice::new(&[]); BATCH];
            let mut n = 0;
            for (i, frame) in self.batch.iter().take(BATCH).enumerate() {
                let start = if i == 0 { self.offset } else { 0 };
                slices[i] = IoSlice::new(&frame[start..]);
                n += 1;
            }
            let mut written = match self.stream.try_write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            while written > 0 {
                let left = self.batch[0].len() - self.offset;
                if written >= left {
                    written -= left;
                    self.offset = 0;
                    if let Some(frame) = self.batch.pop_front() {
                        // Measured if it is a sampled push's frame.
                        self.gw.hub.push_latency.written(&frame);
                    }
                } else {
                    self.offset += written;
                    written = 0;
                }
            }
        }
        // All written: free the batch, so an idle connection holds no
        // queue memory (the next push allocates a fresh one, one small
        // allocation against a system call).
        if self.batch.capacity() > 0 {
            self.batch = VecDeque::new();
        }
        Ok(())
    }

    /// Reads what the socket has, through a buffer on this call's stack.
    fn read_ready(&mut self) -> io::Result<ReadOutcome> {
        let mut buf = [0u8; READ_CHUNK];
        for _ in 0..READS_PER_WAKE {
            match self.stream.try_read(&mut buf) {
                Ok(0) => return Ok(ReadOutcome::Closed),
                Ok(n) => {
                    if let ReadOutcome::Closed = self.handle_bytes(&buf[..n])? {
                        return Ok(ReadOutcome::Closed);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(ReadOutcome::Pending)
    }

    fn handle_bytes(&mut self, data: &[u8]) -> io::Result<ReadOutcome> {
        let gw = &*self.gw;
        // Only whole frames count as activity: a client trickling one byte
        // at a time does not keep its connection alive.
        let now = gw.hub.now_ms();
        let mut client_closed = false;
        let outbox = &*self.outbox;
        let limits = gw.hub.limits();
        let closing = self.closing;
        let id = self.id;
        // Once the close event is out, nothing more is reported about it.
        let report = !closing && !self.left;
        let route = &self.route;
        let emit = |detail: Detail| {
            if report {
                if let Detail::Message { data, .. } = &detail {
                    gw.worker_event(route, id, WorkerEvent::Message(data));
                }
                gw.event(id, detail);
            }
        };
        // Every message becomes an event (for `--events` or a
        // BusinessWorker): held to the client's budget.
        let rate = (report && (gw.events.is_some() || gw.workers.any()))
            .then(|| MessageRate::from_config(&gw.config));
        let budget = &mut self.budget;
        let mut overspent: Option<Overspent> = None;
        let mut within_budget = |len: usize| match &rate {
            None => true,
            Some(rate) => match budget.spend(rate, len, now) {
                Ok(()) => true,
                Err(first) => {
                    overspent = overspent.or(first);
                    false
                }
            },
        };
        let result = self
            .reader
            .feed(data, gw.config.max_message_bytes, &mut |message| {
                outbox.touch(now);
                match message {
                    Incoming::Ping(payload) => {
                        let _ = outbox.push(frame::encode(Opcode::Pong, &payload), limits);
                    }
                    Incoming::Pong => {}
                    Incoming::Close(code) => {
                        client_closed = true;
                        if !closing {
                            // Echo the client's code, as RFC 6455 asks.
                            let code = code.unwrap_or(close_code::NORMAL);
                            outbox.close(code, "", true);
                        }
                    }
                    Incoming::Text(text) => {
                        gw.metrics.messages_in.inc();
                        if is_ping(&text) {
                            let _ = outbox.push(pong_frame(), limits);
                        } else if within_budget(text.len()) {
                            let data = Bytes::from(text);
                            emit(Detail::Message {
                                data,
                                binary: false,
                            });
                        }
                    }
                    Incoming::Binary(data) => {
                        gw.metrics.messages_in.inc();
                        if within_budget(data.len()) {
                            let data = Bytes::from(data);
                            emit(Detail::Message { data, binary: true });
                        }
                    }
                }
            });
        outbox.set_incomplete(self.reader.is_incomplete(), now);
        gw.partial.charge(
            outbox.swap_partial_bytes(self.reader.buffered()),
            self.reader.buffered(),
        );
        if let Some(overspent) = overspent {
            tracing::debug!(client_id = %id, budget = overspent.label(), "client sends too fast");
            gw.metrics
                .client_rate_closed
                .get_or_create(&crate::metrics::ReasonLabel {
                    reason: overspent.label(),
                })
                .inc();
            outbox.close(close_code::POLICY, "message rate exceeded", true);
        }
        if let Err(violation) = result {
            tracing::debug!(
                client_id = %id,
                code = violation.code,
                reason = violation.reason,
                "protocol violation"
            );
            self.outbox.close(violation.code, violation.reason, true);
            return Ok(ReadOutcome::Pending);
        }
        if client_closed {
            self.peer_closed = true;
            if closing {
                return Ok(ReadOutcome::Closed);
            }
        }
        Ok(ReadOutcome::Pending)
    }
}

/// `{"type":"ping"}` (any JSON spacing) asks for `{"type":"pong"}`.
fn is_ping(text: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    text.len() <= 64
        && text.first() == Some(&b'{')
        && serde_json::from_slice::<Typed>(text).is_ok_and(|t| t.kind.as_deref() == Some("ping"))
}

fn pong_frame() -> Bytes {
    static PONG: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    PONG.get_or_init(|| frame::encode(Opcode::Text, br#"{"type":"pong"}"#))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_text_pings() {
        assert!(is_ping(br#"{"type":"ping"}"#));
        assert!(is_ping(br#"{ "type" : "ping" , "x": 1 }"#));
        assert!(!is_ping(br#"{"type":"hello"}"#));
        assert!(!is_ping(b"ping"));
    }
}
