//! Presence events on Redis (`--presence-events`): reading the transitions
//! the partition scripts return, and the task that announces offline and
//! vacated once their grace is over (`scripts/presence.lua` has the
//! counters; docs/redis.md section 2 their keys). On Redis Cluster the
//! partition scripts only say what their partition gained or lost, and
//! this node reports that to `scripts/presence_hold.lua`, under one hash
//! tag ([`Holds`]).

use std::sync::atomic::{AtomicBool, Ordering};
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
/// the grace, between 100 ms and 1 s. On Redis Cluster the poll also
/// keeps this instance alive ([`Holds`]): at least every quarter
/// heartbeat, eight polls per liveness TTL, so a live instance is not
/// taken for a dead one for a late poll or two.
fn poll_every(grace: Duration, heartbeat: Duration, cluster: bool) -> Duration {
    let every = match (grace.is_zero(), cluster) {
        (true, _) => heartbeat / 4,
        (false, true) => (grace / 10).min(heartbeat / 4),
        (false, false) => grace / 10,
    };
    every.clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// Whether this node polls: presence events on, with a grace (for the due
/// transitions) or on Redis Cluster (for its instance's liveness too).
pub fn polls(s: &Shared) -> bool {
    !s.presence_args()[0].is_empty() && (!s.settings.presence.grace.is_zero() || clustered(s))
}

/// Whether presence events are on, on Redis Cluster: the partition scripts
/// collect, and [`Holds`] counts.
pub fn clustered(s: &Shared) -> bool {
    s.redis.sharded && !s.presence_args()[0].is_empty()
}

/// Announces the transitions whose grace is over. Every node polls; the
/// script hands each to one of them.
pub async fn run(s: Arc<Shared>) {
    let base = s.presence_args()[0].clone();
    let mut tick = tokio::time::interval(poll_every(
        s.settings.presence.grace,
        s.settings.heartbeat,
        clustered(&s),
    ));
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
        let due = if clustered(&s) {
            tick_cluster(&s).await
        } else {
            s.scripts
                .presence_due
                .run::<Vec<String>, _, _>(
                    &s.redis.client,
                    format!("{base}:off"),
                    vec![base.clone(), DUE_PER_CALL.to_string()],
                )
                .await
        };
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

/// Presence on Redis Cluster. A uid's counter cannot live in every
/// partition's slot, so the count moves out of the partition scripts:
/// they return what the partition gained or lost, and this node reports
/// it, in the order it happened, to `presence_hold.lua`, which keeps the
/// set of names each node process (instance) holds and the counts, all
/// under one hash tag. A report is idempotent (set membership), so one
/// applied twice counts once; one that failed leaves the instance out of
/// step, and the next report is a full sync of the partition's names
/// instead. An instance that stops polling (dead, or cut off from Redis)
/// is dropped after the liveness TTL and its names count down, as the
/// purge of a partition does on a single Redis; it syncs again when it is
/// back. The lock keeps a sync (a snapshot of the partition, then its
/// report) from interleaving with the mirror's writes and reports.
#[derive(Debug)]
pub struct Holds {
    lock: tokio::sync::Mutex<()>,
    /// The next report must be a full sync.
    resync: AtomicBool,
}

impl Default for Holds {
    fn default() -> Self {
        Holds {
            lock: tokio::sync::Mutex::new(()),
            resync: AtomicBool::new(true),
        }
    }
}

impl Holds {
    /// Serialises the partition's writes with the reports (held by the
    /// mirror across a round of writes and their report).
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    /// Asks for a full sync before the next report (a reconnection: Redis
    /// may have lost what it held).
    pub fn resync(&self) {
        self.resync.store(true, Ordering::Release);
    }
}

/// The arguments every presence_hold call starts with.
fn hold_args(s: &Shared, mode: &str) -> Vec<String> {
    let [base, _, grace] = s.presence_args();
    let ttl = (s.settings.heartbeat * 2).as_millis().to_string();
    vec![
        base,
        // Counting, not collecting.
        s.settings.presence.flags(),
        grace,
        s.instance.clone(),
        mode.to_owned(),
        ttl,
    ]
}

fn hold_key(s: &Shared) -> String {
    format!("{}:in", s.presence_args()[0])
}

/// What a partition script collected ('>' gained, '<' lost), as the
/// report's op and name ('+', 'u:alice').
pub fn collected(flat: &[String], into: &mut Vec<String>) {
    for t in flat.chunks_exact(3) {
        let op = match t[0].get(..1) {
            Some(">") => "+",
            Some("<") => "-",
            _ => continue,
        };
        into.push(op.to_owned());
        into.push(format!("{}:{}", &t[0][1..], t[1]));
    }
}

/// Reports what the partition gained and lost (`ops`: op, name, ...), or
/// the whole partition when a sync is due. Call with [`Holds::lock`] held.
pub async fn report(s: &Shared, ops: Vec<String>) {
    if !s.holds.resync.load(Ordering::Acquire) && !ops.is_empty() {
        let mut args = hold_args(s, "add");
        args.extend(ops);
        match hold(s, args).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "presence report failed: the next one syncs");
                s.holds.resync();
                return;
            }
        }
    } else if !s.holds.resync.load(Ordering::Acquire) {
        return;
    }
    if let Err(e) = sync(s).await {
        tracing::warn!(error = %e, "presence sync failed: tried again at the next write or poll");
        s.holds.resync();
    }
}

/// Reports every name the partition holds now.
async fn sync(s: &Shared) -> Result<(), fred::error::Error> {
    use super::keys::suffix;
    s.holds.resync.store(false, Ordering::Release);
    let p = &s.settings.presence;
    let mut args = hold_args(s, "sync");
    for (on, kind, set) in [(p.uid, "u", suffix::UIDS), (p.group, "g", suffix::GROUPS)] {
        if !on {
            continue;
        }
        let key = s.keys.partition_key(s.node, set, "");
        let names: Vec<String> = s.redis.client.smembers(key).await?;
        args.extend(
            names
                .into_iter()
                .filter(|n| p.watches(n))
                .map(|n| format!("{kind}:{n}")),
        )
    }
    hold(s, args).await.map(|_| ())
}

/// Runs presence_hold; false when the instance was unknown (dropped).
async fn hold(s: &Shared, args: Vec<String>) -> Result<bool, fred::error::Error> {
    let answer: Value = s
        .scripts
        .presence_hold
        .run(&s.redis.client, hold_key(s), args)
        .await?;
    let (code, flat) = split(answer);
    // Never waits: the mirror holds the lock around this, and events must
    // not hold up membership writes (a full queue drops, counted).
    s.notify(transitions(&flat));
    Ok(code >= 0)
}

/// The poll on Redis Cluster: keeps this instance alive, drops the stale
/// ones, announces the due transitions; syncs when this instance was
/// dropped.
async fn tick_cluster(s: &Shared) -> Result<Vec<String>, fred::error::Error> {
    let mut args = hold_args(s, "tick");
    args.push(DUE_PER_CALL.to_string());
    let answer: Value = s
        .scripts
        .presence_hold
        .run(&s.redis.client, hold_key(s), args)
        .await?;
    let (code, flat) = split(answer);
    if code == 0 {
        s.holds.resync();
    }
    if s.holds.resync.load(Ordering::Acquire) {
        let _held = s.holds.lock().await;
        report(s, Vec::new()).await;
    }
    Ok(flat)
}

/// This instance leaves (its partition was deleted): its names count
/// down.
pub async fn leave(s: &Shared) -> Result<(), fred::error::Error> {
    let _held = s.holds.lock().await;
    hold(s, hold_args(s, "drop")).await.map(|_| ())
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

    #[test]
    fn collected_changes_become_ordered_reports_and_transitions_are_skipped() {
        let flat: Vec<String> = ["<u", "alice", "", "+u", "bob", "7", ">g", "room", ""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut ops = Vec::new();
        collected(&flat, &mut ops);
        assert_eq!(ops, ["-", "u:alice", "+", "g:room"]);
        // A collected change is no transition.
        assert_eq!(transitions(&flat).len(), 1);
    }
}
