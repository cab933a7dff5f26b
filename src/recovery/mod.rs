//! Recovery across reconnects (docs/recovery.md): what a connection that
//! opted in with `/ws?recover=1` gets back when it reconnects to any node.
//!
//! [`resume`] holds resume tokens and records (uid, groups and session
//! restored under the new client_id); [`history`] the bounded history of
//! pushes per stream; [`replay`] the replay a resuming connection gets;
//! [`positions`] the client's last position per stream; [`framing`] the
//! header framing of pushes.

pub mod framing;
pub mod history;
pub mod positions;
pub mod replay;
pub mod resume;

/// The recovery parameters of `/ws`, raw: `recover=1`, `resume=<token>`,
/// `pos=<positions>`. Each part parses its own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryQuery {
    /// The connection opted in (`recover=1`, or a `resume=` token).
    pub recover: bool,
    /// The token of the connection to resume, as sent.
    pub resume: Option<String>,
    /// The last position per stream, as sent.
    pub pos: Option<String>,
}
