//! The `pos` parameter of `/ws`: URL-safe base64 (no padding) of a JSON
//! object `{"<stream>":["<epoch>",offset],...}`, the last position the
//! client received per stream. Bounded, and refused whole (HTTP 400 before
//! the upgrade) when malformed.

use std::collections::BTreeMap;

use base64::Engine as _;

/// Longest `pos` accepted, in characters.
pub const MAX_ENCODED: usize = 8192;
/// Most streams one `pos` may name.
pub const MAX_STREAMS: usize = 64;
/// Longest epoch accepted.
const MAX_EPOCH: usize = 64;

/// The client's last position per stream, in stream order.
pub type Positions = BTreeMap<String, (String, u64)>;

/// Why `pos` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PosError {
    /// Longer than [`MAX_ENCODED`].
    #[error("pos is longer than {MAX_ENCODED} characters")]
    TooLong,
    /// Not URL-safe base64.
    #[error("pos is not URL-safe base64")]
    Base64,
    /// Not a JSON object of `[epoch, offset]` pairs.
    #[error("pos is not a JSON object of \"stream\": [\"epoch\", offset]")]
    Shape,
    /// More than [`MAX_STREAMS`] streams.
    #[error("pos names more than {MAX_STREAMS} streams")]
    TooMany,
    /// A name that is not `u:<uid>`, `g:<group>` or `all`.
    #[error("pos names {0:?}, not a stream (u:<uid>, g:<group>, all)")]
    Stream(String),
}

/// Whether `name` is a stream name: `u:<uid>`, `g:<group>`, `all`.
pub fn is_stream(name: &str) -> bool {
    name == "all"
        || name.strip_prefix("u:").is_some_and(|n| !n.is_empty())
        || name.strip_prefix("g:").is_some_and(|n| !n.is_empty())
}

/// Parses `pos`.
pub fn parse(pos: &str) -> Result<Positions, PosError> {
    if pos.len() > MAX_ENCODED {
        return Err(PosError::TooLong);
    }
    let trimmed = pos.trim_end_matches('=');
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(trimmed)
        .map_err(|_| PosError::Base64)?;
    let raw: BTreeMap<String, (String, u64)> =
        serde_json::from_slice(&json).map_err(|_| PosError::Shape)?;
    if raw.len() > MAX_STREAMS {
        return Err(PosError::TooMany);
    }
    for (stream, (epoch, _)) in &raw {
        if !is_stream(stream) {
            return Err(PosError::Stream(stream.chars().take(64).collect()));
        }
        if epoch.len() > MAX_EPOCH {
            return Err(PosError::Shape);
        }
    }
    Ok(raw)
}

/// Encodes positions as a client sends them (tests, examples).
pub fn encode(positions: &Positions) -> String {
    let json = serde_json::to_vec(positions).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_bad_ones_are_refused() {
        let mut p = Positions::new();
        p.insert("u:alice".into(), ("ep".into(), 42));
        p.insert("g:room1".into(), ("e2".into(), 0));
        p.insert("all".into(), ("e3".into(), 7));
        assert_eq!(parse(&encode(&p)), Ok(p));
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        assert_eq!(parse("!!"), Err(PosError::Base64));
        assert_eq!(parse(&b64("[1]")), Err(PosError::Shape));
        assert_eq!(parse(&b64(r#"{"u:a":["e",-1]}"#)), Err(PosError::Shape));
        assert_eq!(
            parse(&b64(r#"{"x:a":["e",1]}"#)),
            Err(PosError::Stream("x:a".into()))
        );
        assert_eq!(parse(&"A".repeat(MAX_ENCODED + 1)), Err(PosError::TooLong));
        let many: String = (0..=MAX_STREAMS)
            .map(|i| format!("\"u:{i}\":[\"e\",1]"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(parse(&b64(&format!("{{{many}}}"))), Err(PosError::TooMany));
    }
}
