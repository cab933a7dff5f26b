//! The client WebSocket (SPEC section 2): keep-alive both ways, frame limits,
//! protocol errors, origin checks, client JWTs and the health endpoints.
//! Every suite runs against each engine, and on Sentinel and Redis Cluster.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{
    assert_api_error, assert_error_body, eventually, sorted, Client, Cluster, Engine, OutputWithin,
    RawClient, Refused,
};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

engine_suite!(
    text_ping_is_answered_with_text_pong,
    websocket_ping_is_answered_with_pong_carrying_its_payload,
    server_sends_websocket_pings_every_interval,
    silent_client_is_closed_after_ping_timeout_and_active_one_is_not,
    frame_above_max_message_bytes_closes_with_1009,
    invalid_utf8_text_closes_with_1007,
    allowed_origins_restricts_the_origin_header,
    non_upgrade_get_on_ws_is_400_json,
    health_and_readiness_on_both_listeners,
    jwt_is_required_and_checked_when_a_secret_is_set,
    jwt_claims_bind_uid_groups_and_session,
    rs256_and_es256_tokens_with_a_public_key,
    a_write_delay_sends_the_pushes_of_a_moment_in_one_write,
);

// The same on Sentinel and on Redis Cluster.
topology_suite!(
    text_ping_is_answered_with_text_pong,
    websocket_ping_is_answered_with_pong_carrying_its_payload,
    server_sends_websocket_pings_every_interval,
    silent_client_is_closed_after_ping_timeout_and_active_one_is_not,
    frame_above_max_message_bytes_closes_with_1009,
    invalid_utf8_text_closes_with_1007,
    allowed_origins_restricts_the_origin_header,
    non_upgrade_get_on_ws_is_400_json,
    health_and_readiness_on_both_listeners,
    jwt_is_required_and_checked_when_a_secret_is_set,
    jwt_claims_bind_uid_groups_and_session,
    rs256_and_es256_tokens_with_a_public_key,
);

/// Seconds since the Unix epoch.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token for `claims` signed with `secret`.
fn hs256(secret: &str, claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Data segments the client's socket received so far (`tcpi_data_segs_in`
/// of TCP_INFO): over loopback, with Nagle off on the node, one per write
/// of the node's.
fn data_segments_in(client: &mut Client) -> u32 {
    use std::os::fd::AsRawFd;
    let fd = match client.stream().get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp.as_raw_fd(),
        _ => panic!("a plain TCP client"),
    };
    // struct tcp_info (linux/tcp.h): tcpi_data_segs_in is the u32 at 152.
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    let got = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert!(got == 0 && len >= 160, "TCP_INFO: {got}, {len} bytes");
    u32::from_ne_bytes(info[152..156].try_into().unwrap())
}

/// `--write-delay`: the pushes that reach a connection within the delay
/// go out in one write, whole and in order. With Redis they come through
/// another node's API, one PUBLISH after another, so the Redis engine's
/// path holds the wake-ups as the API's local fan-out does. Counted as the
/// TCP data segments the client received: 20 pushes through Redis, each
/// written at once, came as ~20; held for 100ms they come in one write per
/// flush the batch spans (a loaded machine spreads it over more).
async fn a_write_delay_sends_the_pushes_of_a_moment_in_one_write(engine: Engine) {
    let c = Cluster::start(engine, &["--write-delay", "100ms"]).await;
    let mut a = c.client().await;
    let commands: Vec<Value> = (0..20)
        .map(|i| {
            json!({"method": "send_to_client",
                   "params": {"client_id": a.id, "data": format!("m{i}")}})
        })
        .collect();
    let (before, started) = (data_segments_in(&mut a), std::time::Instant::now());
    let (status, _) = c.api().call("batch", json!({ "commands": commands })).await;
    assert_eq!(status, 200);
    for i in 0..20 {
        a.expect_text(&format!("m{i}")).await;
    }
    let writes = data_segments_in(&mut a) - before;
    let flushes = started.elapsed().as_millis() as u32 / 100 + 1;
    eprintln!("20 pushes: {writes} segments, within {flushes} write delays");
    assert!(
        writes <= 2 * flushes,
        "20 pushes within {flushes} write delays came in {writes} segments"
    );
    // Pongs are not held.
    a.send_text(r#"{"type":"ping"}"#).await;
    a.expect_text(r#"{"type":"pong"}"#).await;
}

async fn text_ping_is_answered_with_text_pong(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let mut a = c.client().await;
    a.send_text(r#"{"type":"ping"}"#).await;
    // The server's own pings may come at any moment (a share per sweep).
    loop {
        match a.next_raw().await {
            Some(Message::Ping(_)) => continue,
            Some(Message::Text(t)) => break assert_eq!(t.as_str(), r#"{"type":"pong"}"#),
            other => panic!("expected a text pong, got {other:?}"),
        }
    }
    // Other text is a business message: no answer, and the connection
    // stays up.
    a.send_text(r#"{"type":"hello"}"#).await;
    a.send_text("ping").await;
    a.send(Message::binary(vec![1, 2, 3])).await;
    a.send_text(r#"{ "type" : "ping" }"#).await;
    a.expect_text(r#"{"type":"pong"}"#).await;
    c.api()
        .ok(
            "send_to_client",
            json!({"client_id": a.id, "data": "marker"}),
        )
        .await;
    a.expect_text("marker").await;
}

async fn websocket_ping_is_answered_with_pong_carrying_its_payload(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let mut a = c.client().await;
    for payload in [&b"abc"[..], b"", &[0xff, 0, 7]] {
        a.send(Message::Ping(payload.to_vec().into())).await;
        loop {
            match a.next_raw().await {
                Some(Message::Pong(p)) => {
                    assert_eq!(&p[..], payload);
                    break;
                }
                // A server ping may come first; tungstenite answers it.
                Some(Message::Ping(_)) => continue,
                other => panic!("expected a pong, got {other:?}"),
            }
        }
    }
}

async fn server_sends_websocket_pings_every_interval(engine: Engine) {
    let c = Cluster::start(engine, &["--ping-interval", "100ms"]).await;
    let mut a = c.client().await;
    for _ in 0..3 {
        match a.next_raw().await {
            Some(Message::Ping(_)) => {}
            other => panic!("expected a server ping, got {other:?}"),
        }
    }
}

async fn silent_client_is_closed_after_ping_timeout_and_active_one_is_not(engine: Engine) {
    let c = Cluster::start(
        engine,
        &["--ping-interval", "200ms", "--ping-timeout", "600ms"],
    )
    .await;
    let node = c.client_node();
    let api = c.api();
    // The silent client: a hand-made connection that reads nothing and so
    // answers no ping.
    let mut silent = RawClient::connect(node.public, "/ws", &[])
        .await
        .expect("101");
    let welcome = silent.read_frame().await.expect("welcome frame");
    let welcome: Value = serde_json::from_slice(&welcome.payload).unwrap();
    let silent_id = welcome["client_id"].as_str().unwrap().to_owned();
    assert_eq!(
        api.ok("is_online", json!({"client_id": silent_id})).await,
        true
    );
    // The active client answers pings (tungstenite pongs as it reads) and
    // sends its own text pings.
    let mut active = c.client().await;
    let mut pings = 0;
    // Each ping is 200ms after the previous one: 6 pings span at least a
    // second, well past the 600ms timeout.
    while pings < 6 {
        match active.next_raw().await {
            Some(Message::Ping(_)) => {
                pings += 1;
                active.send_text(r#"{"type":"ping"}"#).await;
            }
            Some(Message::Text(t)) => assert_eq!(t.as_str(), r#"{"type":"pong"}"#),
            other => panic!("active client got {other:?}"),
        }
    }
    eventually("the silent client is offline", || async {
        api.ok("is_online", json!({"client_id": silent_id})).await == false
    })
    .await;
    assert_eq!(
        api.ok("is_online", json!({"client_id": active.id})).await,
        true
    );
    // The silent client was told: after pings, a close frame.
    loop {
        let frame = silent
            .read_frame()
            .await
            .expect("a close frame before the end");
        match frame.opcode {
            9 => continue,
            8 => break,
            other => panic!("silent client got opcode {other}"),
        }
    }
    // The active one still gets pushes.
    api.ok(
        "send_to_client",
        json!({"client_id": active.id, "data": "still here"}),
    )
    .await;
    loop {
        match active.next_raw().await {
            Some(Message::Ping(_)) => {}
            Some(Message::Text(t)) if t.as_str() == r#"{"type":"pong"}"# => {}
            Some(Message::Text(t)) => {
                assert_eq!(t.as_str(), "still here");
                break;
            }
            other => panic!("active client got {other:?}"),
        }
    }
    assert_eq!(api.ok("get_all_client_count", json!({})).await, 1);
}

async fn frame_above_max_message_bytes_closes_with_1009(engine: Engine) {
    let c = Cluster::start(engine, &["--max-message-bytes", "16"]).await;
    let api = c.api();
    let mut a = c.client().await;
    // 16 bytes is fine, text and binary.
    a.send_text(&"a".repeat(16)).await;
    a.send(Message::binary(vec![0u8; 16])).await;
    api.ok(
        "send_to_client",
        json!({"client_id": a.id, "data": "marker"}),
    )
    .await;
    a.expect_text("marker").await;
    // 17 bytes closes with 1009.
    a.send_text(&"b".repeat(17)).await;
    a.expect_close(1009).await;
    let id = a.id.clone();
    eventually("the closed client is offline", || async {
        api.ok("is_online", json!({"client_id": id})).await == false
    })
    .await;
    // A binary frame too, and a message fragmented into small frames.
    let mut b = c.client().await;
    b.send(Message::binary(vec![0u8; 17])).await;
    b.expect_close(1009).await;
    let mut raw = RawClient::connect(c.client_node().public, "/ws", &[])
        .await
        .expect("101");
    assert_eq!(raw.read_frame().await.unwrap().opcode, 1, "welcome");
    raw.send_frame(false, 1, &[b'c'; 10]).await;
    raw.send_frame(true, 0, &[b'c'; 10]).await;
    let close = raw.read_frame().await.expect("a close frame");
    assert_eq!(close.close_code(), Some(1009), "{close:?}");
    // A frame header announcing 1 TiB is refused at once, before any of its
    // payload arrives.
    let mut raw = RawClient::connect(c.client_node().public, "/ws", &[])
        .await
        .expect("101");
    assert_eq!(raw.read_frame().await.unwrap().opcode, 1, "welcome");
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 40).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    raw.send_bytes(&header).await;
    let close = raw.read_frame().await.expect("a close frame");
    assert_eq!(close.close_code(), Some(1009), "{close:?}");
}

async fn invalid_utf8_text_closes_with_1007(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let api = c.api();
    let mut raw = RawClient::connect(c.client_node().public, "/ws", &[])
        .await
        .expect("101");
    let welcome = raw.read_frame().await.expect("welcome frame");
    let welcome: Value = serde_json::from_slice(&welcome.payload).unwrap();
    let id = welcome["client_id"].as_str().unwrap().to_owned();
    // Valid UTF-8, multi-byte and split across fragments, is accepted: the
    // text ping after it is answered.
    raw.send_frame(true, 1, "héllo \u{1F600}".as_bytes()).await;
    let smiley = "\u{1F600}".as_bytes();
    raw.send_frame(false, 1, &smiley[..2]).await;
    raw.send_frame(true, 0, &smiley[2..]).await;
    raw.send_frame(true, 1, br#"{"type":"ping"}"#).await;
    let pong = raw.read_frame().await.expect("a pong");
    assert_eq!(
        (pong.opcode, &pong.payload[..]),
        (1, &br#"{"type":"pong"}"#[..])
    );
    raw.send_frame(true, 1, &[b'o', b'k', 0xff, 0xfe]).await;
    let close = raw.read_frame().await.expect("a close frame");
    assert_eq!(close.close_code(), Some(1007), "{close:?}");
    eventually("the closed client is offline", || async {
        api.ok("is_online", json!({"client_id": id})).await == false
    })
    .await;
}

async fn allowed_origins_restricts_the_origin_header(engine: Engine) {
    let c = Cluster::start(engine, &["--allowed-origins", "https://good.example"]).await;
    let url = c.client_node().ws_url("");
    let api = c.api();
    let good = Client::try_connect(&url, &[("Origin", "https://good.example")])
        .await
        .expect("an allowed origin connects");
    for evil in [
        "https://evil.example",
        "https://good.example.evil.example",
        "null",
    ] {
        let got = Client::try_connect(&url, &[("Origin", evil)]).await;
        assert_eq!(got.err(), Some(Refused::Status(403)), "origin {evil}");
    }
    // The refusal is the API's JSON error.
    let refused = RawClient::connect(
        c.client_node().public,
        "/ws",
        &[("Origin", "https://evil.example")],
    )
    .await;
    let Err((status, body)) = refused else {
        panic!("evil origin upgraded")
    };
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_error_body("evil origin", &(status, body), 403);
    // Clients that send no Origin (not browsers) are not restricted by it.
    let no_origin = c.client().await;
    assert_eq!(
        sorted(api.ok("get_all_client_id_list", json!({})).await),
        {
            let mut ids = vec![good.id.clone(), no_origin.id.clone()];
            ids.sort();
            ids
        },
        "only the allowed connections exist"
    );
}

async fn non_upgrade_get_on_ws_is_400_json(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let (status, text) = c.client_node().get_raw(true, "/ws").await;
    let body: Value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("400 body is JSON: {text:?}"));
    assert_error_body("GET /ws", &(status, body), 400);
    assert_eq!(c.api().ok("get_all_client_count", json!({})).await, 0);
}

async fn health_and_readiness_on_both_listeners(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    for node in &c.nodes {
        for public in [true, false] {
            for path in ["/healthz", "/readyz"] {
                assert_eq!(
                    node.get_status(public, path).await,
                    200,
                    "{path} on the {} listener",
                    if public { "public" } else { "API" }
                );
            }
        }
    }
}

async fn jwt_is_required_and_checked_when_a_secret_is_set(engine: Engine) {
    let c = Cluster::start(
        engine,
        &["--client-jwt-secret", "websocket-test-jwt-secret"],
    )
    .await;
    let node = c.client_node();
    let api = c.api();
    let valid = json!({"sub": "alice", "exp": now() + 3600});
    let cases = [
        ("no token", String::new()),
        ("empty token", "?token=".to_owned()),
        ("garbage", "?token=not.a.jwt".to_owned()),
        (
            "bad signature",
            format!("?token={}", hs256("other secret", &valid)),
        ),
        (
            "expired",
            format!(
                "?token={}",
                hs256(
                    "websocket-test-jwt-secret",
                    &json!({"sub": "alice", "exp": now() - 3600})
                )
            ),
        ),
        ("alg none", format!("?token={}", alg_none(&valid))),
        (
            "no exp",
            format!(
                "?token={}",
                hs256("websocket-test-jwt-secret", &json!({"sub": "bob"}))
            ),
        ),
    ];
    for (what, query) in &cases {
        let got = Client::try_connect(&node.ws_url(query), &[]).await;
        assert_eq!(got.err(), Some(Refused::Status(401)), "{what}");
        // Refused before the upgrade, with the API's JSON error.
        let refused = RawClient::connect(node.public, &format!("/ws{query}"), &[]).await;
        let Err((status, body)) = refused else {
            panic!("{what}: upgraded")
        };
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_api_error(what, &(status, body.clone()), 401, "unauthorized");
        if !query.is_empty() {
            // Which check failed is not told.
            assert_eq!(body["error"]["message"], "invalid token", "{what}");
        }
    }
    assert_eq!(api.ok("get_all_client_count", json!({})).await, 0);
    assert_eq!(
        api.ok("is_uid_online", json!({"uid": "alice"})).await,
        false
    );
    let a = Client::try_connect(
        &node.ws_url(&format!(
            "?token={}",
            hs256("websocket-test-jwt-secret", &valid)
        )),
        &[],
    )
    .await
    .expect("a valid token connects");
    assert_eq!(
        api.ok("get_uid_by_client_id", json!({"client_id": a.id}))
            .await,
        "alice"
    );
}

/// An unsigned token (`alg: none`), which must never be accepted.
fn alg_none(claims: &Value) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    )
}

async fn jwt_claims_bind_uid_groups_and_session(engine: Engine) {
    let c = Cluster::start(
        engine,
        &["--client-jwt-secret", "websocket-test-jwt-secret"],
    )
    .await;
    let api = c.api();
    let token = hs256(
        "websocket-test-jwt-secret",
        &json!({
            "sub": "alice",
            "groups": ["g1", "g2"],
            "session": {"role": "admin"},
            "exp": now() + 3600,
        }),
    );
    let mut a = Client::try_connect(&c.client_node().ws_url(&format!("?token={token}")), &[])
        .await
        .expect("a valid token connects");
    assert_eq!(
        api.ok("get_uid_by_client_id", json!({"client_id": a.id}))
            .await,
        "alice"
    );
    assert_eq!(
        api.ok("get_client_id_by_uid", json!({"uid": "alice"}))
            .await,
        json!([a.id])
    );
    for group in ["g1", "g2"] {
        assert_eq!(
            api.ok("get_client_id_list_by_group", json!({"group": group}))
                .await,
            json!([a.id]),
            "{group}"
        );
    }
    assert_eq!(
        api.ok("get_session", json!({"client_id": a.id})).await,
        json!({"role": "admin"})
    );
    // What the claims set up is live: pushes by uid and group reach it.
    api.ok("send_to_uid", json!({"uid": "alice", "data": "to alice"}))
        .await;
    api.ok("send_to_group", json!({"group": "g2", "data": "to g2"}))
        .await;
    a.expect_text("to alice").await;
    a.expect_text("to g2").await;
    // Numeric sub and groups are names too.
    let token = hs256(
        "websocket-test-jwt-secret",
        &json!({"sub": 42, "groups": [7], "exp": now() + 3600}),
    );
    let b = Client::try_connect(&c.client_node().ws_url(&format!("?token={token}")), &[])
        .await
        .expect("a valid token connects");
    assert_eq!(
        api.ok("get_uid_by_client_id", json!({"client_id": b.id}))
            .await,
        "42"
    );
    assert_eq!(
        sorted(api.ok("get_all_group_id_list", json!({})).await),
        vec!["7", "g1", "g2"]
    );
}

/// Runs `openssl` with `args`; panics with its stderr on failure.
fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output_within(common::WAIT);
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh temporary directory for key files.
fn temp_dir(name: &str) -> std::path::PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "gatecast-test-{name}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn rs256_and_es256_tokens_with_a_public_key(engine: Engine) {
    let dir = temp_dir("jwt-keys");
    let path = |f: &str| dir.join(f).to_str().unwrap().to_owned();
    openssl(&["genrsa", "-out", &path("rsa.pem"), "2048"]);
    openssl(&[
        "rsa",
        "-in",
        &path("rsa.pem"),
        "-pubout",
        "-out",
        &path("rsa.pub"),
    ]);
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &path("ec.pem"),
    ]);
    openssl(&[
        "pkey",
        "-in",
        &path("ec.pem"),
        "-pubout",
        "-out",
        &path("ec.pub"),
    ]);
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let claims = json!({"sub": "carol", "groups": ["pk"], "exp": now() + 3600});

    // RS256.
    let rsa = EncodingKey::from_rsa_pem(&read("rsa.pem")).unwrap();
    let c = Cluster::start(engine, &["--client-jwt-public-key", &path("rsa.pub")]).await;
    let node = c.client_node();
    let good = encode(&Header::new(Algorithm::RS256), &claims, &rsa).unwrap();
    let a = Client::try_connect(&node.ws_url(&format!("?token={good}")), &[])
        .await
        .expect("an RS256 token connects");
    assert_eq!(
        c.api()
            .ok("get_uid_by_client_id", json!({"client_id": a.id}))
            .await,
        "carol"
    );
    // Refused: HS256 keyed with the public key itself (algorithm
    // confusion), a token signed with the EC key, an expired token.
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&read("rsa.pub")),
    )
    .unwrap();
    let ec = EncodingKey::from_ec_pem(&read("ec.pem")).unwrap();
    let other_key = encode(&Header::new(Algorithm::ES256), &claims, &ec).unwrap();
    let expired = encode(
        &Header::new(Algorithm::RS256),
        &json!({"sub": "carol", "exp": now() - 3600}),
        &rsa,
    )
    .unwrap();
    for (what, token) in [
        ("HS256 with the public key", &confused),
        ("ES256", &other_key),
        ("expired", &expired),
    ] {
        let got = Client::try_connect(&node.ws_url(&format!("?token={token}")), &[]).await;
        assert_eq!(got.err(), Some(Refused::Status(401)), "{what}");
    }
    drop(c);

    // ES256.
    let c = Cluster::start(engine, &["--client-jwt-public-key", &path("ec.pub")]).await;
    let node = c.client_node();
    let a = Client::try_connect(&node.ws_url(&format!("?token={other_key}")), &[])
        .await
        .expect("an ES256 token connects");
    assert_eq!(
        c.api()
            .ok("get_client_id_list_by_group", json!({"group": "pk"}))
            .await,
        json!([a.id])
    );
    let got = Client::try_connect(&node.ws_url(&format!("?token={good}")), &[]).await;
    assert_eq!(
        got.err(),
        Some(Refused::Status(401)),
        "RS256 token on an EC key"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--welcome-frame` replaces the welcome's shape (SPEC section 2): the
/// first frame is exactly the template with the connection's real id, the
/// one pushes reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_frame_template_shapes_the_first_frame() {
    let node = common::Node::start(&[
        "--welcome-frame",
        r#"{"type":"init","client_id":"{client_id}"}"#,
    ]);
    let mut raw = RawClient::connect(node.public, "/ws", &[])
        .await
        .expect("101");
    let first = raw.read_frame().await.expect("a first frame");
    assert_eq!(first.opcode, 1, "text: {first:?}");
    let text = String::from_utf8(first.payload).unwrap();
    let id = text
        .strip_prefix(r#"{"type":"init","client_id":""#)
        .and_then(|rest| rest.strip_suffix(r#""}"#))
        .unwrap_or_else(|| panic!("the template with an id: {text}"));
    assert_eq!(id.len(), 20, "{text}");
    node.ok("send_to_client", json!({"client_id": id, "data": "hi"}))
        .await;
    let pushed = raw.read_frame().await.expect("the push");
    assert_eq!((pushed.opcode, &pushed.payload[..]), (1, &b"hi"[..]));
}

/// A template without `{client_id}` would hide the id from every client:
/// refused at start, naming the flag, from the command line or the
/// environment.
#[test]
fn welcome_frame_without_the_placeholder_is_refused_at_start() {
    for (args, env) in [
        (&["--welcome-frame", r#"{"type":"init"}"#][..], None),
        (&[][..], Some(r#"{"type":"init","id":"{id}"}"#)),
    ] {
        let mut command = common::gatecast_command();
        command.args(args);
        if let Some(template) = env {
            command.env("GATECAST_WELCOME_FRAME", template);
        }
        let out = command.output_within(common::WAIT);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains("--welcome-frame"), "{stderr}");
        assert!(stderr.contains("{client_id}"), "{stderr}");
    }
}

/// Sends a byte of an unfinished frame every `every` and reads what the
/// server sends meanwhile, until it closes; the close code.
async fn trickle_until_closed(raw: &mut RawClient, every: std::time::Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while tokio::time::Instant::now() < deadline {
        raw.send_bytes(b"x").await;
        match tokio::time::timeout(every, raw.read_frame()).await {
            Ok(Some(frame)) if frame.opcode == 8 => return frame.close_code(),
            Ok(None) => return None,
            _ => {}
        }
    }
    panic!("still open after {:?}", common::WAIT)
}

/// A client that trickles a message one byte at a time holds its buffers
/// only until `--message-timeout`: closed with 1008, though bytes keep
/// coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_trickled_byte_by_byte_is_closed_with_1008() {
    let node = common::Node::start(&["--message-timeout", "1s"]);
    let mut raw = RawClient::connect(node.public, "/ws", &[])
        .await
        .expect("101");
    raw.read_frame().await.expect("welcome frame");
    // A 64 KiB non-final fragment, then a continuation of 200 bytes sent a
    // byte at a time: the message never completes.
    raw.send_frame(false, 1, &vec![b'a'; 65_000]).await;
    raw.send_bytes(&[0x80, 0x80 | 126, 0, 200, 1, 2, 3, 4])
        .await;
    let code = trickle_until_closed(&mut raw, std::time::Duration::from_millis(200)).await;
    assert_eq!(code, Some(1008));
}

/// Bytes alone are not activity: a client that sends part of a frame every
/// 100 ms but never a whole one is closed by the ping timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_without_a_whole_frame_do_not_keep_a_client_alive() {
    let node = common::Node::start(&[
        "--ping-interval",
        "200ms",
        "--ping-timeout",
        "600ms",
        "--message-timeout",
        "60s",
    ]);
    let mut raw = RawClient::connect(node.public, "/ws", &[])
        .await
        .expect("101");
    raw.read_frame().await.expect("welcome frame");
    // The header of a 200-byte text frame, then its payload a byte at a time.
    raw.send_bytes(&[0x81, 0x80 | 126, 0, 200, 1, 2, 3, 4])
        .await;
    let code = trickle_until_closed(&mut raw, std::time::Duration::from_millis(100)).await;
    assert_eq!(code, Some(1000), "closed by the ping timeout");
}

/// Whether `claims` (HS256, secret `websocket-test-jwt-secret`) open a connection on `node`;
/// a refusal must be a 401 that says only "invalid token".
async fn token_accepted(node: &common::Node, claims: &Value) -> bool {
    let query = format!("?token={}", hs256("websocket-test-jwt-secret", claims));
    match RawClient::connect(node.public, &format!("/ws{query}"), &[]).await {
        Ok(_) => true,
        Err((status, body)) => {
            let body: Value = serde_json::from_str(&body).unwrap();
            assert_api_error(
                &claims.to_string(),
                &(status, body.clone()),
                401,
                "unauthorized",
            );
            assert_eq!(body["error"]["message"], "invalid token", "{claims}");
            false
        }
    }
}

/// `exp` is required by default and can be made optional; `nbf` is
/// honoured; both with `--client-jwt-leeway` (30s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_exp_is_required_nbf_honoured_with_a_leeway() {
    let node = common::Node::start(&["--client-jwt-secret", "websocket-test-jwt-secret"]);
    let t = now();
    for (claims, accepted) in [
        (json!({"sub": "a"}), false),
        (json!({"sub": "a", "exp": "tomorrow"}), false),
        (json!({"sub": "a", "exp": t + 60}), true),
        // Within the default leeway, and past it.
        (json!({"sub": "a", "exp": t - 10}), true),
        (json!({"sub": "a", "exp": t - 120}), false),
        (json!({"sub": "a", "exp": t + 60, "nbf": t - 10}), true),
        (json!({"sub": "a", "exp": t + 60, "nbf": t + 10}), true),
        (json!({"sub": "a", "exp": t + 60, "nbf": t + 3600}), false),
    ] {
        assert_eq!(token_accepted(&node, &claims).await, accepted, "{claims}");
    }
    drop(node);

    let node = common::Node::start(&[
        "--client-jwt-secret",
        "websocket-test-jwt-secret",
        "--client-jwt-require-exp=false",
        "--client-jwt-leeway",
        "0s",
    ]);
    for (claims, accepted) in [
        (json!({"sub": "a"}), true),
        // Still honoured when present, now without leeway.
        (json!({"sub": "a", "exp": t - 10}), false),
        (json!({"sub": "a", "nbf": t + 10}), false),
    ] {
        assert_eq!(token_accepted(&node, &claims).await, accepted, "{claims}");
    }
}

/// With `--client-jwt-audience` / `--client-jwt-issuer`, tokens minted for
/// another audience or by another issuer are refused, and so are tokens
/// without the claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_audience_and_issuer_are_checked_when_set() {
    let node = common::Node::start(&[
        "--client-jwt-secret",
        "websocket-test-jwt-secret",
        "--client-jwt-audience",
        "chat",
        "--client-jwt-issuer",
        "https://idp.example",
    ]);
    let exp = now() + 3600;
    let idp = "https://idp.example";
    for (claims, accepted) in [
        (json!({"exp": exp, "aud": "chat", "iss": idp}), true),
        (
            json!({"exp": exp, "aud": ["other", "chat"], "iss": idp}),
            true,
        ),
        (json!({"exp": exp, "iss": idp}), false),
        (json!({"exp": exp, "aud": "billing", "iss": idp}), false),
        (json!({"exp": exp, "aud": "chat"}), false),
        (
            json!({"exp": exp, "aud": "chat", "iss": "https://evil.example"}),
            false,
        ),
    ] {
        assert_eq!(token_accepted(&node, &claims).await, accepted, "{claims}");
    }
    drop(node);
    // Unset, `aud` and `iss` are not looked at.
    let node = common::Node::start(&["--client-jwt-secret", "websocket-test-jwt-secret"]);
    let claims = json!({"exp": exp, "aud": "anything", "iss": "anyone"});
    assert!(token_accepted(&node, &claims).await);
}

/// `--client-jwt-enforce-exp` closes a connection with 4001 "token
/// expired" once its token's `exp` (plus the leeway) passed; connections
/// with a later `exp` stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_enforce_exp_closes_the_connection_with_4001() {
    let node = common::Node::start(&[
        "--client-jwt-secret",
        "websocket-test-jwt-secret",
        "--client-jwt-enforce-exp",
        "--client-jwt-leeway",
        "0s",
        "--ping-interval",
        "200ms",
        "--ping-timeout",
        "5s",
    ]);
    let connect = |exp: u64| {
        let url = node.ws_url(&format!(
            "?token={}",
            hs256(
                "websocket-test-jwt-secret",
                &json!({"sub": "a", "exp": exp})
            )
        ));
        async move { Client::try_connect(&url, &[]).await.expect("connects") }
    };
    let mut short = connect(now() + 2).await;
    let mut long = connect(now() + 3600).await;
    loop {
        match short.next_raw().await {
            Some(Message::Ping(_) | Message::Pong(_)) => continue,
            Some(Message::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), 4001);
                assert_eq!(frame.reason.as_str(), "token expired");
                break;
            }
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
    long.send_text(r#"{"type":"ping"}"#).await;
    long.expect_text(r#"{"type":"pong"}"#).await;
    assert_eq!(node.ok("get_all_client_count", json!({})).await, 1);
}
