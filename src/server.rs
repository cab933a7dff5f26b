//! Starting and stopping a node: raise the descriptor limit, bind the
//! listeners, build the engine, serve until the shutdown signal or a failed
//! critical task, then drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::accept::Acceptor;
use crate::api;
use crate::autoscale::reconnect::{pick_retry_ms, Operational};
use crate::browser;
use crate::config::Config;
use crate::engine::memory::MemoryEngine;
use crate::engine::redis::{RedisEngine, RedisSettings};
use crate::engine::Engine;
use crate::events::{Events, Sink};
use crate::fd_limit;
use crate::frame;
use crate::gateway::Gateway;
use crate::gatewayworker::register;
use crate::hub::Hub;
use crate::ids::{IdMinter, NodeId};
use crate::metrics::Metrics;
use crate::outbox::Limits;
use crate::redact::redact_url;
use crate::task::{spawn_critical, Fatal};
use crate::ws::{self, auth::ClientAuth};

/// Why a node could not start, or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound (address in use, permission...).
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A critical background task failed (see [`Fatal`]): the node drained
    /// and stopped rather than run half-alive.
    #[error("stopped after a critical failure: {0}")]
    Fatal(String),
}

/// The listeners, bound before anything else so a node that cannot own its
/// address fails fast.
pub struct Listeners {
    public: TcpListener,
    api: TcpListener,
    inner: TcpListener,
    /// GatewayWorker's Register, with `--register-listen`.
    register: Option<TcpListener>,
}

impl Listeners {
    /// Binds the public, API and inner listeners, and the Register's when
    /// it is asked for.
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        Ok(Listeners {
            public: bind("public", config.listen).await?,
            api: bind("api", config.api_listen).await?,
            // Bound even before section 7 is served: its port is part of
            // every client_id, so two nodes must never share it.
            inner: bind("inner", config.inner_bind()).await?,
            register: match config.register_listen {
                Some(addr) => Some(bind("register", addr).await?),
                None => None,
            },
        })
    }
}

/// After `--handshake-timeout`, a connection still speaking HTTP is told to
/// close (after the request in flight, if any); this long more and it is
/// dropped.
const HANDSHAKE_CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// How the public listener bounds what a connection may cost before its
/// upgrade (issue 16: slow handshakes).
#[derive(Clone)]
struct PublicBounds {
    /// `--handshake-timeout`.
    timeout: std::time::Duration,
    /// `--max-request-head-bytes`.
    head_bytes: usize,
    /// `--max-handshakes`: a permit per connection not yet upgraded.
    handshakes: Option<Arc<tokio::sync::Semaphore>>,
    metrics: Arc<Metrics>,
}

/// The answer to a connection past `--max-handshakes`: written straight to
/// the socket (no HTTP parsing spent on it) and the socket closed. An
/// admission refusal like the handshake rate's: `Retry-After` and the
/// client's own `retry_ms` (0.5 to 1.5 s: handshakes in progress end
/// within `--handshake-timeout`, most far sooner).
fn handshakes_full() -> Vec<u8> {
    let retry_ms = 500 + pick_retry_ms(std::time::Duration::from_millis(1000));
    let body = format!(
        r#"{{"error":"overloaded","retry_ms":{retry_ms},"message":"too many handshakes in progress: retry later"}}"#
    );
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: {}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        crate::autoscale::admission::retry_after_seconds(retry_ms),
        body.len()
    )
    .into_bytes()
}

/// Runs a node until `shutdown` resolves, then drains it (SPEC section 1):
/// not ready, no new connections, clients closed with 1001, entries removed
/// from the engine, all within `--shutdown-grace`. A critical background
/// task that fails drains the node the same way, and then `run` returns
/// [`StartError::Fatal`].
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    run_with(config, shutdown, Fatal::new()).await
}

/// [`run`] with a [`Fatal`] the caller keeps: tripping it stops the node as
/// a failed critical task would (for tests and for embedding the node).
pub async fn run_with(
    config: Config,
    shutdown: impl Future<Output = ()>,
    fatal: Fatal,
) -> Result<(), StartError> {
    config.validate().map_err(StartError::Config)?;
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    if let Some(note) = config.inner_unreachable_note() {
        tracing::info!("{note}");
    }
    let client_auth = ClientAuth::from_config(&config).map_err(StartError::Config)?;
    let metrics = Arc::new(Metrics::new());
    // Before binding, so the limit holds from the first connection on.
    if let Some(limit) = fd_limit::raise_to_hard_limit() {
        metrics
            .open_files_limit
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }
    let listeners = Listeners::bind(&config).await?;
    let local = |l: &TcpListener| l.local_addr().expect("bound listener has an address");
    let (public_addr, api_addr, inner_addr) = (
        local(&listeners.public),
        local(&listeners.api),
        local(&listeners.inner),
    );
    let register_addr = listeners.register.as_ref().map(local);
    let node = NodeId::new(config.advertised_ip(), inner_addr.port());

    let hub = Arc::new(
        Hub::new(Limits {
            frames: config.client_queue,
            bytes: config.client_queue_bytes,
        })
        .with_max_session_bytes(config.max_session_bytes)
        .with_push_latency(metrics.push_latency())
        .with_write_delay(config.write_delay),
    );
    if let Some(held) = hub.held_wakes() {
        tokio::spawn(held.clone().run());
    }
    let history = crate::recovery::history::HistorySettings::new(
        config.history_size,
        config.history_ttl,
        &config.history_streams,
    );
    // Presence transitions and purged nodes' closes, from the engine to
    // the events (with --events on) and the BusinessWorkers.
    let (notices, notices_rx) = crate::presence::Notices::new();
    let notices = Some(notices);
    let engine: Arc<dyn Engine> = match &config.redis_url {
        None => {
            // A single node is the whole gateway.
            metrics.nodes_alive.set(1);
            Arc::new(
                MemoryEngine::new(hub.clone(), metrics.clone(), node)
                    .with_resume_window(config.resume_window)
                    .with_history(history)
                    .with_presence(config.presence(), notices.clone()),
            )
        }
        Some(url) => {
            let settings = RedisSettings {
                url: url.expose().to_owned(),
                password: config
                    .redis_password
                    .as_ref()
                    .map(|p| p.expose().to_owned()),
                prefix: config.redis_prefix.clone(),
                heartbeat: config.node_heartbeat,
                lost_grace: config.redis_lost_grace,
                reconnect_window: config.reconnect_window,
                info: serde_json::json!({
                    "inner": node.addr().to_string(),
                    "public": public_addr.to_string(),
                    "version": env!("CARGO_PKG_VERSION"),
                }),
                max_message_bytes: config.max_message_bytes,
                max_list_items: config.max_list_items,
                liveness_key: crate::gatewayworker::secret::GatewayKey::new(
                    &config.gateway_secret_key,
                ),
                resume_window: config.resume_window,
                history,
                presence: config.presence(),
                notices: notices.clone(),
            };
            let engine =
                RedisEngine::start(settings, node, hub.clone(), metrics.clone(), fatal.clone())
                    .await
                    .map_err(StartError::Config)?;
            Arc::new(engine)
        }
    };
    let stop_public = CancellationToken::new();
    let stop_internal = CancellationToken::new();
    let events = match start_events(&config, node, &metrics).await? {
        Some((events, drain)) => {
            // Not tracked with the other background tasks: it ends when
            // the last `Events` handle drops, after `run` returns.
            spawn_critical("events queue", &fatal, &stop_internal, drain);
            Some(events)
        }
        None => None,
    };
    // The bound address, so what the node tells others (BusinessWorkers'
    // `gateway_port`) is right with `--listen ...:0`.
    let mut config = config;
    config.listen = public_addr;
    let gw = Arc::new(Gateway::new(
        config,
        hub,
        engine,
        IdMinter::new(node),
        metrics,
        client_auth,
        events,
        fatal.clone(),
    ));

    if node.addr().ip().is_loopback() && !inner_addr.ip().is_loopback() {
        // The Register hands this address to GatewayClients and workers on
        // other hosts, which would dial their own loopback (issue 32).
        tracing::warn!(
            advertised = %node.addr(),
            inner = %inner_addr,
            "advertising a loopback address while the inner port is open to other hosts: \
             GatewayClients and BusinessWorkers on other hosts cannot reach this node's \
             clients; set --advertise-ip to an address they reach (the pod IP)"
        );
    }

    tracing::info!(
        public = %public_addr,
        api = %api_addr,
        inner = %inner_addr,
        register = register_addr.map(tracing::field::display),
        node = %node,
        advertised = %node.addr(),
        engine = if gw.config.redis_url.is_some() { "redis" } else { "memory" },
        redis = gw.config.redis_url.as_deref().map(|u| redact_url(u)),
        events_webhook = gw.config.events_webhook.as_deref().map(|u| redact_url(u)),
        "listening"
    );

    // Not critical: it only forwards, and ends with the node.
    tokio::spawn(crate::presence::deliver(
        gw.clone(),
        node,
        notices_rx,
        stop_internal.clone(),
    ));

    // Every task here must live as long as the node: one that panics or
    // ends early trips `fatal`. The trackers let the drain wait for them.
    let background = tokio_util::task::TaskTracker::new();
    let public = tokio_util::task::TaskTracker::new();
    let acceptor = |listener, what| Acceptor::new(listener, what, gw.metrics.clone());
    spawn_critical(
        "ping sweeper",
        &fatal,
        &stop_internal,
        background.track_future(ping_sweeper(gw.clone(), stop_internal.clone())),
    );
    spawn_critical(
        "unfinished messages budget",
        &fatal,
        &stop_internal,
        background.track_future(ws::partial::evictor(
            gw.hub.clone(),
            gw.partial.clone(),
            gw.metrics.clone(),
            gw.config.reconnect_window,
            stop_internal.clone(),
        )),
    );
    spawn_critical(
        "handshake ramp",
        &fatal,
        &stop_internal,
        background.track_future(crate::autoscale::admission::follow_readiness(
            gw.clone(),
            stop_internal.clone(),
        )),
    );
    // The load task stops publishing when the drain begins and deletes
    // the node's load field; the drain waits for that (`load_left`) before
    // the engine leaves, so no write of the field lands after it left.
    let stop_load = stop_internal.child_token();
    let (load_left_tx, load_left) = tokio::sync::oneshot::channel::<()>();
    if gw.config.redis_url.is_some() {
        spawn_critical(
            "rebalancing",
            &fatal,
            &stop_internal,
            background.track_future(crate::autoscale::rebalance::run(
                gw.clone(),
                stop_load.clone(),
                load_left_tx,
                stop_internal.clone(),
            )),
        );
    } else {
        drop(load_left_tx);
    }
    // The dashboard's stats record (docs/dashboard.md).
    spawn_critical(
        "stats record",
        &fatal,
        &stop_internal,
        background.track_future(crate::stats::run(
            gw.clone(),
            crate::stats::Addresses {
                inner: node.addr().to_string(),
                public: public_addr.to_string(),
                api: api_addr.to_string(),
            },
            stop_internal.clone(),
        )),
    );
    spawn_critical(
        "inner listener",
        &fatal,
        &stop_internal,
        background.track_future(crate::gatewayworker::inner::serve(
            gw.clone(),
            acceptor(listeners.inner, "inner"),
            stop_internal.clone(),
        )),
    );
    spawn_critical(
        "api listener",
        &fatal,
        &stop_internal,
        background.track_future(serve(
            acceptor(listeners.api, "api"),
            api::router(gw.clone()),
            stop_internal.clone(),
        )),
    );
    spawn_critical(
        "public listener",
        &fatal,
        &stop_public,
        public.track_future(serve_public(
            acceptor(listeners.public, "public"),
            public_router(gw.clone(), api_addr),
            PublicBounds {
                timeout: gw.config.handshake_timeout,
                head_bytes: gw.config.max_request_head_bytes,
                handshakes: (gw.config.max_handshakes > 0)
                    .then(|| Arc::new(tokio::sync::Semaphore::new(gw.config.max_handshakes))),
                metrics: gw.metrics.clone(),
            },
            stop_public.clone(),
        )),
    );
    if let Some(listener) = listeners.register {
        // Stops with the public listener: a draining node no longer
        // speaks for the cluster, and the workers that followed it
        // reconnect to another replica (through the Service).
        spawn_critical(
            "register listener",
            &fatal,
            &stop_public,
            public.track_future(register::serve(
                acceptor(listener, "register"),
                gw.clone(),
                stop_public.clone(),
            )),
        );
    }
    public.close();

    // Whichever comes first; a failure during the drain below is logged
    // (by `Fatal::trip`) but no longer changes how the node exits.
    let failure = tokio::select! {
        () = shutdown => None,
        () = fatal.tripped() => Some(fatal.reason().unwrap_or_default()),
    };
    tracing::info!(failed = failure.is_some(), "shutting down: draining");
    let grace = gw.config.shutdown_grace;
    let drain = async {
        gw.start_draining();
        stop_load.cancel();
        gw.autoscale.evacuation.stop();
        stop_public.cancel();
        // The node stays in the cluster while its clients are closed
        // slice by slice: messages still reach those not closed yet. Each
        // is told to wait a delay of its own within the spread before it
        // reconnects (1 s at most when everyone goes at once).
        let spread = gw.config.drain_spread();
        let window = if spread.is_zero() {
            std::time::Duration::from_secs(1)
        } else {
            spread
        };
        let drain = Operational::Drain;
        let before = gw.hub.client_count() as u64;
        gw.hub
            .close_all_spread(drain.code(), || drain.reason(pick_retry_ms(window)), spread)
            .await;
        gw.metrics.autoscale.closed(drain.name(), before);
        // Bounded: the load task is between two Redis commands at worst.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), load_left).await;
        // Leave the cluster now, not after the last client said goodbye:
        // other nodes must stop routing to this one at once.
        gw.engine.shutdown().await;
        gw.connections.close();
        // Leave time to flush the close events even if some connections
        // outlast the grace.
        let flush_time = std::time::Duration::from_secs(2).min(grace / 4);
        let _ = tokio::time::timeout(grace - flush_time, gw.connections.wait()).await;
        if let Some(events) = &gw.events {
            events.flush(flush_time).await;
        }
        gw.workers.close(flush_time).await;
        public.wait().await;
    };
    if tokio::time::timeout(grace, drain).await.is_err() {
        tracing::warn!(
            ?grace,
            "shutdown grace period over: exiting with connections still open"
        );
    }
    stop_internal.cancel();
    background.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), background.wait()).await;
    tracing::info!("stopped");
    match failure {
        None => Ok(()),
        Some(reason) => Err(StartError::Fatal(reason)),
    }
}

/// The events sink `--events` asks for: the Redis stream (with a Redis
/// client of its own) or the webhook; the handle and the task that drains
/// the queue into the sink, for the caller to spawn.
async fn start_events(
    config: &Config,
    node: NodeId,
    metrics: &Arc<Metrics>,
) -> Result<Option<(Events, impl Future<Output = ()> + Send + 'static)>, StartError> {
    use fred::interfaces::ClientLike;
    if !config.events {
        return Ok(None);
    }
    let sink = match (&config.redis_url, &config.events_webhook) {
        (Some(url), _) => {
            // A Redis of their own, when asked: events then never fill
            // the one that holds the cluster's membership.
            let (url, flag) = match &config.events_redis_url {
                Some(events_url) => (events_url, "--events-redis-url"),
                None => (url, "--redis-url"),
            };
            let mut redis = fred::types::config::Config::from_url(url)
                .map_err(|e| StartError::Config(format!("invalid {flag}: {e}")))?;
            if let (Some(password), None) = (&config.redis_password, &config.events_redis_url) {
                redis.password = Some(password.expose().to_owned());
            }
            let client = fred::types::Builder::from_config(redis)
                .with_config(|c| c.fail_fast = false)
                .with_performance_config(|p| {
                    p.default_command_timeout = std::time::Duration::from_secs(2)
                })
                .set_policy(fred::types::config::ReconnectPolicy::new_exponential(
                    0, 100, 1000, 2,
                ))
                .build()
                .map_err(|e| StartError::Config(e.to_string()))?;
            client.connect();
            Sink::Stream {
                client,
                key: format!("{}:events", config.redis_prefix),
                max_len: config.events_max_len,
            }
        }
        (None, Some(url)) => Sink::Webhook {
            url: url.expose().to_owned(),
        },
        (None, None) => {
            return Err(StartError::Config(
                "--events needs --redis-url or --events-webhook".into(),
            ))
        }
    };
    let bounds = crate::events::Bounds {
        queue_bytes: config.events_queue_bytes,
        max_event_bytes: config.events_max_bytes,
        stream_bytes: config.events_stream_bytes,
    };
    Ok(Some(Events::new(sink, node, metrics.clone(), bounds)))
}

fn public_router(gw: Arc<Gateway>, api: SocketAddr) -> Router {
    let demo = gw.config.demo.then_some(api);
    Router::new()
        .route("/ws", get(ws::upgrade))
        .merge(browser::routes(demo))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .with_state(gw)
}

async fn serve(listener: Acceptor, router: Router, stop: CancellationToken) {
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "listener failed");
    }
}

/// The public listener. Served with hyper's HTTP/1 connection directly
/// rather than `axum::serve`, whose protocol detection wraps the socket in a
/// private type: the WebSocket task needs the `TcpStream` itself back after
/// the upgrade (see `ws::connection`).
///
/// Before the upgrade a connection is hyper's, and bounded here: its
/// request head must arrive within `--handshake-timeout` and fit in
/// `--max-request-head-bytes` (else 431), and the connection must be
/// upgraded (or done) within `--handshake-timeout` of its accept, so a
/// client trickling its request, or one never reading our answer, holds
/// its socket and buffer for a bounded time.
async fn serve_public(
    mut listener: Acceptor,
    router: Router,
    bounds: PublicBounds,
    stop: CancellationToken,
) {
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        // Failed accepts (out of descriptors...) are counted, logged and
        // retried inside `Acceptor`.
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        // Held until the connection is upgraded or done.
        let permit = match &bounds.handshakes {
            None => None,
            Some(handshakes) => match handshakes.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    bounds
                        .metrics
                        .connections_refused
                        .get_or_create(&crate::metrics::ReasonLabel {
                            reason: "handshakes_full",
                        })
                        .inc();
                    // Best effort: a socket that cannot take it at once
                    // is dropped all the same.
                    let _ = stream.try_write(&handshakes_full());
                    continue;
                }
            },
        };
        // The peer's address, for the per-address limits (`ConnectInfo`).
        let with_peer = tower::util::MapRequestLayer::new(
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                request
            },
        );
        let service = hyper_util::service::TowerToHyperService::new(tower::Layer::layer(
            &with_peer,
            router.clone(),
        ));
        let stop = stop.clone();
        let bounds = bounds.clone();
        connections.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(bounds.timeout)
                .max_header_size(bounds.head_bytes)
                // hyper's floor; pipelined requests cannot grow it further.
                .max_buf_size(bounds.head_bytes.max(8192))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            let deadline = tokio::time::sleep(bounds.timeout);
            tokio::pin!(deadline);
            let result = tokio::select! {
                result = conn.as_mut() => Some(result),
                () = &mut deadline => {
                    bounds.metrics
                        .handshakes_failed
                        .get_or_create(&crate::metrics::ReasonLabel { reason: "deadline" })
                        .inc();
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(HANDSHAKE_CLOSE_GRACE, conn.as_mut()).await.ok()
                }
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    Some(conn.await)
                }
            };
            drop(permit);
            if let Some(Err(e)) = result {
                tracing::debug!(error = %e, "public connection failed before the upgrade");
                // Only what the bounds cut off; a client hanging up or
                // sending garbage is not worth a series.
                let reason = if e.is_timeout() {
                    Some("header_timeout")
                } else if e.is_parse_too_large() {
                    Some("head_too_large")
                } else {
                    None
                };
                if let Some(reason) = reason {
                    bounds
                        .metrics
                        .handshakes_failed
                        .get_or_create(&crate::metrics::ReasonLabel { reason })
                        .inc();
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// Sends WebSocket pings every `--ping-interval` and closes connections
/// silent for `--ping-timeout`. One task for the node, not a timer per
/// connection: timers are the largest part of an idle connection otherwise.
async fn ping_sweeper(gw: Arc<Gateway>, stop: CancellationToken) {
    let interval = gw.config.ping_interval;
    let timeout = gw.config.ping_timeout;
    let message_timeout = gw.config.message_timeout;
    // Check timeouts often enough to honour them within a quarter of their
    // length, and ping on every `interval`.
    let tick = interval
        .min(timeout / 4)
        .min(message_timeout / 4)
        .max(std::time::Duration::from_millis(10));
    let ping = frame::encode(frame::Opcode::Ping, b"");
    // Each tick pings one share of the connections, so a connection is
    // pinged once per `interval` (rounded up to whole ticks), and a node's
    // pings are spread over the interval rather than written in one burst.
    let phases = u32::try_from(interval.as_millis().div_ceil(tick.as_millis().max(1)))
        .unwrap_or(u32::MAX)
        .max(1);
    let mut phase = 0;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        gw.metrics
            .partial_bytes
            .set(i64::try_from(gw.partial.used()).unwrap_or(i64::MAX));
        let pings = crate::hub::Pings {
            frame: &ping,
            phase,
            phases,
        };
        phase = (phase + 1) % phases;
        gw.hub.sweep(
            Some(pings),
            timeout.as_millis() as u64,
            message_timeout.as_millis() as u64,
        );
    }
}
