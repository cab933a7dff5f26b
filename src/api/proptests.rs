//! Properties of the HTTP API's decoding: whatever body reaches whichever
//! method, the answer is JSON, 200 with a result or a 4xx with an error
//! object (code and message), never a panic or a 500. Runs the real router
//! on a single node (in-process engine) with two connections in it.

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use clap::Parser;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tower::ServiceExt;

use super::methods::METHODS;
use super::router;
use crate::config::Config;
use crate::engine::memory::MemoryEngine;
use crate::gateway::Gateway;
use crate::hub::{Hub, Membership};
use crate::ids::{IdMinter, NodeId};
use crate::metrics::Metrics;
use crate::outbox::{Limits, Outbox};
use crate::task::Fatal;

/// The ids of the two connections every node here holds.
const IDS: [&str; 2] = ["7f00000100010000000a", "7f00000100010000000b"];

/// Calls `method` with `body` on a fresh node; the status and the body,
/// which must be JSON.
fn call(method: &str, body: Vec<u8>) -> (u16, Value) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let config = Config::try_parse_from(["gatecast", "--max-message-bytes", "64"]).unwrap();
        let node = NodeId::new(std::net::Ipv4Addr::LOCALHOST, 1);
        let hub = Arc::new(Hub::new(Limits {
            frames: 1024,
            bytes: 1 << 20,
        }));
        let metrics = Arc::new(Metrics::new());
        let engine = Arc::new(MemoryEngine::new(hub.clone(), metrics.clone(), node));
        for id in IDS {
            let outbox = Arc::new(Outbox::default());
            crate::engine::Engine::connect(
                &*engine,
                id.parse().unwrap(),
                outbox,
                Membership::default(),
            )
            .await
            .unwrap();
        }
        let gw = Gateway::new(
            config,
            hub,
            engine,
            IdMinter::new(node),
            metrics,
            None,
            None,
            Fatal::new(),
        );
        let request = Request::post(format!("/api/{method}"))
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        let response = router(Arc::new(gw)).oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{method}: body is not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, value)
    })
}

/// `{"error":{"code":"...","message":"..."}}` and nothing else.
fn is_error(v: &Value) -> bool {
    let Some(obj) = v.as_object() else {
        return false;
    };
    let Some(error) = obj.get("error").and_then(Value::as_object) else {
        return false;
    };
    obj.len() == 1
        && error.len() == 2
        && ["code", "message"].iter().all(|k| {
            error
                .get(*k)
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
        })
}

/// The answer is one the API documents for `method`.
fn well_formed(method: &str, status: u16, body: &Value) -> Result<(), TestCaseError> {
    let known = METHODS.contains(&method);
    match status {
        200 if method == "batch" => {
            let replies = body["replies"].as_array();
            prop_assert!(replies.is_some(), "batch answer {}", body);
            for reply in replies.unwrap() {
                let ok = reply
                    .as_object()
                    .is_some_and(|r| r.len() == 1 && r.contains_key("result"));
                prop_assert!(ok || is_error(reply), "batch reply {}", reply);
            }
        }
        200 => prop_assert!(
            body.as_object()
                .is_some_and(|o| o.len() == 1 && o.contains_key("result")),
            "{} answer {}",
            method,
            body
        ),
        400 | 413 => prop_assert!(known && is_error(body), "{} {}: {}", method, status, body),
        404 => prop_assert!(!known && is_error(body), "{} 404: {}", method, body),
        _ => prop_assert!(false, "{} answered {}: {}", method, status, body),
    }
    Ok(())
}

fn arb_method() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(METHODS).prop_map(str::to_owned),
        1 => "[a-z_]{0,12}",
    ]
}

/// JSON values, sometimes the ones a method wants (an online client_id, a
/// name, a session object), so calls get past the first field.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop::sample::select(&IDS[..]).prop_map(Value::from),
        ".{0,10}".prop_map(Value::from),
        "[A-Za-z0-9+/=]{0,12}".prop_map(Value::from),
        Just(Value::from("x".repeat(300))),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-z_]{0,8}", inner), 0..3)
                .prop_map(|e| Value::Object(e.into_iter().collect())),
        ]
    })
}

/// An object of the parameters the methods read, each with any value.
fn arb_params() -> impl Strategy<Value = Value> {
    let key = prop::sample::select(vec![
        "client_id",
        "client_ids",
        "exclude_client_ids",
        "uid",
        "uids",
        "group",
        "groups",
        "data",
        "data_base64",
        "session",
        "other",
    ]);
    prop::collection::vec((key, arb_json()), 0..5)
        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
}

fn arb_batch() -> impl Strategy<Value = Value> {
    let command = (arb_method(), arb_params(), any::<bool>()).prop_map(|(m, p, with)| {
        let mut c = Map::new();
        c.insert("method".into(), m.into());
        if with {
            c.insert("params".into(), p);
        }
        Value::Object(c)
    });
    prop_oneof![
        prop::collection::vec(command, 0..5).prop_map(|c| json!({ "commands": c })),
        arb_json().prop_map(|c| json!({ "commands": c })),
    ]
}

proptest! {
    // Each case starts a node and a runtime: a fraction of a millisecond.
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_bytes_get_a_json_answer(
        method in arb_method(),
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            "[{}\\[\\]\":,0-9a-z ]{0,40}".prop_map(String::into_bytes),
        ],
    ) {
        let (status, answer) = call(&method, body);
        well_formed(&method, status, &answer)?;
    }

    #[test]
    fn any_parameters_get_a_result_or_a_clear_error(
        method in arb_method(),
        params in prop_oneof![4 => arb_params(), 1 => arb_json()],
    ) {
        let (status, answer) = call(&method, serde_json::to_vec(&params).unwrap());
        well_formed(&method, status, &answer)?;
    }

    #[test]
    fn any_batch_gets_a_reply_per_command_or_a_clear_error(batch in arb_batch()) {
        let (status, answer) = call("batch", serde_json::to_vec(&batch).unwrap());
        well_formed("batch", status, &answer)?;
        if status == 200 {
            let sent = batch["commands"].as_array().map_or(0, Vec::len);
            prop_assert_eq!(answer["replies"].as_array().unwrap().len(), sent);
        }
    }
}
