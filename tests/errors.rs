//! The HTTP API's error contract (SPEC section 4): every failure answers
//! with the right status and `{"error":{"code":...,"message":...}}`, and the
//! limits (body size, message size, batch size, name length) sit exactly where
//! the options put them. Every suite runs against each engine, and on
//! Sentinel and Redis Cluster.

mod common;

use common::{assert_api_error, Cluster, Engine, OFFLINE_ID};
use serde_json::{json, Value};

engine_suite!(
    bad_params_are_400_invalid_params,
    names_are_non_empty_and_at_most_256_bytes,
    malformed_json_is_400_invalid_json,
    unknown_method_and_unknown_path_are_404,
    api_methods_answer_405_to_get,
    body_above_api_max_body_bytes_is_413,
    message_above_max_message_bytes_is_413,
    api_key_is_required_on_every_api_call,
    batch_carries_at_most_1000_commands,
    lists_are_capped,
);

// The same on Sentinel and on Redis Cluster.
topology_suite!(
    bad_params_are_400_invalid_params,
    names_are_non_empty_and_at_most_256_bytes,
    malformed_json_is_400_invalid_json,
    unknown_method_and_unknown_path_are_404,
    api_methods_answer_405_to_get,
    body_above_api_max_body_bytes_is_413,
    message_above_max_message_bytes_is_413,
    api_key_is_required_on_every_api_call,
    batch_carries_at_most_1000_commands,
    lists_are_capped,
);

async fn bad_params_are_400_invalid_params(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let mut a = c.client().await;
    let api = c.api();
    let cases: Vec<(&str, Value)> = vec![
        // client_id missing, malformed (too short, too long, not hex, not a
        // string).
        ("send_to_client", json!({"data": "x"})),
        ("send_to_client", json!({"client_id": "abc", "data": "x"})),
        (
            "send_to_client",
            json!({"client_id": format!("{OFFLINE_ID}0"), "data": "x"}),
        ),
        (
            "send_to_client",
            json!({"client_id": "zz000001ffff00000001", "data": "x"}),
        ),
        ("is_online", json!({"client_id": 12})),
        ("is_online", json!({})),
        // data and data_base64 both, neither, bad base64.
        (
            "send_to_client",
            json!({"client_id": a.id, "data": "x", "data_base64": "eA=="}),
        ),
        ("send_to_client", json!({"client_id": a.id})),
        ("send_to_all", json!({})),
        (
            "send_to_client",
            json!({"client_id": a.id, "data_base64": "!!not base64!!"}),
        ),
        // A session must be an object.
        ("set_session", json!({"client_id": a.id, "session": [1, 2]})),
        ("update_session", json!({"client_id": a.id, "session": "x"})),
        // send_to_uid / send_to_group need a target.
        ("send_to_uid", json!({"data": "x"})),
        ("send_to_group", json!({"data": "x"})),
    ];
    for (method, params) in cases {
        let what = format!("{method} {params}");
        let got = api.call(method, params).await;
        assert_api_error(&what, &got, 400, "invalid_params");
    }
    // Params that are not a JSON object.
    for body in [&b"[1, 2]"[..], b"\"x\"", b"42"] {
        let got = api
            .post_raw("get_all_client_count", body.to_vec(), None)
            .await;
        assert_api_error("params not an object", &got, 400, "invalid_params");
    }
    // None of the refused pushes reached the client.
    api.ok(
        "send_to_client",
        json!({"client_id": a.id, "data": "marker"}),
    )
    .await;
    a.expect_text("marker").await;
}

async fn names_are_non_empty_and_at_most_256_bytes(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let a = c.client().await;
    let api = c.api();
    for uid in [json!(""), json!("u".repeat(257)), json!(null), json!([])] {
        let what = format!("uid {uid}");
        let got = api
            .call("bind_uid", json!({"client_id": a.id, "uid": uid}))
            .await;
        assert_api_error(&what, &got, 400, "invalid_params");
    }
    // Bytes, not characters: 129 two-byte characters are 258 bytes.
    let got = api
        .call(
            "join_group",
            json!({"client_id": a.id, "group": "é".repeat(129)}),
        )
        .await;
    assert_api_error("group of 258 bytes", &got, 400, "invalid_params");
    let got = api.call("is_uid_online", json!({"uid": ""})).await;
    assert_api_error("empty uid in a query", &got, 400, "invalid_params");
    assert_eq!(api.ok("get_all_uid_list", json!({})).await, json!([]));
    assert_eq!(api.ok("get_all_group_id_list", json!({})).await, json!([]));
    // 256 bytes is allowed.
    let longest = "u".repeat(256);
    api.ok("bind_uid", json!({"client_id": a.id, "uid": longest}))
        .await;
    assert_eq!(
        api.ok("get_uid_by_client_id", json!({"client_id": a.id}))
            .await,
        json!(longest)
    );
}

async fn malformed_json_is_400_invalid_json(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let api = c.api();
    for body in [&b"{not json"[..], b"{\"data\": \"x\"", b"\xff\xfe"] {
        let what = format!("body {:?}", String::from_utf8_lossy(body));
        let got = api.post_raw("send_to_all", body.to_vec(), None).await;
        assert_api_error(&what, &got, 400, "invalid_json");
    }
    let got = api.post_raw("batch", b"{not json".to_vec(), None).await;
    assert_api_error("batch", &got, 400, "invalid_json");
}

async fn unknown_method_and_unknown_path_are_404(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let api = c.api();
    let got = api.call("nope", json!({})).await;
    assert_api_error("/api/nope", &got, 404, "unknown_method");
    // Unknown even with bad params: the name is checked first.
    let got = api.post_raw("nope", b"[1]".to_vec(), None).await;
    assert_api_error("/api/nope with [1]", &got, 404, "unknown_method");
    // Paths outside /api/ on the API listener, and on the public listener.
    for public in [false, true] {
        let (status, text) = api.get_raw(public, "/nope").await;
        let body: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("404 body is JSON: {text:?}"));
        assert_api_error(
            &format!("/nope, public {public}"),
            &(status, body),
            404,
            "not_found",
        );
    }
}

async fn api_methods_answer_405_to_get(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let api = c.api();
    for path in ["/api/send_to_all", "/api/batch"] {
        let (status, text) = api.get_raw(false, path).await;
        let body: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("405 body is JSON: {text:?}"));
        assert_api_error(
            &format!("GET {path}"),
            &(status, body),
            405,
            "method_not_allowed",
        );
    }
}

async fn body_above_api_max_body_bytes_is_413(engine: Engine) {
    let c = Cluster::start(engine, &["--api-max-body-bytes", "1024"]).await;
    let mut a = c.client().await;
    let api = c.api();
    let big = serde_json::to_vec(&json!({"data": "x".repeat(2048)})).unwrap();
    let got = api.post_raw("send_to_all", big, None).await;
    assert_api_error("send_to_all", &got, 413, "body_too_large");
    let big_batch = serde_json::to_vec(&json!({"commands": [
        {"method": "send_to_all", "params": {"data": "x".repeat(2048)}}
    ]}))
    .unwrap();
    let got = api.post_raw("batch", big_batch, None).await;
    assert_api_error("batch", &got, 413, "body_too_large");
    // Just under the limit passes, and the client sees it (not the refused
    // pushes).
    let data = "y".repeat(1000);
    let body = serde_json::to_vec(&json!({"data": data})).unwrap();
    assert!(body.len() <= 1024);
    let (status, reply) = api.post_raw("send_to_all", body, None).await;
    assert_eq!((status, reply), (200, json!({"result": null})));
    a.expect_text(&data).await;
}

async fn message_above_max_message_bytes_is_413(engine: Engine) {
    let c = Cluster::start(engine, &["--max-message-bytes", "16"]).await;
    let mut a = c.client().await;
    let api = c.api();
    let too_big = [
        ("send_to_all", json!({"data": "a".repeat(17)})),
        (
            "send_to_client",
            json!({"client_id": a.id, "data": "b".repeat(17)}),
        ),
        // 9 two-byte characters are 18 bytes: the limit counts bytes.
        (
            "send_to_client",
            json!({"client_id": a.id, "data": "é".repeat(9)}),
        ),
        // 17 bytes once decoded.
        (
            "send_to_client",
            json!({"client_id": a.id, "data_base64": "AAAAAAAAAAAAAAAAAAAAAAA="}),
        ),
        (
            "close_client",
            json!({"client_id": a.id, "data": "c".repeat(17)}),
        ),
    ];
    for (method, params) in too_big {
        let what = format!("{method} {params}");
        let got = api.call(method, params).await;
        assert_api_error(&what, &got, 413, "message_too_large");
    }
    // 16 bytes passes, as text and as binary.
    api.ok("send_to_all", json!({"data": "d".repeat(16)})).await;
    api.ok(
        "send_to_client",
        json!({"client_id": a.id, "data": "é".repeat(8)}),
    )
    .await;
    api.ok(
        "send_to_client",
        json!({"client_id": a.id, "data_base64": "AAAAAAAAAAAAAAAAAAAAAA=="}),
    )
    .await;
    a.expect_text(&"d".repeat(16)).await;
    a.expect_text(&"é".repeat(8)).await;
    assert_eq!(a.next().await, common::Seen::Binary(vec![0; 16]));
    // The refused close_client did not close it.
    assert_eq!(api.ok("is_online", json!({"client_id": a.id})).await, true);
}

async fn api_key_is_required_on_every_api_call(engine: Engine) {
    let c = Cluster::start(engine, &["--api-key", "errors-test-api-key-0123"]).await;
    let mut a = c.client().await;
    let api = c.api();
    let push = serde_json::to_vec(&json!({"data": "refused"})).unwrap();
    let batch = serde_json::to_vec(&json!({"commands": [
        {"method": "send_to_all", "params": {"data": "refused"}}
    ]}))
    .unwrap();
    for method in ["send_to_all", "batch"] {
        let body = if method == "batch" { &batch } else { &push };
        for key in [
            None,
            Some("wrong"),
            Some("secre"),
            Some("secret2"),
            Some(""),
        ] {
            let got = api.post_raw(method, body.clone(), key).await;
            assert_api_error(&format!("{method} key {key:?}"), &got, 401, "unauthorized");
        }
    }
    // Unknown methods and bad bodies are refused as unauthorized too, so
    // nothing leaks to a caller without the key.
    let got = api.post_raw("nope", b"{not json".to_vec(), None).await;
    assert_api_error("unknown method", &got, 401, "unauthorized");
    // The right key works, for methods and batches.
    let got = api
        .post_raw(
            "get_all_client_count",
            b"{}".to_vec(),
            Some("errors-test-api-key-0123"),
        )
        .await;
    assert_eq!(got, (200, json!({"result": 1})));
    let got = api
        .post_raw(
            "batch",
            serde_json::to_vec(&json!({"commands": [
                {"method": "send_to_client", "params": {"client_id": a.id, "data": "with key"}},
                {"method": "get_all_client_count"}
            ]}))
            .unwrap(),
            Some("errors-test-api-key-0123"),
        )
        .await;
    assert_eq!(
        got,
        (200, json!({"replies": [{"result": null}, {"result": 1}]}))
    );
    // None of the refused pushes reached the client.
    a.expect_text("with key").await;
    // Health and readiness stay open to probes.
    assert_eq!(api.get_status(false, "/healthz").await, 200);
    assert_eq!(api.get_status(false, "/readyz").await, 200);
}

async fn batch_carries_at_most_1000_commands(engine: Engine) {
    let c = Cluster::start(engine, &[]).await;
    let mut a = c.client().await;
    let api = c.api();
    let command = json!({"method": "send_to_client", "params": {"client_id": a.id, "data": "b"}});
    let too_many = vec![command.clone(); 1001];
    let got = api.call("batch", json!({ "commands": too_many })).await;
    assert_api_error("1001 commands", &got, 400, "invalid_params");
    // A refused batch runs none of its commands.
    api.ok(
        "send_to_client",
        json!({"client_id": a.id, "data": "marker"}),
    )
    .await;
    a.expect_text("marker").await;
    // 1000 is allowed.
    let count = json!({"method": "get_all_client_count"});
    let (status, body) = api
        .call("batch", json!({ "commands": vec![count; 1000] }))
        .await;
    assert_eq!(status, 200, "{body}");
    let replies = body["replies"].as_array().unwrap();
    assert_eq!(replies.len(), 1000);
    assert!(replies.iter().all(|r| *r == json!({"result": 1})));
    // A body that is not a batch.
    for bad in [json!({}), json!({"commands": {}}), json!({"commands": [1]})] {
        let what = format!("batch {bad}");
        let got = api.call("batch", bad).await;
        assert_api_error(&what, &got, 400, "invalid_params");
    }
}

async fn lists_are_capped(engine: Engine) {
    let c = Cluster::start(engine, &["--max-list-items", "3"]).await;
    let mut a = c.client().await;
    let api = c.api();
    let four = json!([OFFLINE_ID, OFFLINE_ID, OFFLINE_ID, OFFLINE_ID]);
    for (method, params) in [
        ("send_to_all", json!({"data": "x", "client_ids": four})),
        (
            "send_to_all",
            json!({"data": "x", "exclude_client_ids": four}),
        ),
        (
            "send_to_uid",
            json!({"data": "x", "uids": ["a", "b", "c", "d"]}),
        ),
        (
            "send_to_group",
            json!({"data": "x", "groups": ["a", "b", "c", "d"]}),
        ),
    ] {
        let got = api.call(method, params.clone()).await;
        assert_api_error(&format!("{method} {params}"), &got, 400, "invalid_params");
    }
    // At the cap is fine, and a repeated name counts once.
    api.ok(
        "send_to_all",
        json!({"data": "three", "client_ids": [a.id, OFFLINE_ID, OFFLINE_ID]}),
    )
    .await;
    a.expect_text("three").await;
    api.ok(
        "send_to_uid",
        json!({"data": "x", "uids": ["a", "b", "c", "c"]}),
    )
    .await;
}
