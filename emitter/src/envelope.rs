//! The envelope: what travels on gatecast's Redis channels. A public,
//! versioned format (docs/publishing.md) that any backend can produce with
//! its own Redis and MessagePack libraries.
//!
//! An envelope is a MessagePack map with string keys. Fields that an
//! operation does not use are left out. `data` may be MessagePack `bin` or
//! `str` (PHP's msgpack writes strings as `str` whatever their bytes).

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

/// One message on a gatecast channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Format version; this node reads version 1.
    pub v: u32,
    /// The operation.
    pub op: Op,
    /// Push on a node channel: the node's connections to deliver to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_ids: Vec<String>,
    /// The connection a command is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// bind_uid / unbind_uid: the uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// join_group / leave_group: the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Push on group channels: every group of the push, in order, so that
    /// a connection in several of them receives it once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Push: connections that must not receive it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Push / close: the message bytes.
    #[serde(default, with = "raw_bytes", skip_serializing_if = "Option::is_none")]
    pub data: Option<Bytes>,
    /// Push / close: send as a binary frame (else text).
    #[serde(default, skip_serializing_if = "is_false")]
    pub binary: bool,
    /// set_session / update_session: the session (a map).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Session>,
    /// The node that already delivered this push to its own connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// A command's number, when the sender waits for a reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<u64>,
    /// The node to reply to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Reply: what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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
}

impl Envelope {
    /// An envelope of `op` with every optional field empty.
    pub fn new(op: Op) -> Self {
        Envelope {
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
            origin: None,
            req: None,
            reply_to: None,
            error: None,
        }
    }

    /// MessagePack bytes, map with named fields.
    pub fn encode(&self) -> Bytes {
        // Serializing this struct into a Vec cannot fail.
        Bytes::from(rmp_serde::to_vec_named(self).expect("envelope serializes"))
    }

    /// Reads an envelope; refuses versions this node does not know.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        // The version first: a later version may change the other fields.
        #[derive(Deserialize)]
        struct Versioned {
            v: u32,
        }
        let Versioned { v } = rmp_serde::from_slice(bytes)?;
        if v != VERSION {
            return Err(DecodeError::Version(v));
        }
        Ok(rmp_serde::from_slice(bytes)?)
    }
}

/// `data` as MessagePack `bin`; reads `bin` or `str`.
mod raw_bytes {
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

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bytes>, D::Error> {
        struct Raw;
        impl<'de> Visitor<'de> for Raw {
            type Value = Option<Bytes>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("bytes or a string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                Ok(Some(Bytes::copy_from_slice(v)))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
                Ok(Some(Bytes::from(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Some(Bytes::copy_from_slice(v.as_bytes())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Some(Bytes::from(v)))
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
}
