//! The event consumers of docs/events.md (examples/python/consume_events.py
//! and examples/php/consume_events.php): the real programs, run with the real
//! language runtimes, read the events stream of a real three-node gateway
//! with a consumer group, print what they handled, answer through the HTTP
//! API, and leave unacknowledged entries pending for XAUTOCLAIM.
//! `scripts/setup-examples` installs the runtimes and libraries they need.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use common::{Client, Cluster, Engine, Seen, WAIT};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// A binary message that is not UTF-8.
const BINARY: &[u8] = b"\x00\xff\x80\x9fgatecast";

/// A consumer example.
#[derive(Debug, Clone, Copy)]
enum Lang {
    Python,
    Php,
}

/// A running consumer: its stdout lines, one JSON event each, as they come.
struct Consumer {
    lang: Lang,
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Consumer {
    /// Starts the example against the cluster's Redis, answering through the
    /// API of the cluster's third node.
    fn start(lang: Lang, c: &Cluster, args: &[&str]) -> Consumer {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let (program, script): (PathBuf, &str) = match lang {
            Lang::Python => (
                root.join(".venv-examples/bin/python"),
                "examples/python/consume_events.py",
            ),
            Lang::Php => ("php".into(), "examples/php/consume_events.php"),
        };
        let redis_url = c.redis.as_ref().unwrap().url();
        let api_url = format!("http://{}/api", c.nodes[2].api);
        let mut child = Command::new(program)
            .arg(root.join(script))
            .args(args)
            .args([&redis_url, &api_url])
            .env_remove("GATECAST_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{lang:?} consumer starts ({e}); run scripts/setup-examples first")
            });
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Consumer { lang, child, lines }
    }

    /// Waits (bounded) for the consumer to exit successfully; returns every
    /// event it printed, parsed.
    async fn finish(mut self) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?} consumer did not exit within {WAIT:?}",
                self.lang
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // Exited: the reader thread ends at EOF and closes the channel.
        let mut events = Vec::new();
        while let Some(line) = tokio::time::timeout(WAIT, self.lines.recv())
            .await
            .expect("consumer output read in time")
        {
            let event = serde_json::from_str(&line).unwrap_or_else(|e| {
                panic!("{:?} printed a non-JSON line {line:?}: {e}", self.lang)
            });
            events.push(event);
        }
        assert!(
            status.success(),
            "{:?} consumer failed ({status}) after printing {events:?}",
            self.lang
        );
        events
    }

    /// Runs the consumer to its end.
    async fn run(lang: Lang, c: &Cluster, args: &[&str]) -> Vec<Value> {
        Self::start(lang, c, args).finish().await
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client on the first node, with a query string and the headers a
/// browser sends.
async fn connect(c: &Cluster, query: &str) -> Client {
    let mut request = c.nodes[0].ws_url(query).into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert("origin", "https://app.example".parse().unwrap());
    headers.insert("user-agent", "consumer-test/1".parse().unwrap());
    Client::connect_request(request).await
}

/// Closes from the client side: sends a close frame and waits (bounded) for
/// the server's answer, by which time the server has handled the close,
/// then drops the socket. (`Client::close` waits for the server to end the
/// TCP connection too, which it does only after a 5 s linger.)
async fn close(mut client: Client) {
    client
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    client.expect_close(1000).await;
}

/// `XPENDING <stream> <group>`: how many entries were read and not
/// acknowledged.
fn pending(c: &Cluster, group: &str) -> u64 {
    let out = c
        .redis
        .as_ref()
        .unwrap()
        .cli(&["XPENDING", "gatecast:events", group]);
    out.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("XPENDING count in {out:?}"))
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

fn kinds_of<'a>(events: &[&'a Value]) -> Vec<&'a str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

/// Every event of a connection, in order, with everything the stream holds:
/// connect (query, remote address, headers), a text and a binary message
/// byte for byte, close, with the uid and session of the time.
async fn consumer_prints_every_event(lang: Lang) {
    let c = Cluster::start(Engine::Redis, &["--events"]).await;
    let mut a = connect(&c, "?room=7&token=secret&lang=en%20GB").await;
    let api = &c.nodes[2];
    api.ok("bind_uid", json!({"client_id": a.id, "uid": "alice"}))
        .await;
    api.ok(
        "set_session",
        json!({"client_id": a.id, "session": {"role": "admin"}}),
    )
    .await;
    a.send_text("hello ✓ \"quoted\"\n").await;
    a.send(Message::binary(BINARY.to_vec())).await;
    let id = a.id.clone();
    close(a).await;

    // A group created at 0 reads what was written before it existed; the
    // consumer blocks until the close event is there.
    let events = Consumer::run(lang, &c, &["--start", "0", "--max-events", "4"]).await;
    assert_eq!(
        kinds(&events),
        ["connect", "message", "message", "close"],
        "{events:?}"
    );
    for e in &events {
        assert_eq!(e["client_id"], id.as_str(), "{e}");
        assert_eq!(e["node"], &id[..12], "{e}");
        assert_eq!(e["reclaimed"], false, "{e}");
        assert!(e["time_ms"].as_u64().unwrap() > 1_600_000_000_000, "{e}");
        assert!(e["id"].as_str().unwrap().contains('-'), "{e}");
    }
    let connect = &events[0];
    // The token is never copied into events.
    assert_eq!(connect["query"], "room=7&lang=en%20GB");
    let remote = connect["remote_addr"].as_str().unwrap();
    assert!(remote.starts_with("127.0.0.1:"), "{remote}");
    assert_eq!(connect["headers"]["origin"], "https://app.example");
    assert_eq!(connect["headers"]["user-agent"], "consumer-test/1");
    // Bound after the connect event was written.
    assert_eq!(connect["uid"], Value::Null);
    assert_eq!(connect["session"], json!({}));

    let text = &events[1];
    assert_eq!(text["binary"], false);
    assert_eq!(text["data"], "hello ✓ \"quoted\"\n");
    assert_eq!(text["uid"], "alice");
    assert_eq!(text["session"], json!({"role": "admin"}));

    let binary = &events[2];
    assert_eq!(binary["binary"], true);
    assert_eq!(binary.get("data"), None, "{binary}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(binary["data_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes, BINARY);

    // The close event still knows who it was.
    let close = &events[3];
    assert_eq!(close["uid"], "alice");
    assert_eq!(close["session"], json!({"role": "admin"}));
    assert_eq!(pending(&c, "backend"), 0, "every event acknowledged");
}

/// A client that opted in to recovery resumes on another node: the
/// consumer gets the `resumed` event with both ids, and acknowledges it like
/// any other.
async fn consumer_hears_of_a_resume(lang: Lang) {
    let c = Cluster::start(Engine::Redis, &["--events"]).await;
    let (first, welcome) = Client::connect_welcome(&c.nodes[0].ws_url("?recover=1")).await;
    let token = welcome["resume"]
        .as_str()
        .expect("a resume token")
        .to_owned();
    let old = first.id.clone();
    first.close().await;
    let url = c.nodes[1].ws_url(&format!("?recover=1&resume={token}"));
    let (back, welcome) = Client::connect_welcome(&url).await;
    assert_eq!(welcome["resumed"], true, "{welcome}");

    let events = Consumer::run(lang, &c, &["--start", "0", "--max-events", "4"]).await;
    // Each connection's events in order; the two nodes' events interleave
    // in no guaranteed order (docs/events.md: each node writes its own
    // queue, and the first node's close may reach the stream after the
    // second node's events).
    let of = |id: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| e["client_id"] == id)
            .collect::<Vec<_>>()
    };
    let (first_events, back_events) = (of(&old), of(&back.id));
    assert_eq!(
        (kinds_of(&first_events), kinds_of(&back_events)),
        (vec!["connect", "close"], vec!["connect", "resumed"]),
        "{events:?}"
    );
    let resumed = back_events[1];
    assert_eq!(resumed["old_client_id"], old.as_str(), "{resumed}");
    // The resume token is never copied into events.
    let connect = back_events[0];
    assert_eq!(connect["query"], "recover=1", "{connect}");
    assert_eq!(pending(&c, "backend"), 0, "every event acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_consumer_hears_of_a_resume() {
    consumer_hears_of_a_resume(Lang::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_consumer_hears_of_a_resume() {
    consumer_hears_of_a_resume(Lang::Php).await;
}

/// The round trip of a chat backend: the consumer, already running, answers
/// each message through the HTTP API, and the client gets the answer.
async fn consumer_echoes_through_the_api(lang: Lang) {
    let c = Cluster::start(Engine::Redis, &["--events"]).await;
    let consumer = Consumer::start(lang, &c, &["--start", "0", "--max-events", "4"]);
    let mut a = connect(&c, "").await;
    a.send_text("hello").await;
    a.expect_text("echo: hello").await;
    a.send(Message::binary(BINARY.to_vec())).await;
    assert_eq!(a.next().await, Seen::Binary(BINARY.to_vec()));
    let id = a.id.clone();
    close(a).await;

    let events = consumer.finish().await;
    assert_eq!(
        kinds(&events),
        ["connect", "message", "message", "close"],
        "{events:?}"
    );
    assert!(events.iter().all(|e| e["client_id"] == id.as_str()));
    assert_eq!(pending(&c, "backend"), 0);
}

/// At least once: entries a consumer read without acknowledging stay
/// pending in the group, and the next consumer takes them over with
/// XAUTOCLAIM, the same entries, and acknowledges them.
async fn unacknowledged_events_are_reclaimed(lang: Lang) {
    let c = Cluster::start(Engine::Redis, &["--events"]).await;
    let mut a = connect(&c, "?n=1").await;
    a.send_text("hello").await;
    let id = a.id.clone();
    close(a).await;

    let common = ["--start", "0", "--group", "workers", "--max-events", "3"];
    let mut args = common.to_vec();
    args.extend(["--consumer", "dies", "--no-ack"]);
    let read = Consumer::run(lang, &c, &args).await;
    assert_eq!(kinds(&read), ["connect", "message", "close"], "{read:?}");
    assert_eq!(pending(&c, "workers"), 3);
    let pending_of_dies = c.redis.as_ref().unwrap().cli(&[
        "XPENDING",
        "gatecast:events",
        "workers",
        "-",
        "+",
        "10",
        "dies",
    ]);
    assert_eq!(
        pending_of_dies.lines().filter(|l| *l == "dies").count(),
        3,
        "{pending_of_dies}"
    );

    let mut args = common.to_vec();
    args.extend(["--consumer", "takes-over", "--claim-min-idle", "0"]);
    let reclaimed = Consumer::run(lang, &c, &args).await;
    assert_eq!(
        kinds(&reclaimed),
        ["connect", "message", "close"],
        "{reclaimed:?}"
    );
    for (first, again) in read.iter().zip(&reclaimed) {
        assert_eq!(first["id"], again["id"]);
        assert_eq!(again["reclaimed"], true, "{again}");
        assert_eq!(again["client_id"], id.as_str());
    }
    assert_eq!(reclaimed[1]["data"], "hello");
    assert_eq!(pending(&c, "workers"), 0, "acknowledged after the takeover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_consumer_prints_every_event() {
    consumer_prints_every_event(Lang::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_consumer_prints_every_event() {
    consumer_prints_every_event(Lang::Php).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_consumer_echoes_through_the_api() {
    consumer_echoes_through_the_api(Lang::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_consumer_echoes_through_the_api() {
    consumer_echoes_through_the_api(Lang::Php).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_unacknowledged_events_are_reclaimed() {
    unacknowledged_events_are_reclaimed(Lang::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_unacknowledged_events_are_reclaimed() {
    unacknowledged_events_are_reclaimed(Lang::Php).await;
}
