//! The in-process engine: one node, everything answered from the hub.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Engine, EngineResult};
use crate::frame::close_code;
use crate::hub::{Hub, Membership};
use crate::ids::{ClientId, NodeId};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::push::{Delivered, Message, Push, Target};
use crate::recovery::framing::PositionRef;
use crate::recovery::history::{
    group_stream, uid_stream, HistoryRead, HistorySettings, MemoryHistory, ALL_STREAM,
};
use crate::recovery::resume::{
    MemoryRecords, Refusal, Resumable, ResumeKey, Taken, Token, UidCheck, DEFAULT_WINDOW,
};
use crate::session::Session;

/// A single node's engine: the hub is the whole state.
#[derive(Debug)]
pub struct MemoryEngine {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    node: NodeId,
    /// Connections that opted in to recovery, with their keys.
    resumable: Resumable,
    /// Records of closed connections, until `--resume-window` passes.
    records: MemoryRecords,
    history: MemoryHistory,
    /// Presence events, from the hub.
    presence: crate::presence::LocalPresence,
    /// The dashboard's live tails (nothing while nobody watches).
    taps: Arc<crate::tail::Taps>,
    /// This node's last stats record (the whole cluster's, here).
    stats: parking_lot::Mutex<Option<crate::stats::NodeStats>>,
}

impl MemoryEngine {
    /// An engine over `hub`, for node `node`, history off.
    pub fn new(hub: Arc<Hub>, metrics: Arc<Metrics>, node: NodeId) -> Self {
        MemoryEngine {
            hub,
            metrics,
            node,
            resumable: Resumable::default(),
            records: MemoryRecords::new(DEFAULT_WINDOW),
            history: MemoryHistory::new(HistorySettings::default()),
            presence: Default::default(),
            taps: Default::default(),
            stats: Default::default(),
        }
    }

    /// This engine, emitting presence events as `settings` say.
    pub fn with_presence(
        mut self,
        settings: crate::presence::PresenceSettings,
        notices: Option<crate::presence::Notices>,
    ) -> Self {
        self.presence = crate::presence::LocalPresence::new(settings, notices);
        self
    }

    /// Reconciles the presence of a uid and groups a change touched.
    fn touched(&self, uid: Option<&str>, groups: &[String]) {
        if self.presence.uids() {
            if let Some(uid) = uid {
                self.presence.reconcile(&self.hub, true, uid);
            }
        }
        if self.presence.groups() {
            for group in groups {
                self.presence.reconcile(&self.hub, false, group);
            }
        }
    }

    /// This engine, keeping closed connections' resume records for
    /// `window` (`--resume-window`).
    pub fn with_resume_window(mut self, window: std::time::Duration) -> Self {
        self.records = MemoryRecords::new(window);
        self
    }

    /// Tells `id`, when it opted in to recovery, where it stands in
    /// `stream`, which it just became a member of, if that stream keeps
    /// history (docs/recovery.md, the `position` frame).
    fn tell_position(&self, id: ClientId, stream: &str) {
        let Some(outbox) = self.hub.framed_member(id, stream) else {
            return;
        };
        let read = self
            .history
            .read(stream, crate::recovery::history::TOP_ONLY);
        if let Some(epoch) = read.epoch.as_deref() {
            let frame = crate::recovery::framing::position(PositionRef {
                stream,
                epoch,
                offset: read.top,
            });
            let _ = outbox.push(frame, &self.hub.limits().one_more());
        }
    }

    /// This engine with these history settings.
    pub fn with_history(mut self, settings: HistorySettings) -> Self {
        self.history = MemoryHistory::new(settings);
        self
    }

    /// Delivers a push with history on for some of its streams: each stream
    /// apart, appended and delivered under the history's lock.
    fn publish_kept(&self, push: &Push) -> Delivered {
        let m = &push.message;
        let (hub, exclude) = (&self.hub, push.exclude.as_slice());
        let one = |stream: &str, deliver: &dyn Fn(Option<PositionRef<'_>>) -> Delivered| {
            if self.history.settings().keeps(stream, push.history) {
                self.history.append_then(stream, m, |p| deliver(Some(p)))
            } else {
                deliver(None)
            }
        };
        let mut total = Delivered::default();
        let mut add = |d: Delivered| {
            total.queued += d.queued;
            total.overflowed += d.overflowed;
        };
        match &push.target {
            Target::Uids(uids) => {
                let mut seen = std::collections::HashSet::new();
                for uid in uids.iter().filter(|u| seen.insert(*u)) {
                    let target = Target::Uids(vec![uid.clone()]);
                    add(one(&uid_stream(uid), &|p| {
                        hub.deliver_message(&target, exclude, m.binary, &m.data, p)
                    }));
                }
            }
            Target::Groups(groups) => {
                let mut seen = std::collections::HashSet::new();
                let names: Vec<&str> = groups
                    .iter()
                    .map(String::as_str)
                    .filter(|g| seen.insert(*g))
                    .collect();
                for group in &names {
                    add(one(&group_stream(group), &|p| {
                        hub.deliver_group_message(&names, group, exclude, m.binary, &m.data, p)
                    }));
                }
            }
            Target::All => add(one(ALL_STREAM, &|p| {
                hub.deliver_message(&Target::All, exclude, m.binary, &m.data, p)
            })),
            Target::Client(_) | Target::Clients(_) => add(hub.deliver(push)),
        }
        total
    }
}

fn count(n: usize) -> u64 {
    n as u64
}

#[async_trait]
impl Engine for MemoryEngine {
    fn is_ready(&self) -> bool {
        true
    }

    async fn connect(&self, id: ClientId, outbox: Arc<Outbox>, m: Membership) -> EngineResult<()> {
        let (uid, groups) = (m.uid.clone(), m.groups.clone());
        self.hub.insert(id, outbox, m);
        self.touched(uid.as_deref(), &groups);
        Ok(())
    }

    async fn disconnect(&self, id: ClientId) {
        let membership = self.hub.remove(id);
        if let Some(m) = &membership {
            self.touched(m.uid.as_deref(), &m.groups);
        }
        if let (Some(key), Some(m)) = (self.resumable.remove(id), membership) {
            self.records.closed(key, m);
        }
    }

    async fn publish(&self, push: Push) -> EngineResult<()> {
        if self.taps.watched() {
            self.taps.offer(&push, Some(&self.node.to_string()));
        }
        let delivered = if self.history.settings().keeps_any(&push) {
            self.publish_kept(&push)
        } else {
            self.hub.deliver(&push)
        };
        self.metrics.delivered(push.target.kind(), delivered);
        Ok(())
    }

    async fn close_client(&self, id: ClientId, last: Option<Message>) -> EngineResult<()> {
        let frame = last.map(|m| crate::push::LastFrame::of(m.binary, &m.data));
        self.hub
            .close_client(id, frame, close_code::NORMAL, "closed by server");
        Ok(())
    }

    async fn bind_uid(&self, id: ClientId, uid: String) -> EngineResult<()> {
        let previous = self.hub.bind_uid(id, &uid);
        if let Some(Some(old)) = &previous {
            self.touched(Some(old), &[]);
        }
        if previous.is_some_and(|p| p.as_deref() != Some(uid.as_str())) {
            self.tell_position(id, &crate::recovery::history::uid_stream(&uid));
        }
        self.touched(Some(&uid), &[]);
        Ok(())
    }

    async fn unbind_uid(&self, id: ClientId, uid: String) -> EngineResult<()> {
        self.hub.unbind_uid(id, &uid);
        self.touched(Some(&uid), &[]);
        Ok(())
    }

    async fn join_group(&self, id: ClientId, group: String) -> EngineResult<()> {
        if self.hub.join_group(id, &group) == Some(true) {
            self.tell_position(id, &crate::recovery::history::group_stream(&group));
        }
        self.touched(None, std::slice::from_ref(&group));
        Ok(())
    }

    async fn leave_group(&self, id: ClientId, group: String) -> EngineResult<()> {
        self.hub.leave_group(id, &group);
        self.touched(None, std::slice::from_ref(&group));
        Ok(())
    }

    async fn ungroup(&self, group: String) -> EngineResult<()> {
        self.hub.ungroup(&group);
        self.touched(None, std::slice::from_ref(&group));
        Ok(())
    }

    async fn ungroup_local(&self, group: String) -> EngineResult<()> {
        self.ungroup(group).await
    }

    async fn set_session(&self, id: ClientId, session: Session, merge: bool) -> EngineResult<()> {
        if let Err(e) = self.hub.set_session(id, session, merge) {
            self.metrics
                .sessions_refused
                .get_or_create(&crate::metrics::ReasonLabel { reason: e.label() })
                .inc();
            return Err(e.into());
        }
        Ok(())
    }

    async fn is_online(&self, id: ClientId) -> EngineResult<bool> {
        Ok(self.hub.contains(id))
    }

    async fn uid_of(&self, id: ClientId) -> EngineResult<Option<String>> {
        Ok(self.hub.uid_of(id).flatten())
    }

    async fn session_of(&self, id: ClientId) -> EngineResult<Option<Session>> {
        Ok(self.hub.session_of(id))
    }

    async fn client_ids_by_uid(&self, uid: String) -> EngineResult<Vec<ClientId>> {
        Ok(self.hub.client_ids_by_uid(&uid))
    }

    async fn is_uid_online(&self, uid: String) -> EngineResult<bool> {
        Ok(self.hub.has_uid(&uid))
    }

    async fn group_client_ids(&self, group: String) -> EngineResult<Vec<ClientId>> {
        Ok(self.hub.group_client_ids(&group))
    }

    async fn group_client_count(&self, group: String) -> EngineResult<u64> {
        Ok(count(self.hub.group_client_count(&group)))
    }

    async fn group_sessions(&self, group: String) -> EngineResult<Vec<(ClientId, Session)>> {
        Ok(self.hub.group_sessions(&group))
    }

    async fn group_uids(&self, group: String) -> EngineResult<Vec<String>> {
        Ok(self.hub.group_uids(&group))
    }

    async fn client_count(&self) -> EngineResult<u64> {
        Ok(count(self.hub.client_count()))
    }

    async fn client_ids(&self) -> EngineResult<Vec<ClientId>> {
        Ok(self.hub.client_ids())
    }

    async fn sessions(&self) -> EngineResult<Vec<(ClientId, Session)>> {
        Ok(self.hub.sessions())
    }

    async fn uids(&self) -> EngineResult<Vec<String>> {
        Ok(self.hub.uids())
    }

    async fn uid_count(&self) -> EngineResult<u64> {
        Ok(count(self.hub.uid_count()))
    }

    async fn groups(&self) -> EngineResult<Vec<String>> {
        Ok(self.hub.groups())
    }

    async fn node_addresses(&self) -> EngineResult<Vec<std::net::SocketAddrV4>> {
        Ok(vec![self.node.addr()])
    }

    fn track_resume(&self, id: ClientId, key: ResumeKey) {
        self.records.track(id, key.clone());
        self.resumable.insert(id, key);
    }

    async fn take_resume(&self, token: &Token, check: UidCheck<'_>) -> EngineResult<Taken> {
        if token.node() != self.node {
            // Another node's connection: a single node knows nothing of it.
            return Ok(Err(Refusal::Unknown));
        }
        Ok(self
            .records
            .take(token, check, |old| self.hub.membership(old)))
    }

    async fn history_since(&self, stream: &str, offset: u64) -> EngineResult<HistoryRead> {
        Ok(self.history.read(stream, offset))
    }

    async fn publish_once(&self, push: Push, _dedup: String) -> EngineResult<()> {
        // One node: it is the only one that got the push.
        self.publish(push).await
    }

    async fn publish_stats(
        &self,
        stats: &crate::stats::NodeStats,
        _valid_for: std::time::Duration,
    ) -> EngineResult<()> {
        *self.stats.lock() = Some(stats.clone());
        Ok(())
    }

    async fn cluster_stats(&self) -> EngineResult<Vec<crate::stats::NodeStats>> {
        let now = crate::stats::unix_ms();
        Ok(self
            .stats
            .lock()
            .iter()
            .filter(|s| crate::stats::is_fresh(s, now))
            .cloned()
            .collect())
    }

    async fn groups_of(&self, id: ClientId) -> EngineResult<Vec<String>> {
        Ok(self
            .hub
            .membership(id)
            .map(|m| m.groups)
            .unwrap_or_default())
    }

    async fn tail(&self, target: crate::tail::TailTarget) -> EngineResult<crate::tail::Tail> {
        Ok(self.taps.watch(target))
    }

    async fn shutdown(&self) {
        self.stats.lock().take();
    }
}
