//! What the sequencer does with a packet, in the order packets arrive.
//!
//! A GatewayClient opens a connection per call, so `joinGroup` then
//! `sendToGroup`, or `setSession` then `updateSession`, arrive on two
//! connections and must apply in that order, as GatewayWorker's event loop
//! applies them. [`apply`] only changes the hub and queues frames to
//! clients, both without waiting. It never writes to a socket, never waits
//! on Redis (a write still pending goes to the connection's own task) and
//! never answers a query: a query goes to its connection's task, which
//! answers it after every change that arrived before it was applied.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;
use serde_json::Value as Json;

use super::super::php;
use super::super::protocol::{cmd, Packet};
use super::{json_ext, keys, name, strings, values};
use crate::engine::EngineResult;
use crate::frame::close_code;
use crate::gateway::Gateway;
use crate::hub::Frames;
use crate::ids::ClientId;
use crate::push::{encode_frame, LastFrame, Message, Push, Target};
use crate::recovery::framing;
use crate::recovery::history::{group_stream, prefix_keeps, uid_stream, ALL_STREAM};

/// A Redis write still running after its change was applied to the hub.
pub(crate) type Mirror = Pin<Box<dyn Future<Output = EngineResult<()>> + Send>>;

/// What the connection that sent a packet does next.
pub(crate) enum Outcome {
    /// Applied; nothing more to do.
    Done,
    /// Applied to the hub; the connection lets this finish (its Redis
    /// write) in the background, within the node's in-flight bound.
    Mirror(&'static str, Mirror),
    /// A query, now ordered after every earlier change: the connection
    /// answers it.
    Query(Packet),
    /// The packet breaks the protocol: close the connection.
    Failed(String),
}

/// One packet, in arrival order.
pub(crate) fn apply(gw: &Gateway, p: Packet, log: &mut crate::accept::Throttle) -> Outcome {
    let id = ClientId::new(gw.minter.node(), p.connection_id);
    let engine = gw.engine.clone();
    let ext = || String::from_utf8_lossy(&p.ext_data).into_owned();
    let ids = |numbers: &mut dyn Iterator<Item = u32>| -> Vec<ClientId> {
        let node = gw.minter.node();
        numbers.map(|n| ClientId::new(node, n)).collect()
    };
    match p.cmd {
        cmd::SEND_TO_ONE => deliver(gw, &Target::Client(id), &[], &p, log),
        cmd::SEND_TO_ALL => {
            let ext = json_ext(&p);
            match ext.get("connections") {
                // The values of `connections`: only those.
                Some(only) => {
                    let only = ids(&mut values(only));
                    deliver(gw, &Target::Clients(only), &[], &p, log)
                }
                // The keys of `exclude`: all but those.
                None => {
                    let exclude = ids(&mut keys(ext.get("exclude")));
                    deliver(gw, &Target::All, &exclude, &p, log)
                }
            }
        }
        cmd::SEND_TO_UID => {
            let uids = strings(&json_ext(&p));
            deliver(gw, &Target::Uids(uids), &[], &p, log)
        }
        cmd::SEND_TO_GROUP => {
            let ext = json_ext(&p);
            let groups = strings(ext.get("group").unwrap_or(&Json::Null));
            let exclude = ids(&mut keys(ext.get("exclude")));
            deliver(gw, &Target::Groups(groups), &exclude, &p, log)
        }
        cmd::KICK => {
            // `closeClient($id)` without a message sends a serialized null
            // (flag 0x01 clear).
            let message = p.body_is_scalar() && !p.body.is_empty();
            let last = if message {
                match frame(gw, &p) {
                    Ok(frame) if p.is_raw() => Some(LastFrame::raw(frame)),
                    Ok(frame) => Some(LastFrame {
                        plain: frame,
                        framed: framing::encode(is_binary(&p.body), None, &p.body),
                    }),
                    Err(why) => {
                        refused(gw, why, log);
                        None
                    }
                }
            } else {
                None
            };
            gw.hub
                .close_client(id, last, close_code::NORMAL, "closed by server");
            Outcome::Done
        }
        cmd::DESTROY => {
            gw.hub.destroy_client(id, close_code::NORMAL, "destroyed");
            Outcome::Done
        }
        cmd::BIND_UID => match name(ext()) {
            Some(uid) => change("bind_uid", async move { engine.bind_uid(id, uid).await }),
            None => Outcome::Done,
        },
        cmd::UNBIND_UID => match gw.hub.uid_of(id).flatten() {
            // GatewayWorker unbinds whatever uid the client has.
            Some(uid) => change(
                "unbind_uid",
                async move { engine.unbind_uid(id, uid).await },
            ),
            None => Outcome::Done,
        },
        cmd::JOIN_GROUP => match name(ext()) {
            Some(g) => change("join_group", async move { engine.join_group(id, g).await }),
            None => Outcome::Done,
        },
        cmd::LEAVE_GROUP => match name(ext()) {
            Some(g) => change(
                "leave_group",
                async move { engine.leave_group(id, g).await },
            ),
            None => Outcome::Done,
        },
        cmd::UNGROUP => match name(ext()) {
            Some(g) => change("ungroup", async move { engine.ungroup_local(g).await }),
            None => Outcome::Done,
        },
        cmd::SET_SESSION | cmd::UPDATE_SESSION => {
            let given = match php::session_from_php(&p.ext_data) {
                Ok(given) => given,
                Err(e) => return Outcome::Failed(e.to_string()),
            };
            let Some(current) = gw.hub.session_of(id) else {
                return Outcome::Done;
            };
            // updateSession merges as PHP's array_replace_recursive, which
            // differs from the API's merge for lists.
            let session = if p.cmd == cmd::UPDATE_SESSION {
                php::replace_session(&current, &given)
            } else {
                given
            };
            change("set_session", async move {
                engine.set_session(id, session, false).await
            })
        }
        cmd::GET_SESSION_BY_CLIENT_ID
        | cmd::IS_ONLINE
        | cmd::GET_ALL_CLIENT_SESSIONS
        | cmd::GET_CLIENT_SESSIONS_BY_GROUP
        | cmd::GET_CLIENT_COUNT_BY_GROUP
        | cmd::BATCH_GET_CLIENT_COUNT_BY_GROUP
        | cmd::GET_CLIENT_ID_BY_UID
        | cmd::BATCH_GET_CLIENT_ID_BY_UID
        | cmd::GET_GROUP_ID_LIST
        | cmd::SELECT => Outcome::Query(p),
        other => Outcome::Failed(format!("unknown command {other}")),
    }
}

/// Applies an engine change now (its first step changes the hub); the rest
/// (the write to Redis) goes back to the connection.
fn change<F>(what: &'static str, change: F) -> Outcome
where
    F: Future<Output = EngineResult<()>> + Send + 'static,
{
    let mut change: Mirror = Box::pin(change);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match change.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(())) => Outcome::Done,
        Poll::Ready(Err(e)) => {
            tracing::warn!(what, error = %e, "inner command failed");
            Outcome::Done
        }
        // Polled again by the connection's task, which registers its own
        // waker then.
        Poll::Pending => Outcome::Mirror(what, change),
    }
}

/// Why a push was not sent.
#[derive(Debug, Clone, Copy)]
enum Refused {
    TooLarge { len: usize, max: usize },
}

/// The frame a push's body becomes: as given when `raw` (the caller framed
/// it; copied, so that it does not keep the whole read buffer alive while
/// clients are slow), else one message of exactly the bytes: a text frame
/// when they are UTF-8, a binary frame when not (a text frame that is not
/// UTF-8 makes the browser close with 1007). Longer than
/// `--max-message-bytes` (plus a frame header when raw): refused.
fn frame(gw: &Gateway, p: &Packet) -> Result<Bytes, Refused> {
    let max = gw.config.max_message_bytes;
    if p.is_raw() {
        // A raw body is whole frames: their headers are at most 14 bytes.
        let max = max.saturating_add(14);
        if p.body.len() > max {
            return Err(Refused::TooLarge {
                len: p.body.len(),
                max,
            });
        }
        return Ok(Bytes::copy_from_slice(&p.body));
    }
    if p.body.len() > max {
        return Err(Refused::TooLarge {
            len: p.body.len(),
            max,
        });
    }
    let binary = is_binary(&p.body);
    if binary {
        gw.metrics.inner_binary_pushes.inc();
    }
    Ok(encode_frame(binary, &p.body))
}

/// Whether an inner push's body goes out as a binary frame (not UTF-8).
fn is_binary(body: &[u8]) -> bool {
    std::str::from_utf8(body).is_err()
}

/// Local delivery only: the GatewayClient sends to every node itself.
/// Except for the streams `--history-streams` keeps: those go through the
/// engine once for all nodes (kept in history, then published), so that
/// every node delivers them in history order.
fn deliver(
    gw: &Gateway,
    target: &Target,
    exclude: &[ClientId],
    p: &Packet,
    log: &mut crate::accept::Throttle,
) -> Outcome {
    let frame = match frame(gw, p) {
        Ok(frame) => frame,
        Err(why) => {
            refused(gw, why, log);
            return Outcome::Done;
        }
    };
    let (kept, local) = match p.is_raw() {
        // Whole frames already: nothing to keep a payload of.
        true => (None, Some(target.clone())),
        false => split_kept(&gw.config.history_streams, target),
    };
    if let Some(local) = local {
        // Accepted now, as far as push-to-frame latency goes.
        let accepted = Some(crate::push_latency::Accepted::now());
        crate::push_latency::with(accepted, || deliver_here(gw, &local, exclude, p, &frame));
    }
    let Some(kept) = kept else {
        return Outcome::Done;
    };
    let push = Push {
        target: kept,
        exclude: exclude.to_vec(),
        message: Message {
            binary: is_binary(&p.body),
            data: Bytes::copy_from_slice(&p.body),
        },
        history: Some(true),
    };
    let dedup = gw.hub.inner_pushes.id(&[&[p.cmd], &p.ext_data, &p.body]);
    let engine = gw.engine.clone();
    change("history_push", async move {
        engine.publish_once(push, dedup).await
    })
}

/// The part of `target` whose streams `--history-streams` keeps, and the
/// rest.
fn split_kept(prefixes: &[String], target: &Target) -> (Option<Target>, Option<Target>) {
    let some = |v: Vec<String>, f: fn(Vec<String>) -> Target| (!v.is_empty()).then(|| f(v));
    match target {
        Target::Uids(uids) => {
            let (kept, rest): (Vec<String>, Vec<String>) = uids
                .iter()
                .cloned()
                .partition(|u| prefix_keeps(prefixes, &uid_stream(u)));
            (some(kept, Target::Uids), some(rest, Target::Uids))
        }
        Target::Groups(groups) => {
            let (kept, rest): (Vec<String>, Vec<String>) = groups
                .iter()
                .cloned()
                .partition(|g| prefix_keeps(prefixes, &group_stream(g)));
            (some(kept, Target::Groups), some(rest, Target::Groups))
        }
        Target::All if prefix_keeps(prefixes, ALL_STREAM) => (Some(Target::All), None),
        other => (None, Some(other.clone())),
    }
}

fn deliver_here(gw: &Gateway, target: &Target, exclude: &[ClientId], p: &Packet, frame: &Bytes) {
    let encode = || frame.clone();
    // A raw body is whole frames already: sent as given, and to connections
    // that opted in to recovery each message of it with the header `{}`.
    let framed = || match p.is_raw() {
        true => framing::reframe(frame).unwrap_or_else(|| {
            tracing::debug!("a raw inner push is not whole frames: sent as given");
            frame.clone()
        }),
        false => framing::encode(is_binary(&p.body), None, &p.body),
    };
    let frames = Frames {
        plain: &encode,
        framed: &framed,
        position: None,
    };
    let delivered = gw.hub.deliver_with(target, exclude, &frames);
    gw.metrics.delivered(target.kind(), delivered);
}

/// A push that was not sent: counted, and logged at most once a second.
fn refused(gw: &Gateway, why: Refused, log: &mut crate::accept::Throttle) {
    gw.metrics.inner_pushes_refused.inc();
    if let Some(suppressed) = log.allow(Instant::now()) {
        let Refused::TooLarge { len, max } = why;
        tracing::warn!(
            len,
            max,
            suppressed,
            "inner push refused: larger than --max-message-bytes (logged at most once a \
             second, `suppressed` since the last line)"
        );
    }
}
