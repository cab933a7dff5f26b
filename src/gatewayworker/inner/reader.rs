//! Packets off one inner connection, within a node-wide byte budget.
//!
//! The decoder would reserve room for a whole packet as soon as its header
//! names the length (up to `--inner-max-packet`): a few hundred sockets
//! each announcing 10 MiB would take gigabytes. Here every connection takes
//! the bytes it buffers from one node-wide budget first; a connection that
//! cannot get them is closed (it is the one asking for more than is left),
//! and a packet gives its bytes back when it is dropped. A packet that began
//! must arrive whole in time, so nobody holds budget for long.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::gatewayworker::protocol::{self, Packet, ProtocolError, HEADER_LEN};

/// Bytes read at once (and taken from the budget) before the length of a
/// packet is known.
const CHUNK: usize = 4096;

/// Why no packet came.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// Not a packet (too long for this connection, malformed, I/O error).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The node-wide budget for inner read buffers cannot hold this packet.
    #[error("no room for a {need}-byte packet in the node's inner read budget")]
    Budget {
        /// The bytes asked for.
        need: usize,
    },
    /// Nothing came within the idle limit.
    #[error("idle for {0:?}")]
    Idle(Duration),
    /// A packet began but did not arrive whole in time.
    #[error("a packet did not arrive whole within {0:?}")]
    Slow(Duration),
}

/// The budget a packet's bytes hold until it is dropped.
pub(crate) struct Held(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

/// Reads one connection's packets.
pub(crate) struct PacketReader {
    read: OwnedReadHalf,
    buf: BytesMut,
    budget: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
    /// When the first byte of the packet being read arrived.
    started: Option<Instant>,
}

impl PacketReader {
    /// Reads `read`, taking its buffer from `budget` (in bytes).
    pub(crate) fn new(read: OwnedReadHalf, budget: Arc<Semaphore>) -> PacketReader {
        PacketReader {
            read,
            buf: BytesMut::new(),
            budget,
            held: None,
            started: None,
        }
    }

    /// The next packet of at most `max_packet` bytes, with the budget it
    /// holds; `Ok(None)` at the end of the stream (a half-sent packet is
    /// dropped). Between packets the peer may be silent for `idle` (`None`:
    /// for ever); once a packet began it must arrive whole within `whole`.
    /// Cancel-safe: bytes read stay buffered.
    pub(crate) async fn next(
        &mut self,
        max_packet: usize,
        idle: Option<Duration>,
        whole: Duration,
    ) -> Result<Option<(Packet, Held)>, ReadError> {
        loop {
            let need = match peek_len(&self.buf) {
                Some(len) if (HEADER_LEN..=max_packet).contains(&len) => len.max(CHUNK),
                // The decoder refuses it before reserving anything.
                Some(_) => 0,
                None => CHUNK,
            };
            self.hold(need)?;
            if let Some(packet) = protocol::decode(&mut self.buf, max_packet)? {
                self.started = (!self.buf.is_empty()).then(Instant::now);
                return Ok(Some((packet, Held(self.held.take()))));
            }
            if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(CHUNK);
            }
            let read = self.read.read_buf(&mut self.buf);
            let n = match self.started {
                Some(started) => tokio::time::timeout_at(started + whole, read)
                    .await
                    .map_err(|_| ReadError::Slow(whole))?,
                None => match idle {
                    Some(idle) => tokio::time::timeout(idle, read)
                        .await
                        .map_err(|_| ReadError::Idle(idle))?,
                    None => read.await,
                },
            }
            .map_err(ProtocolError::Io)?;
            if n == 0 {
                return Ok(None);
            }
            self.started.get_or_insert_with(Instant::now);
        }
    }

    /// Holds at least `need` bytes of the budget for the buffer. The first
    /// [`CHUNK`] of every connection is not taken from it (the connection
    /// caps bound those), so that small calls always get through, even
    /// while large packets hold the whole budget.
    fn hold(&mut self, need: usize) -> Result<(), ReadError> {
        let need = need.saturating_sub(CHUNK);
        let have = self.held.as_ref().map_or(0, |p| p.num_permits());
        if have >= need {
            return Ok(());
        }
        let more = u32::try_from(need - have).map_err(|_| ReadError::Budget { need })?;
        let permit = self
            .budget
            .clone()
            .try_acquire_many_owned(more)
            .map_err(|_| ReadError::Budget { need })?;
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
        Ok(())
    }
}

/// The packet length a buffer starts with, once it holds 4 bytes.
fn peek_len(buf: &[u8]) -> Option<usize> {
    let bytes = buf.get(..4)?;
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize)
}
