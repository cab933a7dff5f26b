//! Membership changes: applied to the hub where the connection lives, then
//! mirrored. A change for this node's connection is applied at once and
//! answered once its batch is written; one for another node's connection
//! is a command to that node ([`super::rpc`]).

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;

use super::envelope::{Envelope, EnvelopeRef, Op};
use super::mirror::Follow;
use super::Shared;
use crate::engine::{EngineError, EngineResult};
use crate::ids::ClientId;
use crate::recovery::framing::{self, PositionRef};
use crate::recovery::history::{group_stream, uid_stream, TOP_ONLY};
use crate::session::{Session, SessionError};

/// Why a change to this node's connection answers 503 while Redis is away.
const KEPT: &str = "redis is not connected: applied on this node, written to redis when it is back";

/// Longest a `position` frame may take to be told after a bind or join
/// (the channel followed, the stream's top read); past it, none is sent
/// and the client's next resume says the stream was not recovered.
const TELL_WITHIN: Duration = Duration::from_secs(10);

/// One change of one connection's membership or session.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Bind this uid, replacing the one it had.
    BindUid(String),
    /// Unbind this uid if it is the connection's.
    UnbindUid(String),
    /// Join this group.
    JoinGroup(String),
    /// Leave this group.
    LeaveGroup(String),
    /// Replace the session, or merge into it.
    Session {
        /// The new session, or the keys to merge.
        session: Session,
        /// Merge (update_session) rather than replace (set_session).
        merge: bool,
    },
}

impl Change {
    /// The change a command envelope asks for.
    pub fn from_envelope(e: &EnvelopeRef<'_>) -> Result<Change, &'static str> {
        let name = |n: Option<&str>, what: &'static str| {
            n.map(str::to_owned)
                .and_then(|n| crate::name::Name::new(n).ok())
                .map(|n| n.0)
                .ok_or(what)
        };
        Ok(match e.op {
            Op::BindUid => Change::BindUid(name(e.uid, "bind_uid without a valid uid")?),
            Op::UnbindUid => Change::UnbindUid(name(e.uid, "unbind_uid without a valid uid")?),
            Op::JoinGroup => Change::JoinGroup(name(e.group, "join_group without a valid group")?),
            Op::LeaveGroup => {
                Change::LeaveGroup(name(e.group, "leave_group without a valid group")?)
            }
            Op::SetSession | Op::UpdateSession => Change::Session {
                session: e.session.clone().ok_or("session command without session")?,
                merge: e.op == Op::UpdateSession,
            },
            _ => return Err("not a membership command"),
        })
    }

    /// The command envelope for connection `id`.
    fn into_envelope(self, id: ClientId) -> Envelope {
        let (op, uid, group, session) = match self {
            Change::BindUid(uid) => (Op::BindUid, Some(uid), None, None),
            Change::UnbindUid(uid) => (Op::UnbindUid, Some(uid), None, None),
            Change::JoinGroup(group) => (Op::JoinGroup, None, Some(group), None),
            Change::LeaveGroup(group) => (Op::LeaveGroup, None, Some(group), None),
            Change::Session { session, merge } => {
                let op = if merge {
                    Op::UpdateSession
                } else {
                    Op::SetSession
                };
                (op, None, None, Some(session))
            }
        };
        let mut e = Envelope::new(op);
        e.client_id = Some(id.to_string());
        e.uid = uid;
        e.group = group;
        e.session = session;
        e
    }
}

impl Shared {
    /// Applies a change to a connection of this node. Returns the channels
    /// whose subscription may change, or `None` when there is nothing to
    /// mirror (the connection is not here, or the change changed nothing).
    /// Changes that changed nothing are mirrored anyway where cheap: the
    /// writes are idempotent, and a retry repairs what a failure left.
    pub(super) fn apply(
        self: &Arc<Self>,
        id: ClientId,
        change: Change,
    ) -> Result<Option<Vec<Follow>>, SessionError> {
        let hub = &self.hub;
        Ok(match change {
            Change::BindUid(uid) => {
                let Some(previous) = hub.bind_uid(id, &uid) else {
                    return Ok(None);
                };
                if previous.as_deref() != Some(uid.as_str()) {
                    self.tell_position(id, Follow::Uid(uid.clone()));
                }
                let mut follows = vec![Follow::Uid(uid.clone())];
                follows.extend(previous.filter(|p| *p != uid).map(Follow::Uid));
                Some(follows)
            }
            Change::UnbindUid(uid) => hub.unbind_uid(id, &uid).then(|| vec![Follow::Uid(uid)]),
            Change::JoinGroup(group) => {
                match hub.join_group(id, &group) {
                    None => return Ok(None),
                    Some(true) => self.tell_position(id, Follow::Group(group.clone())),
                    Some(false) => {}
                }
                Some(vec![Follow::Group(group)])
            }
            Change::LeaveGroup(group) => {
                hub.leave_group(id, &group);
                hub.contains(id).then(|| vec![Follow::Group(group)])
            }
            Change::Session { session, merge } => {
                if let Err(e) = hub.set_session(id, session, merge) {
                    self.metrics
                        .sessions_refused
                        .get_or_create(&crate::metrics::ReasonLabel { reason: e.label() })
                        .inc();
                    return Err(e);
                }
                Some(Vec::new())
            }
        })
    }

    /// Runs a change where the connection lives and waits until it is
    /// mirrored: when this returns, the owner follows the channels the
    /// change needs, so a push sent next reaches the connection.
    pub(super) async fn command(
        self: &Arc<Self>,
        id: ClientId,
        change: Change,
    ) -> EngineResult<()> {
        if !self.is_local(id) {
            // Refused before anything changes when Redis is away.
            self.check()?;
            return self.rpc(id.node(), change.into_envelope(id)).await;
        }
        match self.apply(id, change)? {
            Some(follows) => self.mirrored([id], follows).await,
            None => Ok(()),
        }
    }

    /// Tells the connection `id`, when it opted in to recovery, where it
    /// stands in the stream it just became a member of, if that stream
    /// keeps history (docs/recovery.md, the `position` frame): read once
    /// the node follows the stream's channel, so every push after the
    /// position reaches it live. Without it, a first push on the stream
    /// missed while it is away could not be named when it resumes.
    fn tell_position(self: &Arc<Self>, id: ClientId, follow: Follow) {
        let stream = match &follow {
            Follow::Uid(u) => uid_stream(u),
            Follow::Group(g) => group_stream(g),
        };
        if self.hub.framed_member(id, &stream).is_none() {
            return;
        }
        let Some(runtime) = self.gaps.runtime() else {
            return;
        };
        let s = self.clone();
        runtime.spawn(async move {
            let told = tokio::time::timeout(TELL_WITHIN, async {
                s.mirror.flush([], [follow]).await.ok()?;
                let read = s.history_since(&stream, TOP_ONLY).await.ok()?;
                let epoch = read.epoch.as_deref()?;
                // Still a member (it may have left meanwhile).
                let outbox = s.hub.framed_member(id, &stream)?;
                let frame = framing::position(PositionRef {
                    stream: &stream,
                    epoch,
                    offset: read.top,
                });
                let _ = outbox.push(frame, &s.hub.limits().one_more());
                Some(())
            });
            if told.await.is_err() {
                tracing::debug!(client_id = %id, %stream, "position not told in time");
            }
        });
    }

    /// Waits until changes already applied to this node's connections are
    /// mirrored. With Redis away they are only marked: they stay applied
    /// here (as in the in-process engine; the inner port has nobody to
    /// retry them) and the registration after the reconnection writes
    /// them, so the caller learns they are not in Redis yet, at once.
    async fn mirrored(
        &self,
        clients: impl IntoIterator<Item = ClientId>,
        follows: impl IntoIterator<Item = Follow>,
    ) -> EngineResult<()> {
        if !self.redis.client.is_connected() {
            self.mirror.mark(clients, follows);
            return Err(EngineError::Unavailable(KEPT.into()));
        }
        self.mirror
            .flush(clients, follows)
            .await
            .map_err(EngineError::Unavailable)
    }

    /// Removes every member from `group` on every node: published on the
    /// group's channel (in order with pushes to it), applied by every node
    /// holding members, this one included, and answered once mirrored.
    pub(super) async fn ungroup(&self, group: String) -> EngineResult<()> {
        self.check()?;
        let channel = self.keys.group_channel(&group);
        self.rpc_all(channel, Envelope::new(Op::Ungroup)).await
    }

    /// Removes this node's members from `group` (an `ungroup` arrived).
    pub(super) fn ungroup_here(&self, group: &str) {
        let members = self.hub.ungroup(group);
        self.mirror.mark(members, [Follow::Group(group.to_owned())]);
    }

    /// Removes this node's members from `group` and waits until mirrored
    /// (kept while Redis is away, as a change of one connection is).
    pub(super) async fn ungroup_local(&self, group: &str) -> EngineResult<()> {
        let members = self.hub.ungroup(group);
        self.mirrored(members, [Follow::Group(group.to_owned())])
            .await
    }
}
