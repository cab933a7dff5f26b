//! Presence events on Redis (`--presence-events`): reading the transitions
//! the partition scripts return, and the task that announces offline and
//! vacated once their grace is over (`scripts/presence.lua` has the
//! counters; docs/redis.md section 2 their keys).

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::Value;

use super::liveness::Throttle;
use super::Shared;
use crate::presence::{transitions, Notice};
use crate::session::Session;

/// Most names one poll announces (the next poll takes the rest).
const DUE_PER_CALL: usize = 1000;

fn text(value: Value) -> String {
    match value {
        Value::String(s) => s.to_string(),
        Value::Bytes(b) => String::from_utf8_lossy(&b).into_owned(),
        Value::Integer(i) => i.to_string(),
        _ => String::new(),
    }
}

fn int(value: &Value) -> i64 {
    match value {
        Value::Integer(i) => *i,
        Value::String(s) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

/// A put_clients answer: its code (1 written, 0 purged, -1 conflict) and
/// the flat transitions that came with it.
pub fn split(answer: Value) -> (i64, Vec<String>) {
    match answer {
        Value::Array(items) => {
            let code = items.first().map_or(0, int);
            (code, items.into_iter().skip(1).map(text).collect())
        }
        other => (int(&other), Vec::new()),
    }
}

/// A clear answer: how many connections were removed (-1: none, the
/// node is alive or another process holds it) and the notices: the
/// removed connections' closes (when asked for) and the transitions.
pub fn cleared(answer: Value) -> (i64, Vec<Notice>) {
    let Value::Array(items) = answer else {
        return (int(&answer), Vec::new());
    };
    let removed = items.first().map_or(0, int);
    let closes = items.get(1).map_or(0, int).max(0) as usize;
    let mut rest = items.into_iter().skip(2).map(text);
    let mut notices = Vec::new();
    for _ in 0..closes {
        let (Some(id), Some(uid), Some(session)) = (rest.next(), rest.next(), rest.next()) else {
            break;
        };
        let Ok(client_id) = id.parse() else { continue };
        notices.push(Notice::Closed {
            client_id,
            uid: (!uid.is_empty()).then_some(uid),
            session: serde_json::from_str::<Session>(&session).unwrap_or_default(),
        });
    }
    let flat: Vec<String> = rest.collect();
    notices.extend(transitions(&flat));
    (removed, notices)
}

/// How often the due offline / vacated transitions are polled: a tenth of
/// the grace, between 100 ms and 1 s.
fn poll_every(grace: Duration) -> Duration {
    (grace / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// Whether this node polls for due transitions: presence events on, with
/// a grace.
pub fn polls(s: &Shared) -> bool {
    !s.presence_args()[0].is_empty() && !s.settings.presence.grace.is_zero()
}

/// Announces the transitions whose grace is over. Every node polls; the
/// script hands each to one of them.
pub async fn run(s: Arc<Shared>) {
    let base = s.presence_args()[0].clone();
    let mut tick = tokio::time::interval(poll_every(s.settings.presence.grace));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = Throttle::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = s.stop.cancelled() => return,
        }
        if !s.redis.client.is_connected() {
            continue;
        }
        let due: Result<Vec<String>, _> = s
            .scripts
            .presence_due
            .run(
                &s.redis.client,
                Vec::<String>::new(),
                vec![base.clone(), DUE_PER_CALL.to_string()],
            )
            .await;
        match due {
            Ok(flat) => s.notify_wait(transitions(&flat)).await,
            Err(e) => {
                if let Some(skipped) = failures.allow() {
                    tracing::warn!(error = %e, skipped, "announcing due presence transitions failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_answers_carry_closes_then_transitions() {
        let s = |v: &str| Value::String(v.into());
        let answer = Value::Array(vec![
            Value::Integer(2),
            Value::Integer(1),
            s("7f000001b3c361f66484"),
            s("alice"),
            s("{\"a\":1}"),
            s("-u"),
            s("alice"),
            s("5"),
        ]);
        let (removed, notices) = cleared(answer);
        assert_eq!(removed, 2);
        assert_eq!(notices.len(), 2);
        assert!(matches!(&notices[0], Notice::Closed { uid: Some(u), .. } if u == "alice"));
        assert_eq!(cleared(Value::Integer(-1)).0, -1);
        assert_eq!(split(Value::Integer(1)), (1, Vec::new()));
    }
}
