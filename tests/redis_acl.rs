//! The example Redis ACL users of deploy/redis-acl.conf on a real
//! redis-server: the gateway works as its user, a push-only backend can
//! push to uids, groups and everyone and nothing else, a commanding backend
//! can also reach single clients.

mod common;

use common::redis::RedisServer;
use common::{eventually, Client, Node};
use fred::prelude::*;
use gatecast_emitter::{Emitter, Message};
use serde_json::json;

/// The ACL rules of deploy/redis-acl.conf, one `ACL SETUSER` each.
fn acl_rules() -> Vec<Vec<String>> {
    let file = include_str!("../deploy/redis-acl.conf");
    file.lines()
        .filter_map(|l| l.strip_prefix("user "))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// `redis://user:password@...` for a user of the example file.
fn url_as(server: &RedisServer, user: &str) -> String {
    let password = acl_rules()
        .into_iter()
        .find(|rule| rule[0] == user)
        .and_then(|rule| {
            rule.iter()
                .find_map(|w| w.strip_prefix('>').map(str::to_owned))
        })
        .unwrap_or_else(|| panic!("{user} in deploy/redis-acl.conf"));
    let url = server.url();
    let rest = url.strip_prefix("redis://").unwrap();
    format!("redis://{user}:{password}@{rest}")
}

async fn emitter_as(server: &RedisServer, user: &str) -> (Emitter, fred::clients::Client) {
    let client = Builder::from_config(Config::from_url(&url_as(server, user)).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    (Emitter::new(client.clone(), "gatecast"), client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_acl_users_allow_what_they_say_and_no_more() {
    let server = RedisServer::start();
    for rule in acl_rules() {
        let mut args = vec!["ACL", "SETUSER"];
        args.extend(rule.iter().map(String::as_str));
        assert_eq!(server.cli(&args).trim(), "OK", "{rule:?}");
    }
    // Nothing may lean on the default user's rights.
    assert_eq!(
        server.cli(&["ACL", "SETUSER", "default", "off"]).trim(),
        "OK"
    );

    let gateway = url_as(&server, "gatecast");
    let node = Node::start(&["--redis-url", &gateway, "--node-heartbeat", "1s"]);
    node.wait_ready().await;
    let mut a = Client::connect(&node.ws_url("")).await;
    node.ok("bind_uid", json!({"client_id": a.id, "uid": "alice"}))
        .await;
    node.ok("join_group", json!({"client_id": a.id, "group": "room"}))
        .await;
    // The gateway's own cross-node path works as its user: a push through
    // the API goes out on Redis and back.
    node.ok("send_to_uid", json!({"uid": "alice", "data": "via api"}))
        .await;
    a.expect_text("via api").await;

    let (pusher, raw) = emitter_as(&server, "pusher").await;
    pusher
        .send_to_uid("alice", Message::text("to alice"))
        .await
        .unwrap();
    pusher
        .send_to_group("room", Message::text("to room"), &[])
        .await
        .unwrap();
    pusher
        .send_to_all(Message::text("everyone"), &[])
        .await
        .unwrap();
    a.expect_text("to alice").await;
    a.expect_text("to room").await;
    a.expect_text("everyone").await;
    // Node channels, where commands go, are out of its reach; so are keys.
    let refused = pusher.send_to_client(&a.id, Message::text("x")).await;
    assert!(refused.is_err(), "send_to_client allowed");
    let refused = pusher.close_client(&a.id, None).await;
    assert!(refused.is_err(), "close_client allowed");
    let refused = pusher.bind_uid(&a.id, "mallory").await;
    assert!(refused.is_err(), "bind_uid allowed");
    let read: Result<Option<String>, _> = raw.get("gatecast:nodes").await;
    assert!(read.is_err(), "keys readable");
    let smembers: Result<Vec<String>, _> = raw.smembers("gatecast:nodes").await;
    assert!(smembers.is_err(), "keys readable");

    // The commanding user reaches single clients and commands them.
    let (commander, _) = emitter_as(&server, "commander").await;
    commander
        .send_to_client(&a.id, Message::text("just you"))
        .await
        .unwrap();
    a.expect_text("just you").await;
    commander.bind_uid(&a.id, "alice2").await.unwrap();
    eventually("bound by the commander", || async {
        node.ok("get_uid_by_client_id", json!({"client_id": a.id}))
            .await
            == "alice2"
    })
    .await;
}
