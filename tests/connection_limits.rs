//! Connection limits (SPEC section 2, issue 16): per node, refused with 503
//! before the upgrade, and per client address, refused with 429, where the
//! address comes from X-Forwarded-For only through a trusted proxy.

mod common;

use common::{eventually, metric, Client, Node, Refused};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_node_limit_are_refused_with_503() {
    let node = Node::start(&["--max-connections", "2"]);
    let url = node.ws_url("");
    let first = Client::connect(&url).await;
    let _second = Client::connect(&url).await;
    match Client::try_connect(&url, &[]).await {
        Err(Refused::Status(503)) => {}
        other => panic!("expected 503, got {:?}", other.map(|c| c.id)),
    }
    // A closed connection gives its place back.
    first.close().await;
    eventually("a place frees up", || async {
        Client::try_connect(&url, &[]).await.is_ok()
    })
    .await;
    let page = node.get_text("/metrics").await;
    assert!(
        metric(
            &page,
            "gatecast_connections_refused_total{reason=\"node_full\"}"
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_limit_believes_forwarded_for_only_from_trusted_proxies() {
    let behind = Node::start(&[
        "--max-connections-per-ip",
        "1",
        "--trusted-proxies",
        "127.0.0.0/8",
    ]);
    let url = behind.ws_url("");
    let xff = |ip: &'static str| [("x-forwarded-for", ip)];
    let _a = Client::try_connect(&url, &xff("192.0.2.1")).await.unwrap();
    assert!(matches!(
        Client::try_connect(&url, &xff("192.0.2.1")).await,
        Err(Refused::Status(429))
    ));
    // Another client behind the same proxy is another address.
    let _b = Client::try_connect(&url, &xff("192.0.2.2")).await.unwrap();

    // Without trusted proxies the header is the client's own word: ignored.
    let open = Node::start(&["--max-connections-per-ip", "1"]);
    let url = open.ws_url("");
    let _c = Client::try_connect(&url, &xff("198.51.100.1"))
        .await
        .unwrap();
    assert!(matches!(
        Client::try_connect(&url, &xff("198.51.100.2")).await,
        Err(Refused::Status(429))
    ));
    let page = open.get_text("/metrics").await;
    assert_eq!(
        metric(
            &page,
            "gatecast_connections_refused_total{reason=\"address_full\"}"
        ),
        1.0
    );
}
