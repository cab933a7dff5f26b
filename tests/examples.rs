//! The publishing examples of docs/publishing.md (examples/python, php and
//! node): the real programs, run with the real language runtimes, publish
//! straight to a real Redis, and real WebSocket clients on two different
//! gateway nodes receive exactly what they published. `scripts/setup-examples`
//! installs the runtimes and libraries the examples need.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::redis::RedisCluster;
use common::{eventually, sorted, strs, Client, Cluster, Engine, Node, OutputWithin, Seen, WAIT};
use serde_json::json;

/// An example program.
#[derive(Debug, Clone, Copy)]
enum Example {
    Python,
    Php,
    Node,
}

impl Example {
    /// The command that runs it, before its own arguments.
    fn command(self) -> Command {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let (program, script): (PathBuf, &str) = match self {
            Example::Python => (
                root.join(".venv-examples/bin/python"),
                "examples/python/publish.py",
            ),
            Example::Php => ("php".into(), "examples/php/publish.php"),
            Example::Node => ("node".into(), "examples/node/publish.js"),
        };
        let mut command = Command::new(program);
        command.arg(root.join(script));
        command
    }

    /// Runs the example with `args` and waits (bounded) for it to succeed.
    async fn run(self, args: &[&str]) {
        let mut child = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{self:?} example starts ({e}); run scripts/setup-examples first")
            });
        let deadline = tokio::time::Instant::now() + WAIT;
        while child.try_wait().unwrap().is_none() {
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill();
                panic!("{self:?} example {args:?} did not finish within {WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{self:?} example {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Where the example publishes, and the gateway nodes it reaches.
struct Target<'a> {
    /// `--cluster` (Redis Cluster, SPUBLISH) or nothing.
    flags: &'a [&'a str],
    url: &'a str,
    prefix: &'a str,
    /// The node that holds client A.
    node_a: &'a Node,
    /// The node that holds client B.
    node_b: &'a Node,
    /// The node whose HTTP API the test asks.
    api: &'a Node,
}

impl Target<'_> {
    /// Redis Cluster: each channel lives on its shard, and a node reads
    /// every shard on its own connection.
    fn sharded(&self) -> bool {
        self.flags.contains(&"--cluster")
    }
}

/// Reads as many frames as `want` lists, each tagged with the channel it was
/// published on, and checks they are exactly these. On one Redis they arrive
/// in publishing order. On Redis Cluster (`sharded`) each channel lives on
/// its own shard, which a node reads over its own connection: frames of one
/// channel keep their order, frames of different channels may interleave.
async fn expect_frames(client: &mut Client, sharded: bool, want: &[(&str, Seen)]) {
    let mut got = Vec::new();
    for _ in want {
        got.push(client.next().await);
    }
    let mut got_frames: Vec<&Seen> = got.iter().collect();
    let mut want_frames: Vec<&Seen> = want.iter().map(|(_, s)| s).collect();
    if sharded {
        // A stable sort by channel (its first place in `want`) keeps the
        // order within each channel; an unexpected frame sorts last.
        let rank = |frame: &&Seen| {
            want.iter()
                .find(|(_, w)| w == *frame)
                .and_then(|(c, _)| want.iter().position(|(w, _)| w == c))
                .unwrap_or(usize::MAX)
        };
        got_frames.sort_by_key(rank);
        want_frames.sort_by_key(rank);
    }
    assert_eq!(got_frames, want_frames, "client {}: got {got:?}", client.id);
}

/// The binary push of the `pushes` scenario: not UTF-8 on purpose.
const BINARY: &[u8] = b"\x00\xff\x80\x9fgatecast";

/// Runs the example's four scenarios (see each example's usage) against
/// clients A and B on two nodes, checking every frame each one receives.
async fn full_sequence(example: Example, t: &Target<'_>) {
    let mut a = Client::connect(&t.node_a.ws_url("")).await;
    let mut b = Client::connect(&t.node_b.ws_url("")).await;
    let run = |scenario: &'static str, a: String, b: String| async move {
        let mut args: Vec<&str> = t.flags.to_vec();
        args.extend([t.url, t.prefix, scenario, a.as_str(), b.as_str()]);
        example.run(&args).await;
    };
    let api = t.api;

    // Commands are applied asynchronously by the node holding the client:
    // wait on the HTTP API before pushing to the groups and uid they made.
    run("commands", a.id.clone(), b.id.clone()).await;
    eventually("commands applied", || async {
        sorted(
            api.ok("get_client_id_list_by_group", json!({"group": "room"}))
                .await,
        ) == strs(&[&a.id, &b.id])
            && sorted(
                api.ok("get_client_id_list_by_group", json!({"group": "lobby"}))
                    .await,
            ) == strs(&[&a.id])
            && sorted(api.ok("get_client_id_by_uid", json!({"uid": "bob"})).await) == strs(&[&b.id])
            && api.ok("get_session", json!({"client_id": a.id})).await
                == json!({"name": "alice", "n": 1})
    })
    .await;

    run("pushes", a.id.clone(), b.id.clone()).await;
    // A is in both groups and gets "room or lobby" once; B is in one.
    let text = |s: &str| Seen::Text(s.to_owned());
    expect_frames(
        &mut a,
        t.sharded(),
        &[
            ("node", text("hello a ✓")),
            ("room", text("room without b")),
            ("room", text("room or lobby")),
            ("all", text("everyone")),
        ],
    )
    .await;
    expect_frames(
        &mut b,
        t.sharded(),
        &[
            ("uid", text("hello bob")),
            ("room", text("room or lobby")),
            ("node", Seen::Binary(BINARY.to_vec())),
            ("all", text("everyone")),
        ],
    )
    .await;

    run("cleanup", a.id.clone(), b.id.clone()).await;
    eventually("cleanup applied", || async {
        api.ok("get_session", json!({"client_id": a.id})).await == json!({"name": "alice", "n": 2})
            && api
                .ok("get_client_count_by_group", json!({"group": "room"}))
                .await
                == 0
            && api
                .ok("get_client_count_by_group", json!({"group": "lobby"}))
                .await
                == 0
            && api.ok("is_uid_online", json!({"uid": "bob"})).await == false
    })
    .await;

    // The pushes to the emptied group and the unbound uid reach nobody: the
    // next thing each client sees is its close.
    run("close", a.id.clone(), b.id.clone()).await;
    a.expect_text("bye a").await;
    a.expect_close(1000).await;
    b.expect_close(1000).await;
    eventually("closed clients gone", || async {
        api.ok("get_all_client_count", json!({})).await == 0
    })
    .await;
}

/// A three-node gateway on one Redis (with `--redis-prefix prefix`), A on
/// the first node, B on the second, the API of the third.
async fn on_redis(example: Example, prefix: &str) {
    let c = Cluster::start(Engine::Redis, &["--redis-prefix", prefix]).await;
    let url = c.redis.as_ref().unwrap().url();
    full_sequence(
        example,
        &Target {
            flags: &[],
            url: &url,
            prefix,
            node_a: &c.nodes[0],
            node_b: &c.nodes[1],
            api: &c.nodes[2],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_reaches_clients_on_two_nodes() {
    on_redis(Example::Python, "gatecast").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_example_reaches_clients_on_two_nodes() {
    on_redis(Example::Php, "gc-php").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_example_reaches_clients_on_two_nodes() {
    on_redis(Example::Node, "gc-node").await;
}

/// The example's `--cluster` mode: SPUBLISH on a Redis Cluster of three
/// masters, to a gateway that uses sharded pub/sub there.
async fn on_redis_cluster(example: Example) {
    let cluster = RedisCluster::start();
    let url = cluster.url();
    let args = ["--redis-url", url.as_str(), "--node-heartbeat", "1s"];
    let nodes = [Node::start(&args), Node::start(&args)];
    for node in &nodes {
        node.wait_ready().await;
    }
    let seed = format!("redis://127.0.0.1:{}", cluster.servers[0].port);
    full_sequence(
        example,
        &Target {
            flags: &["--cluster"],
            url: &seed,
            prefix: "gatecast",
            node_a: &nodes[0],
            node_b: &nodes[1],
            api: &nodes[1],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_spublishes_on_redis_cluster() {
    on_redis_cluster(Example::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_example_spublishes_on_redis_cluster() {
    on_redis_cluster(Example::Php).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_example_spublishes_on_redis_cluster() {
    on_redis_cluster(Example::Node).await;
}

/// `gatecast_pubsub_malformed_total` on a node's `/metrics`.
async fn malformed_count(node: &Node) -> u64 {
    let metrics = node.get_text("/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("gatecast_pubsub_malformed_total "))
        .unwrap_or_else(|| panic!("gatecast_pubsub_malformed_total in:\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

/// Garbage, a version-2 envelope and an unknown op on a node's channel are
/// skipped and counted; the next valid push is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unknown_version_envelopes_are_skipped_and_counted() {
    let c = Cluster::start(Engine::Redis, &[]).await;
    let url = c.redis.as_ref().unwrap().url();
    let node = &c.nodes[0];
    let mut a = Client::connect(&node.ws_url("")).await;
    let before = malformed_count(node).await;

    Example::Python
        .run(&[&url, "gatecast", "malformed", &a.id])
        .await;
    // Received in order on the node's one subscription: the three bad
    // envelopes were counted before the good one was delivered.
    a.expect_text("still here").await;
    assert_eq!(malformed_count(node).await, before + 3);
    // Only the node that holds A subscribes to its channel.
    assert_eq!(malformed_count(&c.nodes[1]).await, 0);
    // The connection is intact: a push through the API still arrives.
    c.nodes[2]
        .ok("send_to_client", json!({"client_id": a.id, "data": "api"}))
        .await;
    a.expect_text("api").await;
}

/// The shell block of docs/publishing.md (the one after its "tested" marker)
/// does what the page says, with the page's sample client_id replaced by a
/// real one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_doc_shell_examples_work() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/publishing.md")).unwrap();
    let after_marker = doc
        .split_once("<!-- tested: tests/examples.rs")
        .expect("docs/publishing.md marks its tested shell block")
        .1;
    let block = after_marker
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a ```sh block after the marker")
        .0;

    let c = Cluster::start(Engine::Redis, &[]).await;
    let port = c.redis.as_ref().unwrap().port;
    let mut a = Client::connect(&c.nodes[0].ws_url("")).await;
    let mut b = Client::connect(&c.nodes[1].ws_url("")).await;
    let api = &c.nodes[2];
    for id in [&a.id, &b.id] {
        api.ok("join_group", json!({"client_id": id, "group": "room-1"}))
            .await;
    }
    const SAMPLE_ID: &str = "0a0102030b5400000001";
    let script = block
        .replace(SAMPLE_ID, &a.id)
        .replace(&SAMPLE_ID[..12], &a.id[..12])
        .replace("redis-cli ", &format!("redis-cli -p {port} "))
        .replace(
            "python3 ",
            &format!("{} ", root.join(".venv-examples/bin/python").display()),
        );
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .output_within(WAIT * 6);
    assert!(
        out.status.success(),
        "the doc's shell block failed:\n{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    a.expect_text("hello").await;
    a.expect_text("hi").await;
    b.expect_text("hello").await;
    b.expect_text(r#"{"type":"news"}"#).await;
    // Nothing else came before this: A was excluded from the group push.
    api.ok("send_to_all", json!({"data": "end"})).await;
    a.expect_text("end").await;
    b.expect_text("end").await;
}
