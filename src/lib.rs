//! gatecast: a WebSocket push gateway.
//!
//! Browsers and apps hold a WebSocket to any node; backends push to a
//! connection, a uid, a group or everyone through the HTTP API of any node.
//! The repository's `docs/` describe the API, the Redis layout and the wire
//! format.
//!
//! Layout: [`ws`] is the client transport, [`api`] the HTTP transport,
//! [`hub`] this node's connections and local fan-out, [`engine`] where
//! membership lives and how pushes cross nodes, [`server`] start and stop,
//! [`task`] the background tasks whose failure stops the node, [`register`]
//! GatewayWorker's Register.

#![warn(missing_docs)]

pub mod accept;
pub mod allocator;
pub mod api;
pub mod autoscale;
pub mod browser;
pub mod config;
pub mod engine;
pub mod error;
pub mod events;
pub mod exposition;
pub mod fd_limit;
pub mod frame;
pub mod gateway;
pub mod gatewayworker;
pub mod hub;
pub mod ids;
pub mod metrics;
pub mod name;
pub mod outbox;
pub mod presence;
pub mod push;
pub mod push_latency;
pub mod recovery;
pub mod redact;
pub mod server;
pub mod session;
pub mod stats;
pub mod tail;
pub mod task;
pub mod ws;

pub use config::Config;
pub use server::run;
