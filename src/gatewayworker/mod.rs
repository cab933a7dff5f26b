//! GatewayWorker compatibility: PHP backends that talk to a GatewayWorker
//! cluster through GatewayClient work unchanged against gatecast.
//!
//! GatewayClient finds the gateways through a Register (JSON lines: it asks
//! with `worker_connect` and gets the list of gateway inner addresses), then
//! speaks GatewayWorker's binary gateway protocol to those addresses: one
//! packet per call, straight to the address inside a client_id for calls about
//! one connection, to every address for broadcasts and queries. It credits
//! each answer to the address it asked, rebuilding client_ids from that
//! address.
//!
//! So every gatecast node serves the Register's text protocol (the Register
//! stops being a single point of failure: `registerAddress` can point at a
//! Service in front of the replicas) and GatewayWorker's binary gateway
//! protocol on its inner port (the address inside its client_ids), answering
//! queries and local sends for its *own* connections only, as one GatewayWorker
//! gateway does. Sessions cross that protocol as PHP `serialize()` strings and
//! are merged with PHP's `array_replace_recursive`.
//!
//! Its parts: the pure codecs, with no I/O,
//! - [`php`]: PHP `serialize()` / `unserialize()` for the values GatewayWorker
//!   exchanges, their mapping to and from JSON, and `array_replace_recursive`;
//! - [`protocol`]: the binary gateway packet, its command codes and flags, and
//!   the length-prefixed replies GatewayClient reads.
//!
//! - [`inner`]: the gateway protocol served on the inner port;
//! - [`register`]: the Register's protocol (`--register-listen`);
//! - [`secret`]: `--gateway-secret-key`, compared by digest, and the
//!   signature of each node's liveness record;
//! - [`workers`]: the BusinessWorkers connected to this node, and the events
//!   (connect, websocket-connect, message, close) they get, so `Events.php`
//!   runs unchanged;
//! - [`handshake`]: the WebSocket handshake as `$_GET`, `$_SERVER` and
//!   `$_COOKIE` for `onWebSocketConnect`.

pub mod handshake;
pub mod inner;
pub mod php;
pub mod protocol;
pub mod register;
pub mod secret;
pub mod workers;

#[cfg(test)]
mod php_cli;

/// Peer-supplied text made safe for a log line: control characters, quotes
/// and backslashes escaped (no forged lines), at most `max` characters
/// (`…` marks a cut).
pub(crate) fn printable(text: &str, max: usize) -> String {
    let mut escaped = text.chars().flat_map(char::escape_debug);
    let mut out: String = escaped.by_ref().take(max).collect();
    if escaped.next().is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod printable_tests {
    #[test]
    fn peer_text_is_escaped_and_bounded() {
        assert_eq!(super::printable("w:1", 64), "w:1");
        assert_eq!(super::printable("a\nINFO forged", 64), "a\\nINFO forged");
        assert_eq!(super::printable(&"x".repeat(100), 8), "xxxxxxxx…");
    }
}
