//! GatewayWorker's binary gateway protocol (`GatewayProtocol.php`): the packet
//! that GatewayClient, BusinessWorkers and gateways exchange on a gateway's
//! inner port, and the length-prefixed replies GatewayClient reads back.
//!
//! # Packet
//!
//! A 28-byte big-endian header (PHP `pack("NCNnNnNCnN")`), then `ext_data`,
//! then the body:
//!
//! | bytes | field | |
//! |---|---|---|
//! | 0..4 | pack_len | u32, the whole packet, header included |
//! | 4 | cmd | u8, see [`cmd`] |
//! | 5..9 | local_ip | u32, the gateway's IPv4 |
//! | 9..11 | local_port | u16, the gateway's inner port |
//! | 11..15 | client_ip | u32, the client's IPv4 |
//! | 15..17 | client_port | u16 |
//! | 17..21 | connection_id | u32, the connection on that gateway |
//! | 21 | flag | u8, see [`flag`] |
//! | 22..24 | gateway_port | u16, the gateway's public port |
//! | 24..28 | ext_len | u32, the length of `ext_data` |
//!
//! The body is a PHP scalar's bytes when [`flag::BODY_IS_SCALAR`] is set,
//! otherwise a PHP `serialize()`d value (PHP's encoder sets the bit itself
//! from `is_scalar($body)`). Workerman closes a connection whose packet is
//! longer than 10 MB ([`DEFAULT_MAX_PACKET`]).
//!
//! # Replies
//!
//! A query's answer is *not* a packet: it is `pack('N', strlen($s)) . $s`
//! where `$s` is PHP `serialize($result)` ([`encode_reply`]). GatewayClient
//! reads until it has the 4-byte length and that many bytes (or 5 s pass).
//!
//! # What GatewayClient sends
//!
//! GatewayClient starts from an all-zero header: `local_ip`, `local_port`,
//! `client_ip`, `client_port` and `gateway_port` are 0 in everything it sends.
//! It fills `connection_id` (the last 8 hex digits of the client_id) for calls
//! about one connection, which go straight to the ip:port inside the
//! client_id; broadcasts and queries go to every address the Register lists.
//! Its default body is `''`, a scalar, so flag bit 0x01 is set in nearly every
//! packet. By default it opens one TCP connection per call; with a
//! `secretKey` it writes a [`cmd::GATEWAY_CLIENT_CONNECT`] packet first, in
//! the same write.
//!
//! Ext data written `{id:id}` is a JSON object whose keys and values are the
//! same connection ids (PHP's `json_encode` of `[$id => $id]`; it becomes a
//! JSON list only when the ids are exactly 0..n-1). GatewayWorker reads the
//! *values* of `connections` and the *keys* of `exclude`. Uids and groups put
//! straight into ext_data are PHP strings (an int uid arrives as its decimal
//! text); a uid or group PHP considers empty (`0`, `"0"`, `""`) arrives as
//! empty ext_data and GatewayWorker ignores the call.
//!
//! | cmd | name | ext_data | body | reply (PHP type) |
//! |---|---|---|---|---|
//! | 5 | SEND_TO_ONE (`sendToClient`) | `''` | the message | none |
//! | 6 | SEND_TO_ALL (`sendToAll`) | `''` (everyone); `{"connections":{id:id}}` to each gateway of `$client_id_array`; `{"exclude":{id:id}}` or `''` per gateway with `$exclude_client_id` | the message; flag 0x02 when `$raw` | none |
//! | 7 | KICK (`closeClient`) | `''` | the message to send before closing; `closeClient($id)` sends `null`, so the body is `N;` with flag 0 | none |
//! | 8 | DESTROY (`destoryClient`) | `''` | `''` | none |
//! | 9 | UPDATE_SESSION (`updateSession`) | `serialize($session)` | `''` | none |
//! | 10 | GET_ALL_CLIENT_SESSIONS (`getAllClientSessions()`) | `''` | `''` | `array<int conn_id, string>`: each connection's serialized session, `''` when it has none |
//! | 11 | IS_ONLINE (`isOnline`) | `''` | `''` | `int` 0 or 1 |
//! | 12 | BIND_UID (`bindUid`) | the uid | `''` | none |
//! | 13 | UNBIND_UID (`unbindUid`) | the uid (ignored) | `''` | none |
//! | 14 | SEND_TO_UID (`sendToUid`) | JSON of the uid array (`["u1","u2"]`; an object if the caller's array has keys) | the message | none |
//! | 15 | GET_CLIENT_ID_BY_UID (`getClientIdByUid`, `isUidOnline`) | the uid | `''` | `list<int conn_id>` |
//! | 16 | BATCH_GET_CLIENT_ID_BY_UID (`batchGetClientIdByUid`, `isUidsOnline`) | JSON of the uids | `''` | `array<uid, list<int conn_id>>`, every asked uid present |
//! | 20 | JOIN_GROUP (`joinGroup`) | the group | `''` | none |
//! | 21 | LEAVE_GROUP (`leaveGroup`) | the group | `''` | none |
//! | 22 | SEND_TO_GROUP (`sendToGroup`) | `{"group":[…],"exclude":null}`, or `{"group":[…],"exclude":{id:id}}` to the gateways of excluded clients | the message; flag 0x02 when `$raw` | none |
//! | 23 | GET_CLIENT_SESSIONS_BY_GROUP (`getClientSessionsByGroup`, `getAllClientSessions($group)`) | the group | `''` | `array<int conn_id, string>` as 10 |
//! | 24 | GET_CLIENT_COUNT_BY_GROUP (`getClientIdCountByGroup`, `getAllClientIdCount`, `getAllClientCount`) | the group, `''` for all connections | `''` | `int` |
//! | 25 | SELECT (`getAllClientIdList`, `getClientIdListByGroup`, `getAllUidList`, `getUidListByGroup`, `getUidByClientId`, `getAllGroupUidList`, `getAllGroupClientIdList`, and their counts) | `{"fields":["uid","groups",…],"where":W}`; W is `[]` (no condition: every connection), `{"groups":[…]}`, or `{"connection_id":{id:id}}` sent only to the gateways of those client_ids | `''` | `array<int conn_id, array<field, value>>`: `uid` a string, null when unbound; `groups` `array<group, group>`, null before the first join; `session` the serialized session, `''` when none |
//! | 26 | GET_GROUP_ID_LIST (`getAllGroupIdList`) | `''` | `''` | `list<group>`: PHP array keys, so a numeric group comes back as an int |
//! | 27 | UNGROUP (`ungroup`) | the group | `''` | none |
//! | 28 | BATCH_GET_CLIENT_COUNT_BY_GROUP (`batchGetClientIdCountByGroup`) | JSON list of groups | `''` | `array<group, int>`, every asked group present |
//! | 202 | GATEWAY_CLIENT_CONNECT (before each call when `secretKey` is set) | `''` | `{"secret_key":"…"}` | none; a wrong key closes the connection |
//! | 203 | GET_SESSION_BY_CLIENT_ID (`getSession`) | `''` | `''` | the stored serialized session as is; `a:0:{}` when it has none; `N;` when the connection is not on this gateway |
//! | 204 | SET_SESSION (`setSession`) | `serialize($session)` | `''` | none |
//!
//! The other codes run between gateways and BusinessWorkers (see [`cmd`]):
//! events 1, 3, 4, 205 go gateway → worker with the header filled and the
//! connection's serialized session in ext_data; 200 is a worker announcing
//! itself with `{"worker_key":"name:id","secret_key":"…"}` in the body; 201
//! is the gateway's keep-alive to its workers.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// The fixed header's length.
pub const HEADER_LEN: usize = 28;

/// Workerman's default `maxPackageSize` (10 MB): GatewayWorker closes a
/// connection that announces a longer packet.
pub const DEFAULT_MAX_PACKET: usize = 10 * 1024 * 1024;

/// Command codes, under GatewayWorker's names (`GatewayProtocol::CMD_*`).
pub mod cmd {
    /// Gateway → worker: a client connected (TCP accept, before any WebSocket
    /// handshake).
    pub const ON_CONNECT: u8 = 1;
    /// Gateway → worker: a client sent a message (the body).
    pub const ON_MESSAGE: u8 = 3;
    /// Gateway → worker: a client's connection closed.
    pub const ON_CLOSE: u8 = 4;
    /// Send the body to one connection.
    pub const SEND_TO_ONE: u8 = 5;
    /// Send the body to every connection, or to those listed in ext_data.
    pub const SEND_TO_ALL: u8 = 6;
    /// Send the body to a connection, then close it once it is flushed.
    pub const KICK: u8 = 7;
    /// Close a connection at once.
    pub const DESTROY: u8 = 8;
    /// Merge the serialized array in ext_data into a connection's session.
    pub const UPDATE_SESSION: u8 = 9;
    /// Query: every connection's session.
    pub const GET_ALL_CLIENT_SESSIONS: u8 = 10;
    /// Query: whether a connection is here.
    pub const IS_ONLINE: u8 = 11;
    /// Bind a connection to the uid in ext_data.
    pub const BIND_UID: u8 = 12;
    /// Unbind a connection from its uid.
    pub const UNBIND_UID: u8 = 13;
    /// Send the body to the uids in ext_data (JSON).
    pub const SEND_TO_UID: u8 = 14;
    /// Query: the connections bound to the uid in ext_data.
    pub const GET_CLIENT_ID_BY_UID: u8 = 15;
    /// Query: the connections of each uid in ext_data (JSON).
    pub const BATCH_GET_CLIENT_ID_BY_UID: u8 = 16;
    /// Add a connection to the group in ext_data.
    pub const JOIN_GROUP: u8 = 20;
    /// Remove a connection from the group in ext_data.
    pub const LEAVE_GROUP: u8 = 21;
    /// Send the body to groups, with exclusions (ext_data, JSON).
    pub const SEND_TO_GROUP: u8 = 22;
    /// Query: the sessions of a group's connections.
    pub const GET_CLIENT_SESSIONS_BY_GROUP: u8 = 23;
    /// Query: how many connections a group has (or all connections).
    pub const GET_CLIENT_COUNT_BY_GROUP: u8 = 24;
    /// Query: chosen fields of the connections matching a condition.
    pub const SELECT: u8 = 25;
    /// Query: the groups that have connections here.
    pub const GET_GROUP_ID_LIST: u8 = 26;
    /// Dissolve the group in ext_data.
    pub const UNGROUP: u8 = 27;
    /// Query: how many connections each group in ext_data (JSON) has.
    pub const BATCH_GET_CLIENT_COUNT_BY_GROUP: u8 = 28;
    /// A BusinessWorker announces itself (body: JSON worker_key, secret_key).
    pub const WORKER_CONNECT: u8 = 200;
    /// Gateway → worker keep-alive.
    pub const PING: u8 = 201;
    /// A GatewayClient authenticates (body: JSON secret_key); must come first
    /// when a secret key is set.
    pub const GATEWAY_CLIENT_CONNECT: u8 = 202;
    /// Query: one connection's session.
    pub const GET_SESSION_BY_CLIENT_ID: u8 = 203;
    /// Replace a connection's session with the serialized array in ext_data.
    pub const SET_SESSION: u8 = 204;
    /// Gateway → worker: a client's WebSocket handshake completed (body:
    /// serialized `['get'=>…, 'server'=>…, 'cookie'=>…]`).
    pub const ON_WEBSOCKET_CONNECT: u8 = 205;
    /// Gateway → worker, gatecast's own (GatewayWorker has none): a client
    /// resumed another connection with its resume token (docs/recovery.md);
    /// the body is the old client_id, the packet is about the new one. A
    /// stock BusinessWorker ignores it.
    pub const ON_RESUMED: u8 = 240;
    /// Gateway → worker, gatecast's own: a presence transition
    /// (`--presence-events`); the body is the event as JSON text
    /// (`{"type":"online","uid":"alice","seq":…}`), connection id 0. A
    /// stock BusinessWorker ignores it.
    pub const ON_PRESENCE: u8 = 241;

    /// Every code with its name.
    pub const ALL: [(u8, &str); 32] = [
        (ON_CONNECT, "ON_CONNECT"),
        (ON_MESSAGE, "ON_MESSAGE"),
        (ON_CLOSE, "ON_CLOSE"),
        (SEND_TO_ONE, "SEND_TO_ONE"),
        (SEND_TO_ALL, "SEND_TO_ALL"),
        (KICK, "KICK"),
        (DESTROY, "DESTROY"),
        (UPDATE_SESSION, "UPDATE_SESSION"),
        (GET_ALL_CLIENT_SESSIONS, "GET_ALL_CLIENT_SESSIONS"),
        (IS_ONLINE, "IS_ONLINE"),
        (BIND_UID, "BIND_UID"),
        (UNBIND_UID, "UNBIND_UID"),
        (SEND_TO_UID, "SEND_TO_UID"),
        (GET_CLIENT_ID_BY_UID, "GET_CLIENT_ID_BY_UID"),
        (BATCH_GET_CLIENT_ID_BY_UID, "BATCH_GET_CLIENT_ID_BY_UID"),
        (JOIN_GROUP, "JOIN_GROUP"),
        (LEAVE_GROUP, "LEAVE_GROUP"),
        (SEND_TO_GROUP, "SEND_TO_GROUP"),
        (GET_CLIENT_SESSIONS_BY_GROUP, "GET_CLIENT_SESSIONS_BY_GROUP"),
        (GET_CLIENT_COUNT_BY_GROUP, "GET_CLIENT_COUNT_BY_GROUP"),
        (SELECT, "SELECT"),
        (GET_GROUP_ID_LIST, "GET_GROUP_ID_LIST"),
        (UNGROUP, "UNGROUP"),
        (
            BATCH_GET_CLIENT_COUNT_BY_GROUP,
            "BATCH_GET_CLIENT_COUNT_BY_GROUP",
        ),
        (WORKER_CONNECT, "WORKER_CONNECT"),
        (PING, "PING"),
        (GATEWAY_CLIENT_CONNECT, "GATEWAY_CLIENT_CONNECT"),
        (GET_SESSION_BY_CLIENT_ID, "GET_SESSION_BY_CLIENT_ID"),
        (SET_SESSION, "SET_SESSION"),
        (ON_WEBSOCKET_CONNECT, "ON_WEBSOCKET_CONNECT"),
        (ON_RESUMED, "ON_RESUMED"),
        (ON_PRESENCE, "ON_PRESENCE"),
    ];

    /// The name of a code, for logs and metric labels; `None` for a code
    /// GatewayWorker does not define.
    pub fn name(code: u8) -> Option<&'static str> {
        ALL.iter().find(|(c, _)| *c == code).map(|(_, name)| *name)
    }
}

/// Flag bits, under GatewayWorker's names (`GatewayProtocol::FLAG_*`).
pub mod flag {
    /// The body is a PHP scalar's bytes (usually a string), not a
    /// `serialize()`d value.
    pub const BODY_IS_SCALAR: u8 = 0x01;
    /// "Raw": write the body to the client as is, without the client
    /// protocol's encoding (for WebSocket, the body is whole frames).
    pub const NOT_CALL_ENCODE: u8 = 0x02;
}

/// One packet of the gateway protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packet {
    /// What to do; see [`cmd`].
    pub cmd: u8,
    /// The gateway's IPv4 address (events from a gateway; 0 from GatewayClient).
    pub local_ip: u32,
    /// The gateway's inner port.
    pub local_port: u16,
    /// The client's IPv4 address.
    pub client_ip: u32,
    /// The client's port.
    pub client_port: u16,
    /// The connection on the gateway (the client_id's last 8 hex digits).
    pub connection_id: u32,
    /// See [`flag`].
    pub flag: u8,
    /// The gateway's public port.
    pub gateway_port: u16,
    /// Command arguments: a uid, a group, JSON or a serialized session.
    pub ext_data: Bytes,
    /// The message, or a serialized value unless [`flag::BODY_IS_SCALAR`].
    pub body: Bytes,
}

impl Packet {
    /// An all-zero packet for `cmd`, as GatewayClient starts from.
    pub fn new(cmd: u8) -> Packet {
        Packet {
            cmd,
            ..Packet::default()
        }
    }

    /// Whether the body is a scalar's bytes rather than a serialized value.
    pub fn body_is_scalar(&self) -> bool {
        self.flag & flag::BODY_IS_SCALAR != 0
    }

    /// Whether the body goes to the client without protocol encoding.
    pub fn is_raw(&self) -> bool {
        self.flag & flag::NOT_CALL_ENCODE != 0
    }

    /// The length of the packet on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.ext_data.len() + self.body.len()
    }
}

/// Why bytes on an inner connection are not a packet (or a reply). The
/// connection cannot be resynchronised after any of these: close it.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// pack_len is below the header's own length.
    #[error("gateway packet length {len} is shorter than the {HEADER_LEN}-byte header")]
    ShorterThanHeader {
        /// The declared length.
        len: u32,
    },
    /// pack_len (or a reply's length) is beyond the limit.
    #[error("gateway packet length {len} is over the {max}-byte limit")]
    TooLong {
        /// The declared length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// ext_len does not fit in the packet.
    #[error("gateway packet ext_len {ext_len} runs past its length {len}")]
    ExtPastPacket {
        /// The declared ext_data length.
        ext_len: u32,
        /// The declared packet length.
        len: u32,
    },
    /// The connection failed while framing.
    #[error("gateway connection: {0}")]
    Io(#[from] std::io::Error),
}

/// Takes one packet off the front of `buf`.
///
/// `Ok(None)` means more bytes are needed (room for the rest of the packet is
/// reserved, never more than `max_packet`). Errors are checked as soon as the
/// bytes that show them arrive: a length below the header or over
/// `max_packet` after 4 bytes, an ext_len past the packet after 28. Never
/// panics; `ext_data` and `body` share the packet's buffer.
pub fn decode(buf: &mut BytesMut, max_packet: usize) -> Result<Option<Packet>, ProtocolError> {
    let Some(len) = read_u32(buf, 0) else {
        return Ok(None);
    };
    if (len as usize) < HEADER_LEN {
        return Err(ProtocolError::ShorterThanHeader { len });
    }
    if len as usize > max_packet {
        return Err(ProtocolError::TooLong {
            len: u64::from(len),
            max: max_packet,
        });
    }
    let Some(ext_len) = read_u32(buf, 24) else {
        return Ok(None);
    };
    if ext_len as usize > len as usize - HEADER_LEN {
        return Err(ProtocolError::ExtPastPacket { ext_len, len });
    }
    let len = len as usize;
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let mut packet = buf.split_to(len).freeze();
    packet.advance(4);
    let cmd = packet.get_u8();
    let local_ip = packet.get_u32();
    let local_port = packet.get_u16();
    let client_ip = packet.get_u32();
    let client_port = packet.get_u16();
    let connection_id = packet.get_u32();
    let flag = packet.get_u8();
    let gateway_port = packet.get_u16();
    packet.advance(4);
    let ext_data = packet.split_to(ext_len as usize);
    Ok(Some(Packet {
        cmd,
        local_ip,
        local_port,
        client_ip,
        client_port,
        connection_id,
        flag,
        gateway_port,
        ext_data,
        body: packet,
    }))
}

/// The big-endian u32 at `at`, if `buf` holds it.
fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at + 4)?;
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// The packet on the wire.
///
/// # Panics
///
/// If the packet is longer than 4 GiB, which pack_len cannot express
/// ([`GatewayCodec`] returns an error instead).
pub fn encode(packet: &Packet) -> Bytes {
    let mut out = BytesMut::with_capacity(packet.encoded_len());
    encode_into(packet, &mut out);
    out.freeze()
}

fn encode_into(packet: &Packet, out: &mut BytesMut) {
    let len = u32::try_from(packet.encoded_len()).expect("gateway packet over 4 GiB");
    out.reserve(len as usize);
    out.put_u32(len);
    out.put_u8(packet.cmd);
    out.put_u32(packet.local_ip);
    out.put_u16(packet.local_port);
    out.put_u32(packet.client_ip);
    out.put_u16(packet.client_port);
    out.put_u32(packet.connection_id);
    out.put_u8(packet.flag);
    out.put_u16(packet.gateway_port);
    out.put_u32(packet.ext_data.len() as u32);
    out.put_slice(&packet.ext_data);
    out.put_slice(&packet.body);
}

/// A query's answer as GatewayClient reads it: the 4-byte big-endian length
/// of `serialized`, then `serialized` (a PHP `serialize()`d value).
///
/// # Panics
///
/// If `serialized` is longer than 4 GiB.
pub fn encode_reply(serialized: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + serialized.len());
    encode_reply_into(serialized, &mut out);
    out.freeze()
}

/// [`encode_reply`] without the panic: an error for an answer past 4 GiB,
/// for callers on a path that must not panic (the inner port).
pub fn try_encode_reply(serialized: &[u8]) -> Result<Bytes, ProtocolError> {
    if u32::try_from(serialized.len()).is_err() {
        return Err(ProtocolError::TooLong {
            len: serialized.len() as u64,
            max: u32::MAX as usize,
        });
    }
    Ok(encode_reply(serialized))
}

/// [`encode`] without the panic: an error for a packet past 4 GiB.
pub fn try_encode(packet: &Packet) -> Result<Bytes, ProtocolError> {
    if u32::try_from(packet.encoded_len()).is_err() {
        return Err(ProtocolError::TooLong {
            len: packet.encoded_len() as u64,
            max: u32::MAX as usize,
        });
    }
    Ok(encode(packet))
}

fn encode_reply_into(serialized: &[u8], out: &mut BytesMut) {
    let len = u32::try_from(serialized.len()).expect("gateway reply over 4 GiB");
    out.reserve(4 + serialized.len());
    out.put_u32(len);
    out.put_slice(serialized);
}

/// Takes one reply off the front of `buf` (what GatewayClient does with the
/// answer to a query): the serialized bytes, `Ok(None)` until they are all
/// there. For clients of the protocol, such as tests.
pub fn decode_reply(buf: &mut BytesMut, max_reply: usize) -> Result<Option<Bytes>, ProtocolError> {
    let Some(len) = read_u32(buf, 0) else {
        return Ok(None);
    };
    let len = len as usize;
    if len > max_reply {
        return Err(ProtocolError::TooLong {
            len: len as u64,
            max: max_reply,
        });
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(len).freeze()))
}

/// A query's answer, for [`GatewayCodec`]'s encoder: the serialized PHP value
/// without its length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply(pub Bytes);

/// The protocol as a `tokio_util` codec for the inner port: decodes
/// [`Packet`]s up to a length limit, encodes [`Packet`]s and [`Reply`]s.
#[derive(Debug, Clone, Copy)]
pub struct GatewayCodec {
    max_packet: usize,
}

impl GatewayCodec {
    /// A codec that refuses packets longer than `max_packet` bytes.
    pub fn new(max_packet: usize) -> GatewayCodec {
        GatewayCodec { max_packet }
    }
}

impl Default for GatewayCodec {
    fn default() -> Self {
        GatewayCodec::new(DEFAULT_MAX_PACKET)
    }
}

impl Decoder for GatewayCodec {
    type Item = Packet;
    type Error = ProtocolError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, ProtocolError> {
        decode(buf, self.max_packet)
    }
}

impl Encoder<Packet> for GatewayCodec {
    type Error = ProtocolError;

    fn encode(&mut self, packet: Packet, out: &mut BytesMut) -> Result<(), ProtocolError> {
        if u32::try_from(packet.encoded_len()).is_err() {
            return Err(ProtocolError::TooLong {
                len: packet.encoded_len() as u64,
                max: u32::MAX as usize,
            });
        }
        encode_into(&packet, out);
        Ok(())
    }
}

impl Encoder<Reply> for GatewayCodec {
    type Error = ProtocolError;

    fn encode(&mut self, reply: Reply, out: &mut BytesMut) -> Result<(), ProtocolError> {
        if u32::try_from(reply.0.len()).is_err() {
            return Err(ProtocolError::TooLong {
                len: reply.0.len() as u64,
                max: u32::MAX as usize,
            });
        }
        encode_reply_into(&reply.0, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
