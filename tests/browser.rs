//! gatecast.js and the demo page in a real browser (issue 28): headless
//! Debian `chromium` driven by playwright-core (clients/js devDependency)
//! against real nodes sharing a real Redis. Each test starts the nodes,
//! runs one scenario script `tests/browser/<name>.mjs` with their
//! addresses, and checks that it said `ok <name>`. Screenshots go to
//! `<target>/tmp/browser/`.
//!
//! scripts/test installs chromium, Node.js and `npm ci` in clients/js. A
//! missing one fails these tests with what to do; they never pass
//! silently without a browser.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::redis::RedisServer;
use common::{Node, OutputWithin};
use serde_json::{json, Value};

/// One browser at a time: the machine running CI may have two cores.
static BROWSER: Mutex<()> = Mutex::new(());

/// How long one scenario may run (each takes seconds; the bound is for a
/// loaded machine).
const SCENARIO_LIMIT: Duration = Duration::from_secs(90);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The chromium the scenarios drive: `GATECAST_CHROMIUM`, else Debian's.
fn chromium() -> PathBuf {
    let path = std::env::var_os("GATECAST_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "chromium not found at {}: the browser tests need it \
         (apt-get install chromium, or run scripts/test, which installs it)",
        path.display()
    );
    path
}

/// Runs `tests/browser/<name>.mjs` with `config` (plus the browser and the
/// screenshot directory) and fails unless it reports `ok <name>`.
fn scenario(name: &str, mut config: Value) {
    let chromium = chromium();
    assert!(
        root()
            .join("clients/js/node_modules/playwright-core")
            .exists(),
        "clients/js/node_modules/playwright-core is missing: run `npm ci` in clients/js \
         (scripts/test does)"
    );
    config["chromium"] = json!(chromium);
    config["shots"] = json!(Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser"));
    config["deadline_ms"] = json!(SCENARIO_LIMIT.as_millis() - 5000);
    let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new("node")
        .arg(root().join(format!("tests/browser/{name}.mjs")))
        .arg(config.to_string())
        .current_dir(root())
        .output_within(SCENARIO_LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- {name} stdout\n{stdout}--- {name} stderr\n{stderr}---");
    assert!(
        out.status.success() && stdout.lines().any(|l| l == format!("ok {name}")),
        "browser scenario {name} failed ({}): {stderr}",
        out.status
    );
}

fn origin(node: &Node) -> String {
    format!("http://{}", node.public)
}

fn api(node: &Node) -> String {
    format!("http://{}", node.api)
}

/// Nodes on one real Redis, each with `args`.
async fn cluster(redis: &RedisServer, n: usize, args: &[&str]) -> Vec<Node> {
    let url = redis.url();
    let mut all = vec!["--redis-url", url.as_str(), "--node-heartbeat", "1s"];
    all.extend_from_slice(args);
    let nodes: Vec<Node> = (0..n).map(|_| Node::start(&all)).collect();
    common::ready(&nodes).await;
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_receives_pushes_sent_through_another_node() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, 2, &["--demo"]).await;
    scenario(
        "demo",
        json!({
            "page": origin(&nodes[0]),
            "page_api": api(&nodes[0]),
            "api": api(&nodes[1]),
        }),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_and_the_library_are_served() {
    let node = Node::start(&[]);
    let (status, _) = node.get_raw(true, "/demo").await;
    assert_eq!(status, 404, "no demo page without --demo");
    let demo = Node::start(&["--demo"]);
    let (status, page) = demo.get_raw(true, "/demo").await;
    assert_eq!(status, 200);
    assert!(page.contains(&format!("http://{}/api", demo.api)), "{page}");
    // The npm package and the versioned path carry the crate's version.
    let package: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("clients/js/package.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(package["version"], env!("CARGO_PKG_VERSION"));
    // Both names serve the library compiled in, with their cache lifetimes.
    let http = reqwest::Client::new();
    for (path, cache) in [
        ("/gatecast.js".to_owned(), "public, max-age=300"),
        (
            format!("/gatecast-{}.js", env!("CARGO_PKG_VERSION")),
            "public, max-age=31536000, immutable",
        ),
    ] {
        let res = http
            .get(format!("http://{}{path}", node.public))
            .timeout(common::WAIT)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let header = |h: &str| res.headers()[h].to_str().unwrap().to_owned();
        assert_eq!(header("cache-control"), cache, "{path}");
        assert_eq!(header("content-type"), "text/javascript; charset=utf-8");
        assert_eq!(header("access-control-allow-origin"), "*");
        let body = res.text().await.unwrap();
        let file = std::fs::read_to_string(root().join("clients/js/gatecast.js")).unwrap();
        assert_eq!(body, file, "{path} is clients/js/gatecast.js");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_reconnects_to_another_node_after_a_drain() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, 3, &["--shutdown-grace", "5s"]).await;
    scenario(
        "drain",
        json!({
            "page": origin(&nodes[2]),
            "ws": [nodes[0].ws_url(""), nodes[1].ws_url("")],
            "api": api(&nodes[2]),
            "drain_pid": nodes[0].pid(),
        }),
    );
}

/// CI counts attempts over 4 s with delays of 0.1 s to 0.8 s;
/// `GATECAST_BROWSER_BACKOFF=full` runs the library's defaults (0.5 s to
/// 20 s) over 30 s, as docs/client.md states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_stays_within_bounds_while_every_node_is_down() {
    let full = std::env::var("GATECAST_BROWSER_BACKOFF").as_deref() == Ok("full");
    let (min, max, window) = if full {
        (500, 20_000, 30_000)
    } else {
        (100, 800, 4_000)
    };
    let redis = RedisServer::start();
    let nodes = cluster(&redis, 2, &[]).await;
    scenario(
        "backoff",
        json!({
            "page": origin(&nodes[0]),
            "ws": [nodes[0].ws_url(""), nodes[1].ws_url("")],
            "kill_pids": [nodes[0].pid(), nodes[1].pid()],
            "min_ms": min,
            "max_ms": max,
            "window_ms": window,
            "wait_ms": window + 15_000,
        }),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_token_replaces_a_refused_token_and_an_expired_one_after_4001() {
    let secret = "browser-test-secret-0123456789abcdef";
    let redis = RedisServer::start();
    let args = [
        "--client-jwt-secret",
        secret,
        "--client-jwt-enforce-exp",
        "--client-jwt-leeway",
        "0s",
        "--ping-interval",
        "200ms",
        "--ping-timeout",
        "2s",
    ];
    let nodes = cluster(&redis, 2, &args).await;
    scenario(
        "token",
        json!({
            "page": origin(&nodes[0]),
            "ws": [nodes[0].ws_url("")],
            "api": api(&nodes[1]),
            "secret": secret,
            "token_secs": 4,
        }),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_left_on_a_missing_pong_and_online_cuts_the_backoff_short() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, 3, &[]).await;
    scenario(
        "network",
        json!({
            "page": origin(&nodes[2]),
            "ws": [nodes[0].ws_url(""), nodes[1].ws_url("")],
            "api": api(&nodes[2]),
            "stall_pid": nodes[0].pid(),
        }),
    );
}

/// History on for the scenario's pushes (docs/recovery.md section 2.2):
/// every group's stream kept by the nodes' prefixes, and each push asks for
/// it too (the push API's `history` field).
const RECOVERY_NODE_ARGS: &[&str] = &["--history-streams", "g:"];
fn recovery_push_extra() -> Value {
    json!({"history": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_missed_while_away_arrive_exactly_once_in_order_also_after_a_reload() {
    let redis = RedisServer::start();
    let mut args = vec!["--shutdown-grace", "5s"];
    args.extend_from_slice(RECOVERY_NODE_ARGS);
    let nodes = cluster(&redis, 3, &args).await;
    scenario(
        "recovery",
        json!({
            "page": origin(&nodes[2]),
            "ws": [nodes[0].ws_url(""), nodes[1].ws_url("")],
            "api": api(&nodes[2]),
            "drain_pid": nodes[0].pid(),
            "push_extra": recovery_push_extra(),
        }),
    );
}

/// gatecast.js keeps the position the node tells it when it is bound to a
/// uid that has a history, so a push to that uid missed while the page was
/// away is replayed when it comes back (tests/browser/position.mjs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_first_joined_is_recovered_from_the_position_the_node_told() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, 2, &[]).await;
    scenario(
        "position",
        json!({
            "page": origin(&nodes[1]),
            "ws": [nodes[0].ws_url(""), nodes[1].ws_url("")],
            "api": api(&nodes[1]),
        }),
    );
}
