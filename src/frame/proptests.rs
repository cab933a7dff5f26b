//! Properties of the client frame reader: any bytes a client sends, cut
//! anywhere, give messages or a close code, never a panic, and never more
//! held than one message; what a well-behaved client sends comes out
//! unchanged.

use proptest::prelude::*;

use super::*;

/// What a client means to send.
#[derive(Debug, Clone)]
enum Sent {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

impl Sent {
    fn expected(&self) -> Incoming {
        match self {
            Sent::Text(t) => Incoming::Text(t.as_bytes().to_vec()),
            Sent::Binary(b) => Incoming::Binary(b.clone()),
            Sent::Ping(p) => Incoming::Ping(p.clone()),
            Sent::Pong(_) => Incoming::Pong,
            Sent::Close(c) => Incoming::Close(c.as_ref().map(|(code, _)| *code)),
        }
    }
}

fn arb_close_code() -> impl Strategy<Value = u16> {
    prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999]
}

fn arb_sent() -> impl Strategy<Value = Sent> {
    prop_oneof![
        ".{0,40}".prop_map(Sent::Text),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(Sent::Binary),
        prop::collection::vec(any::<u8>(), 0..=125).prop_map(Sent::Ping),
        prop::collection::vec(any::<u8>(), 0..=125).prop_map(Sent::Pong),
        proptest::option::of((arb_close_code(), "[a-z ]{0,30}")).prop_map(Sent::Close),
    ]
}

/// One masked client frame.
fn frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
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

/// The wire bytes of `sent`: data messages cut in `pieces` fragments (when
/// there are bytes to cut), with a ping between the first two.
fn wire(sent: &[(Sent, usize, [u8; 4])]) -> (Vec<u8>, Vec<Incoming>) {
    let mut out = Vec::new();
    let mut want = Vec::new();
    for (s, pieces, mask) in sent {
        match s {
            Sent::Text(_) | Sent::Binary(_) => {
                let (opcode, bytes) = match s {
                    Sent::Text(t) => (1, t.as_bytes()),
                    Sent::Binary(b) => (2, &b[..]),
                    _ => unreachable!(),
                };
                let pieces = (*pieces).clamp(1, bytes.len().max(1));
                let size = bytes.len().div_ceil(pieces).max(1);
                let chunks: Vec<&[u8]> = if bytes.is_empty() {
                    vec![&[]]
                } else {
                    bytes.chunks(size).collect()
                };
                for (i, chunk) in chunks.iter().enumerate() {
                    let op = if i == 0 { opcode } else { 0 };
                    out.extend(frame(i + 1 == chunks.len(), op, chunk, *mask));
                    if i == 0 && chunks.len() > 1 {
                        // Control frames may come between fragments.
                        out.extend(frame(true, 9, b"mid", *mask));
                        want.push(Incoming::Ping(b"mid".to_vec()));
                    }
                }
            }
            Sent::Ping(p) => out.extend(frame(true, 9, p, *mask)),
            Sent::Pong(p) => out.extend(frame(true, 10, p, *mask)),
            Sent::Close(c) => {
                let payload = match c {
                    None => Vec::new(),
                    Some((code, reason)) => {
                        let mut p = code.to_be_bytes().to_vec();
                        p.extend_from_slice(reason.as_bytes());
                        p
                    }
                };
                out.extend(frame(true, 8, &payload, *mask));
            }
        }
        want.push(s.expected());
    }
    (out, want)
}

/// Feeds `bytes` cut at `cuts`; returns what came out and how it ended.
fn feed_cut(
    reader: &mut Reader,
    bytes: &[u8],
    cuts: &[prop::sample::Index],
    max: usize,
) -> (Vec<Incoming>, Result<(), ProtocolViolation>) {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    at.push(bytes.len());
    at.sort_unstable();
    let mut got = Vec::new();
    let mut from = 0;
    for to in at {
        let result = reader.feed(&bytes[from..to], max, &mut |m| got.push(m));
        from = to;
        if result.is_err() {
            return (got, result);
        }
        // Never more held than one message and a header.
        assert!(
            reader.buffered() <= max + MAX_HEADER,
            "holds {}",
            reader.buffered()
        );
    }
    (got, Ok(()))
}

/// A violation carries a close code the server may send and a reason.
fn well_formed(v: &ProtocolViolation) -> bool {
    [
        close_code::PROTOCOL_ERROR,
        close_code::INVALID_PAYLOAD,
        close_code::TOO_BIG,
    ]
    .contains(&v.code)
        && !v.reason.is_empty()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn what_a_client_sends_comes_out_unchanged_however_cut(
        sent in prop::collection::vec((arb_sent(), 1usize..4, any::<[u8; 4]>()), 1..6),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let (bytes, want) = wire(&sent);
        let mut reader = Reader::default();
        let (got, end) = feed_cut(&mut reader, &bytes, &cuts, 1 << 16);
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(got, want);
        prop_assert!(!reader.is_incomplete());
        prop_assert_eq!(reader.buffered(), 0);
    }

    #[test]
    fn any_bytes_give_messages_or_a_close_code(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        max in 0usize..300,
    ) {
        let (got, end) = feed_cut(&mut Reader::default(), &bytes, &cuts, max);
        if let Err(v) = end {
            prop_assert!(well_formed(&v), "{:?}", v);
        }
        for m in got {
            match m {
                Incoming::Text(t) => {
                    prop_assert!(t.len() <= max);
                    prop_assert!(std::str::from_utf8(&t).is_ok());
                }
                Incoming::Binary(b) => prop_assert!(b.len() <= max),
                Incoming::Ping(p) => prop_assert!(p.len() <= 125),
                Incoming::Pong | Incoming::Close(_) => {}
            }
        }
    }

    #[test]
    fn headers_that_are_almost_right_never_panic(
        b0 in any::<u8>(),
        len in prop_oneof![0u64..130, Just(126), Just(127), 0xFFF0u64..0x1_0010, any::<u64>()],
        form in 0u8..3,
        rest in prop::collection::vec(any::<u8>(), 0..64),
        max in 0usize..200,
    ) {
        // The header a client would send for `len`, in any of the three
        // length forms, masked, with whatever follows.
        let mut bytes = vec![b0];
        match form {
            0 => bytes.push(0x80 | (len as u8 & 0x7F)),
            1 => {
                bytes.push(0x80 | 126);
                bytes.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                bytes.push(0x80 | 127);
                bytes.extend_from_slice(&len.to_be_bytes());
            }
        }
        bytes.extend_from_slice(&rest);
        let (_, end) = feed_cut(&mut Reader::default(), &bytes, &[], max);
        if let Err(v) = end {
            prop_assert!(well_formed(&v), "{:?}", v);
        }
    }

    #[test]
    fn server_frames_carry_the_payload_exactly(
        // Around each length form's limits: 125/126 and 65535/65536.
        // (random bytes, then a run of one byte: cheap to generate).
        payload in (
            prop::collection::vec(any::<u8>(), 0..200),
            prop_oneof![0usize..200, 65_330usize..65_340],
            any::<u8>(),
        ).prop_map(|(mut head, run, byte)| {
            head.resize(head.len() + run, byte);
            head
        }),
        binary in any::<bool>(),
    ) {
        // Read back by the client reader once given a zero mask: the
        // length forms agree both ways.
        let opcode = if binary { Opcode::Binary } else { Opcode::Text };
        let encoded = encode(opcode, &payload);
        let header = match encoded[1] { 126 => 4, 127 => 10, _ => 2 };
        let mut masked = encoded[..header].to_vec();
        masked[1] |= 0x80;
        masked.extend_from_slice(&[0; 4]);
        masked.extend_from_slice(&encoded[header..]);
        prop_assert_eq!(encoded.len(), header + payload.len());
        let mut got = Vec::new();
        let result = Reader::default().feed(&masked, 1 << 17, &mut |m| got.push(m));
        if binary || std::str::from_utf8(&payload).is_ok() {
            prop_assert_eq!(result, Ok(()));
            let want = if binary { Incoming::Binary(payload) } else { Incoming::Text(payload) };
            prop_assert_eq!(got, vec![want]);
        } else {
            prop_assert_eq!(result.unwrap_err().code, close_code::INVALID_PAYLOAD);
        }
    }

    #[test]
    fn close_frames_fit_a_control_frame_and_cut_on_a_char(
        code in any::<u16>(),
        reason in ".{0,80}",
    ) {
        let f = encode_close(code, &reason);
        prop_assert_eq!(f[0], 0x88);
        let len = f[1] as usize;
        prop_assert!(len <= 125);
        prop_assert_eq!(f.len(), 2 + len);
        prop_assert_eq!(&f[2..4], &code.to_be_bytes());
        let sent = std::str::from_utf8(&f[4..]).expect("a UTF-8 reason");
        prop_assert!(reason.starts_with(sent));
    }
}
