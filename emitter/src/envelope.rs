//! The envelope: what travels on gatecast's Redis channels. A public,
//! versioned format (docs/publishing.md) that any backend can produce with
//! its own Redis and MessagePack libraries.
//!
//! An envelope is a MessagePack map with string keys. Fields that an
//! operation does not use are left out. `data` may be MessagePack `bin` or
//! `str` (PHP's msgpack writes strings as `str` whatever their bytes).

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::Session;

/// The envelope version this node writes and reads.
pub const VERSION: u32 = 1;

/// What an envelope asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Deliver `data` to the connections the channel (and `client_ids`)
    /// name, except `exclude`.
    Push,
    /// Close `client_id`, after `data` if given.
    Close,
    /// Bind `uid` to `client_id`.
    BindUid,
    /// Unbind `uid` from `client_id`.
    UnbindUid,
    /// Add `client_id` to `group`.
    JoinGroup,
    /// Remove `client_id` from `group`.
    LeaveGroup,
    /// Remove every member of the channel's group.
    Ungroup,
    /// Replace the session of `client_id` with `session`.
    SetSession,
    /// Merge `session` into the session of `client_id`.
    UpdateSession,
    /// Answer to the command numbered `req`; `error` when it failed.
    Reply,
}

/// One message on a gatecast channel, as written.
///
/// `origin` is written first when set, so a node drops the echo of its own
/// pushes after reading one map key ([`peek_origin`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Envelope {
    /// The node that already delivered this push to its own connections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Format version; this node reads version 1.
    pub v: u32,
    /// The operation.
    pub op: Op,
    /// Push on a node channel: the node's connections to deliver to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub client_ids: Vec<String>,
    /// The connection a command is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// bind_uid / unbind_uid: the uid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// join_group / leave_group: the group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Push on group channels: every group of the push, in order, so that
    /// a connection in several of them receives it once.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Push: connections that must not receive it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Push / close: the message bytes.
    #[serde(with = "raw_bytes", skip_serializing_if = "Option::is_none")]
    pub data: Option<Bytes>,
    /// Push / close: send as a binary frame (else text).
    #[serde(skip_serializing_if = "is_false")]
    pub binary: bool,
    /// set_session / update_session: the session (a map).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<Session>,
    /// A command's number, when the sender waits for a reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub req: Option<u64>,
    /// The node to reply to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// A command: reply on `reply_to`'s reply channel, where replies may be
    /// batched (`reqs`). Left out by nodes older than the reply channel,
    /// which get one reply per command on their node channel.
    #[serde(skip_serializing_if = "is_false")]
    pub reply_channel: bool,
    /// Reply: what went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Reply on a reply channel: the numbers of several commands answered
    /// at once (with `req`, if given), all with the same `error`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reqs: Vec<u64>,
    /// Push: when it was accepted (by the node that took the API call, or
    /// by the publisher), Unix time in microseconds on that host's clock.
    /// Optional: the node that writes the frame measures push-to-frame
    /// latency from it (`gatecast_push_to_frame_seconds{path="redis"}`);
    /// without it, nothing is measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
}

/// An envelope read in place: strings and the payload borrow from the
/// received bytes, so decoding copies no payload (the node copies it once,
/// into the WebSocket frame).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EnvelopeRef<'a> {
    /// See [`Envelope::origin`].
    #[serde(default, borrow)]
    pub origin: Option<&'a str>,
    /// See [`Envelope::v`].
    pub v: u32,
    /// See [`Envelope::op`].
    pub op: Op,
    /// See [`Envelope::client_ids`].
    #[serde(default, borrow)]
    pub client_ids: Vec<&'a str>,
    /// See [`Envelope::client_id`].
    #[serde(default, borrow)]
    pub client_id: Option<&'a str>,
    /// See [`Envelope::uid`].
    #[serde(default, borrow)]
    pub uid: Option<&'a str>,
    /// See [`Envelope::group`].
    #[serde(default, borrow)]
    pub group: Option<&'a str>,
    /// See [`Envelope::groups`].
    #[serde(default, borrow)]
    pub groups: Vec<&'a str>,
    /// See [`Envelope::exclude`].
    #[serde(default, borrow)]
    pub exclude: Vec<&'a str>,
    /// See [`Envelope::data`].
    #[serde(default, borrow, deserialize_with = "raw_bytes::deserialize_ref")]
    pub data: Option<Cow<'a, [u8]>>,
    /// See [`Envelope::binary`].
    #[serde(default)]
    pub binary: bool,
    /// See [`Envelope::session`].
    #[serde(default)]
    pub session: Option<Session>,
    /// See [`Envelope::req`].
    #[serde(default)]
    pub req: Option<u64>,
    /// See [`Envelope::reply_to`].
    #[serde(default, borrow)]
    pub reply_to: Option<&'a str>,
    /// See [`Envelope::reply_channel`].
    #[serde(default)]
    pub reply_channel: bool,
    /// See [`Envelope::error`].
    #[serde(default, borrow)]
    pub error: Option<&'a str>,
    /// See [`Envelope::reqs`].
    #[serde(default)]
    pub reqs: Vec<u64>,
    /// Push kept in history: its stream (`u:<uid>`, `g:<group>`, `all`).
    /// Added by the `<prefix>_push` Redis Function (docs/publishing.md),
    /// never written by a publisher itself, like `e`, `o` and `t`.
    #[serde(default, borrow)]
    pub s: Option<&'a str>,
    /// Push kept in history: the stream's epoch.
    #[serde(default, borrow)]
    pub e: Option<&'a str>,
    /// Push kept in history: its offset in the stream.
    #[serde(default)]
    pub o: Option<u64>,
    /// Push kept in history: when it was appended (Unix ms, Redis clock).
    #[serde(default)]
    pub t: Option<u64>,
    /// See [`Envelope::ts`].
    #[serde(default)]
    pub ts: Option<u64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Why an envelope was skipped.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not a MessagePack map of the expected shape.
    #[error("malformed envelope: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
    /// A version this node does not read.
    #[error("unsupported envelope version {0}")]
    Version(u32),
    /// Not a MessagePack map at all (an array, a string...): the envelope is
    /// a map with named fields, never the fields in order.
    #[error("malformed envelope: a MessagePack map is required, got {0}")]
    NotAMap(String),
}

impl Envelope {
    /// An envelope of `op` with every optional field empty.
    pub fn new(op: Op) -> Self {
        Envelope {
            origin: None,
            v: VERSION,
            op,
            client_ids: Vec::new(),
            client_id: None,
            uid: None,
            group: None,
            groups: Vec::new(),
            exclude: Vec::new(),
            data: None,
            binary: false,
            session: None,
            req: None,
            reply_to: None,
            reply_channel: false,
            error: None,
            reqs: Vec::new(),
            ts: None,
        }
    }

    /// MessagePack bytes, map with named fields.
    pub fn encode(&self) -> Bytes {
        // Serializing this struct into a Vec cannot fail.
        Bytes::from(rmp_serde::to_vec_named(self).expect("envelope serializes"))
    }

    /// Reads an envelope into owned fields; refuses versions this node does
    /// not know.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        EnvelopeRef::decode(bytes).map(|e| e.to_owned())
    }
}

impl<'a> EnvelopeRef<'a> {
    /// Reads an envelope in place, in one pass; refuses versions this node
    /// does not know.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        // Checked first: serde would read an array as the fields in order and
        // explain a wrong one as "expected struct with 15 elements".
        if let Some(kind) = not_a_map(bytes) {
            return Err(DecodeError::NotAMap(kind));
        }
        match rmp_serde::from_slice::<EnvelopeRef>(bytes) {
            Ok(e) if e.v == VERSION => Ok(e),
            Ok(e) => Err(DecodeError::Version(e.v)),
            Err(e) => {
                // A later version may change the other fields: say so
                // rather than "malformed" when the version is readable.
                #[derive(Deserialize)]
                struct Versioned {
                    v: u32,
                }
                match rmp_serde::from_slice::<Versioned>(bytes) {
                    Ok(Versioned { v }) if v != VERSION => Err(DecodeError::Version(v)),
                    _ => Err(e.into()),
                }
            }
        }
    }

    /// The owned envelope.
    pub fn to_owned(&self) -> Envelope {
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        let string = |s: Option<&str>| s.map(str::to_owned);
        Envelope {
            origin: string(self.origin),
            v: self.v,
            op: self.op,
            client_ids: strings(&self.client_ids),
            client_id: string(self.client_id),
            uid: string(self.uid),
            group: string(self.group),
            groups: strings(&self.groups),
            exclude: strings(&self.exclude),
            data: self.data.as_deref().map(Bytes::copy_from_slice),
            binary: self.binary,
            session: self.session.clone(),
            req: self.req,
            reply_to: string(self.reply_to),
            reply_channel: self.reply_channel,
            error: string(self.error),
            reqs: self.reqs.clone(),
            ts: self.ts,
        }
    }
}

/// What `bytes` start with when it is not a MessagePack map; `None` for a
/// map.
fn not_a_map(bytes: &[u8]) -> Option<String> {
    use rmp::Marker;
    let Some(&first) = bytes.first() else {
        return Some("an empty message".into());
    };
    let kind = match Marker::from_u8(first) {
        Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => return None,
        Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => "an array",
        Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => "a string",
        Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => "binary",
        Marker::Null => "nil",
        Marker::True | Marker::False => "a boolean",
        Marker::F32 | Marker::F64 => "a float",
        Marker::FixPos(_)
        | Marker::FixNeg(_)
        | Marker::U8
        | Marker::U16
        | Marker::U32
        | Marker::U64
        | Marker::I8
        | Marker::I16
        | Marker::I32
        | Marker::I64 => "an integer",
        Marker::FixExt1
        | Marker::FixExt2
        | Marker::FixExt4
        | Marker::FixExt8
        | Marker::FixExt16
        | Marker::Ext8
        | Marker::Ext16
        | Marker::Ext32 => "an extension",
        Marker::Reserved => "an invalid byte",
    };
    Some(format!("{kind} (first byte 0x{first:02x})"))
}

/// The `origin` of an envelope when it is the map's first key, as
/// [`Envelope::encode`] writes it; `None` otherwise. Reads a few bytes, so a
/// node skips the echo of its own pushes without decoding them.
pub fn peek_origin(bytes: &[u8]) -> Option<&str> {
    let mut rest = bytes;
    rmp::decode::read_map_len(&mut rest).ok()?;
    let (key, rest) = rmp::decode::read_str_from_slice(rest).ok()?;
    if key != "origin" {
        return None;
    }
    let (origin, _) = rmp::decode::read_str_from_slice(rest).ok()?;
    Some(origin)
}

/// `data` is written as MessagePack `bin` and read from `bin` or `str`.
mod raw_bytes {
    use std::borrow::Cow;

    use bytes::Bytes;
    use serde::de::{self, Deserializer, Visitor};
    use serde::Serializer;
    use std::fmt;

    pub fn serialize<S: Serializer>(data: &Option<Bytes>, s: S) -> Result<S::Ok, S::Error> {
        match data {
            Some(b) => s.serialize_bytes(b),
            None => s.serialize_none(),
        }
    }

    /// Reads `bin` or `str`, borrowed from the input where it can be.
    pub fn deserialize_ref<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Cow<'de, [u8]>>, D::Error> {
        struct Raw;
        impl<'de> Visitor<'de> for Raw {
            type Value = Option<Cow<'de, [u8]>>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("bytes or a string")
            }
            fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Self::Value, E> {
                Ok(Some(Cow::Borrowed(v)))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Some(Cow::Borrowed(v.as_bytes())))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                Ok(Some(Cow::Owned(v.to_vec())))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Some(Cow::Owned(v.as_bytes().to_vec())))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
        }
        d.deserialize_any(Raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_named_fields() {
        let mut e = Envelope::new(Op::Push);
        e.groups = vec!["a".into(), "b".into()];
        e.data = Some(Bytes::from_static(&[0, 159, 146, 150]));
        e.binary = true;
        let bytes = e.encode();
        assert_eq!(Envelope::decode(&bytes).unwrap(), e);
        // A map with string keys, so any language can read and write it.
        #[derive(Deserialize)]
        struct Named {
            v: u32,
            op: String,
        }
        assert!(
            bytes[0] & 0xf0 == 0x80 || bytes[0] == 0xde,
            "a MessagePack map"
        );
        let named: Named = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!((named.v, named.op.as_str()), (1, "push"));
    }

    #[test]
    fn anything_but_a_map_is_refused_saying_a_map_is_required() {
        // The fields in order, as an array: what serde alone would accept
        // or explain as "expected struct Envelope with 15 elements".
        let e = Envelope::new(Op::Push);
        let array = rmp_serde::to_vec(&e).unwrap();
        assert_eq!(array[0] & 0xf0, 0x90, "an array");
        for (bytes, kind) in [
            (&array[..], "an array"),
            (&[0x92, 0x01, 0xa4][..], "an array"),
            (b"this is not msgpack", "an integer"),
            (&[0xa2, b'h', b'i'], "a string"),
            (&[0xc0], "nil"),
            (&[], "an empty message"),
        ] {
            let err = Envelope::decode(bytes).unwrap_err();
            assert!(matches!(err, DecodeError::NotAMap(_)), "{err:?}");
            let text = err.to_string();
            assert!(
                text.contains("a MessagePack map is required") && text.contains(kind),
                "{text}"
            );
            assert!(!text.contains("elements"), "{text}");
        }
        // A map still decodes, and a map of another version says so.
        assert!(Envelope::decode(&e.encode()).is_ok());
    }

    #[test]
    fn reads_data_written_as_str_and_minimal_maps() {
        // {"v":1,"op":"push","data":"hi"} as another language writes it.
        #[derive(Serialize)]
        struct Foreign<'a> {
            v: u8,
            op: &'a str,
            data: &'a str,
        }
        let bytes = rmp_serde::to_vec_named(&Foreign {
            v: 1,
            op: "push",
            data: "hi",
        })
        .unwrap();
        let e = Envelope::decode(&bytes).unwrap();
        assert_eq!(e.data.as_deref(), Some(&b"hi"[..]));
        assert!(!e.binary);
    }

    #[test]
    fn refuses_garbage_unknown_ops_and_versions() {
        assert!(Envelope::decode(b"\xc1garbage").is_err());
        let mut e = Envelope::new(Op::Push);
        e.v = 2;
        assert!(matches!(
            Envelope::decode(&e.encode()),
            Err(DecodeError::Version(2))
        ));
        #[derive(Serialize)]
        struct Unknown<'a> {
            v: u8,
            op: &'a str,
        }
        let bytes = rmp_serde::to_vec_named(&Unknown {
            v: 1,
            op: "explode",
        })
        .unwrap();
        assert!(Envelope::decode(&bytes).is_err());
    }

    #[test]
    fn own_origin_is_read_from_the_first_key_and_data_is_borrowed() {
        let mut e = Envelope::new(Op::Push);
        e.origin = Some("7f0000010b54".into());
        e.data = Some(Bytes::from_static(b"payload"));
        let bytes = e.encode();
        assert_eq!(peek_origin(&bytes), Some("7f0000010b54"));
        let r = EnvelopeRef::decode(&bytes).unwrap();
        assert!(matches!(r.data, Some(Cow::Borrowed(b"payload"))));
        assert_eq!(r.to_owned(), e);
        // Without origin, or with another first key, nothing is peeked.
        assert_eq!(peek_origin(&Envelope::new(Op::Push).encode()), None);
        assert_eq!(peek_origin(b"\xc1"), None);
    }
}

#[cfg(test)]
mod proptests;
