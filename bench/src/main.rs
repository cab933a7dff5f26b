//! Measurements of running servers, for docs/benchmarks.md. Every scenario
//! prints one JSON line.
//!
//! `idle`: opens many WebSocket connections (spread over several loopback
//! source addresses), optionally binds each to a uid and a group through an
//! API (another node's: the cluster case) and pushes to each once, and
//! reports how much the node's RSS grew per connection. `fanout` and
//! `broadcast`: deliveries per second and server CPU per delivery, every
//! push one HTTP call from concurrent callers (or batches, gatecast only),
//! or one PUBLISH of gatecast's envelope straight to Redis (`--via redis`);
//! `--window W` keeps at most W pushes outstanding (flow control) and
//! push-to-last-delivery latency is reported.
//! `unicast`: latency percentiles at a fixed rate of pushes to uids.
//! `storm`: connects per second of a reconnect storm. Every server is
//! spoken to through the same API shape (`POST /api/METHOD`, JSON), so the
//! peers of bench/peers/ run the same scenarios.
//! `churn`: clients coming and going on several nodes while pushes run (the
//! load of bench/soak.sh).

mod churn;
mod deliver;
mod hold;
mod idle;
mod util;

use std::net::SocketAddr;
use std::time::Instant;

use clap::{Parser, Subcommand};
use futures_util::StreamExt;

use deliver::{Mode, Target, Via};
use util::{connect_with, Ws};

#[derive(Parser)]
struct Args {
    /// Third octet of the client source addresses (127.0.<this>.2, .3, …):
    /// give runs that follow each other different ones, so ports left in
    /// TIME_WAIT by the last run do not slow the next.
    #[arg(long, global = true, default_value_t = 0)]
    source_net: u8,
    #[command(subcommand)]
    command: Cmd,
}

/// Where pushes go and whose CPU counts, shared by the delivery scenarios.
#[derive(clap::Args)]
struct TargetArgs {
    /// Process ids of the server (every node; CPU time is summed).
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
    /// The node the clients connect to; several, comma-separated: clients
    /// spread round robin over them.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8080")]
    addr: Vec<SocketAddr>,
    /// The API the pushes go through; may be another node's. Several,
    /// comma-separated: every call (push, join, bind) goes to the next one
    /// in turn, as a Service spreads them.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8081")]
    api: Vec<SocketAddr>,
    /// Concurrent API callers: HTTP calls in flight at once in total,
    /// over all `--api` addresses (not per node).
    #[arg(long, default_value_t = 16)]
    callers: usize,
    /// One HTTP call per push, or 100 per /api/batch call (gatecast only).
    #[arg(long, value_enum, default_value_t = Mode::Single)]
    mode: Mode,
    /// Prefix of group and uid names.
    #[arg(long, default_value = "bench-")]
    prefix: String,
    /// Flow control of fanout and broadcast: at most this many pushes
    /// outstanding (sent, not yet received by every recipient) across all
    /// callers; 0: open loop.
    #[arg(long, default_value_t = 0)]
    window: usize,
    /// Pushes through the HTTP API, or PUBLISHed straight to Redis as
    /// gatecast's envelope (joins and binds still use the API).
    #[arg(long, value_enum, default_value_t = Via::Http)]
    via: Via,
    /// The Redis of `--via redis`.
    #[arg(long)]
    redis_url: Option<String>,
    /// gatecast's `--redis-prefix`, for `--via redis`.
    #[arg(long, default_value = "gatecast")]
    redis_prefix: String,
}

impl TargetArgs {
    fn target(self) -> Target {
        Target {
            pids: self.pid,
            addrs: self.addr,
            api: self.api,
            callers: self.callers,
            mode: self.mode,
            prefix: self.prefix,
            window: self.window,
            via: self.via,
            redis_url: self.redis_url,
            redis_prefix: self.redis_prefix,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// RSS per idle connection; with `--api`, after a bind and one push.
    Idle(idle::Options),
    /// A reconnect storm: clients, each with a uid of its own (JWT `sub`),
    /// connect at once; reports connects per second (until the last
    /// welcome). With the Redis engine each welcome waits until the node
    /// follows the uid's channel.
    Storm {
        /// The node's public address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        /// Clients.
        #[arg(long, default_value_t = 5000)]
        count: usize,
        /// Connections opened at once.
        #[arg(long, default_value_t = 500)]
        concurrency: usize,
        /// The node's `--client-jwt-secret`.
        #[arg(long)]
        jwt_secret: String,
    },
    /// Group fan-out throughput.
    Fanout {
        #[command(flatten)]
        target: TargetArgs,
        /// Clients per group.
        #[arg(long, default_value_t = 1000)]
        group_size: usize,
        /// Groups.
        #[arg(long, default_value_t = 2)]
        groups: usize,
        /// Pushes per group (sent round robin over the groups).
        #[arg(long, default_value_t = 2000)]
        pushes: usize,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Pushes per second, sent on a fixed schedule (a push whose
        /// time came while every caller was busy goes when one frees up,
        /// and its latency counts from then); 0: as fast as the callers go.
        #[arg(long, default_value_t = 0)]
        rate: u64,
    },
    /// Many clients held over several nodes, each bound to a uid and in a
    /// few groups; times stamped pushes per tag, reports on SIGUSR1
    /// (bench/100k.sh).
    Hold(hold::HoldOptions),
    /// Stamped pushes for `hold`'s clients, through the APIs, at a rate or
    /// as fast as the callers go.
    Push(hold::PushOptions),
    /// Connect/push/disconnect churn over several nodes (bench/soak.sh).
    Churn {
        /// The nodes' public addresses, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        addrs: Vec<SocketAddr>,
        /// Their API addresses, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        apis: Vec<SocketAddr>,
        /// Clients at a time.
        #[arg(long, default_value_t = 500)]
        clients: usize,
        /// How long to run.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
    /// send_to_all throughput.
    Broadcast {
        #[command(flatten)]
        target: TargetArgs,
        /// Clients.
        #[arg(long, default_value_t = 5000)]
        clients: usize,
        /// Pushes.
        #[arg(long, default_value_t = 200)]
        pushes: usize,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Pushes per second, sent on a fixed schedule (a push whose
        /// time came while every caller was busy goes when one frees up,
        /// and its latency counts from then); 0: as fast as the callers go.
        #[arg(long, default_value_t = 0)]
        rate: u64,
    },
    /// Latency of pushes to uids at a fixed rate (the send time travels in
    /// the payload).
    Unicast {
        #[command(flatten)]
        target: TargetArgs,
        /// Clients, each bound to a uid of its own.
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Pushes per second.
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// Seconds of pushing.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Payload size in bytes (at least 20: the send time).
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    util::SOURCE_NET.store(args.source_net, std::sync::atomic::Ordering::Relaxed);
    match args.command {
        Cmd::Idle(options) => idle::run(options).await,
        Cmd::Hold(options) => hold::hold(options).await,
        Cmd::Push(options) => hold::push(options).await,
        Cmd::Storm {
            addr,
            count,
            concurrency,
            jwt_secret,
        } => storm(addr, count, concurrency, &jwt_secret).await,
        Cmd::Fanout {
            target,
            group_size,
            groups,
            pushes,
            size,
            rate,
        } => {
            let shape = deliver::Shape {
                groups: groups.max(1),
                group_size,
                pushes,
                size,
                rate,
            };
            deliver::throughput(target.target(), shape).await
        }
        Cmd::Broadcast {
            target,
            clients,
            pushes,
            size,
            rate,
        } => {
            let shape = deliver::Shape {
                groups: 0,
                group_size: clients,
                pushes,
                size,
                rate,
            };
            deliver::throughput(target.target(), shape).await
        }
        Cmd::Unicast {
            target,
            clients,
            rate,
            seconds,
            size,
        } => deliver::unicast(target.target(), clients, rate, seconds, size).await,
        Cmd::Churn {
            addrs,
            apis,
            clients,
            seconds,
        } => churn::run(addrs, apis, clients, seconds).await,
    }
}

async fn storm(addr: SocketAddr, count: usize, concurrency: usize, secret: &str) {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let key = EncodingKey::from_secret(secret.as_bytes());
    let queries: Vec<String> = (0..count)
        .map(|i| {
            let claims = serde_json::json!({"sub": format!("storm-{i}"), "exp": 4_000_000_000u64});
            let token = encode(&Header::default(), &claims, &key).unwrap();
            format!("?token={token}")
        })
        .collect();
    let started = Instant::now();
    let conns: Vec<(Ws, String)> = futures_util::stream::iter(queries.iter().enumerate())
        .map(|(i, q)| connect_with(addr, i, q))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "scenario": "storm",
            "clients": count,
            "concurrency": concurrency,
            "seconds": (elapsed * 100.0).round() / 100.0,
            "connects_per_s": (conns.len() as f64 / elapsed).round(),
        })
    );
}
