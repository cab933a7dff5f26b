//! Command-line options. Every option is also a `GATECAST_<NAME>` environment
//! variable; `gatecast --help` lists them with their defaults.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

mod validate;
mod values;

use validate::strong_secret;
pub use values::{DrainSpread, LogFormat, Rebalance, Secret, WelcomeFrame};

/// gatecast: a WebSocket push gateway with GatewayWorker's API over HTTP.
///
/// `Debug` shows every option but the secrets (see [`Secret`]).
#[derive(Parser, Debug, Clone)]
#[command(name = "gatecast", version, about, long_about = None)]
pub struct Config {
    /// Public listener: WebSocket at /ws, /healthz and /readyz.
    #[arg(long, env = "GATECAST_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Internal listener: the HTTP API under /api/, /metrics, /healthz, /readyz.
    #[arg(long, env = "GATECAST_API_LISTEN", default_value = "127.0.0.1:8081")]
    pub api_listen: SocketAddr,

    /// Inner listener (GatewayWorker's gateway protocol). Its port is part of
    /// every client_id; port 0 lets the system choose one. Default:
    /// 127.0.0.1:2900, loopback only (the client_ids still carry the
    /// advertised IP). Bound to one specific IPv4 address, that address is
    /// advertised unless --advertise-ip says otherwise. Reachable from other
    /// hosts only with --gateway-secret-key (or --gateway-insecure).
    #[arg(long, env = "GATECAST_INNER_LISTEN")]
    pub inner_listen: Option<SocketAddr>,

    /// Serve GatewayWorker's Register (JSON lines) on this address, e.g.
    /// 0.0.0.0:1236, so GatewayClient's `registerAddress` can point at any
    /// node. Unset: not served.
    #[arg(long, env = "GATECAST_REGISTER_LISTEN")]
    pub register_listen: Option<SocketAddr>,

    /// GatewayWorker's `secretKey`: what Register and gateway-protocol
    /// clients must present, and what signs each node's entry in Redis so
    /// that the Register lists only real nodes. Empty: no key (then the
    /// inner and Register listeners must be on loopback). At least 16
    /// bytes, and not a known placeholder, unless --gateway-weak-key-ok.
    #[arg(
        long,
        env = "GATECAST_GATEWAY_SECRET_KEY",
        hide_env_values = true,
        default_value = "",
        hide_default_value = true
    )]
    pub gateway_secret_key: Secret,

    /// Serve the inner and Register listeners on non-loopback addresses
    /// without --gateway-secret-key: for labs where nothing else can reach
    /// them. Anyone who reaches them gets every client's handshake,
    /// messages and sessions, and can push to or kick anyone.
    #[arg(long, env = "GATECAST_GATEWAY_INSECURE", default_value_t = false)]
    pub gateway_insecure: bool,

    /// Accept a short or placeholder --gateway-secret-key (with a warning at
    /// start), for PHP fleets that cannot change theirs yet.
    #[arg(long, env = "GATECAST_GATEWAY_WEAK_KEY_OK", default_value_t = false)]
    pub gateway_weak_key_ok: bool,

    /// Largest gateway-protocol packet from an authenticated peer, in bytes
    /// (GatewayWorker's `maxPackageSize`). Before authentication a packet is
    /// at most 4 KiB whatever this says.
    #[arg(long, env = "GATECAST_INNER_MAX_PACKET", default_value_t = 10 << 20)]
    pub inner_max_packet: usize,

    /// IPv4 address other nodes and tools reach this node at; part of every
    /// client_id. Default: the address of the default-route interface, else
    /// 127.0.0.1. A comma-separated list (Kubernetes' status.podIPs on a
    /// dual-stack cluster) gives its first IPv4 address.
    #[arg(long, env = "GATECAST_ADVERTISE_IP", value_parser = parse_advertise_ip)]
    pub advertise_ip: Option<Ipv4Addr>,

    /// Redis to form a cluster through (redis://, rediss://, redis-sentinel://,
    /// redis-cluster://). Unset: a single node with the in-process engine.
    /// Shown in logs without password or query.
    #[arg(long, env = "GATECAST_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Secret>,

    /// Password for the Redis servers, instead of one in --redis-url: the
    /// URL can then live in plain configuration and the password alone in
    /// a secret store, with no URL encoding.
    #[arg(long, env = "GATECAST_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<Secret>,

    /// Prefix of every Redis key and channel gatecast uses.
    #[arg(long, env = "GATECAST_REDIS_PREFIX", default_value = "gatecast")]
    pub redis_prefix: String,

    /// When set, every /api/ request must carry `Authorization: Bearer <key>`.
    /// At least 16 bytes, and not a known placeholder such as `change-me`.
    #[arg(long, env = "GATECAST_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,

    /// Serve the API on a non-loopback --api-listen without --api-key: for
    /// local tries and networks where nothing else can reach the port.
    #[arg(long, env = "GATECAST_API_INSECURE", default_value_t = false)]
    pub api_insecure: bool,

    /// HS256 secret: WebSocket clients must present a valid JWT as ?token=.
    /// At least 16 bytes, and not a known placeholder such as `change-me`.
    #[arg(long, env = "GATECAST_CLIENT_JWT_SECRET", hide_env_values = true)]
    pub client_jwt_secret: Option<Secret>,

    /// PEM public key file (RSA for RS256, EC P-256 for ES256): WebSocket
    /// clients must present a JWT signed with its private key as ?token=.
    #[arg(long, env = "GATECAST_CLIENT_JWT_PUBLIC_KEY")]
    pub client_jwt_public_key: Option<PathBuf>,

    /// Refuse client tokens without an `exp` claim (a token without one
    /// would never expire). `--client-jwt-require-exp=false` to accept them.
    #[arg(long, env = "GATECAST_CLIENT_JWT_REQUIRE_EXP", default_value_t = true, action = clap::ArgAction::Set)]
    pub client_jwt_require_exp: bool,

    /// When set, a client token's `aud` claim must name this audience.
    #[arg(long, env = "GATECAST_CLIENT_JWT_AUDIENCE")]
    pub client_jwt_audience: Option<String>,

    /// When set, a client token's `iss` claim must be this issuer.
    #[arg(long, env = "GATECAST_CLIENT_JWT_ISSUER")]
    pub client_jwt_issuer: Option<String>,

    /// Clock skew tolerated on a client token's `exp` and `nbf` (whole
    /// seconds, at most 5m).
    #[arg(long, env = "GATECAST_CLIENT_JWT_LEEWAY", default_value = "30s", value_parser = humantime::parse_duration)]
    pub client_jwt_leeway: Duration,

    /// Close a connection when its token expires (close code 4001, reason
    /// "token expired"), so the client reconnects with a fresh token.
    /// Checked by the ping sweep: within a quarter of --ping-timeout (or
    /// one --ping-interval, if shorter) after `exp` plus the leeway.
    #[arg(long, env = "GATECAST_CLIENT_JWT_ENFORCE_EXP", default_value_t = false)]
    pub client_jwt_enforce_exp: bool,

    /// Origins allowed to open a WebSocket (comma-separated, e.g.
    /// `https://app.example.com`). Empty: any origin.
    #[arg(long, env = "GATECAST_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// The first frame a WebSocket client gets (text): `{client_id}` is
    /// replaced with its id. GatewayWorker front ends often expect
    /// `{"type":"init","client_id":"{client_id}"}`.
    #[arg(long, env = "GATECAST_WELCOME_FRAME", default_value = WelcomeFrame::DEFAULT, value_parser = WelcomeFrame::parse)]
    pub welcome_frame: WelcomeFrame,

    /// Most WebSocket connections this node holds; more are refused with
    /// 503 before the upgrade. 0: no limit.
    #[arg(long, env = "GATECAST_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Most WebSocket connections from one client address; more are refused
    /// with 429. 0 (the default): no limit. Behind a proxy, set
    /// --trusted-proxies, else every client shares the proxy's address.
    #[arg(long, env = "GATECAST_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,

    /// Most WebSocket connections with one JWT `sub` (one uid) on this
    /// node; more are refused with 429 before the upgrade. The default is
    /// more than a real user's tabs and devices. 0: no limit. Tokens
    /// without `sub` are not counted.
    #[arg(long, env = "GATECAST_MAX_CONNECTIONS_PER_SUB", default_value_t = 100)]
    pub max_connections_per_sub: usize,

    /// Most connections on the public listener still in their handshake
    /// (accepted, not yet upgraded or answered); more are answered 503 and
    /// closed at once, so slow or idle sockets cannot pile up request
    /// buffers. 0: no limit.
    #[arg(long, env = "GATECAST_MAX_HANDSHAKES", default_value_t = 4096)]
    pub max_handshakes: usize,

    /// Bytes of unfinished client messages (partial frames and fragmented
    /// messages) this node buffers, all connections together; past it the
    /// connections whose message has been incomplete longest are closed
    /// with 1013 until it fits. 0: no limit.
    #[arg(long, env = "GATECAST_MAX_PARTIAL_BYTES", default_value_t = 256 << 20)]
    pub max_partial_bytes: usize,

    /// Largest session, in bytes of JSON, and 64 levels deep at most:
    /// larger or deeper ones are refused wherever they come from (token,
    /// API, GatewayWorker, Redis), and a merge that would grow a session
    /// past it changes nothing.
    #[arg(long, env = "GATECAST_MAX_SESSION_BYTES", default_value_t = 64 << 10)]
    pub max_session_bytes: usize,

    /// New WebSocket connections per second from one client address (an
    /// IPv6 client's /64), after a burst of --connect-burst-per-ip; faster
    /// ones are refused with 429. 0: no limit. Loopback and private
    /// addresses, where proxies and load balancers sit, are not limited
    /// unless --connect-rate-private.
    #[arg(long, env = "GATECAST_CONNECT_RATE_PER_IP", default_value_t = 20)]
    pub connect_rate_per_ip: u32,

    /// Connections one client address may open at once before
    /// --connect-rate-per-ip applies.
    #[arg(long, env = "GATECAST_CONNECT_BURST_PER_IP", default_value_t = 40)]
    pub connect_burst_per_ip: u32,

    /// Apply --connect-rate-per-ip to loopback and private addresses
    /// (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7...) too.
    #[arg(long, env = "GATECAST_CONNECT_RATE_PRIVATE", default_value_t = false)]
    pub connect_rate_private: bool,

    /// Time from accepting a connection on the public listener to its
    /// request head read (and, for a WebSocket, to the upgrade); a client
    /// slower than this is disconnected (at least 100ms).
    #[arg(long, env = "GATECAST_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Largest HTTP request head (request line and headers, the token in
    /// the query included) on the public listener, in bytes; larger ones
    /// get 431 (at least 4096).
    #[arg(long, env = "GATECAST_MAX_REQUEST_HEAD_BYTES", default_value_t = 32 << 10)]
    pub max_request_head_bytes: usize,

    /// Messages per second one client may send while --events is on or a
    /// BusinessWorker is connected, after
    /// a burst of --client-message-burst; past it the connection is closed
    /// with 1008. 0: no limit.
    #[arg(long, env = "GATECAST_CLIENT_MESSAGE_RATE", default_value_t = 100)]
    pub client_message_rate: u32,

    /// Messages one client may send at once before --client-message-rate
    /// applies.
    #[arg(long, env = "GATECAST_CLIENT_MESSAGE_BURST", default_value_t = 200)]
    pub client_message_burst: u32,

    /// Message bytes per second one client may send while --events is on or
    /// a BusinessWorker is connected, after a burst of two seconds' worth (at least one
    /// --max-message-bytes message); past it the connection is closed with
    /// 1008. 0: no limit.
    #[arg(long, env = "GATECAST_CLIENT_MESSAGE_BYTES_RATE", default_value_t = 1 << 20)]
    pub client_message_bytes_rate: usize,

    /// Proxies (addresses or CIDR ranges, comma-separated) whose
    /// X-Forwarded-For is believed for the client's address; from anyone
    /// else the header is ignored.
    #[arg(long, env = "GATECAST_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Largest WebSocket message, both ways, in bytes. A larger client frame
    /// closes the connection with 1009; a larger push is refused with 413.
    #[arg(long, env = "GATECAST_MAX_MESSAGE_BYTES", default_value_t = 65536)]
    pub max_message_bytes: usize,

    /// Most items in one list of a call (`client_ids`, `exclude_client_ids`,
    /// `uids`, `groups`), from the API or from Redis; a push names at most
    /// 100 groups whatever this says.
    #[arg(long, env = "GATECAST_MAX_LIST_ITEMS", default_value_t = 10_000)]
    pub max_list_items: usize,

    /// Frames queued for one client before it counts as too slow and is
    /// closed with 1013.
    #[arg(long, env = "GATECAST_CLIENT_QUEUE", default_value_t = 1024)]
    pub client_queue: usize,

    /// Bytes queued for one client before it counts as too slow and is
    /// closed with 1013 (bounds memory when messages are large).
    #[arg(long, env = "GATECAST_CLIENT_QUEUE_BYTES", default_value_t = 1 << 20)]
    pub client_queue_bytes: usize,

    /// Hold the wake-ups of connection writers after a push for this long
    /// (at most 100ms; timers tick in milliseconds), so the frames of
    /// several pushes go out in one system call: less CPU per delivery
    /// under load, up to this much more latency. 0: write at once.
    #[arg(long, env = "GATECAST_WRITE_DELAY", default_value = "0s", value_parser = parse_write_delay)]
    pub write_delay: Duration,

    /// Interval between the server's WebSocket pings (at least 100ms).
    #[arg(long, env = "GATECAST_PING_INTERVAL", default_value = "25s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// A connection that sent nothing for this long is closed (at least
    /// 500ms, and longer than --ping-interval).
    #[arg(long, env = "GATECAST_PING_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub ping_timeout: Duration,

    /// A frame or fragmented message from a client must arrive whole within
    /// this (at least 100ms); past it the connection is closed with 1008 (a
    /// client trickling bytes would otherwise hold its buffers for ever).
    #[arg(long, env = "GATECAST_MESSAGE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub message_timeout: Duration,

    /// Time allowed for a graceful shutdown after SIGTERM/SIGINT (at least 1s).
    #[arg(long, env = "GATECAST_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Spread the drain's 1001 closes over this part of --shutdown-grace
    /// (in slices every 100ms), and tell each client to wait a delay picked
    /// at random within it before reconnecting (`retry_ms` in the close
    /// reason), so the clients do not all reconnect to the other nodes in
    /// the same instant. `auto`: half of --shutdown-grace, at most 10s. 0:
    /// close every client at once. At most three quarters of
    /// --shutdown-grace.
    #[arg(long, env = "GATECAST_DRAIN_SPREAD", default_value = "auto", value_parser = DrainSpread::parse)]
    pub drain_spread: DrainSpread,

    /// Interval of this node's heartbeat in Redis; a node that stops beating
    /// is purged by the others within three intervals (at least 100ms).
    #[arg(long, env = "GATECAST_NODE_HEARTBEAT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub node_heartbeat: Duration,

    // A node cut off from Redis (issue 32).
    /// How long this node keeps its clients while it cannot reach Redis
    /// (disconnected, not answering, or refusing writes). Past it the node
    /// refuses new WebSocket handshakes and closes every client with 1001
    /// `{"reason":"redis_lost","retry_ms":N}` (N spread over
    /// --reconnect-window), so they move to nodes that can serve them;
    /// clients that opted in to recovery go earlier, after 2.5
    /// --node-heartbeat, if that comes first. 0: never (only the opted-in
    /// clients go); else at least 1s.
    #[arg(long, env = "GATECAST_REDIS_LOST_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub redis_lost_grace: Duration,

    // Resume records (docs/recovery.md section 2.1).
    /// How long a connection that opted in to recovery (`/ws?recover=1`)
    /// can be resumed, on any node, after it is gone (closed, drained, or
    /// its node died); at least 100ms.
    #[arg(long, env = "GATECAST_RESUME_WINDOW", default_value = "120s", value_parser = humantime::parse_duration)]
    pub resume_window: Duration,

    // Autoscaling (issue 29): admission control, reconnect delays,
    // evacuation and rebalancing.
    /// New WebSocket handshakes per second this node admits, all clients
    /// together, checked before the token and any Redis write; past it the
    /// handshake is answered 503 with `Retry-After`. Behind a load balancer
    /// every client has another address, so only a node-wide rate holds a
    /// reconnecting herd back. 0: no limit.
    #[arg(long, env = "GATECAST_HANDSHAKE_RATE", default_value_t = 2000)]
    pub handshake_rate: u32,

    /// After the node first turns ready, --handshake-rate rises linearly
    /// from a tenth to the whole over this time, so a fresh pod is not
    /// flattened by the whole herd the moment it is ready. 0: no ramp.
    #[arg(long, env = "GATECAST_HANDSHAKE_RAMP", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_ramp: Duration,

    /// Evacuation, rebalancing and overload closes tell each client to wait
    /// a delay picked at random up to this long before reconnecting
    /// (`retry_ms` in the close reason).
    #[arg(long, env = "GATECAST_RECONNECT_WINDOW", default_value = "5s", value_parser = humantime::parse_duration)]
    pub reconnect_window: Duration,

    /// Clients closed per second by `POST /api/evacuate` when the request
    /// names no `rate`.
    #[arg(long, env = "GATECAST_EVACUATE_RATE", default_value_t = 200)]
    pub evacuate_rate: u32,

    /// Move connections from nodes above the cluster's mean to the others
    /// (`on`), or not (`off`). Needs --redis-url; nodes publish their
    /// connection count in Redis either way.
    #[arg(long, env = "GATECAST_REBALANCE", value_enum, default_value_t = Rebalance::On)]
    pub rebalance: Rebalance,

    /// How far above the mean of the ready nodes a node may be before it
    /// sheds connections (0.1: 10 %). It then sheds down to half of that
    /// above the mean, never below the mean.
    #[arg(long, env = "GATECAST_REBALANCE_TOLERANCE", default_value_t = 0.1)]
    pub rebalance_tolerance: f64,

    /// Most connections a shedding node closes per second, as a fraction of
    /// those it holds (0.01: 1 %).
    #[arg(long, env = "GATECAST_REBALANCE_RATE", default_value_t = 0.01)]
    pub rebalance_rate: f64,

    /// Time between two rebalancing rounds: each publishes the node's
    /// count, reads the others' and decides (at least 100ms).
    #[arg(long, env = "GATECAST_REBALANCE_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub rebalance_interval: Duration,

    /// Largest HTTP API request body, in bytes (413 above it).
    #[arg(long, env = "GATECAST_API_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub api_max_body_bytes: usize,

    /// Forward connect, message and close events to backends: to the Redis
    /// stream `<prefix>:events` with --redis-url, else to --events-webhook.
    #[arg(long, env = "GATECAST_EVENTS", default_value_t = false)]
    pub events: bool,

    /// Approximate length the events stream is trimmed to (XADD MAXLEN ~).
    #[arg(long, env = "GATECAST_EVENTS_MAX_LEN", default_value_t = 100_000)]
    pub events_max_len: i64,

    /// Largest event (payload and session, about) sent to the stream or
    /// webhook; larger ones are dropped and counted.
    #[arg(long, env = "GATECAST_EVENTS_MAX_BYTES", default_value_t = 256 << 10)]
    pub events_max_bytes: usize,

    /// Bytes the events stream may hold, about: the length it is trimmed
    /// to shrinks (below --events-max-len) as events grow larger, so
    /// events cannot fill Redis. 0: trimmed by --events-max-len only.
    #[arg(long, env = "GATECAST_EVENTS_STREAM_BYTES", default_value_t = 256 << 20)]
    pub events_stream_bytes: usize,

    /// A Redis for the events stream alone (same URL forms as
    /// --redis-url; its password in the URL), so events never fill the
    /// Redis that holds the cluster's membership. Unset: --redis-url.
    #[arg(long, env = "GATECAST_EVENTS_REDIS_URL", hide_env_values = true)]
    pub events_redis_url: Option<Secret>,

    /// Bytes of events (payload and session, about) waiting for the stream
    /// or webhook; past it new events are dropped and counted. One
    /// connection's events may hold an eighth of it.
    #[arg(long, env = "GATECAST_EVENTS_QUEUE_BYTES", default_value_t = 64 << 20)]
    pub events_queue_bytes: usize,

    /// Without Redis: URL each event is POSTed to as JSON (http:// or
    /// https://; redirects are not followed). Shown in logs without
    /// password or query.
    #[arg(long, env = "GATECAST_EVENTS_WEBHOOK", hide_env_values = true)]
    pub events_webhook: Option<Secret>,

    /// Request headers forwarded in connect events (comma-separated
    /// names). `Cookie` is not among the defaults: add it only with
    /// --allowed-origins set, or any site can open a connection carrying
    /// your users' cookies.
    #[arg(long, env = "GATECAST_EVENTS_HEADERS", value_delimiter = ',', default_value = crate::events::DEFAULT_FORWARDED_HEADERS)]
    pub events_headers: Vec<String>,

    /// Keep the client's `token` in the query BusinessWorkers get with
    /// `onWebSocketConnect`. By default it is left out when gatecast
    /// verified it (client auth on): it is gatecast's credential, not the
    /// application's.
    #[arg(long, env = "GATECAST_WORKER_KEEP_TOKEN", default_value_t = false)]
    pub worker_keep_token: bool,

    /// Serve a demo page at /demo on the public listener: it connects with
    /// gatecast.js and shows its client_id, state, every message, and the
    /// curl lines that push to it through the API. For trying gatecast out,
    /// not for production.
    #[arg(long, env = "GATECAST_DEMO", default_value_t = false)]
    pub demo: bool,
    // --- History (issue 27, docs/recovery.md section 2.2) ---
    /// Pushes kept per stream (`u:<uid>`, `g:<group>`, `all`) for
    /// clients that resume with `?recover=1` (1 to 10000).
    #[arg(long, env = "GATECAST_HISTORY_SIZE", default_value_t = 100)]
    pub history_size: usize,

    /// How long a stream's history is kept after its last push, and the
    /// oldest entry a replay uses (at least 1s).
    #[arg(long, env = "GATECAST_HISTORY_TTL", default_value = "300s", value_parser = humantime::parse_duration)]
    pub history_ttl: Duration,

    /// Streams whose pushes are kept in history by default: comma-separated
    /// name prefixes (`u:` every uid, `g:chat-` groups starting with
    /// `chat-`, `all`). Empty: history only for pushes that ask for it
    /// (`"history": true`); `"history": false` overrides either way.
    #[arg(
        long,
        env = "GATECAST_HISTORY_STREAMS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub history_streams: Vec<String>,

    // --- Presence events (issue 31, docs/events.md section 8) ---
    /// Presence events to emit, comma-separated: `uid` (online/offline:
    /// a uid's first connection anywhere / its last gone), `group`
    /// (occupied/vacated). Needs --events. Empty: none, and no extra Redis
    /// work.
    #[arg(
        long,
        env = "GATECAST_PRESENCE_EVENTS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub presence_events: Vec<String>,

    /// An offline (vacated) followed by an online (occupied) within this
    /// time produces neither (a page reload); offline and vacated are sent
    /// this late. 0: at once.
    #[arg(long, env = "GATECAST_PRESENCE_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub presence_grace: Duration,

    /// Only uids and groups whose name starts with one of these prefixes
    /// have presence events, comma-separated (e.g. `room:,vip:`). Empty:
    /// every name. Names outside cost no presence work in Redis.
    #[arg(
        long,
        env = "GATECAST_PRESENCE_PREFIXES",
        value_delimiter = ',',
        default_value = ""
    )]
    pub presence_prefixes: Vec<String>,

    /// Log format.
    #[arg(long, env = "GATECAST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter (tracing's EnvFilter syntax, e.g. `info,gatecast=debug`).
    #[arg(long, env = "GATECAST_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Shortest `--node-heartbeat`: below it the heartbeat alone keeps Redis
/// busy, and a zero interval panics the heartbeat task.
pub const MIN_NODE_HEARTBEAT: Duration = Duration::from_millis(100);
/// Shortest `--ping-interval`: one sweep of every connection per interval.
pub const MIN_PING_INTERVAL: Duration = Duration::from_millis(100);
/// Shortest `--ping-timeout`. Below a second only for tests: a browser on a
/// slow network needs far longer.
pub const MIN_PING_TIMEOUT: Duration = Duration::from_millis(500);
/// Shortest `--shutdown-grace`: closing clients and leaving the cluster
/// takes a few Redis round trips, and events need time to flush.
pub const MIN_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// `--advertise-ip`: an IPv4 address, or a comma-separated list of IPv4 and
/// IPv6 addresses of which the first IPv4 one is taken. client_ids hold an
/// IPv4 address (GatewayWorker's layout), so an IPv6-only list is refused
/// with the reason rather than a bare syntax error.
fn parse_advertise_ip(value: &str) -> Result<Ipv4Addr, String> {
    let mut addresses = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) => return Ok(ip),
            Ok(std::net::IpAddr::V6(_)) => addresses.push(part),
            Err(_) => return Err(format!("{part:?} is not an IP address")),
        }
    }
    Err(format!(
        "no IPv4 address in {value:?}: gatecast's client_ids hold an IPv4 address, \
         so the node needs one (on Kubernetes, an IPv4 or dual-stack cluster with \
         GATECAST_ADVERTISE_IP from status.podIPs)"
    ))
}

/// The shortest API key or HS256 secret accepted: a shorter one can be
/// guessed, and an HS256 secret anyone guesses lets them mint any token.
pub const MIN_SECRET_BYTES: usize = 16;

impl Config {
    /// The advertised IPv4 address: the flag, else the address the inner
    /// listener is explicitly bound to when it is one specific IPv4 address
    /// (nothing listens on any other), else the default-route interface's
    /// address, else loopback.
    pub fn advertised_ip(&self) -> Ipv4Addr {
        self.advertise_ip
            .or_else(|| match self.inner_listen.map(|a| a.ip()) {
                Some(std::net::IpAddr::V4(ip)) if !ip.is_unspecified() => Some(ip),
                _ => None,
            })
            .or_else(default_route_ipv4)
            .unwrap_or(Ipv4Addr::LOCALHOST)
    }

    /// The drain's spread: `--drain-spread`, or for `auto` half of
    /// `--shutdown-grace`, at most 10s.
    pub fn drain_spread(&self) -> Duration {
        match self.drain_spread {
            DrainSpread::Fixed(spread) => spread,
            DrainSpread::Auto => (self.shutdown_grace / 2).min(Duration::from_secs(10)),
        }
    }

    /// The address the inner listener binds: `--inner-listen`, else
    /// [`DEFAULT_INNER_LISTEN`].
    pub fn inner_bind(&self) -> SocketAddr {
        self.inner_listen.unwrap_or(DEFAULT_INNER_LISTEN)
    }

    /// What is allowed but worth a line at start: a weak gateway key taken
    /// with --gateway-weak-key-ok, open GatewayWorker ports without a key,
    /// an inner listener nothing at the advertised address can reach.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let key = self.gateway_secret_key.as_str();
        if !key.is_empty() && self.gateway_weak_key_ok {
            if let Err(weak) = strong_secret("--gateway-secret-key", key) {
                out.push(format!(
                    "{weak} (accepted because of --gateway-weak-key-ok: change the PHP \
                     fleet's secretKey as soon as it can)"
                ));
            }
        }
        if key.is_empty() && self.gateway_insecure && !self.gateway_ports_private() {
            out.push(
                "--gateway-insecure: the inner and Register ports take anyone who reaches \
                 them (every client's handshake, messages and sessions)"
                    .into(),
            );
        }
        out
    }

    /// A note for the start log when nothing at the advertised address can
    /// reach the inner listener (the default: PHP is not served).
    pub fn inner_unreachable_note(&self) -> Option<String> {
        let inner = self.inner_bind();
        let advertised = self.advertised_ip();
        (inner.ip().is_loopback() && !advertised.is_loopback()).then(|| {
            format!(
                "the inner listener is on {inner}, loopback only: GatewayClient and \
                 BusinessWorkers cannot reach it at the advertised {advertised}; to use \
                 them, set --inner-listen and --gateway-secret-key"
            )
        })
    }

    /// Whether the inner and Register listeners are on loopback only.
    fn gateway_ports_private(&self) -> bool {
        self.inner_bind().ip().is_loopback()
            && self.register_listen.is_none_or(|a| a.ip().is_loopback())
    }

    /// Which presence events are on, and their grace.
    pub fn presence(&self) -> crate::presence::PresenceSettings {
        let on = |name: &str| self.presence_events.iter().any(|p| p == name);
        crate::presence::PresenceSettings {
            uid: on("uid"),
            group: on("group"),
            grace: self.presence_grace,
            prefixes: self
                .presence_prefixes
                .iter()
                .filter(|p| !p.is_empty())
                .cloned()
                .collect(),
        }
    }
}

/// An address or a CIDR range (`10.0.0.0/8`, `192.0.2.7`).
/// `--write-delay`: a duration of at most 100ms.
fn parse_write_delay(s: &str) -> Result<Duration, String> {
    let delay = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if delay > Duration::from_millis(100) {
        return Err("at most 100ms: a longer delay is latency, not batching".into());
    }
    Ok(delay)
}

fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is not an address or a CIDR range"))
}

/// Where the inner listener binds without `--inner-listen`: loopback, so a
/// node that does not serve PHP exposes nothing.
pub const DEFAULT_INNER_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 2900);

/// Smallest `--inner-max-packet`: a GatewayClient call with a session.
pub const MIN_INNER_MAX_PACKET: usize = 64 << 10;

/// Longest `--client-jwt-leeway`: a larger one keeps expired tokens
/// valid for long.
pub const MAX_CLIENT_JWT_LEEWAY: Duration = Duration::from_secs(300);

/// Smallest `--max-request-head-bytes`: a request line with a token and
/// the usual browser headers need a few KiB.
pub const MIN_REQUEST_HEAD_BYTES: usize = 4096;

/// The local address the kernel would use for the default route. A UDP
/// "connect" only consults the routing table; no packet is sent.
fn default_route_ipv4() -> Option<Ipv4Addr> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect((Ipv4Addr::new(192, 0, 2, 1), 9)).ok()?;
    match socket.local_addr().ok()?.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autoscaling_defaults_and_the_auto_drain_spread() {
        let c = Config::try_parse_from(["gatecast"]).unwrap();
        assert_eq!(c.handshake_rate, 2000);
        assert_eq!(c.handshake_ramp, Duration::from_secs(10));
        assert_eq!(c.rebalance, Rebalance::On);
        assert_eq!(c.drain_spread, DrainSpread::Auto);
        // Half the grace, at most 10s, so it fits any grace.
        assert_eq!(c.drain_spread(), Duration::from_secs(10));
        let short = Config::try_parse_from(["gatecast", "--shutdown-grace", "4s"]).unwrap();
        assert_eq!(short.drain_spread(), Duration::from_secs(2));
        short.validate().unwrap();
        let fixed = Config::try_parse_from(["gatecast", "--drain-spread", "1500ms"]).unwrap();
        assert_eq!(fixed.drain_spread(), Duration::from_millis(1500));
        assert!(Config::try_parse_from(["gatecast", "--drain-spread", "soon"]).is_err());
        let bad = Config::try_parse_from(["gatecast", "--rebalance-rate", "0"]).unwrap();
        assert!(bad.validate().unwrap_err().contains("--rebalance-rate"));
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = Config::try_parse_from(["gatecast"]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.api_listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(c.inner_bind(), "127.0.0.1:2900".parse().unwrap());
        assert!(c.inner_listen.is_none());
        assert_eq!(c.inner_max_packet, 10 << 20);
        assert_eq!(c.ping_interval, Duration::from_secs(25));
        assert_eq!(c.ping_timeout, Duration::from_secs(60));
        assert_eq!(c.shutdown_grace, Duration::from_secs(20));
        assert_eq!(c.node_heartbeat, Duration::from_secs(5));
        assert_eq!(c.resume_window, Duration::from_secs(120));
        assert!(c.redis_url.is_none());
        assert_eq!(c.events_queue_bytes, 64 << 20);
        // Issue 25's budgets.
        assert_eq!(c.max_connections_per_sub, 100);
        assert_eq!(c.max_handshakes, 4096);
        assert_eq!(c.max_partial_bytes, 256 << 20);
        assert_eq!(c.max_session_bytes, 64 << 10);
        assert_eq!(c.events_max_bytes, 256 << 10);
        assert!(!c.worker_keep_token);
        c.validate().unwrap();
    }

    #[test]
    fn an_explicit_specific_inner_address_is_advertised() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["gatecast"];
            argv.extend_from_slice(args);
            Config::try_parse_from(argv).unwrap()
        };
        let c = parse(&["--inner-listen", "127.0.0.1:2901"]);
        assert_eq!(c.advertised_ip(), Ipv4Addr::LOCALHOST);
        let c = parse(&[
            "--inner-listen",
            "127.0.0.1:2901",
            "--advertise-ip",
            "10.1.2.3",
        ]);
        assert_eq!(c.advertised_ip(), Ipv4Addr::new(10, 1, 2, 3));
        let c = parse(&["--inner-listen", "10.9.8.7:2901", "--gateway-insecure"]);
        assert_eq!(c.advertised_ip(), Ipv4Addr::new(10, 9, 8, 7));
        // The default (loopback) and 0.0.0.0 keep the default-route address.
        let default = parse(&[]);
        let any = parse(&["--inner-listen", "0.0.0.0:2900"]);
        assert_eq!(default.advertised_ip(), any.advertised_ip());
        if default.advertised_ip() != Ipv4Addr::LOCALHOST {
            assert!(default.inner_unreachable_note().is_some());
        }
    }

    #[test]
    fn debug_shows_every_option_but_no_secret() {
        let secrets = [
            "debug-api-key-0123456789",
            "debug-jwt-secret-0123456789",
            "debug-redis-url-pass",
            "debug-redis-password",
            "debug-gateway-key",
            "debug-webhook-key",
        ];
        let c = Config::try_parse_from([
            "gatecast",
            "--api-key",
            secrets[0],
            "--client-jwt-secret",
            secrets[1],
            "--redis-url",
            "redis://app:debug-redis-url-pass@redis:6379",
            "--redis-password",
            secrets[3],
            "--gateway-secret-key",
            secrets[4],
            "--events-webhook",
            "https://hooks.example/in?key=debug-webhook-key",
        ])
        .unwrap();
        // The values are there for the code that uses them...
        assert_eq!(c.api_key.as_ref().unwrap().expose(), secrets[0]);
        assert_eq!(c.gateway_secret_key.as_str(), secrets[4]);
        for shown in [format!("{c:?}"), format!("{c:#?}")] {
            // ...but never printed.
            for secret in secrets {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
            assert_eq!(shown.matches("<redacted>").count(), 6, "{shown}");
            assert!(shown.contains("max_connections"), "{shown}");
        }
    }

    #[test]
    fn welcome_frame_replaces_every_placeholder() {
        let c = Config::try_parse_from(["gatecast"]).unwrap();
        assert_eq!(
            c.welcome_frame.render("7f0000010b5400000001"),
            r#"{"type":"welcome","client_id":"7f0000010b5400000001"}"#
        );
        let twice = WelcomeFrame::parse("{client_id}:{client_id}").unwrap();
        assert_eq!(twice.render("ab"), "ab:ab");
        let error = Config::try_parse_from(["gatecast", "--welcome-frame", r#"{"type":"init"}"#])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--welcome-frame"), "{error}");
        assert!(error.contains("{client_id}"), "{error}");
    }

    #[test]
    fn parses_lists_and_durations() {
        let c = Config::try_parse_from([
            "gatecast",
            "--allowed-origins",
            "https://a.example,https://b.example",
            "--ping-interval",
            "1500ms",
        ])
        .unwrap();
        assert_eq!(c.allowed_origins.len(), 2);
        assert_eq!(c.ping_interval, Duration::from_millis(1500));
    }
}
