//! A client that stops reading (SPEC section 2): its bounded queue overflows,
//! it is closed with 1013, and nobody else is slowed or loses a message.
//! Every suite runs against each engine (not on Sentinel or Cluster: the
//! queue is the node's own, and the timing of a 2-core machine running
//! three Redis servers makes the "fast" client slow too).

mod common;

use common::{metric, Client, Cluster, Engine, Seen};
use serde_json::json;

engine_suite!(
    slow_client_is_closed_with_1013_and_others_get_everything,
    large_messages_close_a_slow_client_by_bytes_long_before_the_frame_bound,
    a_stuck_client_asked_to_close_is_still_let_go,
);

/// Pushes are this large: the default --max-message-bytes.
const SIZE: usize = 64 * 1024;

/// Push number `n`: its number, then padding up to `size` bytes.
fn message(n: usize, size: usize) -> String {
    let mut s = format!("{n:08}:");
    s.push_str(&"x".repeat(size - s.len()));
    s
}

/// The number of a message built by `message`, checking its size.
fn number(text: &str, size: usize) -> usize {
    assert_eq!(text.len(), size, "message length");
    text[..8].parse().expect("numbered message")
}

/// Pushes numbered messages of `size` bytes to everyone until a client that
/// reads nothing is closed (failing past `max_pushes`); checks that it then
/// reads a gap-free start of them and a close with 1013, and that a client
/// reading all along got every one. Returns the fast client and how many
/// pushes it took.
async fn overflow_a_slow_client(c: &Cluster, size: usize, max_pushes: usize) -> (Client, usize) {
    let api = c.api();
    let mut slow = c.client().await;
    let mut fast = c.client().await;
    let slow_id = slow.id.clone();
    // The fast client reads all the time, on its own task.
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        loop {
            match fast.next().await {
                Seen::Text(t) if t == "end" => return (got, fast),
                Seen::Text(t) => got.push(number(&t, size)),
                other => panic!("fast client got {other:?} after {} messages", got.len()),
            }
        }
    });
    // The slow client reads nothing from here on.
    let mut pushed = 0;
    loop {
        assert!(
            pushed < max_pushes,
            "the slow client was never closed ({pushed} pushes of {size} bytes)"
        );
        api.ok("send_to_all", json!({ "data": message(pushed, size) }))
            .await;
        pushed += 1;
        if api.ok("is_online", json!({"client_id": slow_id})).await == false {
            break;
        }
    }
    // The slow client now reads: some of the first messages, in order and
    // without a gap, then a close frame with 1013.
    let mut next = 0;
    loop {
        match slow.next().await {
            Seen::Text(t) => {
                assert_eq!(number(&t, size), next, "slow client's messages in order");
                next += 1;
            }
            Seen::Close(code) => {
                assert_eq!(code, Some(1013), "slow client's close code");
                break;
            }
            other => panic!("slow client: no close frame, got {other:?}"),
        }
    }
    eprintln!("slow client closed after {pushed} pushes of {size} bytes; it had read {next}");
    assert!(
        next < pushed,
        "the slow client was closed yet got all {pushed}"
    );
    // The fast client got every message, in order.
    api.ok("send_to_all", json!({"data": "end"})).await;
    let (got, fast) = reader.await.unwrap();
    assert_eq!(
        got,
        (0..pushed).collect::<Vec<_>>(),
        "fast client's messages"
    );
    // The slow client's node counted the overflow and the 1013 (SPEC
    // section 6: dropped and overflowed messages).
    let page = c.client_node().get_text("/metrics").await;
    for name in [
        "gatecast_messages_overflowed_total",
        "gatecast_slow_clients_closed_total",
    ] {
        assert!(metric(&page, name) >= 1.0, "{name} in:\n{page}");
    }
    (fast, pushed)
}

async fn slow_client_is_closed_with_1013_and_others_get_everything(engine: Engine) {
    let c = Cluster::start(engine, &["--client-queue", "16"]).await;
    let api = c.api();
    let (mut fast, _) = overflow_a_slow_client(&c, SIZE, 2000).await;
    // The node is still healthy: the fast client and a new one get pushes.
    assert_eq!(
        api.ok("is_online", json!({"client_id": fast.id})).await,
        true
    );
    let mut fresh = c.client().await;
    api.ok("send_to_all", json!({"data": "after"})).await;
    fast.expect_text("after").await;
    fresh.expect_text("after").await;
    assert_eq!(api.ok("get_all_client_count", json!({})).await, 2);
    for node in &c.nodes {
        assert_eq!(node.get_status(false, "/readyz").await, 200);
    }
}

/// `--client-queue-bytes` bounds memory when messages are large: with
/// 1,024 frames allowed but 256 KiB, a client that reads nothing is closed
/// after a few 60 KiB pushes beyond what the socket buffers absorb, where
/// the frame bound alone would have let 1,024 of them (60 MiB) queue.
async fn large_messages_close_a_slow_client_by_bytes_long_before_the_frame_bound(engine: Engine) {
    const FRAMES: usize = 1024;
    let c = Cluster::start(
        engine,
        &[
            "--client-queue",
            &FRAMES.to_string(),
            "--client-queue-bytes",
            "262144",
        ],
    )
    .await;
    let (_fast, pushed) = overflow_a_slow_client(&c, 60 * 1024, FRAMES).await;
    // What the kernel's socket buffers hold (a few MiB on loopback) comes
    // on top of the queue; still far below the frame bound.
    assert!(
        pushed < FRAMES / 2,
        "closed after {pushed} pushes: the byte bound did not act"
    );
}

/// close_client is graceful (queued messages first), but a client that
/// stopped reading never takes them: the ping timeout must still end it.
async fn a_stuck_client_asked_to_close_is_still_let_go(engine: Engine) {
    let c = Cluster::start(
        engine,
        &[
            "--client-queue",
            "100000",
            "--ping-interval",
            "200ms",
            "--ping-timeout",
            "1s",
        ],
    )
    .await;
    let api = c.api();
    let stuck = c.client().await;
    let id = stuck.id.clone();
    // Fill the socket buffers; nothing overflows the large queue.
    for n in 0..300 {
        api.ok(
            "send_to_client",
            json!({"client_id": id, "data": message(n, SIZE)}),
        )
        .await;
    }
    api.ok("close_client", json!({"client_id": id, "data": "bye"}))
        .await;
    common::eventually("the stuck client is let go", || async {
        api.ok("is_online", json!({"client_id": id})).await == false
    })
    .await;
    drop(stuck);
}
