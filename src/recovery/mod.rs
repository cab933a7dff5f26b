//! Recovery across reconnects (docs/recovery.md): resume records, the
//! bounded history of pushes per stream, positions and the framing of
//! pushes for connections that opted in.

pub mod framing;
pub mod history;
pub mod positions;

/// The recovery parameters of `/ws`, as given (raw strings; each part
/// parses its own).
#[derive(Debug, Clone, Default)]
pub struct RecoveryQuery {
    /// `recover=1`: the connection opted in.
    pub recover: bool,
    /// `resume=<token>`.
    pub resume: Option<String>,
    /// `pos=<positions>`.
    pub pos: Option<String>,
}
