//! Per-connection sessions: a JSON object, replaced by set_session and merged
//! by update_session, and the bounds every session is held to.
//!
//! [`check`] is the one test of a session's size and depth: the hub runs it
//! on every change (API, GatewayWorker's inner port, Redis commands), and
//! the edges that can answer the sender run it first too (the API, the
//! client's token), so a refusal is a clear error there.

use serde_json::Value;

pub use gatecast_emitter::Session;

/// Deepest nesting of a session, the session object itself being level 1.
/// Far below serde_json's recursion limit (128) and PHP's (128 arrays
/// here), so every node and every PHP worker reads back any session
/// gatecast accepted, instead of a deeper one failing to parse elsewhere
/// and reading as `{}`.
pub const MAX_DEPTH: usize = 64;

/// `--max-session-bytes`' default: 64 KiB of JSON.
pub const DEFAULT_MAX_BYTES: usize = 64 << 10;

/// Why a session is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// Larger than `--max-session-bytes`, as JSON.
    #[error("session of {len} bytes or more is above --max-session-bytes ({max})")]
    TooLarge {
        /// Bytes counted before giving up (at least `max + 1`).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("session nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

impl SessionError {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            SessionError::TooLarge { .. } => "too_large",
            SessionError::TooDeep => "too_deep",
        }
    }
}

/// Checks `session` against `max_bytes` (its compact JSON length) and
/// [`MAX_DEPTH`], without building its JSON.
pub fn check(session: &Session, max_bytes: usize) -> Result<(), SessionError> {
    if depth_over(session.values(), 1) {
        return Err(SessionError::TooDeep);
    }
    let mut counter = Counter {
        len: 0,
        max: max_bytes,
    };
    // The counter fails the write once past the limit: a huge session
    // costs no more than the limit to check.
    if serde_json::to_writer(&mut counter, session).is_err() || counter.len > max_bytes {
        return Err(SessionError::TooLarge {
            len: counter.len,
            max: max_bytes,
        });
    }
    Ok(())
}

/// Whether any of `values`, found at `level`, nests past [`MAX_DEPTH`].
fn depth_over<'a>(values: impl Iterator<Item = &'a Value>, level: usize) -> bool {
    values.into_iter().any(|value| match value {
        Value::Object(map) => level + 1 > MAX_DEPTH || depth_over(map.values(), level + 1),
        Value::Array(items) => level + 1 > MAX_DEPTH || depth_over(items.iter(), level + 1),
        _ => false,
    })
}

/// Counts bytes written, failing past `max`.
struct Counter {
    len: usize,
    max: usize,
}

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.len += buf.len();
        if self.len > self.max {
            return Err(std::io::ErrorKind::FileTooLarge.into());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Merges `update` into `session` as GatewayWorker's updateSession does
/// (PHP's `array_replace_recursive`): nested objects merge key by key, any
/// other value replaces what was there.
pub fn merge(session: &mut Session, update: Session) {
    for (key, value) in update {
        match (session.get_mut(&key), value) {
            (Some(Value::Object(old)), Value::Object(new)) => merge(old, new),
            (_, value) => {
                session.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(levels: usize) -> Session {
        // `levels` objects in all, the session included.
        let mut value = json!(1);
        for _ in 0..levels {
            value = json!({ "k": value });
        }
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn sessions_are_held_to_a_size_and_a_depth() {
        let small = json!({"a": "x".repeat(100)}).as_object().cloned().unwrap();
        assert_eq!(check(&small, 200), Ok(()));
        let len = serde_json::to_vec(&small).unwrap().len();
        assert_eq!(check(&small, len), Ok(()));
        assert!(matches!(
            check(&small, len - 1),
            Err(SessionError::TooLarge { .. })
        ));
        assert_eq!(check(&Session::new(), 2), Ok(()));
        assert_eq!(check(&nested(MAX_DEPTH), DEFAULT_MAX_BYTES), Ok(()));
        assert_eq!(
            check(&nested(MAX_DEPTH + 1), DEFAULT_MAX_BYTES),
            Err(SessionError::TooDeep)
        );
        // Arrays count as levels too.
        let mut value = json!(1);
        for _ in 0..MAX_DEPTH {
            value = json!([value]);
        }
        let deep_list = json!({ "k": value }).as_object().cloned().unwrap();
        assert_eq!(
            check(&deep_list, DEFAULT_MAX_BYTES),
            Err(SessionError::TooDeep)
        );
        // What passes reads back on any node (serde_json's own limit).
        let json = serde_json::to_string(&nested(MAX_DEPTH)).unwrap();
        assert!(serde_json::from_str::<Session>(&json).is_ok());
    }

    #[test]
    fn merge_replaces_scalars_and_merges_objects() {
        let mut s = json!({"a": 1, "nested": {"x": 1, "y": 2}, "keep": true})
            .as_object()
            .cloned()
            .unwrap();
        let update = json!({"a": 2, "nested": {"y": 3, "z": 4}, "new": [1]})
            .as_object()
            .cloned()
            .unwrap();
        merge(&mut s, update);
        assert_eq!(
            Value::Object(s),
            json!({"a": 2, "nested": {"x": 1, "y": 3, "z": 4}, "keep": true, "new": [1]})
        );
    }
}
