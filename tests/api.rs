//! The HTTP API, method by method, against real nodes and real WebSocket
//! clients. Every suite runs against each engine; with Redis, clients are
//! spread over two nodes and the API is called on a third. It also runs on
//! Sentinel and on Redis Cluster.

mod common;

use common::{eventually, sorted, strs, Cluster, Engine, Seen, OFFLINE_ID};
use serde_json::json;

engine_suite!(
    welcome_frame_carries_a_gatewayworker_client_id,
    send_to_client_delivers_exact_text_and_binary,
    send_to_all_honours_exclusions_and_filters,
    send_to_uid_reaches_every_device_of_each_uid,
    send_to_group_reaches_each_member_once,
    uid_binding_and_queries,
    group_membership_and_queries,
    sessions_set_replace_and_update_merges,
    whole_gateway_queries,
    close_client_sends_last_message_then_closes,
    closed_connection_leaves_uid_groups_and_session,
    offline_client_ids_are_no_ops,
    batch_runs_commands_in_order,
    a_burst_of_many_pushes_arrives_whole_and_in_order,
    is_uid_online_is_exact_on_every_node_and_local_answers_skip_redis,
);

// The same suite on Sentinel and on Redis Cluster (every key and channel
// kind crosses them: uid, group, session, node partitions; node, group and
// all channels).
topology_suite!(
    welcome_frame_carries_a_gatewayworker_client_id,
    send_to_client_delivers_exact_text_and_binary,
    send_to_all_honours_exclusions_and_filters,
    send_to_uid_reaches_every_device_of_each_uid,
    send_to_group_reaches_each_member_once,
    uid_binding_and_queries,
    group_membership_and_queries,
    sessions_set_replace_and_update_merges,
    whole_gateway_queries,
    close_client_sends_last_message_then_closes,
    closed_connection_leaves_uid_groups_and_session,
    offline_client_ids_are_no_ops,
    batch_runs_commands_in_order,
    a_burst_of_many_pushes_arrives_whole_and_in_order,
);

async fn welcome_frame_carries_a_gatewayworker_client_id(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let a = c.client().await;
    let b = c.client().await;
    assert_eq!(a.id.len(), 20);
    assert!(a
        .id
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_ne!(a.id, b.id);
    // Address (127.0.0.1) and inner port of the node holding it.
    let node = c.client_node();
    let want = format!("7f000001{:04x}", node.inner.port());
    assert_eq!(&a.id[..12], want);
}

async fn send_to_client_delivers_exact_text_and_binary(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let mut a = c.client().await;
    let text = "héllo {\"x\": 1} \u{1F600}";
    c.api()
        .ok("send_to_client", json!({"client_id": a.id, "data": text}))
        .await;
    a.expect_text(text).await;
    c.api()
        .ok(
            "send_to_client",
            json!({"client_id": a.id, "data_base64": "AAH/"}),
        )
        .await;
    assert_eq!(a.next().await, Seen::Binary(vec![0, 1, 255]));
    // A JSON value that is not a string goes out as its JSON text.
    c.api()
        .ok(
            "send_to_client",
            json!({"client_id": a.id, "data": {"k": [1, 2]}}),
        )
        .await;
    a.expect_text(r#"{"k":[1,2]}"#).await;
    // Upper-case ids are the same id.
    c.api()
        .ok(
            "send_to_client",
            json!({"client_id": a.id.to_uppercase(), "data": "up"}),
        )
        .await;
    a.expect_text("up").await;
}

async fn send_to_all_honours_exclusions_and_filters(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let mut a = c.client().await;
    let mut b = c.client().await;
    let mut d = c.client().await;
    c.api().ok("send_to_all", json!({"data": "all"})).await;
    for x in [&mut a, &mut b, &mut d] {
        x.expect_text("all").await;
    }
    c.api()
        .ok(
            "send_to_all",
            json!({"data": "not b", "exclude_client_ids": [b.id]}),
        )
        .await;
    c.api()
        .ok(
            "send_to_all",
            json!({"data": "only a and b", "client_ids": [a.id, b.id]}),
        )
        .await;
    c.api().ok("send_to_all", json!({"data": "end"})).await;
    a.expect_text("not b").await;
    a.expect_text("only a and b").await;
    a.expect_text("end").await;
    b.expect_text("only a and b").await;
    b.expect_text("end").await;
    d.expect_text("not b").await;
    d.expect_text("end").await;
}

async fn send_to_uid_reaches_every_device_of_each_uid(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let mut phone = c.client().await;
    let mut laptop = c.client().await;
    let mut other = c.client().await;
    let mut nobody = c.client().await;
    let api = c.api();
    api.ok("bind_uid", json!({"client_id": phone.id, "uid": 42}))
        .await;
    api.ok("bind_uid", json!({"client_id": laptop.id, "uid": "42"}))
        .await;
    api.ok("bind_uid", json!({"client_id": other.id, "uid": "bob"}))
        .await;
    api.ok("send_to_uid", json!({"uid": "42", "data": "to 42"}))
        .await;
    api.ok(
        "send_to_uid",
        json!({"uids": [42, "bob"], "data": "to both"}),
    )
    .await;
    api.ok("send_to_uid", json!({"uid": ["bob"], "data": "array uid"}))
        .await;
    api.ok("send_to_all", json!({"data": "end"})).await;
    for x in [&mut phone, &mut laptop] {
        x.expect_text("to 42").await;
        x.expect_text("to both").await;
        x.expect_text("end").await;
    }
    other.expect_text("to both").await;
    other.expect_text("array uid").await;
    other.expect_text("end").await;
    nobody.expect_text("end").await;
}

async fn send_to_group_reaches_each_member_once(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let mut a = c.client().await;
    let mut b = c.client().await;
    let mut d = c.client().await;
    let api = c.api();
    api.ok("join_group", json!({"client_id": a.id, "group": "red"}))
        .await;
    api.ok("join_group", json!({"client_id": a.id, "group": "blue"}))
        .await;
    api.ok("join_group", json!({"client_id": b.id, "group": "blue"}))
        .await;
    api.ok("send_to_group", json!({"group": "red", "data": "red"}))
        .await;
    api.ok(
        "send_to_group",
        json!({"groups": ["red", "blue"], "data": "both"}),
    )
    .await;
    api.ok(
        "send_to_group",
        json!({"group": "blue", "data": "blue but a", "exclude_client_ids": [a.id]}),
    )
    .await;
    api.ok("send_to_all", json!({"data": "end"})).await;
    a.expect_text("red").await;
    a.expect_text("both").await; // once, though a is in both groups
    a.expect_text("end").await;
    b.expect_text("both").await;
    b.expect_text("blue but a").await;
    b.expect_text("end").await;
    d.expect_text("end").await;
}

async fn uid_binding_and_queries(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let a = c.client().await;
    let b = c.client().await;
    let api = c.api();
    assert_eq!(api.ok("is_uid_online", json!({"uid": "u1"})).await, false);
    api.ok("bind_uid", json!({"client_id": a.id, "uid": "u1"}))
        .await;
    api.ok("bind_uid", json!({"client_id": b.id, "uid": "u1"}))
        .await;
    assert_eq!(api.ok("is_uid_online", json!({"uid": "u1"})).await, true);
    assert_eq!(
        sorted(api.ok("get_client_id_by_uid", json!({"uid": "u1"})).await),
        strs(&[&a.id, &b.id])
    );
    assert_eq!(
        api.ok("get_uid_by_client_id", json!({"client_id": a.id}))
            .await,
        "u1"
    );
    // Binding another uid replaces the first.
    api.ok("bind_uid", json!({"client_id": a.id, "uid": "u2"}))
        .await;
    assert_eq!(
        api.ok("get_uid_by_client_id", json!({"client_id": a.id}))
            .await,
        "u2"
    );
    assert_eq!(
        sorted(api.ok("get_client_id_by_uid", json!({"uid": "u1"})).await),
        strs(&[&b.id])
    );
    // Unbinding a uid the client does not have changes nothing.
    api.ok("unbind_uid", json!({"client_id": a.id, "uid": "u1"}))
        .await;
    assert_eq!(
        api.ok("get_uid_by_client_id", json!({"client_id": a.id}))
            .await,
        "u2"
    );
    api.ok("unbind_uid", json!({"client_id": a.id, "uid": "u2"}))
        .await;
    assert_eq!(
        api.ok("get_uid_by_client_id", json!({"client_id": a.id}))
            .await,
        json!(null)
    );
    assert_eq!(api.ok("is_uid_online", json!({"uid": "u2"})).await, false);
}

/// Reads of membership sets Redis served so far (`INFO commandstats`):
/// what a cluster-wide uid query costs per other node.
fn set_reads(redis: &common::redis::RedisServer) -> u64 {
    redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.strip_prefix("calls=")?.split(',').next()?;
            let read = ["smembers", "scard", "exists", "sismember"].contains(&name);
            read.then(|| calls.parse::<u64>().ok()).flatten()
        })
        .sum()
}

/// `is_uid_online` answers exactly on every node, whether the uid is bound
/// on the node asked, on another node, on none, or was just unbound or
/// left; and a node that holds the uid answers from memory (issue 33: it
/// read the node set and every other node's member set of the uid, three
/// reads per call with three nodes, even then).
async fn is_uid_online_is_exact_on_every_node_and_local_answers_skip_redis(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let a = c.client().await;
    let api = c.api();
    let online = |uid: &'static str| {
        let nodes = &c.nodes;
        async move {
            let mut answers = Vec::new();
            for node in nodes {
                answers.push(node.ok("is_uid_online", json!({ "uid": uid })).await);
            }
            answers
        }
    };
    let everywhere = |b: bool| vec![json!(b); c.nodes.len()];
    assert_eq!(online("u").await, everywhere(false), "bound nowhere");
    api.ok("bind_uid", json!({"client_id": a.id, "uid": "u"}))
        .await;
    // Asked on the node holding it, and (Redis) on the two that do not.
    assert_eq!(online("u").await, everywhere(true), "bound on one node");
    assert_eq!(online("other").await, everywhere(false), "another uid");
    if let Some(redis) = &c.redis {
        let holder = c.client_node();
        let before = set_reads(redis);
        for _ in 0..50 {
            assert_eq!(holder.ok("is_uid_online", json!({"uid": "u"})).await, true);
        }
        let reads = set_reads(redis) - before;
        // 150 before (SMEMBERS of the node set and of 2 partitions per
        // call); what is left is the nodes' other work meanwhile.
        assert!(
            reads < 25,
            "50 calls on the node holding the uid read Redis {reads} times"
        );
        // The others still ask Redis, and see it.
        let before = set_reads(redis);
        assert_eq!(api.ok("is_uid_online", json!({"uid": "u"})).await, true);
        assert!(set_reads(redis) > before, "another node asked Redis");
    }
    // Just unbound (through another node): false everywhere at once.
    api.ok("unbind_uid", json!({"client_id": a.id, "uid": "u"}))
        .await;
    assert_eq!(online("u").await, everywhere(false), "just unbound");
    // Bound again, then the client leaves.
    api.ok("bind_uid", json!({"client_id": a.id, "uid": "u"}))
        .await;
    assert_eq!(online("u").await, everywhere(true), "bound again");
    a.close().await;
    eventually(
        "the uid is offline on every node once its client left",
        || async { online("u").await == everywhere(false) },
    )
    .await;
}

async fn group_membership_and_queries(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let a = c.client().await;
    let b = c.client().await;
    let d = c.client().await;
    let api = c.api();
    api.ok("bind_uid", json!({"client_id": a.id, "uid": "alice"}))
        .await;
    api.ok("bind_uid", json!({"client_id": d.id, "uid": "alice"}))
        .await;
    for id in [&a.id, &b.id, &d.id] {
        api.ok("join_group", json!({"client_id": id, "group": "g"}))
            .await;
    }
    api.ok("join_group", json!({"client_id": a.id, "group": "g"}))
        .await; // twice: no-op
    api.ok("join_group", json!({"client_id": b.id, "group": 7}))
        .await;
    assert_eq!(
        api.ok("get_client_count_by_group", json!({"group": "g"}))
            .await,
        3
    );
    assert_eq!(
        sorted(
            api.ok("get_client_id_list_by_group", json!({"group": "g"}))
                .await
        ),
        strs(&[&a.id, &b.id, &d.id])
    );
    assert_eq!(
        sorted(api.ok("get_uid_list_by_group", json!({"group": "g"})).await),
        strs(&["alice"])
    );
    assert_eq!(
        api.ok("get_uid_count_by_group", json!({"group": "g"}))
            .await,
        1
    );
    assert_eq!(
        sorted(api.ok("get_all_group_id_list", json!({})).await),
        strs(&["7", "g"])
    );
    api.ok("leave_group", json!({"client_id": a.id, "group": "g"}))
        .await;
    assert_eq!(
        api.ok("get_client_count_by_group", json!({"group": "g"}))
            .await,
        2
    );
    api.ok("ungroup", json!({"group": "g"})).await;
    assert_eq!(
        api.ok("get_client_count_by_group", json!({"group": "g"}))
            .await,
        0
    );
    assert_eq!(
        api.ok("get_client_id_list_by_group", json!({"group": "g"}))
            .await,
        json!([])
    );
    assert_eq!(
        sorted(api.ok("get_all_group_id_list", json!({})).await),
        strs(&["7"])
    );
    // Sessions by group.
    api.ok(
        "set_session",
        json!({"client_id": b.id, "session": {"n": 1}}),
    )
    .await;
    let sessions = api
        .ok("get_client_sessions_by_group", json!({"group": "7"}))
        .await;
    assert_eq!(sessions, json!({ b.id.clone(): {"n": 1} }));
}

async fn sessions_set_replace_and_update_merges(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let a = c.client().await;
    let api = c.api();
    assert_eq!(
        api.ok("get_session", json!({"client_id": a.id})).await,
        json!({})
    );
    api.ok(
        "set_session",
        json!({"client_id": a.id, "session": {"name": "a", "prefs": {"x": 1, "y": 2}}}),
    )
    .await;
    api.ok(
        "update_session",
        json!({"client_id": a.id, "session": {"age": 3, "prefs": {"y": 5}}}),
    )
    .await;
    assert_eq!(
        api.ok("get_session", json!({"client_id": a.id})).await,
        json!({"name": "a", "age": 3, "prefs": {"x": 1, "y": 5}})
    );
    api.ok(
        "set_session",
        json!({"client_id": a.id, "session": {"only": true}}),
    )
    .await;
    assert_eq!(
        api.ok("get_session", json!({"client_id": a.id})).await,
        json!({"only": true})
    );
}

async fn whole_gateway_queries(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let a = c.client().await;
    let b = c.client().await;
    let api = c.api();
    assert_eq!(api.ok("get_all_client_count", json!({})).await, 2);
    assert_eq!(
        sorted(api.ok("get_all_client_id_list", json!({})).await),
        strs(&[&a.id, &b.id])
    );
    api.ok("bind_uid", json!({"client_id": a.id, "uid": "x"}))
        .await;
    api.ok("bind_uid", json!({"client_id": b.id, "uid": "y"}))
        .await;
    assert_eq!(
        sorted(api.ok("get_all_uid_list", json!({})).await),
        strs(&["x", "y"])
    );
    assert_eq!(api.ok("get_all_uid_count", json!({})).await, 2);
    api.ok(
        "set_session",
        json!({"client_id": a.id, "session": {"k": "v"}}),
    )
    .await;
    assert_eq!(
        api.ok("get_all_client_sessions", json!({})).await,
        json!({ a.id.clone(): {"k": "v"}, b.id.clone(): {} })
    );
    // No body at all is the same as {}.
    let (status, body) = api.post_raw("get_all_client_count", Vec::new(), None).await;
    assert_eq!((status, body), (200, json!({"result": 2})));
}

async fn close_client_sends_last_message_then_closes(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let mut a = c.client().await;
    let mut b = c.client().await;
    c.api()
        .ok("close_client", json!({"client_id": a.id, "data": "bye"}))
        .await;
    a.expect_text("bye").await;
    a.expect_close(1000).await;
    c.api().ok("close_client", json!({"client_id": b.id})).await;
    b.expect_close(1000).await;
    let api = c.api();
    eventually("closed clients are offline", || async {
        api.ok("get_all_client_count", json!({})).await == 0
    })
    .await;
}

async fn closed_connection_leaves_uid_groups_and_session(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let a = c.client().await;
    let api = c.api();
    let id = a.id.clone();
    api.ok("bind_uid", json!({"client_id": id, "uid": "u"}))
        .await;
    api.ok("join_group", json!({"client_id": id, "group": "g"}))
        .await;
    api.ok("set_session", json!({"client_id": id, "session": {"s": 1}}))
        .await;
    assert_eq!(api.ok("is_online", json!({"client_id": id})).await, true);
    a.close().await;
    eventually("the closed client is offline", || async {
        api.ok("is_online", json!({"client_id": id})).await == false
    })
    .await;
    assert_eq!(api.ok("is_uid_online", json!({"uid": "u"})).await, false);
    assert_eq!(
        api.ok("get_client_count_by_group", json!({"group": "g"}))
            .await,
        0
    );
    assert_eq!(
        api.ok("get_session", json!({"client_id": id})).await,
        json!(null)
    );
    assert_eq!(api.ok("get_all_group_id_list", json!({})).await, json!([]));
    assert_eq!(api.ok("get_all_uid_list", json!({})).await, json!([]));
}

async fn offline_client_ids_are_no_ops(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let api = c.api();
    let id = OFFLINE_ID;
    for (method, extra) in [
        ("send_to_client", json!({"data": "x"})),
        ("close_client", json!({})),
        ("bind_uid", json!({"uid": "u"})),
        ("unbind_uid", json!({"uid": "u"})),
        ("join_group", json!({"group": "g"})),
        ("leave_group", json!({"group": "g"})),
        ("set_session", json!({"session": {"a": 1}})),
        ("update_session", json!({"session": {"a": 1}})),
    ] {
        let mut params = extra;
        params["client_id"] = json!(id);
        assert_eq!(api.ok(method, params).await, json!(null), "{method}");
    }
    assert_eq!(api.ok("is_online", json!({"client_id": id})).await, false);
    assert_eq!(
        api.ok("get_uid_by_client_id", json!({"client_id": id}))
            .await,
        json!(null)
    );
    assert_eq!(
        api.ok("get_session", json!({"client_id": id})).await,
        json!(null)
    );
    assert_eq!(
        api.ok("get_client_id_by_uid", json!({"uid": "u"})).await,
        json!([])
    );
    assert_eq!(
        api.ok("get_client_count_by_group", json!({"group": "g"}))
            .await,
        0
    );
    assert_eq!(
        api.ok("get_client_sessions_by_group", json!({"group": "g"}))
            .await,
        json!({})
    );
    assert_eq!(api.ok("get_all_group_id_list", json!({})).await, json!([]));
    assert_eq!(api.ok("ungroup", json!({"group": "g"})).await, json!(null));
}

async fn batch_runs_commands_in_order(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let mut a = c.client().await;
    let (status, body) = c
        .api()
        .call(
            "batch",
            json!({"commands": [
                {"method": "join_group", "params": {"client_id": a.id, "group": "g"}},
                {"method": "send_to_group", "params": {"group": "g", "data": "hi"}},
                {"method": "get_client_count_by_group", "params": {"group": "g"}},
                {"method": "no_such_method", "params": {}},
                {"method": "bind_uid", "params": {"client_id": a.id}},
            ]}),
        )
        .await;
    assert_eq!(status, 200);
    let replies = body["replies"].as_array().unwrap();
    assert_eq!(replies.len(), 5);
    assert_eq!(replies[0], json!({"result": null}));
    assert_eq!(replies[1], json!({"result": null}));
    assert_eq!(replies[2], json!({"result": 1}));
    assert_eq!(replies[3]["error"]["code"], "unknown_method");
    assert_eq!(replies[4]["error"]["code"], "invalid_params");
    a.expect_text("hi").await;
}

async fn a_burst_of_many_pushes_arrives_whole_and_in_order(engine: Engine) {
    // Far more than one write batch (64 frames) queued at once.
    let c = Cluster::start(engine, &[]).await;
    let mut a = c.client().await;
    let commands: Vec<_> = (0..500)
        .map(|n| json!({"method": "send_to_client", "params": {"client_id": a.id, "data": n.to_string()}}))
        .collect();
    let (status, _) = c.api().call("batch", json!({ "commands": commands })).await;
    assert_eq!(status, 200);
    for n in 0..500 {
        a.expect_text(&n.to_string()).await;
    }
}
