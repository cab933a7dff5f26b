//! What operators watch: push-to-frame latency on both paths, `/metrics`
//! in the format the scraper asks for, and a real Prometheus (Debian's
//! `prometheus` and `promtool`) scraping two real nodes and evaluating
//! every expression of the Grafana dashboard and the alert rules.

mod common;

use std::time::Duration;

use common::redis::RedisServer;
use common::{eventually, metric, Client, Node, OutputWithin};
use fred::prelude::*;
use gatecast::gatewayworker::protocol::{self, cmd, flag, Packet};
use gatecast_emitter::envelope::{Envelope, Op};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(common::WAIT)
        .build()
        .unwrap()
}

/// GET `/metrics` with `accept` (none when `None`): content type and body.
async fn scrape(node: &Node, accept: Option<&str>) -> (String, String) {
    let mut req = http().get(format!("http://{}/metrics", node.api));
    if let Some(accept) = accept {
        req = req.header("accept", accept);
    }
    let resp = req.send().await.expect("/metrics answers");
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    (content_type, resp.text().await.unwrap())
}

const COUNT_LOCAL: &str = "gatecast_push_to_frame_seconds_count{path=\"local\"}";
const COUNT_REDIS: &str = "gatecast_push_to_frame_seconds_count{path=\"redis\"}";
const SUM_REDIS: &str = "gatecast_push_to_frame_seconds_sum{path=\"redis\"}";

async fn counts(node: &Node) -> (f64, f64) {
    let page = node.get_text("/metrics").await;
    (metric(&page, COUNT_LOCAL), metric(&page, COUNT_REDIS))
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_to_frame_latency_is_measured_on_the_local_and_the_redis_path() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args = ["--redis-url", url.as_str(), "--node-heartbeat", "1s"];
    let (a, b) = (Node::start(&args), Node::start(&args));
    a.wait_ready().await;
    b.wait_ready().await;
    let mut client = Client::connect(&a.ws_url("")).await;
    a.ok("bind_uid", json!({"client_id": client.id, "uid": "u"}))
        .await;
    assert_eq!(counts(&a).await, (0.0, 0.0), "nothing measured yet");

    // Accepted by b, written by a: crossed Redis with b's accept time.
    b.ok("send_to_uid", json!({"uid": "u", "data": "via b"}))
        .await;
    client.expect_text("via b").await;
    eventually("a measured the push from b on the redis path", || async {
        counts(&a).await == (0.0, 1.0)
    })
    .await;
    assert_eq!(counts(&b).await, (0.0, 0.0), "b wrote no frame");

    // Accepted and written by a.
    a.ok(
        "send_to_client",
        json!({"client_id": client.id, "data": "on a"}),
    )
    .await;
    client.expect_text("on a").await;
    eventually("a measured its own push on the local path", || async {
        counts(&a).await == (1.0, 1.0)
    })
    .await;

    // Accepted on a's inner port (GatewayWorker's protocol), written by a.
    let mut packet = Packet::new(cmd::SEND_TO_ONE);
    packet.connection_id = u32::from_str_radix(&client.id[12..], 16).unwrap();
    packet.flag = flag::BODY_IS_SCALAR;
    packet.body = bytes::Bytes::from_static(b"inner");
    let mut inner = tokio::net::TcpStream::connect(a.inner).await.unwrap();
    inner.write_all(&protocol::encode(&packet)).await.unwrap();
    client.expect_text("inner").await;
    eventually(
        "a measured the inner-port push on the local path",
        || async { counts(&a).await == (2.0, 1.0) },
    )
    .await;
    drop(inner);

    // Straight to Redis: an old publisher without `ts` is delivered and
    // not measured; one with `ts` (50 ms ago on its clock) is, from it.
    let publisher = Builder::from_config(Config::from_url(&url).unwrap())
        .build()
        .unwrap();
    publisher.init().await.unwrap();
    let publish = |data: &'static str, ts: Option<u64>| {
        let mut e = Envelope::new(Op::Push);
        e.data = Some(bytes::Bytes::from_static(data.as_bytes()));
        e.ts = ts;
        let publisher = publisher.clone();
        async move {
            let n: i64 = publisher
                .publish("gatecast:uid:u", e.encode())
                .await
                .unwrap();
            assert!(n >= 1, "a node listens on the uid's channel");
        }
    };
    let before = metric(&a.get_text("/metrics").await, SUM_REDIS);
    publish("no ts", None).await;
    client.expect_text("no ts").await;
    publish("with ts", Some(unix_us() - 50_000)).await;
    client.expect_text("with ts").await;
    eventually("only the envelope with ts was measured", || async {
        counts(&a).await == (2.0, 2.0)
    })
    .await;
    let added = metric(&a.get_text("/metrics").await, SUM_REDIS) - before;
    assert!(
        (0.05..5.0).contains(&added),
        "measured from the envelope's ts, 50 ms before the publish: {added} s"
    );
    publisher.quit().await.unwrap();
}

/// Prometheus 2.42's scrape `Accept` header.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// `promtool check metrics` on a text-format page: the parser Prometheus
/// uses for format 0.0.4. Returns its output; panics if it refuses.
fn promtool_check_metrics(page: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian package prometheus; scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("error while linting") && !text.contains("text format parsing error"),
        "promtool cannot parse the page:\n{text}"
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answer_in_the_text_format_by_default_and_openmetrics_when_asked() {
    let node = Node::start(&[]);
    node.wait_ready().await;
    let _client = Client::connect(&node.ws_url("")).await;

    for accept in [None, Some("*/*"), Some("text/plain;version=0.0.4")] {
        let (content_type, page) = scrape(&node, accept).await;
        assert_eq!(
            content_type, "text/plain; version=0.0.4; charset=utf-8",
            "{accept:?}"
        );
        assert!(!page.contains("# EOF"), "{accept:?}: no OpenMetrics EOF");
        // A counter's metadata names its sample, as 0.0.4 wants.
        assert!(page.contains("# TYPE gatecast_connections_opened_total counter\n"));
        assert!(page.contains("gatecast_connections_opened_total 1\n"));
        assert!(page.contains("# TYPE gatecast_push_to_frame_seconds histogram\n"));
        let lint = promtool_check_metrics(&page);
        assert!(!lint.contains("_total"), "counters are named right: {lint}");
    }

    let (content_type, page) = scrape(&node, Some(PROMETHEUS_ACCEPT)).await;
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(page.ends_with("# EOF\n"));
    assert!(page.contains("# TYPE gatecast_connections_opened counter\n"));
    assert!(page.contains("gatecast_connections_opened_total 1\n"));
}

// ---------------------------------------------------------------------------
// A real Prometheus.

/// The metric names an expression uses (`gatecast_*` identifiers).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("gatecast_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// Every `expr` of the Grafana dashboard, with `$__rate_interval` and the
/// dashboard's variables replaced as Grafana would.
fn dashboard_exprs() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/gatecast.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                exprs.push(
                    expr.replace("$__rate_interval", "1m")
                        .replace("$job", "gatecast")
                        .replace("$instance", ".*"),
                );
            }
        }
    }
    assert!(exprs.len() >= 12, "the dashboard has its panels: {exprs:?}");
    exprs
}

/// Every alert rule's `expr` in deploy/prometheus/gatecast-alerts.yaml.
fn alert_exprs() -> Vec<(String, String)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/gatecast-alerts.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    // A small reader for this file's layout: `- alert: Name`, then
    // `expr: |` and its indented lines, or `expr: <one line>`.
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    let mut name = String::new();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if let Some(n) = t.strip_prefix("- alert: ") {
            name = n.to_owned();
        } else if let Some(e) = t.strip_prefix("expr: ") {
            let indent = line.len() - t.len();
            let expr = if e == "|" || e == ">" {
                let mut body = Vec::new();
                while let Some(next) = lines.peek() {
                    let nt = next.trim();
                    if !nt.is_empty() && next.len() - nt.len() <= indent {
                        break;
                    }
                    body.push(nt.to_owned());
                    lines.next();
                }
                body.join(" ")
            } else {
                e.to_owned()
            };
            out.push((name.clone(), expr));
        }
    }
    assert!(out.len() >= 8, "the alert rules: {out:?}");
    out
}

#[test]
fn every_metric_the_dashboard_and_the_alerts_use_exists() {
    // Names a running node exports after a push (a family with labels is
    // listed once it has a first series).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let page = rt.block_on(async {
        let node = Node::start(&[]);
        node.wait_ready().await;
        let mut client = Client::connect(&node.ws_url("")).await;
        node.ok("bind_uid", json!({"client_id": client.id, "uid": "u"}))
            .await;
        node.ok("send_to_uid", json!({"uid": "u", "data": "x"}))
            .await;
        client.expect_text("x").await;
        scrape(&node, None).await.1
    });
    let families: Vec<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let exists = |name: &str| {
        families.iter().any(|f| {
            name == *f
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(f))
        })
    };
    let mut exprs: Vec<(String, String)> = dashboard_exprs()
        .into_iter()
        .map(|e| ("dashboard".to_owned(), e))
        .collect();
    exprs.extend(alert_exprs());
    for (what, expr) in &exprs {
        let names = metric_names(expr);
        for name in names {
            assert!(
                exists(&name),
                "{what}: `{expr}` uses {name}, which no node exports"
            );
        }
    }
}

/// `s` fit for a URL's query.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A free loopback port.
fn free_port() -> u16 {
    common::redis::free_port()
}

/// A Prometheus on loopback scraping `targets` every second.
struct Prometheus {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(targets: &[String]) -> Prometheus {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("gatecast-prometheus-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rules = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/prometheus/gatecast-alerts.yaml"
        );
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: gatecast\n    static_configs:\n      - targets: [{}]\n",
            targets
                .iter()
                .map(|t| format!("'{t}'"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("prometheus starts (Debian package prometheus; scripts/test installs it)");
        Prometheus { child, port, dir }
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let query: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .collect();
        let url = format!("http://127.0.0.1:{}{path}?{}", self.port, query.join("&"));
        match http().get(url).send().await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    async fn query(&self, expr: &str) -> Value {
        self.get("/api/v1/query", &[("query", expr)]).await
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_two_nodes_and_every_dashboard_and_alert_expression_has_data() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args = ["--redis-url", url.as_str(), "--node-heartbeat", "1s"];
    let nodes = [Node::start(&args), Node::start(&args)];
    for node in &nodes {
        node.wait_ready().await;
    }
    let targets: Vec<String> = nodes.iter().map(|n| n.api.to_string()).collect();
    let prometheus = Prometheus::start(&targets);

    // Traffic for every panel: a client on each node, pushes on both paths.
    let mut clients = Vec::new();
    for node in &nodes {
        let client = Client::connect(&node.ws_url("")).await;
        node.ok("bind_uid", json!({"client_id": client.id, "uid": "u"}))
            .await;
        clients.push(client);
    }

    common::within(
        "prometheus scrapes both nodes (up == 1, no scrape error)",
        Duration::from_secs(60),
        || async {
            let targets = prometheus.get("/api/v1/targets", &[]).await;
            let active = targets["data"]["activeTargets"].as_array().cloned();
            active.is_some_and(|a| {
                a.len() == 2
                    && a.iter()
                        .all(|t| t["health"] == "up" && t["lastError"] == "")
            })
        },
    )
    .await;

    // A few scrapes with pushes in between, so rate() has two points.
    for i in 0..5 {
        for node in &nodes {
            node.ok("send_to_uid", json!({"uid": "u", "data": format!("m{i}")}))
                .await;
        }
        for client in &mut clients {
            for _ in 0..nodes.len() {
                client.next().await;
            }
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }

    let up = prometheus.query("up{job=\"gatecast\"}").await;
    assert_eq!(
        up["data"]["result"].as_array().map(Vec::len),
        Some(2),
        "{up}"
    );
    let series = prometheus.query("gatecast_connections").await;
    assert_eq!(
        series["data"]["result"].as_array().map(Vec::len),
        Some(2),
        "a gatecast metric from each node: {series}"
    );

    // Every dashboard expression returns data; every alert expression is
    // PromQL Prometheus evaluates, on series that have data.
    let mut failures = Vec::new();
    for expr in dashboard_exprs() {
        let mut last = Value::Null;
        let has_data = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                last = prometheus.query(&expr).await;
                if last["status"] == "success"
                    && last["data"]["result"]
                        .as_array()
                        .is_some_and(|r| !r.is_empty())
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
        .await
        .is_ok();
        if !has_data {
            failures.push(format!("dashboard `{expr}`: {last}"));
        }
    }
    for (name, expr) in alert_exprs() {
        let reply = prometheus.query(&expr).await;
        if reply["status"] != "success" {
            failures.push(format!("alert {name} `{expr}`: {reply}"));
        }
        // An alert has no data while it does not fire: each series it
        // reads must have some (promtool's unit tests check the firing).
        for name in metric_names(&expr) {
            let q = format!("count({{__name__=\"{name}\"}})");
            let reply = prometheus.query(&q).await;
            if reply["data"]["result"]
                .as_array()
                .is_none_or(|r| r.is_empty())
            {
                failures.push(format!("alert input {name}: no data ({reply})"));
            }
        }
    }
    // The rules were loaded and evaluated without error.
    let rules = prometheus.get("/api/v1/rules", &[]).await;
    for group in rules["data"]["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            if rule["health"] != "ok" && rule["health"] != "unknown" {
                failures.push(format!("rule {}: {}", rule["name"], rule));
            }
        }
    }
    assert!(
        rules["data"]["groups"]
            .as_array()
            .is_some_and(|g| !g.is_empty()),
        "the alert rules are loaded: {rules}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // promtool agrees with the file too.
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/prometheus/gatecast-alerts.yaml"
        ))
        .output_within(Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");
    for args in [
        &["check", "rules", "gatecast-alerts.yaml"][..],
        &["test", "rules", "gatecast-alerts.test.yaml"][..],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(dir)
            .output_within(Duration::from_secs(120));
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
