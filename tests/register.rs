//! GatewayWorker's Register on every node (`--register-listen`, SPEC
//! section 7), spoken to as GatewayClient and BusinessWorker do: JSON lines
//! over TCP.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::gatewayworker::register_node_args;
use common::redis::RedisServer;
use common::{eventually, metric, Node, WAIT};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const WORKER_CONNECT: &str = r#"{"event":"worker_connect","secret_key":""}"#;

/// A Register client: writes lines, reads JSON lines.
struct RegisterClient {
    stream: BufReader<TcpStream>,
}

/// What the Register did next.
#[derive(Debug, PartialEq)]
enum Heard {
    /// A JSON line.
    Line(Value),
    /// The connection ended (closed or reset) with nothing more.
    Closed,
}

impl RegisterClient {
    async fn connect(addr: SocketAddr) -> RegisterClient {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("TCP connect in time")
            .expect("the Register accepts");
        RegisterClient {
            stream: BufReader::new(stream),
        }
    }

    /// Sends `text` and a `\n`.
    async fn send_line(&mut self, text: &str) {
        self.send_bytes(format!("{text}\n").as_bytes()).await;
    }

    /// Sends bytes as they are. A node that already closed the connection
    /// may reset it under a long write: not an error here, the next read
    /// tells.
    async fn send_bytes(&mut self, bytes: &[u8]) {
        let _ = self.stream.get_mut().write_all(bytes).await;
    }

    /// The next line or the end of the connection, within `limit`.
    async fn next_within(&mut self, limit: Duration) -> Heard {
        let mut line = String::new();
        let read = tokio::time::timeout(limit, self.stream.read_line(&mut line))
            .await
            .unwrap_or_else(|_| panic!("the Register said something within {limit:?}"));
        match read {
            Ok(0) | Err(_) => Heard::Closed,
            Ok(_) => {
                assert!(line.ends_with('\n'), "a whole line: {line:?}");
                Heard::Line(
                    serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("a JSON line: {line:?}: {e}")),
                )
            }
        }
    }

    async fn next(&mut self) -> Heard {
        self.next_within(WAIT).await
    }

    /// The next line must be a `broadcast_addresses`; its addresses.
    async fn addresses(&mut self) -> BTreeSet<String> {
        let heard = self.next().await;
        let Heard::Line(message) = &heard else {
            panic!("expected broadcast_addresses, got {heard:?}")
        };
        assert_eq!(message["event"], "broadcast_addresses", "{message}");
        assert_eq!(
            message.as_object().unwrap().len(),
            2,
            "event and addresses only: {message}"
        );
        let list = message["addresses"].as_array().expect("a list");
        let set: BTreeSet<String> = list
            .iter()
            .map(|a| a.as_str().expect("a string").to_owned())
            .collect();
        assert_eq!(set.len(), list.len(), "no duplicates: {message}");
        set
    }

    /// Reads `broadcast_addresses` lines until one lists exactly `want`
    /// (bounded).
    async fn addresses_until(&mut self, want: &BTreeSet<String>) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let got = tokio::time::timeout(left, self.addresses())
                .await
                .unwrap_or_else(|_| panic!("no list of {want:?} within {WAIT:?}"));
            if &got == want {
                return;
            }
        }
    }
}

/// A node's inner address as the Register lists it.
fn inner(node: &Node) -> String {
    node.inner.to_string()
}

fn register_addr(node: &Node) -> SocketAddr {
    node.register.expect("the node serves the Register")
}

/// `gatecast_register_errors_total` for `reason` on `node`.
async fn register_errors(node: &Node, reason: &str) -> f64 {
    let page = node.get_text("/metrics").await;
    metric(
        &page,
        &format!("gatecast_register_errors_total{{reason=\"{reason}\"}}"),
    )
}

/// With the in-process engine the node is the whole gateway: a worker gets
/// its inner address, exactly, as GatewayClient reads it (one JSON line).
/// A ping before it is accepted without an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_connect_gets_this_nodes_inner_address() {
    let node = Node::start(&["--register-listen", "127.0.0.1:0"]);
    let mut worker = RegisterClient::connect(register_addr(&node)).await;
    worker.send_line(r#"{"event":"ping"}"#).await;
    worker.send_line(WORKER_CONNECT).await;
    assert_eq!(
        worker.next().await,
        Heard::Line(json!({
            "event": "broadcast_addresses",
            "addresses": [inner(&node)],
        }))
    );
    // As GatewayClient sends it: no key at all when none is set, and a
    // second worker_connect on the same connection is answered again.
    let mut client = RegisterClient::connect(register_addr(&node)).await;
    client.send_line(r#"{"event":"worker_connect"}"#).await;
    assert_eq!(client.addresses().await, BTreeSet::from([inner(&node)]));
    client.send_line(WORKER_CONNECT).await;
    assert_eq!(client.addresses().await, BTreeSet::from([inner(&node)]));
}

/// Two nodes on Redis: each lists both, and a connection kept open (a
/// BusinessWorker's) hears when one leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_follows_nodes_leaving_the_cluster() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args = register_node_args(&url, &[]);
    let a = Node::start(&args);
    let mut b = Node::start(&args);
    a.wait_ready().await;
    b.wait_ready().await;
    let both = BTreeSet::from([inner(&a), inner(&b)]);

    let mut worker = RegisterClient::connect(register_addr(&a)).await;
    worker.send_line(WORKER_CONNECT).await;
    worker.addresses_until(&both).await;
    // Every replica answers the same.
    let mut other = RegisterClient::connect(register_addr(&b)).await;
    other.send_line(WORKER_CONNECT).await;
    other.addresses_until(&both).await;

    b.signal("TERM");
    worker.addresses_until(&BTreeSet::from([inner(&a)])).await;
    assert!(b.wait_exit(WAIT).await.success());
    // The replica that left closed its Register connections.
    assert_eq!(other.next().await, Heard::Closed);
}

/// With `--gateway-secret-key`, a worker_connect must carry that key: a
/// wrong or missing one is closed without an answer, as the Register does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_key_is_refused() {
    let node = Node::start(&[
        "--register-listen",
        "127.0.0.1:0",
        "--gateway-secret-key",
        "register-test-key-0001",
    ]);
    for request in [
        r#"{"event":"worker_connect","secret_key":"wrong"}"#,
        r#"{"event":"worker_connect","secret_key":""}"#,
        r#"{"event":"worker_connect"}"#,
        r#"{"event":"worker_connect","secret_key":null}"#,
        r#"{"event":"worker_connect","secret_key":["register-test-key-0001"]}"#,
    ] {
        let mut worker = RegisterClient::connect(register_addr(&node)).await;
        worker.send_line(request).await;
        assert_eq!(worker.next().await, Heard::Closed, "{request}");
    }
    assert_eq!(register_errors(&node, "secret_key").await, 5.0);
    let mut worker = RegisterClient::connect(register_addr(&node)).await;
    worker
        .send_line(r#"{"event":"worker_connect","secret_key":"register-test-key-0001"}"#)
        .await;
    assert_eq!(worker.addresses().await, BTreeSet::from([inner(&node)]));
}

/// A GatewayWorker Gateway process cannot join: the nodes are the gateways.
/// It gets no answer and the connection is closed (and logged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_connect_is_refused_and_closed() {
    let node = Node::start(&["--register-listen", "127.0.0.1:0"]);
    let mut gateway = RegisterClient::connect(register_addr(&node)).await;
    gateway
        .send_line(r#"{"event":"gateway_connect","address":"127.0.0.1:2901","secret_key":""}"#)
        .await;
    assert_eq!(gateway.next().await, Heard::Closed);
    assert_eq!(register_errors(&node, "gateway_connect").await, 1.0);
}

/// A connection that never sends a good worker_connect is closed after the
/// Register's 10 s; pings do not keep it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_authenticates_is_closed() {
    let node = Node::start(&["--register-listen", "127.0.0.1:0"]);
    let mut silent = RegisterClient::connect(register_addr(&node)).await;
    let mut pinging = RegisterClient::connect(register_addr(&node)).await;
    pinging.send_line(r#"{"event":"ping"}"#).await;
    // 10 s and a margin for a loaded machine.
    let limit = Duration::from_secs(25);
    assert_eq!(silent.next_within(limit).await, Heard::Closed);
    assert_eq!(pinging.next_within(limit).await, Heard::Closed);
    assert_eq!(register_errors(&node, "auth_timeout").await, 2.0);
}

/// Garbage, an unknown event and an over-long line each close only their
/// own connection; a worker connected before still gets answers, and so
/// does a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_close_only_their_connection() {
    let node = Node::start(&["--register-listen", "127.0.0.1:0"]);
    let addr = register_addr(&node);
    let me = BTreeSet::from([inner(&node)]);
    let mut worker = RegisterClient::connect(addr).await;
    worker.send_line(WORKER_CONNECT).await;
    assert_eq!(worker.addresses().await, me);

    for (bad, reason) in [
        (&b"not json\n"[..], "malformed"),
        (b"{\"secret_key\":\"\"}\n", "malformed"),
        (b"{\"event\":\"\"}\n", "malformed"),
        (b"\xff\xfe\n", "malformed"),
        (b"{\"event\":\"steal\"}\n", "unknown_event"),
    ] {
        let mut client = RegisterClient::connect(addr).await;
        client.send_bytes(bad).await;
        assert_eq!(client.next().await, Heard::Closed, "{bad:?} ({reason})");
    }
    assert_eq!(register_errors(&node, "malformed").await, 4.0);
    assert_eq!(register_errors(&node, "unknown_event").await, 1.0);
    // 4 KiB without a newline is enough to be refused: the node does not
    // wait for the rest.
    let mut long = RegisterClient::connect(addr).await;
    long.send_bytes(&vec![b' '; 5 * 1024]).await;
    assert_eq!(long.next().await, Heard::Closed);
    assert_eq!(register_errors(&node, "too_long").await, 1.0);
    // A worker_connect after a line just short of the bound is fine: blank
    // lines are skipped.
    let mut padded = RegisterClient::connect(addr).await;
    padded.send_bytes(&vec![b' '; 3 * 1024]).await;
    padded.send_line(&format!("\n{WORKER_CONNECT}")).await;
    assert_eq!(padded.addresses().await, me);

    worker.send_line(WORKER_CONNECT).await;
    assert_eq!(worker.addresses().await, me);
    let mut fresh = RegisterClient::connect(addr).await;
    fresh.send_line(WORKER_CONNECT).await;
    assert_eq!(fresh.addresses().await, me);
    drop(padded);
    drop(fresh);
    eventually("only the worker's connection is left open", || async {
        let page = node.get_text("/metrics").await;
        metric(&page, "gatecast_register_connections") == 1.0
    })
    .await;
}

/// Register poisoning (issue 25): whoever can write to Redis adds a member
/// to `<prefix>:nodes` with an `:alive` key; before, every Register listed
/// it, so PHP sent it the secret key and took its forged sessions. With a
/// gateway key, each node signs its liveness record and the Register lists
/// only records that key verifies: the forged nodes (one unsigned, one with
/// a made-up signature) never appear, the real ones do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_forged_in_redis_are_not_listed_with_a_key() {
    const KEY: &str = "register-test-key-0001";
    let redis = RedisServer::start();
    // 10.9.9.9:2900 and 10.9.9.8:2900, as node ids.
    for (node, record) in [
        (
            "0a0909090b54",
            r#"{"inner":"10.9.9.9:2900","instance":"forged"}"#.to_owned(),
        ),
        (
            "0a0909080b54",
            format!(
                r#"{{"inner":"10.9.9.8:2900","instance":"forged","sig":"{}"}}"#,
                "ab".repeat(32)
            ),
        ),
    ] {
        redis.cli(&["SADD", "gatecast:nodes", node]);
        let alive = format!("gatecast:{{{node}}}:alive");
        redis.cli(&["SET", &alive, &record, "PX", "120000"]);
    }
    let url = redis.url();
    let args = register_node_args(&url, &["--gateway-secret-key", KEY]);
    let a = Node::start(&args);
    a.wait_ready().await;
    let mut worker = RegisterClient::connect(register_addr(&a)).await;
    worker
        .send_line(&format!(
            r#"{{"event":"worker_connect","secret_key":"{KEY}"}}"#
        ))
        .await;
    let b = Node::start(&args);
    b.wait_ready().await;
    // Exactly the two real nodes (a list with a forged one never matches).
    worker
        .addresses_until(&BTreeSet::from([inner(&a), inner(&b)]))
        .await;
    // The forged members are still in the set: it is the signature that
    // keeps them out, on every replica.
    assert!(redis
        .cli(&["SMEMBERS", "gatecast:nodes"])
        .contains("0a0909090b54"));
    let mut other = RegisterClient::connect(register_addr(&b)).await;
    other
        .send_line(&format!(
            r#"{{"event":"worker_connect","secret_key":"{KEY}"}}"#
        ))
        .await;
    other
        .addresses_until(&BTreeSet::from([inner(&a), inner(&b)]))
        .await;
}

/// Before `worker_connect`, a line is at most 4 KiB (it was 64 KiB): a peer
/// without the key cannot make the node hold more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_line_before_worker_connect_closes_the_connection() {
    let node = Node::start(&["--register-listen", "127.0.0.1:0"]);
    let mut peer = RegisterClient::connect(register_addr(&node)).await;
    peer.send_bytes(&vec![b'x'; 5 * 1024]).await;
    assert_eq!(peer.next().await, Heard::Closed);
    assert_eq!(register_errors(&node, "too_long").await, 1.0);
    // Everyone else is still served.
    let mut worker = RegisterClient::connect(register_addr(&node)).await;
    worker.send_line(WORKER_CONNECT).await;
    assert_eq!(worker.addresses().await, BTreeSet::from([inner(&node)]));
}

/// A Register connection from `source` (any 127/8 address).
async fn connect_from(source: [u8; 4], to: SocketAddr) -> RegisterClient {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::from((source, 0)))
        .expect("bind a loopback source address");
    let stream = tokio::time::timeout(WAIT, socket.connect(to))
        .await
        .expect("TCP connect in time")
        .expect("the kernel accepts");
    RegisterClient {
        stream: BufReader::new(stream),
    }
}

/// `MAX_PER_ADDRESS` connections from one address at once, then the next
/// from it is closed at once (`address_full`) while another address is
/// served; `MAX_UNAUTHENTICATED` connections waiting for `worker_connect`
/// node-wide, then the next from anywhere is closed (`unauthenticated_full`)
/// while a worker already in keeps its connection. Places come back when
/// connections go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_refuse_the_excess_and_count_it_by_cap() {
    use gatecast::gatewayworker::register::{MAX_PER_ADDRESS, MAX_UNAUTHENTICATED};
    let node = Node::start(&["--register-listen", "127.0.0.1:0"]);
    node.wait_ready().await;
    let register = register_addr(&node);
    let want = BTreeSet::from([inner(&node)]);

    // The node accepts in arrival order, so these are admitted before the
    // next one (and all within the 10 s they have to authenticate).
    let mut held = Vec::new();
    for _ in 0..MAX_PER_ADDRESS {
        held.push(connect_from([127, 0, 0, 1], register).await);
    }
    let mut extra = connect_from([127, 0, 0, 1], register).await;
    extra.send_line(WORKER_CONNECT).await;
    assert_eq!(extra.next().await, Heard::Closed);
    assert_eq!(register_errors(&node, "address_full").await, 1.0);

    // Another address is served, and stays connected.
    let mut worker = connect_from([127, 0, 0, 2], register).await;
    worker.send_line(WORKER_CONNECT).await;
    assert_eq!(worker.addresses().await, want);

    // Fill the node-wide unauthenticated places from a third address.
    for _ in 0..MAX_UNAUTHENTICATED - MAX_PER_ADDRESS {
        held.push(connect_from([127, 0, 0, 3], register).await);
    }
    let mut extra = connect_from([127, 0, 0, 4], register).await;
    extra.send_line(WORKER_CONNECT).await;
    assert_eq!(extra.next().await, Heard::Closed);
    assert_eq!(register_errors(&node, "unauthenticated_full").await, 1.0);
    assert_eq!(register_errors(&node, "too_many_connections").await, 0.0);
    // The worker already in is still there: a ping is not answered, and
    // nothing closes it.
    worker.send_line(r#"{"event":"ping"}"#).await;
    let quiet = tokio::time::timeout(Duration::from_millis(300), worker.next()).await;
    assert!(
        quiet.is_err(),
        "the worker's connection stays open: {quiet:?}"
    );

    drop(held);
    eventually("127.0.0.1 served again", || async {
        let mut again = connect_from([127, 0, 0, 1], register).await;
        again.send_line(WORKER_CONNECT).await;
        matches!(again.next().await, Heard::Line(_))
    })
    .await;
}

/// A node killed (no leave) drops off every Register's list once the
/// others purge it: the purge tells the other nodes' views, which do not
/// read the registry again otherwise (issue 33). Heartbeat 1 s: the
/// liveness key expires within 2 heartbeats, a purge round follows within
/// half a heartbeat, the Register polls every second; 5 s of slack for a
/// loaded machine, far below the 30 s after which a view is read whole
/// anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_the_list_once_purged() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args = register_node_args(&url, &[]);
    let nodes: Vec<Node> = (0..3).map(|_| Node::start(&args)).collect();
    common::ready(&nodes).await;
    let all: BTreeSet<String> = nodes.iter().map(inner).collect();
    let mut workers = Vec::new();
    for node in &nodes[..2] {
        let mut worker = RegisterClient::connect(register_addr(node)).await;
        worker.send_line(WORKER_CONNECT).await;
        worker.addresses_until(&all).await;
        workers.push(worker);
    }
    let mut nodes = nodes;
    nodes[2].signal("KILL");
    let killed = std::time::Instant::now();
    let _ = nodes[2].wait_exit(WAIT).await;
    let left = BTreeSet::from([inner(&nodes[0]), inner(&nodes[1])]);
    for worker in &mut workers {
        let limit = Duration::from_secs(9).saturating_sub(killed.elapsed());
        tokio::time::timeout(limit, worker.addresses_until(&left))
            .await
            .unwrap_or_else(|_| panic!("the killed node still listed {limit:?} later"));
    }
}

/// Redis commands of idle nodes, summed over `INFO commandstats`, but for
/// PING (each node and its subscriber connections ping on timers of their
/// own, a constant per node that would only dilute the comparison) and
/// the test's own INFO.
fn idle_commands(redis: &RedisServer) -> u64 {
    redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.strip_prefix("calls=")?.split(',').next()?;
            let counted = !["ping", "info"].contains(&name);
            counted.then(|| calls.parse::<u64>().ok()).flatten()
        })
        .sum()
}

/// Commands per node per second over `window`, once every node sees all
/// `nodes` alive (so no registration is still under way).
async fn per_node_rate(redis: &RedisServer, nodes: &[Node], window: Duration) -> f64 {
    let n = nodes.len() as f64;
    eventually("every node sees every node", || async {
        let mut all = true;
        for node in nodes {
            all &= metric(&node.get_text("/metrics").await, "gatecast_nodes_alive") == n;
        }
        all
    })
    .await;
    let (before, started) = (idle_commands(redis), std::time::Instant::now());
    tokio::time::sleep(window).await;
    let count = idle_commands(redis) - before;
    count as f64 / started.elapsed().as_secs_f64() / n
}

/// Idle Redis work grows linearly with the nodes (issue 33): the Redis
/// commands each idle node causes per second (heartbeats, Register polls,
/// purges) are the same with 10 nodes as with 3. They grew with the number
/// of nodes before: every node read every other node's liveness key every
/// second for its Register and ran the purge script for every other node
/// every half heartbeat (3 nodes: ~21 commands per node per second, 10
/// nodes: ~56). Commands are counted, not timed: a loaded machine only
/// fires the timers later, which lowers both figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_redis_commands_per_node_do_not_grow_with_the_nodes() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args = register_node_args(&url, &[]);
    let window = Duration::from_secs(6);
    let mut nodes: Vec<Node> = (0..3).map(|_| Node::start(&args)).collect();
    common::ready(&nodes).await;
    let three = per_node_rate(&redis, &nodes, window).await;
    nodes.extend((0..7).map(|_| Node::start(&args)));
    common::ready(&nodes).await;
    let ten = per_node_rate(&redis, &nodes, window).await;
    eprintln!("idle commands per node per second: 3 nodes {three:.1}, 10 nodes {ten:.1}");
    assert!(
        ten <= three * 1.5,
        "idle Redis commands per node grow with the nodes: {three:.1}/s per node with 3 \
         nodes, {ten:.1}/s with 10"
    );
}
