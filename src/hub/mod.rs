//! The connections this node holds, indexed by uid and group, and local
//! fan-out.
//!
//! The hub is the source of truth for this node's own connections whatever
//! the engine: the in-process engine answers every query from it, and the
//! Redis engine mirrors it to Redis (and re-registers it after Redis lost
//! its data).
//!
//! The index is sharded by client_id, each shard under its own `RwLock`
//! held for short, synchronous sections only, never across an `.await`: a
//! push collects nothing, it enqueues onto each recipient's outbox under a
//! shard's read lock, one shard at a time. So a `send_to_all` to 100k
//! connections never holds one lock over all of them, and connects,
//! disconnects and membership changes in other shards go on meanwhile.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::ids::ClientId;
use crate::outbox::{Limits, Outbox};
use crate::session::{self, Session, SessionError};

mod fanout;
mod members;
mod sweep;
mod wakes;

pub use fanout::Frames;
use members::Members;
pub use sweep::Pings;
pub use wakes::HeldWakes;

/// One local connection's state.
#[derive(Debug)]
pub struct Local {
    /// Its outgoing queue.
    pub outbox: Arc<Outbox>,
    /// The uid bound to it.
    pub uid: Option<String>,
    /// The groups it is in.
    pub groups: Vec<String>,
    /// Its session; `None` while empty. Boxed: a map is 72 bytes inline,
    /// in every connection's index slot, and most connections have none.
    pub session: Option<Box<Session>>,
}

/// A snapshot of one connection's membership, for mirroring to storage.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Membership {
    /// The uid bound to it.
    pub uid: Option<String>,
    /// The groups it is in.
    pub groups: Vec<String>,
    /// Its session.
    pub session: Session,
}

#[derive(Debug, Default)]
struct Index {
    conns: HashMap<ClientId, Local>,
    uids: HashMap<String, Vec<ClientId>>,
    /// Boxed names: a slot is 16 bytes smaller than with a `String`, and
    /// a group is a slot in every shard that holds one of its members.
    groups: HashMap<Box<str>, Members>,
}

/// Shards of the index. A power of two well above the core count, so two
/// threads rarely want the same shard.
const SHARDS: usize = 16;

/// The local connection registry.
#[derive(Debug)]
pub struct Hub {
    shards: Box<[RwLock<Index>]>,
    clock: Instant,
    limits: Limits,
    /// `--max-session-bytes`.
    max_session_bytes: usize,
    /// Replays running here and what they already gave (recovery).
    pub replays: Arc<crate::recovery::history::Replays>,
    /// Inner-port pushes seen lately, to keep each in history once.
    pub inner_pushes: crate::recovery::history::InnerPushes,
    /// Push-to-frame probes: frames registered at fan-out, measured by
    /// the writers.
    pub push_latency: crate::push_latency::PushLatency,
    /// `--write-delay`: writers' wake-ups held and made together; `None`
    /// when off.
    held_wakes: Option<Arc<HeldWakes>>,
}

/// A connection with an unfinished client message (see [`Hub::incomplete`]).
#[derive(Debug)]
pub struct Incomplete {
    /// Since when (hub clock, ms).
    pub since: u64,
    /// Bytes its reader holds.
    pub bytes: usize,
    /// Its queue, to close it.
    pub outbox: Arc<Outbox>,
}

impl Hub {
    /// An empty hub whose connections queue at most `limits`.
    pub fn new(limits: Limits) -> Self {
        Hub {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            clock: Instant::now(),
            limits,
            max_session_bytes: session::DEFAULT_MAX_BYTES,
            replays: Arc::default(),
            inner_pushes: Default::default(),
            push_latency: Default::default(),
            held_wakes: None,
        }
    }

    /// This hub, holding its fan-outs' wake-ups of writers for `delay`
    /// (`--write-delay`; 0: off). [`HeldWakes::run`] must then run.
    pub fn with_write_delay(mut self, delay: Duration) -> Self {
        self.held_wakes = (!delay.is_zero()).then(|| Arc::new(HeldWakes::new(delay)));
        self
    }

    /// The held wake-ups, when `--write-delay` is on.
    pub fn held_wakes(&self) -> Option<&Arc<HeldWakes>> {
        self.held_wakes.as_ref()
    }

    /// This hub, measuring push-to-frame latency into `probes`' histograms.
    pub fn with_push_latency(mut self, probes: crate::push_latency::PushLatency) -> Self {
        self.push_latency = probes;
        self
    }

    /// This hub, holding sessions to `max_bytes` (`--max-session-bytes`).
    pub fn with_max_session_bytes(mut self, max_bytes: usize) -> Self {
        self.max_session_bytes = max_bytes;
        self
    }

    /// `--max-session-bytes`.
    pub fn max_session_bytes(&self) -> usize {
        self.max_session_bytes
    }

    /// The shard that holds `id`. Connection numbers are consecutive, so
    /// their low bits spread connections evenly.
    fn shard(&self, id: ClientId) -> &RwLock<Index> {
        &self.shards[id.number() as usize % SHARDS]
    }

    /// What each connection's queue may hold.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Milliseconds since the hub started: the clock of `Outbox::touch`.
    pub fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// The hub's clock at Unix time `unix_ms` (now, when that is past).
    pub fn unix_ms_to_hub_ms(&self, unix_ms: u64) -> u64 {
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.now_ms() + unix_ms.saturating_sub(now_unix)
    }

    /// Adds a connection with its initial membership.
    pub fn insert(&self, id: ClientId, outbox: Arc<Outbox>, membership: Membership) {
        outbox.touch(self.now_ms());
        let mut index = self.shard(id).write();
        let Membership {
            uid,
            groups,
            session,
        } = membership;
        if let Some(uid) = &uid {
            index.link_uid(uid, id);
        }
        for group in &groups {
            index
                .groups
                .entry(group.as_str().into())
                .or_default()
                .insert(id);
        }
        index.conns.insert(
            id,
            Local {
                outbox,
                uid,
                groups,
                session: boxed(session),
            },
        );
    }

    /// Removes a connection from every index; returns what it was in.
    pub fn remove(&self, id: ClientId) -> Option<Membership> {
        self.replays.clear(id);
        let mut index = self.shard(id).write();
        let local = index.conns.remove(&id)?;
        if let Some(uid) = &local.uid {
            index.unlink_uid(uid, id);
        }
        for group in &local.groups {
            index.unlink_group(group, id);
        }
        Some(Membership {
            uid: local.uid,
            groups: local.groups,
            session: local.session.map(|s| *s).unwrap_or_default(),
        })
    }

    /// Whether this node holds `id`.
    pub fn contains(&self, id: ClientId) -> bool {
        self.shard(id).read().conns.contains_key(&id)
    }

    /// The membership of `id`, when here.
    pub fn membership(&self, id: ClientId) -> Option<Membership> {
        self.shard(id).read().conns.get(&id).map(Local::membership)
    }

    /// The queue of `id` when it is here and opted in to recovery (its
    /// pushes are framed), and whether it is a member of `stream` (a
    /// recovery stream name: `u:<uid>`, `g:<group>`, `all`).
    pub fn framed_member(&self, id: ClientId, stream: &str) -> Option<Arc<Outbox>> {
        let index = self.shard(id).read();
        let local = index.conns.get(&id).filter(|l| l.outbox.is_framed())?;
        let member = stream == "all"
            || stream
                .strip_prefix("u:")
                .is_some_and(|u| local.uid.as_deref() == Some(u))
            || stream
                .strip_prefix("g:")
                .is_some_and(|g| local.groups.iter().any(|m| m == g));
        member.then(|| local.outbox.clone())
    }

    /// Binds `uid` to `id`, replacing any other uid. Returns `None` when the
    /// connection is not here, else the uid it had before.
    pub fn bind_uid(&self, id: ClientId, uid: &str) -> Option<Option<String>> {
        let mut index = self.shard(id).write();
        let local = index.conns.get_mut(&id)?;
        if local.uid.as_deref() == Some(uid) {
            return Some(Some(uid.to_owned()));
        }
        let previous = local.uid.replace(uid.to_owned());
        if let Some(previous) = &previous {
            index.unlink_uid(previous, id);
        }
        index.link_uid(uid, id);
        Some(previous)
    }

    /// Unbinds `uid` from `id` if that is the uid it has. Returns whether it
    /// was unbound.
    pub fn unbind_uid(&self, id: ClientId, uid: &str) -> bool {
        let mut index = self.shard(id).write();
        let Some(local) = index.conns.get_mut(&id) else {
            return false;
        };
        if local.uid.as_deref() != Some(uid) {
            return false;
        }
        local.uid = None;
        index.unlink_uid(uid, id);
        true
    }

    /// Adds `id` to `group`. Returns `None` when the connection is not here,
    /// else whether it was newly added.
    pub fn join_group(&self, id: ClientId, group: &str) -> Option<bool> {
        let mut index = self.shard(id).write();
        let local = index.conns.get_mut(&id)?;
        if local.groups.iter().any(|g| g == group) {
            return Some(false);
        }
        // Exact: most connections are in one or two groups, and a first
        // push would reserve room for four (96 bytes each connection).
        local.groups.reserve_exact(1);
        local.groups.push(group.to_owned());
        index.groups.entry(group.into()).or_default().insert(id);
        Some(true)
    }

    /// Removes `id` from `group`. Returns whether it was a member.
    pub fn leave_group(&self, id: ClientId, group: &str) -> bool {
        let mut index = self.shard(id).write();
        let Some(local) = index.conns.get_mut(&id) else {
            return false;
        };
        let Some(pos) = local.groups.iter().position(|g| g == group) else {
            return false;
        };
        local.groups.swap_remove(pos);
        index.unlink_group(group, id);
        true
    }

    /// Removes every local member from `group`; returns who was in it.
    pub fn ungroup(&self, group: &str) -> Vec<ClientId> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let mut index = shard.write();
            let Some(members) = index.groups.remove(group) else {
                continue;
            };
            for id in &members {
                if let Some(local) = index.conns.get_mut(id) {
                    local.groups.retain(|g| g != group);
                }
            }
            out.extend(members.iter().copied());
        }
        out
    }

    /// Replaces (or with `merge`, merges into) the session of `id`. Returns
    /// the resulting session, or `None` when the connection is not here.
    /// A result over `--max-session-bytes` or [`session::MAX_DEPTH`] is
    /// refused and the session stays as it was: every path that changes a
    /// session comes here, so none can grow one past the bounds.
    pub fn set_session(
        &self,
        id: ClientId,
        update: Session,
        merge: bool,
    ) -> Result<Option<Session>, SessionError> {
        if !merge {
            // Checked before the lock: a replacement is judged alone.
            session::check(&update, self.max_session_bytes)?;
        }
        let mut index = self.shard(id).write();
        let Some(local) = index.conns.get_mut(&id) else {
            return Ok(None);
        };
        let session = match merge {
            true => {
                let mut merged = local.session.as_deref().cloned().unwrap_or_default();
                session::merge(&mut merged, update);
                session::check(&merged, self.max_session_bytes)?;
                merged
            }
            false => update,
        };
        local.session = boxed(session.clone());
        Ok(Some(session))
    }

    /// Asks `id` to close, after `last` (if any) and what is already
    /// queued. Returns whether the connection is here.
    pub fn close_client(
        &self,
        id: ClientId,
        last: Option<crate::push::LastFrame>,
        code: u16,
        reason: &str,
    ) -> bool {
        let index = self.shard(id).read();
        let Some(local) = index.conns.get(&id) else {
            return false;
        };
        if let Some(last) = last {
            let frame = match local.outbox.is_framed() {
                true => last.framed,
                false => last.plain,
            };
            // Room is made for the last message even in a full queue.
            let _ = local.outbox.push(frame, &self.limits.one_more());
        }
        local.outbox.close(code, reason, false);
        true
    }

    /// Asks `id` to close after what is queued, unless it is closing
    /// already. Returns whether this call started its close (a connection
    /// that is closing stays here until its close handshake ends, and must
    /// not be counted twice).
    pub fn close_if_open(&self, id: ClientId, code: u16, reason: &str) -> bool {
        let index = self.shard(id).read();
        let Some(local) = index.conns.get(&id) else {
            return false;
        };
        if local.outbox.is_closing() {
            return false;
        }
        local.outbox.close(code, reason, false);
        true
    }

    /// Closes `id` at once, dropping what is queued for it (GatewayWorker's
    /// `destroyClient`). Returns whether the connection is here.
    pub fn destroy_client(&self, id: ClientId, code: u16, reason: &str) -> bool {
        let index = self.shard(id).read();
        let Some(local) = index.conns.get(&id) else {
            return false;
        };
        local.outbox.close(code, reason, true);
        true
    }

    /// Asks every connection to close (shutdown).
    pub fn close_all(&self, code: u16, reason: &str) {
        for shard in self.shards.iter() {
            for local in shard.read().conns.values() {
                local.outbox.close(code, reason, false);
            }
        }
    }

    /// Asks every connection to close, in slices spread over `spread` (one
    /// every 100ms), so the clients' reconnects reach the other nodes over
    /// that time rather than in one burst. Each close gets its own
    /// `reason()` (a reconnect delay of its own). No lock is held across a
    /// sleep; connections that arrive meanwhile are closed with the last
    /// slice. A zero `spread` closes every connection at once.
    pub async fn close_all_spread(&self, code: u16, reason: impl Fn() -> String, spread: Duration) {
        const STEP: Duration = Duration::from_millis(100);
        if spread.is_zero() {
            return self.close_rest(code, &reason);
        }
        let ids: Vec<ClientId> = self
            .shards
            .iter()
            .flat_map(|shard| shard.read().conns.keys().copied().collect::<Vec<_>>())
            .collect();
        let slices = (spread.as_millis() / STEP.as_millis()).clamp(1, u32::MAX as u128) as u32;
        let per_slice = ids.len().div_ceil(slices as usize).max(1);
        let mut ticker = tokio::time::interval(spread / slices);
        for chunk in ids.chunks(per_slice) {
            ticker.tick().await;
            for id in chunk {
                if let Some(local) = self.shard(*id).read().conns.get(id) {
                    local.outbox.close(code, &reason(), false);
                }
            }
        }
        self.close_rest(code, &reason);
    }

    /// Closes every connection not closing yet, each with its own reason.
    fn close_rest(&self, code: u16, reason: &impl Fn() -> String) {
        for shard in self.shards.iter() {
            for local in shard.read().conns.values() {
                if !local.outbox.is_closing() {
                    local.outbox.close(code, &reason(), false);
                }
            }
        }
    }

    /// Every local connection holding an unfinished client message: since
    /// when, how many bytes, and its outbox (to close it).
    pub fn incomplete(&self) -> Vec<Incomplete> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for local in shard.read().conns.values() {
                if let Some(since) = local.outbox.incomplete_since() {
                    out.push(Incomplete {
                        since,
                        bytes: local.outbox.partial_bytes(),
                        outbox: local.outbox.clone(),
                    });
                }
            }
        }
        out
    }

    /// A snapshot of every local connection's membership.
    pub fn snapshot(&self) -> Vec<(ClientId, Membership)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let index = shard.read();
            out.extend(index.conns.iter().map(|(id, l)| (*id, l.membership())));
        }
        out
    }

    /// The groups that have at least one local member.
    pub fn groups(&self) -> Vec<String> {
        self.distinct_keys(|index, out| out.extend(index.groups.keys().map(|g| g.to_string())))
    }

    /// Whether a local connection is bound to `uid`.
    pub fn has_uid(&self, uid: &str) -> bool {
        self.shards.iter().any(|s| s.read().uids.contains_key(uid))
    }

    /// Whether `group` has a local member.
    pub fn has_group(&self, group: &str) -> bool {
        self.shards
            .iter()
            .any(|s| s.read().groups.contains_key(group))
    }

    /// The uid bound to `id`: `None` when not here, `Some(None)` when unbound.
    pub fn uid_of(&self, id: ClientId) -> Option<Option<String>> {
        self.shard(id).read().conns.get(&id).map(|l| l.uid.clone())
    }

    /// The session of `id`, when here.
    pub fn session_of(&self, id: ClientId) -> Option<Session> {
        self.shard(id).read().conns.get(&id).map(Local::session)
    }

    /// Local connections bound to `uid`.
    pub fn client_ids_by_uid(&self, uid: &str) -> Vec<ClientId> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            out.extend(shard.read().uids.get(uid).into_iter().flatten().copied());
        }
        out
    }

    /// Local members of `group`.
    pub fn group_client_ids(&self, group: &str) -> Vec<ClientId> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            out.extend(
                shard
                    .read()
                    .groups
                    .get(group)
                    .into_iter()
                    .flatten()
                    .copied(),
            );
        }
        out
    }

    /// How many local members `group` has.
    pub fn group_client_count(&self, group: &str) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().groups.get(group).map_or(0, Members::len))
            .sum()
    }

    /// Local members of `group` with their sessions.
    pub fn group_sessions(&self, group: &str) -> Vec<(ClientId, Session)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let index = shard.read();
            let members = index.groups.get(group).into_iter().flatten();
            out.extend(members.filter_map(|id| Some((*id, index.conns.get(id)?.session()))));
        }
        out
    }

    /// Distinct uids bound to local members of `group`.
    pub fn group_uids(&self, group: &str) -> Vec<String> {
        let mut uids = HashSet::new();
        for shard in self.shards.iter() {
            let index = shard.read();
            let members = index.groups.get(group).into_iter().flatten();
            uids.extend(members.filter_map(|id| index.conns.get(id)?.uid.clone()));
        }
        uids.into_iter().collect()
    }

    /// How many connections this node holds.
    pub fn client_count(&self) -> usize {
        self.shards.iter().map(|s| s.read().conns.len()).sum()
    }

    /// Every local connection.
    pub fn client_ids(&self) -> Vec<ClientId> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            out.extend(shard.read().conns.keys().copied());
        }
        out
    }

    /// Every local connection with its session.
    pub fn sessions(&self) -> Vec<(ClientId, Session)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let index = shard.read();
            out.extend(index.conns.iter().map(|(id, l)| (*id, l.session())));
        }
        out
    }

    /// Every uid bound to a local connection.
    pub fn uids(&self) -> Vec<String> {
        self.distinct_keys(|index, out| out.extend(index.uids.keys().cloned()))
    }

    /// How many distinct uids are bound to local connections.
    pub fn uid_count(&self) -> usize {
        self.uids().len()
    }

    /// The distinct names `names` gives in every shard (a uid or group may
    /// have members in several shards).
    fn distinct_keys(&self, names: impl Fn(&Index, &mut HashSet<String>)) -> Vec<String> {
        let mut out = HashSet::new();
        for shard in self.shards.iter() {
            names(&shard.read(), &mut out);
        }
        out.into_iter().collect()
    }
}

impl Local {
    fn membership(&self) -> Membership {
        Membership {
            uid: self.uid.clone(),
            groups: self.groups.clone(),
            session: self.session(),
        }
    }

    fn session(&self) -> Session {
        self.session.as_deref().cloned().unwrap_or_default()
    }
}

/// A session as a connection keeps it: nothing while empty.
fn boxed(session: Session) -> Option<Box<Session>> {
    (!session.is_empty()).then(|| Box::new(session))
}

impl Index {
    /// Adds `id` under `uid`. A uid's first connection gets a list of
    /// exactly one: most uids have one connection, and a first push would
    /// reserve room for four.
    fn link_uid(&mut self, uid: &str, id: ClientId) {
        match self.uids.get_mut(uid) {
            Some(ids) => ids.push(id),
            None => {
                // `vec![]` allocates exactly its items.
                self.uids.insert(uid.to_owned(), vec![id]);
            }
        }
    }

    fn unlink_uid(&mut self, uid: &str, id: ClientId) {
        if let Entry::Occupied(mut e) = self.uids.entry(uid.to_owned()) {
            e.get_mut().retain(|c| *c != id);
            if e.get().is_empty() {
                e.remove();
            }
        }
    }

    fn unlink_group(&mut self, group: &str, id: ClientId) {
        if let Some(members) = self.groups.get_mut(group) {
            members.remove(&id);
            if members.is_empty() {
                self.groups.remove(group);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{IdMinter, NodeId};
    use crate::push::{Message, Push, Target};
    use bytes::Bytes;
    use std::collections::VecDeque;

    fn hub_with(n: usize) -> (Hub, Vec<(ClientId, Arc<Outbox>)>) {
        let hub = Hub::new(Limits {
            frames: 16,
            bytes: 1 << 20,
        });
        let minter = IdMinter::new(NodeId::new(std::net::Ipv4Addr::LOCALHOST, 1));
        let conns = (0..n)
            .map(|_| {
                let id = minter.mint();
                let outbox = Arc::new(Outbox::default());
                hub.insert(id, outbox.clone(), Membership::default());
                (id, outbox)
            })
            .collect();
        (hub, conns)
    }

    #[test]
    fn a_group_part_listing_many_groups_costs_linear_work() {
        // 500 members of "last", each in 200 other groups, none listed
        // before it among 20,000: the quadratic check compared 500 × 20,000
        // × 200 names (many seconds); the linear one 500 × 200 lookups.
        let (hub, conns) = hub_with(500);
        for (id, _) in &conns {
            hub.join_group(*id, "last");
            for g in 0..200 {
                hub.join_group(*id, &format!("mine{g:05}"));
            }
        }
        let names: Vec<String> = (0..20_000).map(|g| format!("list{g:05}")).collect();
        let mut groups: Vec<&str> = names.iter().map(String::as_str).collect();
        groups.push("last");
        let x = || bytes::Bytes::from_static(b"x");
        let frame = super::fanout::Frames {
            plain: &x,
            framed: &x,
            position: None,
        };
        let started = std::time::Instant::now();
        let delivered = hub.deliver_group_part(&groups, "last", &[], &frame);
        let took = started.elapsed();
        assert_eq!(delivered.queued, 500, "every member, once");
        assert!(took < std::time::Duration::from_secs(2), "took {took:?}");
        // A member of an earlier group is still skipped here.
        hub.join_group(conns[0].0, "list12345");
        let delivered = hub.deliver_group_part(&groups, "last", &[], &frame);
        assert_eq!(delivered.queued, 499);
    }

    #[test]
    fn group_push_reaches_each_member_once_sharing_one_frame() {
        let (hub, conns) = hub_with(3);
        let (a, b, c) = (conns[0].0, conns[1].0, conns[2].0);
        hub.join_group(a, "g1");
        hub.join_group(a, "g2");
        hub.join_group(b, "g2");
        hub.join_group(c, "g2");
        let push = Push {
            target: Target::Groups(vec!["g1".into(), "g2".into()]),
            exclude: vec![c],
            message: Message::text("hi"),
            history: None,
        };
        assert_eq!(hub.deliver(&push).queued, 2);
        let mut frames = Vec::new();
        for (_, outbox) in &conns {
            let mut batch = VecDeque::new();
            outbox.take(&mut batch);
            frames.push(batch);
        }
        assert_eq!(frames[0].len(), 1);
        assert_eq!(frames[1].len(), 1);
        assert!(frames[2].is_empty());
        // The same allocation, not a copy per recipient.
        assert_eq!(frames[0][0].as_ptr(), frames[1][0].as_ptr());
    }

    #[test]
    fn a_sampled_push_is_measured_at_each_recipient_then_frees_its_slot() {
        use crate::push_latency::{self, Accepted};
        let (hub, conns) = hub_with(3);
        conns[2].1.set_framed();
        let write_all = || {
            for (_, outbox) in &conns {
                let mut batch = VecDeque::new();
                outbox.take(&mut batch);
                for frame in &batch {
                    hub.push_latency.written(frame);
                }
            }
        };
        let raw = Bytes::from(vec![0x81, 1, b'x']);
        // Plain and framed variants, and GatewayWorker's raw frame, which
        // is one frame for both: either way the slot frees once all three
        // wrote theirs.
        for same in [false, true] {
            let plain = || raw.clone();
            let framed = || match same {
                true => raw.clone(),
                false => Bytes::from(b"other".to_vec()),
            };
            let frames = super::fanout::Frames {
                plain: &plain,
                framed: &framed,
                position: None,
            };
            let delivered = push_latency::with(Some(Accepted::now()), || {
                hub.deliver_with(&crate::push::Target::All, &[], &frames)
            });
            assert_eq!(delivered.queued, 3);
            assert!(hub.push_latency.active() > 0, "sampled");
            write_all();
            assert_eq!(hub.push_latency.active(), 0, "same frame: {same}");
        }
        // Without an accept time nothing is sampled.
        hub.deliver(&Push {
            target: crate::push::Target::All,
            exclude: vec![],
            message: Message::text("x"),
            history: None,
        });
        assert_eq!(hub.push_latency.active(), 0);
        write_all();
    }

    #[test]
    fn remove_leaves_uid_and_groups() {
        let (hub, conns) = hub_with(2);
        let (a, b) = (conns[0].0, conns[1].0);
        hub.bind_uid(a, "u");
        hub.bind_uid(b, "u");
        hub.join_group(a, "g");
        let m = hub.remove(a).unwrap();
        assert_eq!(m.uid.as_deref(), Some("u"));
        assert_eq!(hub.client_ids_by_uid("u"), vec![b]);
        assert!(!hub.has_group("g"));
        assert_eq!(hub.client_count(), 1);
    }

    #[test]
    fn binding_another_uid_replaces_the_first() {
        let (hub, conns) = hub_with(1);
        let a = conns[0].0;
        hub.bind_uid(a, "u1");
        assert_eq!(hub.bind_uid(a, "u2"), Some(Some("u1".into())));
        assert!(hub.client_ids_by_uid("u1").is_empty());
        assert!(!hub.unbind_uid(a, "u1"));
        assert!(hub.unbind_uid(a, "u2"));
        assert_eq!(hub.uid_count(), 0);
    }
}
