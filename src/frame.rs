//! The WebSocket wire format (RFC 6455) for a server: unmasked frames out,
//! masked frames in.
//!
//! Written by hand because the gateway's memory budget rules out what the
//! libraries do: they keep a read and a write buffer per connection for its
//! whole life. Here an idle connection owns no buffer at all (the reader only
//! holds bytes while a frame is incomplete), and an outgoing frame is encoded
//! once into a shared [`Bytes`] that every recipient's queue clones.

use bytes::{BufMut, Bytes, BytesMut};

/// Frame opcodes (RFC 6455 section 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    /// Continuation of a fragmented message.
    Continuation = 0x0,
    /// UTF-8 text message.
    Text = 0x1,
    /// Binary message.
    Binary = 0x2,
    /// Close.
    Close = 0x8,
    /// Ping.
    Ping = 0x9,
    /// Pong.
    Pong = 0xA,
}

impl Opcode {
    fn from_u8(b: u8) -> Option<Opcode> {
        Some(match b {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// WebSocket close codes gatecast sends.
pub mod close_code {
    /// Normal closure (close_client, ping timeout).
    pub const NORMAL: u16 = 1000;
    /// The server is going away (shutdown): reconnect elsewhere.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A message was larger than --max-message-bytes.
    pub const TOO_BIG: u16 = 1009;
    /// Policy violation: a message that took too long to arrive.
    pub const POLICY: u16 = 1008;
    /// The server could not serve the connection (engine failure).
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The client read too slowly and its queue overflowed.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The client's token expired (`--client-jwt-enforce-exp`): reconnect
    /// with a fresh one. In the range RFC 6455 leaves to applications.
    pub const TOKEN_EXPIRED: u16 = 4001;
}

/// Encodes one complete, unfragmented, unmasked frame.
pub fn encode(opcode: Opcode, payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut buf = BytesMut::with_capacity(len + 10);
    buf.put_u8(0x80 | opcode as u8);
    if len < 126 {
        buf.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        buf.put_u8(126);
        buf.put_u16(len as u16);
    } else {
        buf.put_u8(127);
        buf.put_u64(len as u64);
    }
    buf.put_slice(payload);
    buf.freeze()
}

/// Encodes a close frame with a status code and a short reason.
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    // Control frames carry at most 125 bytes: 2 for the code, the rest reason.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(Opcode::Close, &payload)
}

/// A complete message or control frame received from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A text message (already checked to be UTF-8).
    Text(Vec<u8>),
    /// A binary message.
    Binary(Vec<u8>),
    /// A ping; the payload must be echoed in a pong.
    Ping(Vec<u8>),
    /// A pong.
    Pong,
    /// The client closes, with its status code when it gave one.
    Close(Option<u16>),
}

/// Why the reader gave up on a connection: the close code to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolViolation {
    /// Close code to answer with.
    pub code: u16,
    /// Short reason for the close frame and the logs.
    pub reason: &'static str,
}

const fn violation(code: u16, reason: &'static str) -> ProtocolViolation {
    ProtocolViolation { code, reason }
}

/// The longest frame header (2 bytes, 8 of length, 4 of mask).
const MAX_HEADER: usize = 14;

/// Incremental parser of client frames.
///
/// Holds bytes only while a frame or a fragmented message is incomplete; an
/// idle connection's reader owns no heap memory.
#[derive(Debug, Default)]
pub struct Reader {
    /// Bytes of a frame whose end has not arrived yet.
    partial: Vec<u8>,
    /// A fragmented message being assembled: (is text, payload so far).
    /// Boxed: fragmented messages are rare, and every connection carries
    /// its reader.
    fragments: Option<Box<(bool, Vec<u8>)>>,
}

impl Reader {
    /// Feeds bytes read from the socket; calls `on_message` for every
    /// complete message or control frame, in order.
    pub fn feed(
        &mut self,
        data: &[u8],
        max_message: usize,
        on_message: &mut dyn FnMut(Incoming),
    ) -> Result<(), ProtocolViolation> {
        if self.partial.is_empty() {
            let used = self.parse_all(data, max_message, on_message)?;
            if used < data.len() {
                self.partial.extend_from_slice(&data[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(data);
            let used = self.parse_all(&buf, max_message, on_message)?;
            buf.drain(..used);
            // Keep the allocation only while a frame is still incomplete.
            if !buf.is_empty() {
                self.partial = buf;
            }
        }
        // What a connection may hold of an unfinished message, whatever the
        // mix of partial frame and fragments: one message and a header.
        if self.buffered() > max_message + MAX_HEADER {
            return Err(violation(close_code::TOO_BIG, "message too big"));
        }
        Ok(())
    }

    /// Bytes held for an unfinished frame or message.
    pub fn buffered(&self) -> usize {
        self.partial.len() + self.fragments.as_ref().map_or(0, |f| f.1.len())
    }

    /// Whether a frame or a fragmented message has begun and not ended.
    pub fn is_incomplete(&self) -> bool {
        !self.partial.is_empty() || self.fragments.is_some()
    }

    fn parse_all(
        &mut self,
        mut data: &[u8],
        max_message: usize,
        on_message: &mut dyn FnMut(Incoming),
    ) -> Result<usize, ProtocolViolation> {
        let total = data.len();
        while let Some((header, header_len)) = parse_header(data, max_message)? {
            let frame_len = header_len + header.len;
            if data.len() < frame_len {
                break;
            }
            let mut payload = data[header_len..frame_len].to_vec();
            unmask(&mut payload, header.mask);
            self.on_frame(header, payload, max_message, on_message)?;
            data = &data[frame_len..];
        }
        Ok(total - data.len())
    }

    fn on_frame(
        &mut self,
        header: Header,
        payload: Vec<u8>,
        max_message: usize,
        on_message: &mut dyn FnMut(Incoming),
    ) -> Result<(), ProtocolViolation> {
        match header.opcode {
            Opcode::Ping => on_message(Incoming::Ping(payload)),
            Opcode::Pong => on_message(Incoming::Pong),
            Opcode::Close => on_message(Incoming::Close(parse_close(&payload)?)),
            Opcode::Text | Opcode::Binary => {
                if self.fragments.is_some() {
                    return Err(violation(
                        close_code::PROTOCOL_ERROR,
                        "new message inside a fragmented one",
                    ));
                }
                let text = header.opcode == Opcode::Text;
                if header.fin {
                    on_message(complete(text, payload)?);
                } else {
                    self.fragments = Some(Box::new((text, payload)));
                }
            }
            Opcode::Continuation => {
                let Some(mut fragments) = self.fragments.take() else {
                    return Err(violation(
                        close_code::PROTOCOL_ERROR,
                        "continuation without a message",
                    ));
                };
                let buf = &mut fragments.1;
                if buf.len() + payload.len() > max_message {
                    return Err(violation(close_code::TOO_BIG, "message too big"));
                }
                buf.extend_from_slice(&payload);
                if header.fin {
                    let (text, buf) = *fragments;
                    on_message(complete(text, buf)?);
                } else {
                    self.fragments = Some(fragments);
                }
            }
        }
        Ok(())
    }
}

fn complete(text: bool, payload: Vec<u8>) -> Result<Incoming, ProtocolViolation> {
    if !text {
        return Ok(Incoming::Binary(payload));
    }
    if std::str::from_utf8(&payload).is_err() {
        return Err(violation(close_code::INVALID_PAYLOAD, "text is not UTF-8"));
    }
    Ok(Incoming::Text(payload))
}

fn parse_close(payload: &[u8]) -> Result<Option<u16>, ProtocolViolation> {
    match payload {
        [] => Ok(None),
        [_] => Err(violation(close_code::PROTOCOL_ERROR, "bad close frame")),
        [a, b, reason @ ..] => {
            if std::str::from_utf8(reason).is_err() {
                return Err(violation(close_code::INVALID_PAYLOAD, "bad close reason"));
            }
            let code = u16::from_be_bytes([*a, *b]);
            // Codes an endpoint may send (RFC 6455 section 7.4); 1005, 1006
            // and 1015 only ever describe a close, they are never sent.
            match code {
                1000..=1003 | 1007..=1014 | 3000..=4999 => Ok(Some(code)),
                _ => Err(violation(close_code::PROTOCOL_ERROR, "invalid close code")),
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    opcode: Opcode,
    mask: [u8; 4],
    len: usize,
}

/// Parses a frame header; `None` when more bytes are needed.
fn parse_header(
    data: &[u8],
    max_message: usize,
) -> Result<Option<(Header, usize)>, ProtocolViolation> {
    let [b0, b1, rest @ ..] = data else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(violation(close_code::PROTOCOL_ERROR, "reserved bits set"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = Opcode::from_u8(b0 & 0x0F)
        .ok_or(violation(close_code::PROTOCOL_ERROR, "unknown opcode"))?;
    if b1 & 0x80 == 0 {
        return Err(violation(
            close_code::PROTOCOL_ERROR,
            "client frames must be masked",
        ));
    }
    let (len, rest, ext) = match b1 & 0x7F {
        126 => match rest {
            [a, b, rest @ ..] => (u64::from(u16::from_be_bytes([*a, *b])), rest, 2),
            _ => return Ok(None),
        },
        127 => match rest {
            [a, b, c, d, e, f, g, h, rest @ ..] => (
                u64::from_be_bytes([*a, *b, *c, *d, *e, *f, *g, *h]),
                rest,
                8,
            ),
            _ => return Ok(None),
        },
        n => (u64::from(n), rest, 0),
    };
    if opcode.is_control() && (len > 125 || !fin) {
        return Err(violation(close_code::PROTOCOL_ERROR, "bad control frame"));
    }
    if len > max_message as u64 {
        return Err(violation(close_code::TOO_BIG, "message too big"));
    }
    let [m0, m1, m2, m3, ..] = rest else {
        return Ok(None);
    };
    let header = Header {
        fin,
        opcode,
        mask: [*m0, *m1, *m2, *m3],
        len: len as usize,
    };
    Ok(Some((header, 2 + ext + 4)))
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    // Word-at-a-time: messages of a few KiB unmask in a few hundred ns.
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes(chunk.try_into().expect("8-byte chunk")) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame as browsers send it: masked.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn feed_all(reader: &mut Reader, data: &[u8]) -> Result<Vec<Incoming>, ProtocolViolation> {
        let mut got = Vec::new();
        reader.feed(data, 1 << 20, &mut |m| got.push(m))?;
        Ok(got)
    }

    #[test]
    fn encodes_each_length_form() {
        assert_eq!(&encode(Opcode::Text, b"hi")[..], b"\x81\x02hi");
        let mid = encode(Opcode::Binary, &[7; 300]);
        assert_eq!(&mid[..4], &[0x82, 126, 1, 44]);
        assert_eq!(mid.len(), 304);
        let big = encode(Opcode::Binary, &[7; 70000]);
        assert_eq!(&big[..2], &[0x82, 127]);
        assert_eq!(&big[2..10], &70000u64.to_be_bytes());
    }

    #[test]
    fn close_frame_carries_code_and_truncated_reason() {
        let f = encode_close(1013, &"x".repeat(500));
        assert_eq!(f[0], 0x88);
        assert_eq!(f[1], 125);
        assert_eq!(&f[2..4], &1013u16.to_be_bytes());
    }

    #[test]
    fn parses_messages_split_anywhere() {
        let long = vec![b'a'; 70000];
        let mut wire = client_frame(true, 1, b"hello");
        wire.extend(client_frame(true, 2, &long));
        wire.extend(client_frame(true, 9, b"p"));
        for split in [1, 2, 7, 13, 1000, wire.len() - 1] {
            let mut reader = Reader::default();
            let mut got = feed_all(&mut reader, &wire[..split]).unwrap();
            got.extend(feed_all(&mut reader, &wire[split..]).unwrap());
            assert_eq!(
                got,
                vec![
                    Incoming::Text(b"hello".to_vec()),
                    Incoming::Binary(long.clone()),
                    Incoming::Ping(b"p".to_vec())
                ],
                "split at {split}"
            );
            assert!(reader.partial.is_empty() && reader.partial.capacity() == 0);
        }
    }

    #[test]
    fn assembles_fragments_with_control_frames_between() {
        let mut wire = client_frame(false, 1, b"hel");
        wire.extend(client_frame(true, 9, b""));
        wire.extend(client_frame(true, 0, b"lo"));
        let got = feed_all(&mut Reader::default(), &wire).unwrap();
        assert_eq!(
            got,
            vec![Incoming::Ping(vec![]), Incoming::Text(b"hello".to_vec())]
        );
    }

    #[test]
    fn rejects_protocol_violations() {
        let too_big = client_frame(true, 2, &[0; 11]);
        let mut r = Reader::default();
        let err = r.feed(&too_big, 10, &mut |_| {}).unwrap_err();
        assert_eq!(err.code, close_code::TOO_BIG);

        let unmasked = [0x81, 0x01, b'a'];
        let err = feed_all(&mut Reader::default(), &unmasked).unwrap_err();
        assert_eq!(err.code, close_code::PROTOCOL_ERROR);

        let bad_utf8 = client_frame(true, 1, &[0xff, 0xfe]);
        let err = feed_all(&mut Reader::default(), &bad_utf8).unwrap_err();
        assert_eq!(err.code, close_code::INVALID_PAYLOAD);

        let lone_continuation = client_frame(true, 0, b"x");
        let err = feed_all(&mut Reader::default(), &lone_continuation).unwrap_err();
        assert_eq!(err.code, close_code::PROTOCOL_ERROR);
    }

    #[test]
    fn fragmented_message_is_bounded_too() {
        let mut wire = client_frame(false, 2, &[0; 8]);
        wire.extend(client_frame(true, 0, &[0; 8]));
        let err = Reader::default().feed(&wire, 10, &mut |_| {}).unwrap_err();
        assert_eq!(err.code, close_code::TOO_BIG);
    }

    #[test]
    fn reads_close_codes() {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let got = feed_all(&mut Reader::default(), &client_frame(true, 8, &payload)).unwrap();
        assert_eq!(got, vec![Incoming::Close(Some(1000))]);
        for invalid in [999u16, 1005, 1006, 1015, 2000, 5000] {
            let frame = client_frame(true, 8, &invalid.to_be_bytes());
            let err = feed_all(&mut Reader::default(), &frame).unwrap_err();
            assert_eq!(err.code, close_code::PROTOCOL_ERROR, "code {invalid}");
        }
    }
}

#[cfg(test)]
mod proptests;
