//! This node's partition in Redis: its connections' uids, groups and
//! sessions, written only by the mirror (see [`super::mirror`]).

use std::time::Instant;

use fred::prelude::*;
use futures_util::future::join_all;

use super::keys::suffix;
use super::liveness::{self, Beat};
use super::mirror::Failure;
use super::Shared;
use crate::ids::ClientId;

/// Connections per script call, and payload bytes (sessions) per call.
const CHUNK_RECORDS: usize = 128;
const CHUNK_BYTES: usize = 256 * 1024;

/// Script calls in flight at once (fred pipelines them on one connection).
const IN_FLIGHT: usize = 16;

/// Rewrites `clients` in the partition from the hub's current state: a
/// connection the hub no longer holds is removed. Refreshes the node's
/// liveness between rounds of a long rewrite, so no other node takes it
/// for dead halfway. Each write is fenced by this process's instance: it
/// fails with [`Failure::Purged`] when the node's liveness key is gone (a
/// rewrite that was purged halfway must start again as a whole) and with
/// [`Failure::Conflict`] when another process holds the node id.
pub async fn put(s: &Shared, clients: &[ClientId], last_beat: &mut Instant) -> Result<(), Failure> {
    let calls = records(s, clients);
    // On Redis Cluster each round's partition changes are reported (in
    // order, before the next round) under the presence lock.
    let clustered = super::presence::clustered(s);
    let _held = match clustered {
        true => Some(s.holds.lock().await),
        false => None,
    };
    for round in calls.chunks(IN_FLIGHT) {
        // Every answer is read before an error is returned: a call that
        // succeeded next to one that failed has decided its presence
        // transitions once and for all (the retry finds nothing to change).
        let answers = join_all(round.iter().map(|args| {
            s.scripts.put_clients.run::<Value, _, _>(
                &s.redis.client,
                s.keys.partition(s.node),
                args.clone(),
            )
        }))
        .await;
        let mut written = Vec::with_capacity(answers.len());
        let mut failed = None;
        let mut ops = Vec::new();
        for answer in answers {
            match answer {
                Ok(answer) => {
                    let (code, transitions) = super::presence::split(answer);
                    written.push(code);
                    if clustered {
                        super::presence::collected(&transitions, &mut ops);
                    } else {
                        s.notify(crate::presence::transitions(&transitions));
                    }
                }
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if clustered {
            super::presence::report(s, ops).await;
        }
        if let Some(e) = failed {
            return Err(e.into());
        }
        if written.iter().any(|w| *w < 0) {
            return Err(Failure::Conflict);
        }
        if written.contains(&0) {
            return Err(Failure::Purged);
        }
        if liveness::due(s, *last_beat) {
            match liveness::beat(s, false).await? {
                Beat::Kept => *last_beat = Instant::now(),
                Beat::Fresh => return Err(Failure::Purged),
                Beat::Conflict => return Err(Failure::Conflict),
            }
        }
    }
    Ok(())
}

/// The put_clients script's arguments, chunked; each call starts with this
/// process's instance id and the resume window. A connection that opted in
/// to recovery carries its resume record's id and digest: its record is
/// written in the same script call as its partition entries.
fn records(s: &Shared, clients: &[ClientId]) -> Vec<Vec<String>> {
    let presence = s.presence_args();
    let start = || {
        let mut args = vec![s.instance.clone(), s.resume_window_ms()];
        args.extend(presence.iter().cloned());
        args
    };
    let mut calls = Vec::new();
    let mut args: Vec<String> = start();
    let (mut records, mut bytes) = (0, 0);
    for id in clients {
        match s.hub.membership(*id) {
            Some(m) => {
                let session = serde_json::to_string(&m.session).unwrap_or_else(|_| "{}".into());
                bytes += session.len();
                let (record, digest) = match s.resumable.get(*id) {
                    Some(key) => (key.record, key.digest),
                    None => (String::new(), String::new()),
                };
                args.extend([id.to_string(), "1".into(), record, digest, session]);
                args.push(m.uid.unwrap_or_default());
                args.push(m.groups.len().to_string());
                args.extend(m.groups);
            }
            None => {
                let blank = String::new;
                args.extend([
                    id.to_string(),
                    "0".into(),
                    blank(),
                    blank(),
                    blank(),
                    blank(),
                ]);
                args.push("0".into());
            }
        }
        records += 1;
        if records == CHUNK_RECORDS || bytes >= CHUNK_BYTES {
            calls.push(std::mem::replace(&mut args, start()));
            (records, bytes) = (0, 0);
        }
    }
    if records > 0 {
        calls.push(args);
    }
    calls
}

/// Connections in the partition that the hub no longer holds (they closed
/// while Redis was away, or Redis came back with old data).
pub async fn stale(s: &Shared) -> Result<Vec<ClientId>, fred::error::Error> {
    let key = s.keys.partition_key(s.node, suffix::CLIENTS, "");
    let ids: Vec<String> = s.redis.client.hkeys(key).await?;
    Ok(ids
        .iter()
        .filter_map(|id| id.parse().ok())
        .filter(|id| !s.hub.contains(*id))
        .collect())
}

/// Deletes the partition and the liveness key in one step, then leaves the
/// node set.
pub async fn leave(s: &Shared) -> Result<(), fred::error::Error> {
    let mut args = vec!["leave".to_owned(), s.instance.clone(), s.resume_window_ms()];
    // The leaving node's connections emit their own close events.
    args.extend(s.presence_args());
    let answer: Value = s
        .scripts
        .clear
        .run(&s.redis.client, s.keys.partition(s.node), args)
        .await?;
    let (removed, notices) = super::presence::cleared(answer);
    s.notify(notices);
    if removed < 0 {
        // Another process holds the node id now: its partition stays.
        return Ok(());
    }
    if super::presence::clustered(s) {
        super::presence::leave(s).await?;
    }
    s.redis
        .client
        .srem::<i64, _, _>(s.keys.nodes(), s.node_name.clone())
        .await?;
    super::registry::bump(s).await
}
