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

/// Whole frames built by a GatewayWorker caller (the raw flag: the bytes go
/// to the socket as given), as a connection that opted in to recovery must
/// get them: each message (a text or binary frame, or a fragmented one
/// joined) with the header `{}` (never kept: a raw body is not a payload
/// the node can keep), control frames (ping, pong, close) as given. `None`
/// when the bytes are not whole, unmasked, unextended server frames: those
/// cannot be framed, and go as given, as to every other connection.
pub fn reframe(raw: &[u8]) -> Option<Bytes> {
    let mut out = BytesMut::with_capacity(raw.len() + 8);
    let mut rest = raw;
    // A fragmented message being joined: binary, and its bytes so far.
    let mut message: Option<(bool, Vec<u8>)> = None;
    while !rest.is_empty() {
        let (b0, b1) = (*rest.first()?, *rest.get(1)?);
        if b1 & 0x80 != 0 || b0 & 0x70 != 0 {
            // Masked (a client's frame) or with extension bits.
            return None;
        }
        let (len, start): (usize, usize) = match b1 & 0x7f {
            126 => (
                u16::from_be_bytes([*rest.get(2)?, *rest.get(3)?]) as usize,
                4,
            ),
            127 => {
                let n = u64::from_be_bytes(rest.get(2..10)?.try_into().ok()?);
                (usize::try_from(n).ok()?, 10)
            }
            n => (n as usize, 2),
        };
        let end = start.checked_add(len)?;
        let payload = rest.get(start..end)?;
        let whole = &rest[..end];
        rest = &rest[end..];
        let fin = b0 & 0x80 != 0;
        match b0 & 0x0f {
            op @ (1 | 2) if message.is_none() => match fin {
                true => out.put_slice(&encode(op == 2, None, payload)),
                false => message = Some((op == 2, payload.to_vec())),
            },
            0 => {
                let (binary, mut data) = message.take()?;
                data.extend_from_slice(payload);
                match fin {
                    true => out.put_slice(&encode(binary, None, &data)),
                    false => message = Some((binary, data)),
                }
            }
            // Control frames, which may come between fragments.
            8..=10 => out.put_slice(whole),
            _ => return None,
        }
    }
    message.is_none().then(|| out.freeze())
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

/// The `position` control frame: where the connection stands in a stream
/// kept in history that it is a member of but holds no position in (it
/// just became a member, or its resume could not recover the stream). A
/// client keeps it as it keeps a push's header, so that it can always name
/// the stream when it resumes.
pub fn position(p: PositionRef<'_>) -> Bytes {
    let text = serde_json::json!({"type": "position", "s": p.stream, "e": p.epoch, "o": p.offset})
        .to_string();
    frame::encode(Opcode::Text, text.as_bytes())
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
        assert_eq!(position_of_frame(&frame), Some(p.clone()));
        let plain = encode(false, None, b"hi");
        assert_eq!(&plain[2..], b"{}\nhi");
        assert_eq!(position_of_frame(&plain), None);
        assert!(is_push_frame(&plain) && is_push_frame(&frame));
        assert!(!is_push_frame(&frame::encode(
            Opcode::Text,
            br#"{"type":"welcome"}"#
        )));
        assert!(!is_push_frame(&frame::encode(Opcode::Ping, b"")));
        let at = position(p.as_ref());
        assert!(!is_push_frame(&at));
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&at[2..]).unwrap(),
            serde_json::json!({"type":"position","s":"g:room\n1","e":"e1","o":42})
        );
        // A caller's raw frames: each message framed, control frames kept.
        let text = frame::encode(Opcode::Text, b"a\nb");
        let ping = frame::encode(Opcode::Ping, b"p");
        let long = frame::encode(Opcode::Binary, &[7u8; 300]);
        let fragments: &[u8] = &[0x01, 2, b'h', b'e', 0x89, 0, 0x80, 1, b'y'];
        let raw = [&text[..], &ping[..], &long[..], fragments].concat();
        let mut want = encode(false, None, b"a\nb").to_vec();
        want.extend_from_slice(&ping);
        want.extend_from_slice(&encode(true, None, &[7u8; 300]));
        want.extend_from_slice(&[0x89, 0]);
        want.extend_from_slice(&encode(false, None, b"hey"));
        assert_eq!(reframe(&raw).as_deref(), Some(&want[..]));
        // Not whole frames, masked, or a fragment never finished.
        assert_eq!(reframe(&text[..text.len() - 1]), None);
        assert_eq!(reframe(&[0x81, 0x81, 1, 2, 3, 4, 5]), None);
        assert_eq!(reframe(&[0x01, 1, b'x']), None);
        assert_eq!(reframe(&[0x80, 1, b'x']), None);
        let big = encode(false, None, &vec![b'x'; 70_000]);
        assert_eq!(position_of_frame(&big), None);
    }
}
