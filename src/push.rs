//! What a push is: a message and the connections it goes to.

use bytes::Bytes;

use crate::frame::{self, Opcode};
use crate::ids::ClientId;

/// A message exactly as pushed: its bytes reach the client unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Sent as a binary frame (pushed as `data_base64`) rather than text.
    pub binary: bool,
    /// The payload.
    pub data: Bytes,
}

impl Message {
    /// A text message.
    pub fn text(data: impl Into<Bytes>) -> Self {
        Message {
            binary: false,
            data: data.into(),
        }
    }

    /// A binary message.
    pub fn binary(data: impl Into<Bytes>) -> Self {
        Message {
            binary: true,
            data: data.into(),
        }
    }

    /// The complete WebSocket frame, encoded once and shared by every
    /// recipient.
    pub fn frame(&self) -> Bytes {
        encode_frame(self.binary, &self.data)
    }
}

/// The complete WebSocket frame of a message's bytes: binary or text.
pub fn encode_frame(binary: bool, data: &[u8]) -> Bytes {
    let opcode = if binary { Opcode::Binary } else { Opcode::Text };
    frame::encode(opcode, data)
}

/// The last message of a close, in both shapes: exactly as pushed, and
/// framed for a connection that opted in to recovery (docs/recovery.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastFrame {
    /// The frame of exactly the bytes pushed.
    pub plain: Bytes,
    /// The frame with the header `{}` (never kept in history).
    pub framed: Bytes,
}

impl LastFrame {
    /// Both frames of a message.
    pub fn of(binary: bool, data: &[u8]) -> Self {
        LastFrame {
            plain: encode_frame(binary, data),
            framed: crate::recovery::framing::encode(binary, None, data),
        }
    }

    /// Whole frames built by the caller (GatewayWorker's raw pushes): sent
    /// as given, and to connections that opted in to recovery each message
    /// with the header `{}` ([`crate::recovery::framing::reframe`]).
    pub fn raw(frame: Bytes) -> Self {
        LastFrame {
            framed: crate::recovery::framing::reframe(&frame).unwrap_or_else(|| frame.clone()),
            plain: frame,
        }
    }
}

/// Who a push goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One connection.
    Client(ClientId),
    /// These connections (send_to_all with `client_ids`).
    Clients(Vec<ClientId>),
    /// Every connection bound to one of these uids.
    Uids(Vec<String>),
    /// Every member of one of these groups; a connection in several of them
    /// receives the message once.
    Groups(Vec<String>),
    /// Every connection.
    All,
}

impl Target {
    /// The metric label of this kind of target.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Client(_) => "client",
            Target::Clients(_) => "clients",
            Target::Uids(_) => "uid",
            Target::Groups(_) => "group",
            Target::All => "all",
        }
    }
}

/// A message, its target and the connections left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// Who receives it.
    pub target: Target,
    /// Connections that do not receive it even when targeted.
    pub exclude: Vec<ClientId>,
    /// What they receive.
    pub message: Message,
    /// Keep it in its streams' history (`Some(true)`), not (`Some(false)`),
    /// or as `--history-streams` says (`None`).
    pub history: Option<bool>,
}

/// What a push did on this node.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Connections whose queue took the message.
    pub queued: usize,
    /// Connections closed because their queue was full.
    pub overflowed: usize,
}
