//! Connection limits: per node, per client address and per JWT `sub`, and
//! the rate of new connections per client address; checked before the
//! upgrade so a refused client costs no connection task. Also the
//! per-connection budget of client messages ([`MessageBudget`]).
//!
//! Behind a load balancer every client arrives from the balancer's address:
//! the client's own address is taken from `X-Forwarded-For` only when the
//! peer is one of `--trusted-proxies`, walking the list from the right past
//! the trusted hops, never from a header a client could set itself.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::Instant;

use axum::http::HeaderMap;
use ipnet::IpNet;
use parking_lot::Mutex;

use crate::config::Config;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The node holds `--max-connections`.
    Node,
    /// The client's address holds `--max-connections-per-ip`.
    Address,
    /// The token's `sub` holds `--max-connections-per-sub`.
    Sub,
    /// The client's address opens connections faster than
    /// `--connect-rate-per-ip`.
    Rate,
}

/// Open connections, by node, by client address and by `sub`, and the
/// connect rate per address. An IPv6 address counts as its /64, for both
/// the connections and the rate: one host often holds a /64 whole.
#[derive(Debug)]
pub struct ConnectionLimits {
    max: usize,
    max_per_ip: usize,
    max_per_sub: usize,
    state: Mutex<Counts>,
    rate: Option<ConnectRate>,
    /// Watches for a node that only ever sees proxies.
    pub peers: PrivatePeers,
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    per_ip: HashMap<IpAddr, usize>,
    per_sub: HashMap<String, usize>,
}

/// One admitted connection; gives its place back when dropped.
#[derive(Debug)]
pub struct Admitted {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
    /// Counted against `--max-connections-per-sub`.
    sub: Option<String>,
}

impl ConnectionLimits {
    /// `max` per node and `max_per_ip` per address; 0 means no limit. No
    /// `sub` limit and no connect rate.
    pub fn new(max: usize, max_per_ip: usize) -> Self {
        ConnectionLimits {
            max,
            max_per_ip,
            max_per_sub: 0,
            state: Mutex::default(),
            rate: None,
            peers: PrivatePeers::new(false),
        }
    }

    /// The limits the options ask for.
    pub fn from_config(config: &Config) -> Self {
        ConnectionLimits {
            max_per_sub: config.max_connections_per_sub,
            rate: (config.connect_rate_per_ip > 0).then(|| {
                ConnectRate::new(
                    config.connect_rate_per_ip,
                    config.connect_burst_per_ip,
                    config.connect_rate_private,
                )
            }),
            peers: PrivatePeers::new(config.trusted_proxies.is_empty()),
            ..Self::new(config.max_connections, config.max_connections_per_ip)
        }
    }

    /// Admits a connection from `ip`, or says which limit refuses it. Every
    /// attempt the rate lets through spends from the address's budget,
    /// whatever becomes of it (a refused token included).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refused> {
        let ip = address_key(ip);
        if let Some(rate) = &self.rate {
            if !rate.allow(ip, Instant::now()) {
                return Err(Refused::Rate);
            }
        }
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
            sub: None,
        })
    }
}

impl Admitted {
    /// Counts the connection against its token's `sub`, known only once
    /// the token checked out; refuses it when the `sub` holds
    /// `--max-connections-per-sub` already.
    pub fn count_sub(&mut self, sub: &str) -> Result<(), Refused> {
        let limits = &self.limits;
        if limits.max_per_sub == 0 || self.sub.is_some() {
            return Ok(());
        }
        let mut state = limits.state.lock();
        let n = state.per_sub.get(sub).copied().unwrap_or(0);
        if n >= limits.max_per_sub {
            return Err(Refused::Sub);
        }
        state.per_sub.insert(sub.to_owned(), n + 1);
        self.sub = Some(sub.to_owned());
        Ok(())
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
        if let Some(sub) = &self.sub {
            if let Some(n) = state.per_sub.get_mut(sub) {
                *n -= 1;
                if *n == 0 {
                    state.per_sub.remove(sub);
                }
            }
        }
    }
}

/// Addresses remembered by the connect rate, at most: ~50 bytes each, a
/// few MiB whatever the number of addresses a flood comes from.
const RATE_TABLE_MAX: usize = 1 << 16;

/// New connections per second per client address: a token bucket per
/// address (per /64 for IPv6, which a single host often holds whole).
///
/// The buckets live in two generations of at most [`RATE_TABLE_MAX`] / 2
/// each: a bucket used again moves to the current one, and when the
/// current one fills up the previous one is forgotten. Memory stays
/// bounded however many addresses connect; a forgotten bucket is as good
/// as a full one, which an address idle for `burst / rate` seconds has
/// anyway.
#[derive(Debug)]
pub struct ConnectRate {
    per_second: f64,
    burst: f64,
    /// Whether loopback and private addresses are limited too.
    private: bool,
    buckets: Mutex<Generations>,
}

#[derive(Debug, Default)]
struct Generations {
    current: HashMap<IpAddr, Bucket>,
    previous: HashMap<IpAddr, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl ConnectRate {
    /// `per_second` connections after a burst of `burst`.
    pub fn new(per_second: u32, burst: u32, private: bool) -> Self {
        ConnectRate {
            per_second: f64::from(per_second),
            burst: f64::from(burst.max(1)),
            private,
            buckets: Mutex::default(),
        }
    }

    /// Whether `ip` may open a connection at `now`; spends a token if so.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let key = address_key(ip);
        if !self.private && is_private(key) {
            return true;
        }
        let mut g = self.buckets.lock();
        let mut bucket = match g.current.get(&key) {
            Some(b) => *b,
            None => g.previous.remove(&key).unwrap_or(Bucket {
                tokens: self.burst,
                at: now,
            }),
        };
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.at = now;
        let allowed = bucket.tokens >= 1.0;
        if allowed {
            bucket.tokens -= 1.0;
        }
        if !g.current.contains_key(&key) && g.current.len() >= RATE_TABLE_MAX / 2 {
            g.previous = std::mem::take(&mut g.current);
        }
        g.current.insert(key, bucket);
        allowed
    }

    /// Addresses remembered now (for tests).
    pub fn remembered(&self) -> usize {
        let g = self.buckets.lock();
        g.current.len() + g.previous.len()
    }
}

/// What the per-address limits count: the address itself for IPv4 (an
/// IPv4-mapped IPv6 address included), its /64 for IPv6.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
        v4 => v4,
    }
}

/// Least time between two warnings that every peer is private.
const PRIVATE_PEERS_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Notices a node whose peers are all private while no proxy is trusted:
/// behind an ingress or kube-proxy's SNAT every client then arrives from a
/// proxy's private address, the connect rate exempts it, and the
/// per-address limits count the proxy. Warns (at most once an hour) and
/// holds the gauge `gatecast_untrusted_private_peers` at 1 until a public
/// peer shows up.
#[derive(Debug)]
pub struct PrivatePeers {
    /// No `--trusted-proxies`: the only case worth watching.
    armed: bool,
    public_seen: std::sync::atomic::AtomicBool,
    last_warning: Mutex<Option<Instant>>,
}

impl PrivatePeers {
    /// Watches when `armed` (no proxy is trusted).
    pub fn new(armed: bool) -> Self {
        PrivatePeers {
            armed,
            public_seen: std::sync::atomic::AtomicBool::new(false),
            last_warning: Mutex::new(None),
        }
    }

    /// Notes a connection from `peer` (the socket's address). Returns the
    /// gauge's new value when it changes, and logs the warning when due.
    pub fn observe(&self, peer: IpAddr, now: Instant) -> Option<i64> {
        use std::sync::atomic::Ordering;
        if !self.armed || self.public_seen.load(Ordering::Relaxed) {
            return None;
        }
        if !is_private(peer.to_canonical()) {
            self.public_seen.store(true, Ordering::Relaxed);
            return Some(0);
        }
        let mut last = self.last_warning.lock();
        if last.is_some_and(|at| now.saturating_duration_since(at) < PRIVATE_PEERS_WARN_EVERY) {
            return None;
        }
        let first = last.is_none();
        *last = Some(now);
        drop(last);
        tracing::warn!(
            %peer,
            "every client so far connects from a private or loopback address and \
             --trusted-proxies is empty: behind an ingress, load balancer or SNAT the \
             per-address limits see the proxy, not the clients (and private addresses \
             are not rate-limited at all); set --trusted-proxies to the proxies' \
             addresses (logged at most once an hour)"
        );
        first.then_some(1)
    }
}

/// Loopback, private, shared (100.64/10), link-local and unique-local
/// addresses: where proxies and load balancers sit, not internet clients.
fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
        }
    }
}

/// What one connection has sent while events are on, against
/// `--client-message-rate` and `--client-message-bytes-rate`: for each, the
/// time (hub milliseconds) at which its budget would be whole again if it
/// sent nothing more (GCRA, a token bucket kept as one number). 24 bytes in
/// the connection's task; the default is a whole budget.
#[derive(Debug, Default)]
pub struct MessageBudget {
    messages_full_at: f64,
    bytes_full_at: f64,
    /// Overspent once already: the connection is being closed.
    overspent: bool,
}

/// The limits a [`MessageBudget`] is held to, from the options.
#[derive(Debug, Clone, Copy)]
pub struct MessageRate {
    /// Messages per second (0: no limit).
    pub per_second: u32,
    /// Messages at once.
    pub burst: u32,
    /// Bytes per second (0: no limit).
    pub bytes_per_second: usize,
    /// Bytes at once: two seconds' worth, at least one largest message.
    pub bytes_burst: usize,
}

/// Which budget a client overspent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overspent {
    /// `--client-message-rate`.
    Messages,
    /// `--client-message-bytes-rate`.
    Bytes,
}

impl Overspent {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Overspent::Messages => "messages",
            Overspent::Bytes => "bytes",
        }
    }
}

impl MessageRate {
    /// The rate the options ask for.
    pub fn from_config(config: &Config) -> Self {
        MessageRate {
            per_second: config.client_message_rate,
            burst: config.client_message_burst.max(1),
            bytes_per_second: config.client_message_bytes_rate,
            bytes_burst: config
                .client_message_bytes_rate
                .saturating_mul(2)
                .max(config.max_message_bytes),
        }
    }
}

/// One GCRA step: `cost` and `capacity` in milliseconds of refill.
fn gcra(full_at: &mut f64, now: f64, cost: f64, capacity: f64) -> bool {
    let next = full_at.max(now) + cost;
    if next - now > capacity {
        return false;
    }
    *full_at = next;
    true
}

impl MessageBudget {
    /// Spends one message of `len` bytes at `now_ms` (the hub's clock), or
    /// says which budget it would overspend. Once overspent, every later
    /// call fails too, with `None` in place of the budget: the caller
    /// reports the first one only.
    pub fn spend(
        &mut self,
        rate: &MessageRate,
        len: usize,
        now_ms: u64,
    ) -> Result<(), Option<Overspent>> {
        if self.overspent {
            return Err(None);
        }
        let now = now_ms as f64;
        // Checked before spending either, so a refusal spends nothing.
        let (mut messages, mut bytes) = (self.messages_full_at, self.bytes_full_at);
        if rate.per_second > 0 {
            let each = 1000.0 / f64::from(rate.per_second);
            if !gcra(&mut messages, now, each, each * f64::from(rate.burst)) {
                self.overspent = true;
                return Err(Some(Overspent::Messages));
            }
        }
        if rate.bytes_per_second > 0 {
            let per_byte = 1000.0 / rate.bytes_per_second as f64;
            if !gcra(
                &mut bytes,
                now,
                per_byte * len as f64,
                per_byte * rate.bytes_burst as f64,
            ) {
                self.overspent = true;
                return Err(Some(Overspent::Bytes));
            }
        }
        (self.messages_full_at, self.bytes_full_at) = (messages, bytes);
        Ok(())
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
    fn an_ipv6_client_counts_as_its_slash_64() {
        let limits = Arc::new(ConnectionLimits::new(0, 2));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let _a = limits.admit(ip("2001:db8:0:1::1")).unwrap();
        let b = limits.admit(ip("2001:db8:0:1::2")).unwrap();
        assert_eq!(
            limits.admit(ip("2001:db8:0:1:ffff::9")).unwrap_err(),
            Refused::Address
        );
        // Another /64 has a count of its own; a closed one frees its place.
        let _c = limits.admit(ip("2001:db8:0:2::1")).unwrap();
        drop(b);
        let _d = limits.admit(ip("2001:db8:0:1::3")).unwrap();
        // An IPv4-mapped address is the IPv4 address.
        let _e = limits.admit(ip("::ffff:192.0.2.1")).unwrap();
        let _f = limits.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(limits.admit(ip("192.0.2.1")).unwrap_err(), Refused::Address);
    }

    #[test]
    fn only_private_peers_without_trusted_proxies_is_flagged_until_a_public_one() {
        let now = Instant::now();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let peers = PrivatePeers::new(true);
        assert_eq!(peers.observe(ip("10.1.2.3"), now), Some(1));
        // Throttled: no new warning, no change.
        assert_eq!(peers.observe(ip("10.1.2.4"), now), None);
        assert_eq!(peers.observe(ip("203.0.113.5"), now), Some(0));
        assert_eq!(peers.observe(ip("10.1.2.5"), now), None);
        // With trusted proxies nothing is watched.
        let trusted = PrivatePeers::new(false);
        assert_eq!(trusted.observe(ip("10.1.2.3"), now), None);
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

    #[test]
    fn a_sub_holds_at_most_its_limit_and_gives_back() {
        let limits = Arc::new(ConnectionLimits {
            max_per_sub: 2,
            ..ConnectionLimits::new(0, 0)
        });
        let ip: IpAddr = "1.1.1.1".parse().unwrap();
        let mut first = limits.admit(ip).unwrap();
        first.count_sub("alice").unwrap();
        let mut second = limits.admit(ip).unwrap();
        second.count_sub("alice").unwrap();
        let mut third = limits.admit(ip).unwrap();
        assert_eq!(third.count_sub("alice").unwrap_err(), Refused::Sub);
        third.count_sub("bob").unwrap();
        drop(first);
        let mut fourth = limits.admit(ip).unwrap();
        fourth.count_sub("alice").unwrap();
        drop((second, third, fourth));
        assert!(limits.state.lock().per_sub.is_empty());
    }

    #[test]
    fn the_connect_rate_refills_and_spares_private_addresses() {
        let rate = ConnectRate::new(10, 3, false);
        let t0 = Instant::now();
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        assert!((0..3).all(|_| rate.allow(ip, t0)));
        assert!(!rate.allow(ip, t0));
        // A tenth of a second gives one back.
        let later = t0 + std::time::Duration::from_millis(100);
        assert!(rate.allow(ip, later));
        assert!(!rate.allow(ip, later));
        // A whole IPv6 /64 is one client.
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!((0..3).all(|_| rate.allow(a, t0)));
        assert!(!rate.allow(b, t0));
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "100.64.0.1",
            "fd00::1",
        ] {
            let ip: IpAddr = private.parse().unwrap();
            assert!((0..10).all(|_| rate.allow(ip, t0)), "{private}");
        }
        let strict = ConnectRate::new(10, 3, true);
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(!(0..4).all(|_| strict.allow(local, t0)));
    }

    #[test]
    fn the_connect_rate_forgets_addresses_past_its_bound() {
        let rate = ConnectRate::new(1, 1, false);
        let t0 = Instant::now();
        let hot: IpAddr = "203.0.113.1".parse().unwrap();
        assert!(rate.allow(hot, t0));
        for n in 0..(RATE_TABLE_MAX as u32 * 2) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0800_0000 + n));
            rate.allow(ip, t0);
            if n % 1000 == 0 {
                // An address in use stays remembered.
                assert!(!rate.allow(hot, t0));
            }
        }
        assert!(rate.remembered() <= RATE_TABLE_MAX);
    }

    #[test]
    fn a_message_budget_refills_and_names_what_ran_out() {
        let rate = MessageRate {
            per_second: 10,
            burst: 2,
            bytes_per_second: 100,
            bytes_burst: 200,
        };
        let mut budget = MessageBudget::default();
        budget.spend(&rate, 10, 1000).unwrap();
        budget.spend(&rate, 10, 1000).unwrap();
        assert_eq!(
            budget.spend(&rate, 10, 1000),
            Err(Some(Overspent::Messages))
        );
        // Overspent is for good: the connection is closing.
        assert_eq!(budget.spend(&rate, 10, 5000), Err(None));

        let mut budget = MessageBudget::default();
        budget.spend(&rate, 10, 0).unwrap();
        budget.spend(&rate, 10, 0).unwrap();
        // A tenth of a second gives one message back.
        budget.spend(&rate, 10, 100).unwrap();

        let mut budget = MessageBudget::default();
        budget.spend(&rate, 150, 0).unwrap();
        // Half a second: 50 bytes more, so 100 fit and 110 do not.
        assert_eq!(budget.spend(&rate, 110, 500), Err(Some(Overspent::Bytes)));
        let mut budget = MessageBudget::default();
        budget.spend(&rate, 150, 0).unwrap();
        budget.spend(&rate, 100, 500).unwrap();

        let off = MessageRate {
            per_second: 0,
            burst: 1,
            bytes_per_second: 0,
            bytes_burst: 0,
        };
        let mut budget = MessageBudget::default();
        assert!((0..1000).all(|_| budget.spend(&off, 1 << 20, 0).is_ok()));
    }
}
