//! The Redis engine on Sentinel (with a failover) and on Redis Cluster, and
//! a password given apart from the URL.

mod common;

use common::redis::{RedisCluster, RedisServer};
use common::{eventually, sorted, strs, Client, Node};
use serde_json::json;

/// Joins, pushes and queries across two nodes; `a` is held by `holder`.
async fn exercise(holder: &Node, api: &Node, a: &mut Client, tag: &str) {
    let group = format!("g-{tag}");
    let uid = format!("u-{tag}");
    api.ok("join_group", json!({"client_id": a.id, "group": group}))
        .await;
    api.ok("bind_uid", json!({"client_id": a.id, "uid": uid}))
        .await;
    api.ok(
        "update_session",
        json!({"client_id": a.id, "session": {tag: true}}),
    )
    .await;
    api.ok(
        "send_to_group",
        json!({"group": group, "data": format!("group {tag}")}),
    )
    .await;
    api.ok(
        "send_to_uid",
        json!({"uid": uid, "data": format!("uid {tag}")}),
    )
    .await;
    api.ok(
        "send_to_client",
        json!({"client_id": a.id, "data": format!("client {tag}")}),
    )
    .await;
    a.expect_text(&format!("group {tag}")).await;
    a.expect_text(&format!("uid {tag}")).await;
    a.expect_text(&format!("client {tag}")).await;
    for node in [holder, api] {
        assert_eq!(
            node.ok("get_client_count_by_group", json!({"group": group}))
                .await,
            1
        );
        assert!(sorted(node.ok("get_all_uid_list", json!({})).await).contains(&uid));
        assert_eq!(
            node.ok("get_session", json!({"client_id": a.id})).await[tag],
            true
        );
        assert_eq!(
            sorted(node.ok("get_client_id_by_uid", json!({"uid": uid})).await),
            strs(&[&a.id])
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_keeps_the_gateway_working() {
    let mut master = RedisServer::start();
    let replica = RedisServer::start_args(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    let sentinel = RedisServer::sentinel_for(master.port);
    let url = format!(
        "redis-sentinel://127.0.0.1:{}/0?sentinelServiceName=mymaster",
        sentinel.port
    );
    let args = ["--redis-url", url.as_str(), "--node-heartbeat", "1s"];
    let (holder, api) = (Node::start(&args), Node::start(&args));
    holder.wait_ready().await;
    api.wait_ready().await;
    let mut a = Client::connect(&holder.ws_url("")).await;
    exercise(&holder, &api, &mut a, "before").await;

    // A failover needs a replica Sentinel knows and can promote: without
    // this wait the master could go before Sentinel has seen the replica,
    // and the test would time out for the harness's sake.
    sentinel.wait_knows_replica(replica.port);
    master.stop();
    // Sentinel promotes the replica; both nodes follow it and register again.
    eventually("replica promoted", || async {
        replica.cli(&["ROLE"]).starts_with("master")
    })
    .await;
    for node in [&holder, &api] {
        eventually("node ready on the new master", || async {
            node.get_status(false, "/readyz").await == 200
                && node.call("get_all_client_count", json!({})).await.0 == 200
        })
        .await;
    }
    exercise(&holder, &api, &mut a, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_of_three_masters() {
    let cluster = RedisCluster::start();
    let url = cluster.url();
    let args = ["--redis-url", url.as_str(), "--node-heartbeat", "1s"];
    let (holder, api) = (Node::start(&args), Node::start(&args));
    holder.wait_ready().await;
    api.wait_ready().await;
    // Each node's view of the registry reads the other's liveness key in
    // its own slot (one GET per node: an MGET across slots is refused).
    eventually("each node sees both alive", || async {
        let mut both = true;
        for node in [&holder, &api] {
            let page = node.get_text("/metrics").await;
            both &= common::metric(&page, "gatecast_nodes_alive") == 2.0;
        }
        both
    })
    .await;
    let mut a = Client::connect(&holder.ws_url("")).await;
    let mut b = Client::connect(&api.ws_url("")).await;
    exercise(&holder, &api, &mut a, "one").await;
    api.ok("send_to_all", json!({"data": "all"})).await;
    a.expect_text("all").await;
    b.expect_text("all").await;
    assert_eq!(api.ok("get_all_client_count", json!({})).await, 2);
    // The partitions of the two nodes live on different hash tags; a
    // closed connection leaves its node's partition at once.
    a.close().await;
    eventually("closed client gone cluster-wide", || async {
        api.ok("get_all_client_count", json!({})).await == 1
    })
    .await;
}

/// --redis-password (GATECAST_REDIS_PASSWORD) replaces the URL's password,
/// so a deployment keeps the URL in plain configuration and the password in
/// a secret store; characters a URL would need encoded are fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_password_comes_from_its_own_option() {
    let redis = RedisServer::start();
    let password = "p@ss:w/rd#with%url?chars";
    assert_eq!(redis.cli(&["CONFIG", "SET", "requirepass", password]), "OK");
    let mut command = common::gatecast_command();
    command.env("GATECAST_REDIS_PASSWORD", password);
    let node = Node::start_command(command, &["--redis-url", &redis.url()]);
    node.wait_ready().await;
    let mut a = Client::connect(&node.ws_url("")).await;
    node.ok(
        "send_to_client",
        json!({"client_id": a.id, "data": "through redis"}),
    )
    .await;
    a.expect_text("through redis").await;
}

/// The harness never shares another test's Redis: a server started on a
/// port that one already holds is noticed (it exits, or the port answers
/// with another process id) and the start fails instead of going on with
/// the other server.
#[test]
fn a_redis_start_on_a_taken_port_fails_instead_of_sharing() {
    let holder = RedisServer::start();
    let port = holder.port;
    let result = std::panic::catch_unwind(|| RedisServer::start_on(port));
    let message = match result {
        Ok(_) => panic!("a second redis-server on port {port} was taken for its own"),
        Err(panic) => panic.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(message.contains(&port.to_string()), "{message}");
    // The first server is untouched.
    assert_eq!(holder.cli(&["PING"]), "PONG");
}
