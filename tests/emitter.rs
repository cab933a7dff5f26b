//! The Rust emitter crate publishing straight to Redis, no HTTP API, into a
//! cluster of real nodes.

mod common;

use common::{eventually, sorted, strs, Client, Cluster, Engine, Seen};
use fred::prelude::*;
use gatecast_emitter::{Emitter, Message};
use serde_json::json;

async fn emitter(c: &Cluster) -> Emitter {
    let url = c.redis.as_ref().unwrap().url();
    let client = Builder::from_config(Config::from_url(&url).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    Emitter::new(client, "gatecast")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emitter_pushes_and_commands_reach_clients_on_every_node() {
    let c = Cluster::start(Engine::Redis, &[]).await;
    let e = emitter(&c).await;
    let mut a = Client::connect(&c.nodes[0].ws_url("")).await;
    let mut b = Client::connect(&c.nodes[1].ws_url("")).await;
    let api = &c.nodes[2];

    e.join_group(&a.id, "room").await.unwrap();
    e.join_group(&b.id, "room").await.unwrap();
    e.bind_uid(&b.id, "bob").await.unwrap();
    e.set_session(&a.id, json!({"n": 1}).as_object().unwrap().clone())
        .await
        .unwrap();
    // Commands are applied asynchronously by the node holding the client.
    eventually("commands applied", || async {
        api.ok("get_client_count_by_group", json!({"group": "room"}))
            .await
            == 2
            && api.ok("is_uid_online", json!({"uid": "bob"})).await == true
            && api.ok("get_session", json!({"client_id": a.id})).await == json!({"n": 1})
    })
    .await;

    e.send_to_group("room", Message::text("to room"), &[&b.id])
        .await
        .unwrap();
    e.send_to_uid("bob", Message::text("to bob")).await.unwrap();
    e.send_to_client(&a.id, Message::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    e.send_to_groups(&["room", "other"], Message::text("once"), &[])
        .await
        .unwrap();
    e.send_to_all(Message::text("everyone"), &[]).await.unwrap();
    a.expect_text("to room").await;
    assert_eq!(a.next().await, Seen::Binary(vec![1, 2, 3]));
    a.expect_text("once").await;
    a.expect_text("everyone").await;
    b.expect_text("to bob").await;
    b.expect_text("once").await;
    b.expect_text("everyone").await;

    e.leave_group(&b.id, "room").await.unwrap();
    eventually("left", || async {
        sorted(
            api.ok("get_client_id_list_by_group", json!({"group": "room"}))
                .await,
        ) == strs(&[&a.id])
    })
    .await;
    e.close_client(&a.id, Some(Message::text("bye")))
        .await
        .unwrap();
    a.expect_text("bye").await;
    a.expect_close(1000).await;
    assert!(e
        .send_to_client("not-an-id", Message::text("x"))
        .await
        .is_err());
}
