//! Identifiers: the node that holds connections and the client_id of one
//! connection, in GatewayWorker's 20-hex layout.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::str::FromStr;

/// A gateway node: its advertised IPv4 address and inner port.
///
/// Rendered as 12 lowercase hex characters, the first 12 of every client_id it
/// mints, so any node can tell from a client_id which node holds it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u64);

impl NodeId {
    /// The node advertised at `ip` with inner port `port`.
    pub fn new(ip: Ipv4Addr, port: u16) -> Self {
        NodeId((u64::from(u32::from(ip)) << 16) | u64::from(port))
    }

    /// The advertised address.
    pub fn addr(self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from((self.0 >> 16) as u32), self.0 as u16)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:012x}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self} = {})", self.addr())
    }
}

impl FromStr for NodeId {
    type Err = InvalidId;

    fn from_str(s: &str) -> Result<Self, InvalidId> {
        parse_hex(s, 12).map(|v| NodeId(v as u64))
    }
}

/// One WebSocket connection: node address (8 hex), inner port (4 hex) and a
/// 32-bit connection number (8 hex), as GatewayWorker lays out its ids.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(u128);

impl ClientId {
    /// The id of connection number `conn` on `node`.
    pub fn new(node: NodeId, conn: u32) -> Self {
        ClientId((u128::from(node.0) << 32) | u128::from(conn))
    }

    /// The node that holds this connection.
    pub fn node(self) -> NodeId {
        NodeId((self.0 >> 32) as u64)
    }

    /// The connection number on its node.
    pub fn number(self) -> u32 {
        self.0 as u32
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:020x}", self.0)
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientId({self})")
    }
}

impl FromStr for ClientId {
    type Err = InvalidId;

    /// Accepts 20 hex digits in either case; ids are always rendered lowercase.
    fn from_str(s: &str) -> Result<Self, InvalidId> {
        parse_hex(s, 20).map(ClientId)
    }
}

impl serde::Serialize for ClientId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ClientId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A string that is not a well-formed id.
#[derive(Debug, thiserror::Error)]
#[error("not a valid id: expected {0} hex characters")]
pub struct InvalidId(usize);

fn parse_hex(s: &str, len: usize) -> Result<u128, InvalidId> {
    if s.len() != len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(InvalidId(len));
    }
    u128::from_str_radix(s, 16).map_err(|_| InvalidId(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_has_gatewayworker_layout() {
        let node = NodeId::new(Ipv4Addr::new(10, 0, 0, 7), 2900);
        let id = ClientId::new(node, 0x0000_00ff);
        assert_eq!(id.to_string(), "0a0000070b54000000ff");
        assert_eq!(id.node(), node);
        assert_eq!(node.to_string(), "0a0000070b54");
        assert_eq!(
            node.addr(),
            "10.0.0.7:2900".parse::<SocketAddrV4>().unwrap()
        );
    }

    #[test]
    fn client_id_round_trips_and_rejects_garbage() {
        let id: ClientId = "7F0000010B5400000001".parse().unwrap();
        assert_eq!(id.to_string(), "7f0000010b5400000001");
        assert!("7f0000010b540000000".parse::<ClientId>().is_err());
        assert!("7f0000010b54000000zz".parse::<ClientId>().is_err());
        assert!("+f0000010b5400000001".parse::<ClientId>().is_err());
    }
}
