//! The node's shared state: configuration, the local hub, the engine and
//! what both transports (WebSocket and HTTP API) need.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::engine::Engine;
use crate::events::{Detail, Event, Events};
use crate::gatewayworker::php::session_to_php;
use crate::gatewayworker::workers::{self, Route, Workers};
use crate::hub::Hub;
use crate::ids::ClientId;
use crate::ids::IdMinter;
use crate::metrics::Metrics;
use crate::task::Fatal;
use crate::ws::auth::ClientAuth;
use crate::ws::limits::ConnectionLimits;
use crate::ws::partial::PartialBudget;

/// Everything a request or a connection task needs, behind one `Arc`.
pub struct Gateway {
    /// The node's configuration.
    pub config: Config,
    /// This node's connections.
    pub hub: Arc<Hub>,
    /// Membership, queries and delivery across the gateway.
    pub engine: Arc<dyn Engine>,
    /// Mints client_ids for new connections.
    pub minter: IdMinter,
    /// Exported metrics.
    pub metrics: Arc<Metrics>,
    /// Client token verifier, when client auth is on.
    pub client_auth: Option<ClientAuth>,
    /// Where connect/message/close events go, when `--events` is on.
    pub events: Option<Events>,
    /// BusinessWorkers connected to the inner port, and their events.
    pub workers: Workers,
    /// Connection tasks, so shutdown can wait for them.
    pub connections: TaskTracker,
    /// Open connections per node and per client address.
    pub limits: Arc<ConnectionLimits>,
    /// Bytes of unfinished client messages, node-wide.
    pub partial: Arc<PartialBudget>,
    /// Tripped by a critical background task that failed: the node stops.
    /// Parts that spawn such tasks (the engine) take a clone.
    pub fatal: Fatal,
    /// Admission control, evacuation (issue 29).
    pub autoscale: crate::autoscale::Autoscale,
    draining: AtomicBool,
}

impl Gateway {
    /// Assembles a node's state. Each part is built on its own in
    /// `server::run`; a struct of parts would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        hub: Arc<Hub>,
        engine: Arc<dyn Engine>,
        minter: IdMinter,
        metrics: Arc<Metrics>,
        client_auth: Option<ClientAuth>,
        events: Option<Events>,
        fatal: Fatal,
    ) -> Self {
        let limits = Arc::new(ConnectionLimits::from_config(&config));
        let autoscale = crate::autoscale::Autoscale::from_config(&config);
        let partial = Arc::new(PartialBudget::new(config.max_partial_bytes));
        // `listen` is the bound address by now (port 0 resolved).
        let workers = Workers::new(config.listen.port(), metrics.clone());
        Gateway {
            workers,
            config,
            hub,
            engine,
            minter,
            metrics,
            client_auth,
            events,
            partial,
            limits,
            connections: TaskTracker::new(),
            fatal,
            autoscale,
            draining: AtomicBool::new(false),
        }
    }

    /// Whether the node is shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Marks the node as shutting down: not ready, no new connections.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Emits an event about a local connection with its current uid and
    /// session (a no-op unless `--events` is on).
    pub fn event(&self, id: ClientId, detail: Detail) {
        let Some(events) = &self.events else {
            return;
        };
        let uid = self.hub.uid_of(id).flatten();
        let session = self.hub.session_of(id).unwrap_or_default();
        events.emit(Event::new(id, uid, session, detail), &self.metrics);
    }

    /// Sends an event about a local connection to its BusinessWorker, with
    /// its session as GatewayWorker stores it (`''` when it has none).
    pub fn worker_event(&self, route: &Route, id: ClientId, event: workers::Event<'_>) {
        self.workers.send(route, id, event, || {
            self.hub
                .session_of(id)
                .filter(|s| !s.is_empty())
                .map(|s| session_to_php(&s))
                .unwrap_or_default()
        });
    }

    /// Whether the node should receive traffic: not draining, not
    /// evacuating, and the engine usable.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && !self.autoscale.evacuation.is_active() && self.engine.is_ready()
    }
}
