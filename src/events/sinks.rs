//! Where events are written: the Redis stream (one pipelined XADD per
//! batch) or the webhook (one POST per event, a few tries).

use std::time::Duration;

use fred::clients::Client;
use fred::interfaces::{ClientLike, StreamsInterface};
use fred::types::Value as RedisValue;

use super::Event;
use crate::ids::NodeId;
use crate::redact::redact_url;

/// Longest wait for the events connection before a batch is dropped: a
/// node is ready before its events connection is up (a separate
/// `--events-redis-url`, a reconnection), and the events of that moment
/// (the first connects) must not be lost. Bounded, so an outage only
/// slows the queue, which then drops and counts as before.
pub(super) const CONNECT_WAIT: Duration = Duration::from_secs(2);

/// Whether `client` is connected, waiting up to `limit` for it.
async fn connected(client: &Client, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !client.is_connected() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        // Each attempt's outcome, or a short tick (a missed notification
        // costs at most that).
        let tick = left.min(Duration::from_millis(50));
        if let Ok(Err(_)) = tokio::time::timeout(tick, client.wait_for_connect()).await {
            // A failed attempt: the next one is the reconnection policy's.
            tokio::time::sleep(tick).await;
        }
    }
    true
}

pub(super) async fn write_stream(
    client: &Client,
    key: &str,
    max_len: i64,
    node: NodeId,
    batch: &[Event],
) -> usize {
    if !connected(client, CONNECT_WAIT).await {
        tracing::debug!(events = batch.len(), "redis down: events dropped");
        return 0;
    }
    let pipeline = client.pipeline();
    for event in batch {
        let _: Result<(), _> = pipeline
            .xadd(
                key,
                false,
                ("MAXLEN", "~", max_len),
                "*",
                event.stream_fields(node),
            )
            .await;
    }
    let results: Vec<Result<RedisValue, fred::error::Error>> = pipeline.try_all().await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    if ok < batch.len() {
        tracing::warn!(
            failed = batch.len() - ok,
            "events not written to the stream"
        );
    }
    ok
}

/// The client events are POSTed with: http and https (rustls with ring,
/// the system's roots), and no redirects, since a redirect would re-send
/// the events, sessions included, to wherever the webhook's server points.
pub(super) fn webhook_client() -> Result<reqwest::Client, reqwest::Error> {
    install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// Installs ring as the process's rustls provider unless one already is:
/// reqwest is built without a default one (Cargo.toml), and panics when it
/// builds a client without.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub(super) async fn post_all(
    http: &reqwest::Client,
    url: &str,
    node: NodeId,
    batch: &[Event],
) -> usize {
    let mut sent = 0;
    for event in batch {
        let body = event.json(node);
        // A few tries with a short backoff: a webhook restart should not
        // lose events, a dead one must not hold the queue for long.
        for attempt in 0..3u32 {
            match http.post(url).json(&body).send().await {
                Ok(r) if r.status().is_success() => {
                    sent += 1;
                    break;
                }
                // A redirect counts as a refusal: it is not followed.
                Ok(r) => tracing::warn!(
                    status = %r.status(),
                    webhook = %redact_url(url),
                    "event webhook refused an event"
                ),
                // Without the URL, whose query may hold a key.
                Err(e) => tracing::warn!(
                    error = %e.without_url(),
                    webhook = %redact_url(url),
                    "event webhook unreachable"
                ),
            }
            if attempt < 2 {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
        }
    }
    sent
}
