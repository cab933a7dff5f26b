//! How pushes reach connections that opted in to recovery: a header line
//! (compact JSON, `{"s":..,"e":..,"o":..}` or `{}`), `\n`, then the payload
//! exactly as pushed, in a text or binary frame as pushed. Each variant of a
//! push is encoded once and shared by every recipient.

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};

use crate::frame::{self, Opcode};
use bytes::Bytes;

/// Where a push kept in history sits: its stream, epoch and offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The stream: `u:<uid>`, `g:<group>` or `all`.
    #[serde(rename = "s")]
    pub stream: String,
    /// The stream's epoch.
    #[serde(rename = "e")]
    pub epoch: String,
    /// The push's offset in the stream.
    #[serde(rename = "o")]
    pub offset: u64,
}

/// A position borrowed from where it was read (an envelope, a header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PositionRef<'a> {
    /// See [`Position::stream`].
    pub stream: &'a str,
    /// See [`Position::epoch`].
    pub epoch: &'a str,
    /// See [`Position::offset`].
    pub offset: u64,
}

impl Position {
    /// This position, borrowed.
    pub fn as_ref(&self) -> PositionRef<'_> {
        PositionRef {
            stream: &self.stream,
            epoch: &self.epoch,
            offset: self.offset,
        }
    }
}

/// The header line of a push at `position` (`{}` for one not kept).
pub fn header(position: Option<PositionRef<'_>>) -> Vec<u8> {
    match position {
        None => b"{}".to_vec(),
        Some(p) => {
            #[derive(Serialize)]
            struct H<'a> {
                s: &'a str,
                e: &'a str,
                o: u64,
            }
            // Serializing strings and a number cannot fail; compact JSON
            // escapes any newline inside the strings.
            serde_json::to_vec(&H {
                s: p.stream,
                e: p.epoch,
                o: p.offset,
            })
            .unwrap_or_else(|_| b"{}".to_vec())
        }
    }
}

/// The complete WebSocket frame of a push for an opted-in connection:
/// header, `\n`, payload; text or binary as pushed.
pub fn encode(binary: bool, position: Option<PositionRef<'_>>, data: &[u8]) -> Bytes {
    let header = header(position);
    let mut payload = BytesMut::with_capacity(header.len() + 1 + data.len());
    payload.put_slice(&header);
    payload.put_u8(b'\n');
    payload.put_slice(data);
    let opcode = if binary { Opcode::Binary } else { Opcode::Text };
    frame::encode(opcode, &payload)
}

/// The header line of an encoded push frame (server frames are not masked);
/// `None` for a control frame (welcome, pong, ping, close).
fn header_of_frame(frame: &[u8]) -> Option<&[u8]> {
    let opcode = frame.first()? & 0x0f;
    if opcode != Opcode::Text as u8 && opcode != Opcode::Binary as u8 {
        return None;
    }
    let start = match frame.get(1)? & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let payload = frame.get(start..)?;
    let end = payload.iter().position(|b| *b == b'\n')?;
    Some(&payload[..end])
}

/// Whether an encoded frame is a push (it has a header line), not a control
/// frame.
pub fn is_push_frame(frame: &[u8]) -> bool {
    header_of_frame(frame).is_some_and(|h| h.first() == Some(&b'{'))
}

/// The position in the header of an encoded frame, when it is a push kept
/// in history: how held frames are matched against a replay.
pub fn position_of_frame(frame: &[u8]) -> Option<Position> {
    serde_json::from_slice(header_of_frame(frame)?).ok()
}

/// The `recovered` control frame: every stream named in the client's
/// positions, true when its replay was complete.
pub fn recovered(streams: &[(String, bool)]) -> Bytes {
    let mut map = serde_json::Map::new();
    for (stream, ok) in streams {
        map.insert(stream.clone(), (*ok).into());
    }
    let text = serde_json::json!({"type": "recovered", "streams": map}).to_string();
    frame::encode(Opcode::Text, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_framed_push_keeps_its_bytes_and_its_header_reads_back() {
        let p = Position {
            stream: "g:room\n1".into(),
            epoch: "e1".into(),
            offset: 42,
        };
        let data = vec![0u8, 10, 255, 10];
        let frame = encode(true, Some(p.as_ref()), &data);
        assert_eq!(frame[0], 0x82);
        let payload = &frame[2..];
        let nl = payload.iter().position(|b| *b == b'\n').unwrap();
        assert_eq!(&payload[nl + 1..], &data[..]);
        assert_eq!(position_of_frame(&frame), Some(p));
        let plain = encode(false, None, b"hi");
        assert_eq!(&plain[2..], b"{}\nhi");
        assert_eq!(position_of_frame(&plain), None);
        assert!(is_push_frame(&plain) && is_push_frame(&frame));
        assert!(!is_push_frame(&frame::encode(
            Opcode::Text,
            br#"{"type":"welcome"}"#
        )));
        assert!(!is_push_frame(&frame::encode(Opcode::Ping, b"")));
        let big = encode(false, None, &vec![b'x'; 70_000]);
        assert_eq!(position_of_frame(&big), None);
    }
}
