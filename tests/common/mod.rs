//! Test harness: real gateway processes on free loopback ports, real
//! WebSocket clients and real HTTP calls.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A running `gatecast` process.
pub struct Node {
    child: Child,
    /// Public listener (WebSocket).
    pub public: SocketAddr,
    /// Internal listener (API).
    pub api: SocketAddr,
    /// Inner listener.
    pub inner: SocketAddr,
    api_key: Option<String>,
    http: reqwest::Client,
}

impl Node {
    /// Starts a node on free loopback ports with `args` added.
    pub fn start(args: &[&str]) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gatecast"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--api-listen",
                "127.0.0.1:0",
                "--inner-listen",
                "127.0.0.1:0",
                "--advertise-ip",
                "127.0.0.1",
                "--log-format",
                "json",
                "--log-level",
                "info,gatecast=debug",
            ])
            .args(args)
            .env_remove("GATECAST_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("gatecast starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Drain the log for the node's whole life (a full pipe would block
        // it); echo it so a failing test shows what the node did.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("[node] {line}");
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["fields"]["message"] == "listening" {
                        let _ = tx.send(v["fields"].clone());
                    }
                }
            }
        });
        let fields = rx
            .recv_timeout(WAIT)
            .expect("node logs its listening addresses");
        let addr = |k: &str| fields[k].as_str().unwrap().parse().unwrap();
        let api_key = args
            .iter()
            .position(|a| *a == "--api-key")
            .map(|i| args[i + 1].to_owned());
        Node {
            public: addr("public"),
            api: addr("api"),
            inner: addr("inner"),
            child,
            api_key,
            http: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `ws://.../ws` of this node, with an optional query string.
    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws{}", self.public, query)
    }

    /// POSTs raw bytes to `/api/<method>`; returns status and JSON body.
    pub async fn post_raw(&self, method: &str, body: Vec<u8>, key: Option<&str>) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("http://{}/api/{method}", self.api))
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let resp = req.send().await.expect("API answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("API body is JSON: {text:?} (status {status})"));
        (status, body)
    }

    /// Calls a method; returns status and JSON body.
    pub async fn call(&self, method: &str, params: Value) -> (u16, Value) {
        let body = serde_json::to_vec(&params).unwrap();
        self.post_raw(method, body, self.api_key.as_deref()).await
    }

    /// Calls a method that must succeed; returns its `result`.
    pub async fn ok(&self, method: &str, params: Value) -> Value {
        let (status, body) = self.call(method, params).await;
        assert_eq!(status, 200, "{method} failed: {body}");
        body["result"].clone()
    }

    /// GETs a path on the internal or public listener; returns the status.
    pub async fn get_status(&self, public: bool, path: &str) -> u16 {
        let addr = if public { self.public } else { self.api };
        match self.http.get(format!("http://{addr}{path}")).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// GETs a path on the internal listener; returns the body.
    pub async fn get_text(&self, path: &str) -> String {
        let url = format!("http://{}{path}", self.api);
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Sends a signal (e.g. "TERM", "KILL") to the process.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node did not exit within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which engine a behaviour suite runs against.
#[derive(Debug, Clone, Copy)]
pub enum Engine {
    /// One node, in-process engine.
    Memory,
}

/// The gateway under test: one or more nodes.
pub struct Cluster {
    /// Its nodes.
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts the gateway for `engine` with extra node arguments.
    pub async fn start(engine: Engine, args: &[&str]) -> Cluster {
        match engine {
            Engine::Memory => Cluster {
                nodes: vec![Node::start(args)],
            },
        }
    }

    /// The node clients connect to.
    pub fn client_node(&self) -> &Node {
        &self.nodes[0]
    }

    /// The node API calls go to: with several nodes, never the one holding
    /// the clients, so every command crosses the engine.
    pub fn api(&self) -> &Node {
        self.nodes.last().unwrap()
    }

    /// Connects a client to the client node.
    pub async fn client(&self) -> Client {
        Client::connect(&self.client_node().ws_url("")).await
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client.
pub struct Client {
    ws: Ws,
    /// The client_id from the welcome frame.
    pub id: String,
}

/// What a client saw next.
#[derive(Debug, PartialEq)]
pub enum Seen {
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A close frame with its code.
    Close(Option<u16>),
    /// The connection ended without a close frame.
    Ended,
}

impl Client {
    /// Connects and reads the welcome frame.
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("WebSocket handshake");
        let mut client = Client {
            ws,
            id: String::new(),
        };
        let welcome = client.next().await;
        let Seen::Text(text) = welcome else {
            panic!("expected a welcome frame, got {welcome:?}")
        };
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "welcome");
        client.id = v["client_id"].as_str().unwrap().to_owned();
        client
    }

    /// The next message, close or end, skipping pings (bounded wait).
    pub async fn next(&mut self) -> Seen {
        loop {
            let item = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("client got something in time");
            return match item {
                None | Some(Err(_)) => Seen::Ended,
                Some(Ok(Message::Text(t))) => Seen::Text(t.to_string()),
                Some(Ok(Message::Binary(b))) => Seen::Binary(b.to_vec()),
                Some(Ok(Message::Close(frame))) => Seen::Close(frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
            };
        }
    }

    /// The next message, which must be this text.
    pub async fn expect_text(&mut self, want: &str) {
        assert_eq!(
            self.next().await,
            Seen::Text(want.to_owned()),
            "client {}",
            self.id
        );
    }

    /// The next thing must be a close frame with `code`.
    pub async fn expect_close(&mut self, code: u16) {
        assert_eq!(
            self.next().await,
            Seen::Close(Some(code)),
            "client {}",
            self.id
        );
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    /// Sends any message.
    pub async fn send(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    /// Closes the connection with a normal close frame.
    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
        // Read until the server's answer so the close is complete.
        let _ = tokio::time::timeout(WAIT, async { while self.ws.next().await.is_some() {} }).await;
    }

    /// The raw stream, for tests that need to stop reading.
    pub fn stream(&mut self) -> &mut Ws {
        &mut self.ws
    }
}

/// Waits (bounded) until `check` returns true.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sorts a JSON array of strings (results of list queries are unordered).
pub fn sorted(v: Value) -> Vec<String> {
    let mut list: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("expected an array, got {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    list.sort();
    list
}

/// Sorted list of owned strings.
pub fn strs(items: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Runs each named suite function against every engine.
#[macro_export]
macro_rules! engine_suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Engine::Memory).await
                }
            )*
        }
    };
}

/// A client_id that no node holds.
pub const OFFLINE_ID: &str = "7f000001ffff00000001";
