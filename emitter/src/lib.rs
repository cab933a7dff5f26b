//! gatecast's public wire format, and an emitter that uses it.
//!
//! A backend that already holds a Redis connection can push to gatecast's
//! WebSocket clients without calling its HTTP API: every push is one
//! `PUBLISH` (`SPUBLISH` on Redis Cluster) of a MessagePack [`Envelope`]
//! on a gatecast channel. This crate holds that format (the gateway itself
//! uses it) and [`Emitter`], which publishes it with fred.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use fred::prelude::*;
//! use gatecast_emitter::{Emitter, Message};
//!
//! let client = Builder::from_config(Config::from_url("redis://127.0.0.1:6379")?).build()?;
//! client.init().await?;
//! let emitter = Emitter::new(client, "gatecast");
//! emitter.send_to_group("room-1", Message::text("hello room"), &[]).await?;
//! emitter.send_to_uid("alice", Message::text("hello alice")).await?;
//! # Ok(()) }
//! ```
//!
//! docs/publishing.md describes the format for other languages.

#![warn(missing_docs)]

pub mod emitter;
pub mod envelope;
pub mod ids;
pub mod keys;

pub use emitter::{EmitError, Emitter, Message};
pub use envelope::{Envelope, EnvelopeRef, Op};
pub use ids::{ClientId, NodeId};

/// A connection's session: a JSON object.
pub type Session = serde_json::Map<String, serde_json::Value>;
