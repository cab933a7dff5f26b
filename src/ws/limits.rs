//! Connection limits: per node and per client address, checked before the
//! upgrade so a refused client costs no connection task.
//!
//! Behind a load balancer every client arrives from the balancer's address:
//! the client's own address is taken from `X-Forwarded-For` only when the
//! peer is one of `--trusted-proxies`, walking the list from the right past
//! the trusted hops, never from a header a client could set itself.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::http::HeaderMap;
use ipnet::IpNet;
use parking_lot::Mutex;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The node holds `--max-connections`.
    Node,
    /// The client's address holds `--max-connections-per-ip`.
    Address,
}

/// Open connections, by node and by client address.
#[derive(Debug)]
pub struct ConnectionLimits {
    max: usize,
    max_per_ip: usize,
    state: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// One admitted connection; gives its place back when dropped.
#[derive(Debug)]
pub struct Admitted {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl ConnectionLimits {
    /// `max` per node and `max_per_ip` per address; 0 means no limit.
    pub fn new(max: usize, max_per_ip: usize) -> Self {
        ConnectionLimits {
            max,
            max_per_ip,
            state: Mutex::default(),
        }
    }

    /// Admits a connection from `ip`, or says which limit refuses it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refused> {
        let mut state = self.state.lock();
        if self.max > 0 && state.open >= self.max {
            return Err(Refused::Node);
        }
        let from_ip = state.per_ip.get(&ip).copied().unwrap_or(0);
        if self.max_per_ip > 0 && from_ip >= self.max_per_ip {
            return Err(Refused::Address);
        }
        state.open += 1;
        // Addresses are only counted when their limit is on: no map entry
        // per client otherwise.
        if self.max_per_ip > 0 {
            state.per_ip.insert(ip, from_ip + 1);
        }
        Ok(Admitted {
            limits: self.clone(),
            ip,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut state = self.limits.state.lock();
        state.open = state.open.saturating_sub(1);
        if let Some(n) = state.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                state.per_ip.remove(&self.ip);
            }
        }
    }
}

/// The client's address: the peer's, or, when the peer is a trusted proxy,
/// the right-most address of `X-Forwarded-For` that is not a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            // Garbage from here on was written by someone untrusted.
            Err(_) => break,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_read_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "6.6.6.6, 1.2.3.4, 10.0.0.9".parse().unwrap(),
        );
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "9.9.9.9".parse().unwrap();
        // Through the trusted proxies: the first untrusted hop from the right.
        assert_eq!(
            client_ip(proxy, &headers, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        // Straight from a client: its header is ignored.
        assert_eq!(client_ip(stranger, &headers, &trusted), stranger);
    }

    #[test]
    fn limits_count_and_give_back() {
        let limits = Arc::new(ConnectionLimits::new(3, 2));
        let a: IpAddr = "1.1.1.1".parse().unwrap();
        let b: IpAddr = "2.2.2.2".parse().unwrap();
        let first = limits.admit(a).unwrap();
        let _second = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), Refused::Address);
        let _third = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).unwrap_err(), Refused::Node);
        drop(first);
        assert!(limits.admit(a).is_ok());
    }
}
