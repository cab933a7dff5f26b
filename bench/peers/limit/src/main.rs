//! The box's limit: the smallest push server that does what gatecast does
//! on one node without Redis, built the way ../shared/PERFORMANCE.md
//! describes. tokio multi-thread and hyper; the tungstenite read side; one
//! writer task per connection that takes up to 64 queued frames and writes
//! them with one vectored write; each push encoded once into a shared
//! `Bytes` frame; an index (uid / group / all) read under a lock never held
//! across an await.
//!
//! It speaks the subset of gatecast's API the load generator uses
//! (`POST /api/{bind_uid,join_group,send_to_uid,send_to_group,send_to_all}`)
//! and sends the same welcome frame (`{"client_id": ...}`).
//!
//! usage: limit-server WS_ADDR API_ADDR

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::RwLock;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// Frames a connection may have queued before it is dropped as too slow.
const QUEUE: usize = 4096;
/// Frames per vectored write.
const BATCH: usize = 64;

type Queue = mpsc::Sender<Bytes>;

#[derive(Default)]
struct Index {
    conns: HashMap<u64, Queue>,
    uids: HashMap<String, Vec<u64>>,
    groups: HashMap<String, Vec<u64>>,
}

#[derive(Default)]
struct Server {
    index: RwLock<Index>,
    next: AtomicU64,
}

/// A server-to-client WebSocket frame (unmasked), encoded once.
fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 10);
    b.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => b.put_u8(n as u8),
        n if n < 65536 => {
            b.put_u8(126);
            b.put_u16(n as u16);
        }
        n => {
            b.put_u8(127);
            b.put_u64(n as u64);
        }
    }
    b.put_slice(payload);
    b.freeze()
}

impl Server {
    fn deliver(&self, ids: impl Iterator<Item = u64>, frame: &Bytes) {
        let index = self.index.read();
        for id in ids {
            if let Some(q) = index.conns.get(&id) {
                let _ = q.try_send(frame.clone());
            }
        }
    }

    fn remove(&self, id: u64) {
        let mut index = self.index.write();
        index.conns.remove(&id);
        // The benchmark never disconnects mid-run; uid and group lists are
        // cleaned lazily (deliver skips ids that are gone).
    }
}

async fn writer(mut write: tokio::net::tcp::OwnedWriteHalf, mut rx: mpsc::Receiver<Bytes>) {
    use tokio::io::AsyncWriteExt;
    let mut batch: Vec<Bytes> = Vec::new();
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let mut start = 0;
        let mut offset = 0;
        while start < batch.len() {
            let slices: Vec<IoSlice<'_>> = batch[start..]
                .iter()
                .enumerate()
                .map(|(i, f)| IoSlice::new(if i == 0 { &f[offset..] } else { f }))
                .collect();
            let Ok(mut n) = write.write_vectored(&slices).await else {
                return;
            };
            if n == 0 {
                return;
            }
            while n > 0 {
                let left = batch[start].len() - offset;
                if n >= left {
                    n -= left;
                    start += 1;
                    offset = 0;
                } else {
                    offset += n;
                    n = 0;
                }
            }
        }
        batch.clear();
        if batch.capacity() > BATCH {
            batch = Vec::new();
        }
    }
}

/// Only the read side of the socket is tungstenite's: what it would write
/// (pong, close replies) is dropped, the benchmark's clients never ping.
struct ReadSide(tokio::net::tcp::OwnedReadHalf);

impl tokio::io::AsyncRead for ReadSide {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ReadSide {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

async fn serve_ws(server: Arc<Server>, stream: TcpStream, early: Bytes) {
    let id = server.next.fetch_add(1, Ordering::Relaxed) + 1;
    let (read, write) = stream.into_split();
    let (tx, rx) = mpsc::channel(QUEUE);
    let welcome = frame(1, format!("{{\"client_id\":\"{id}\"}}").as_bytes());
    let _ = tx.try_send(welcome);
    server.index.write().conns.insert(id, tx);
    let writer = tokio::spawn(writer(write, rx));
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 4096;
    let ws = tokio_tungstenite::WebSocketStream::from_partially_read(
        ReadSide(read),
        early.to_vec(),
        Role::Server,
        Some(config),
    )
    .await;
    let (_, mut read) = ws.split();
    while let Some(Ok(m)) = read.next().await {
        if m.is_close() {
            break;
        }
    }
    server.remove(id);
    writer.abort();
}

fn json_response(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn api(server: &Server, method: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Ok(body) = req.into_body().collect().await else {
        return json_response(StatusCode::BAD_REQUEST, "{\"error\":\"body\"}");
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body.to_bytes()) else {
        return json_response(StatusCode::BAD_REQUEST, "{\"error\":\"json\"}");
    };
    let s = |k: &str| v[k].as_str().map(str::to_owned);
    let id = || s("client_id").and_then(|c| c.parse::<u64>().ok());
    let data = || frame(1, v["data"].as_str().unwrap_or("").as_bytes());
    match method {
        "bind_uid" | "join_group" => {
            let (Some(id), Some(name)) =
                (id(), s(if method == "bind_uid" { "uid" } else { "group" }))
            else {
                return json_response(StatusCode::BAD_REQUEST, "{\"error\":\"params\"}");
            };
            let mut index = server.index.write();
            let map = if method == "bind_uid" {
                &mut index.uids
            } else {
                &mut index.groups
            };
            map.entry(name).or_default().push(id);
        }
        "send_to_uid" | "send_to_group" => {
            let key = if method == "send_to_uid" {
                "uid"
            } else {
                "group"
            };
            let Some(name) = s(key) else {
                return json_response(StatusCode::BAD_REQUEST, "{\"error\":\"params\"}");
            };
            let frame = data();
            let ids: Vec<u64> = {
                let index = server.index.read();
                let map = if key == "uid" {
                    &index.uids
                } else {
                    &index.groups
                };
                map.get(&name).cloned().unwrap_or_default()
            };
            server.deliver(ids.into_iter(), &frame);
        }
        "send_to_all" => {
            let frame = data();
            let index = server.index.read();
            for q in index.conns.values() {
                let _ = q.try_send(frame.clone());
            }
        }
        _ => return json_response(StatusCode::NOT_FOUND, "{\"error\":\"method\"}"),
    }
    json_response(StatusCode::OK, "{\"result\":null}")
}

async fn handle(
    server: Arc<Server>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_owned();
    if let Some(method) = path.strip_prefix("/api/") {
        return Ok(api(&server, method, req).await);
    }
    if path == "/readyz" {
        return Ok(json_response(StatusCode::OK, "{}"));
    }
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return Ok(json_response(
            StatusCode::BAD_REQUEST,
            "{\"error\":\"not a websocket\"}",
        ));
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
            return;
        };
        serve_ws(server, parts.io.into_inner(), parts.read_buf).await;
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(Full::new(Bytes::new()))
        .unwrap())
}

async fn listen(server: Arc<Server>, addr: SocketAddr) {
    let listener = TcpListener::bind(addr).await.expect("bind");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(server.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let ws: SocketAddr = args
        .next()
        .unwrap_or("127.0.0.1:8080".into())
        .parse()
        .unwrap();
    let api: SocketAddr = args
        .next()
        .unwrap_or("127.0.0.1:8081".into())
        .parse()
        .unwrap();
    let server = Arc::new(Server::default());
    tokio::spawn(listen(server.clone(), api));
    listen(server, ws).await;
}
