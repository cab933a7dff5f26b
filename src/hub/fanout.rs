//! Local fan-out: a push enqueued onto the outbox of every local connection
//! it targets, one shard at a time, the frame encoded once.

use std::cell::OnceCell;
use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;

use super::{HeldWakes, Hub, Local};
use crate::ids::ClientId;
use crate::outbox::{Limits, Outbox};
use crate::push::{Delivered, Push, Target};
use crate::push_latency::{self, Accepted, Probe, PushLatency};
use crate::recovery::framing::{self, PositionRef};
use crate::recovery::history::Replays;

/// The frames of one push, each encoded at the first recipient that needs
/// it and shared by the others: `plain`, exactly the bytes pushed, for most
/// connections; `framed`, header and payload, for those that opted in to
/// recovery.
pub struct Frames<'a> {
    /// The frame of exactly the bytes pushed.
    pub plain: &'a dyn Fn() -> Bytes,
    /// The frame with the recovery header.
    pub framed: &'a dyn Fn() -> Bytes,
    /// Where the push sits in its stream's history, if kept.
    pub position: Option<PositionRef<'a>>,
}

impl Hub {
    /// Enqueues a message at `position` (kept in history, or not) to the
    /// local connections `target` names, except `exclude`: both variants
    /// encoded from the message at most once.
    pub fn deliver_message(
        &self,
        target: &Target,
        exclude: &[ClientId],
        binary: bool,
        data: &[u8],
        position: Option<PositionRef<'_>>,
    ) -> Delivered {
        with_frames(binary, data, position, |frames| {
            self.deliver_with(target, exclude, frames)
        })
    }

    /// [`Hub::deliver_group_part`] of a message at `position`.
    pub fn deliver_group_message(
        &self,
        groups: &[&str],
        group: &str,
        exclude: &[ClientId],
        binary: bool,
        data: &[u8],
        position: Option<PositionRef<'_>>,
    ) -> Delivered {
        with_frames(binary, data, position, |frames| {
            self.deliver_group_part(groups, group, exclude, frames)
        })
    }
}

/// Runs `f` with the two variants of a message at `position`, each encoded
/// only if some recipient needs it.
fn with_frames<R>(
    binary: bool,
    data: &[u8],
    position: Option<PositionRef<'_>>,
    f: impl FnOnce(&Frames<'_>) -> R,
) -> R {
    let plain = || crate::push::encode_frame(binary, data);
    let framed = || framing::encode(binary, position, data);
    f(&Frames {
        plain: &plain,
        framed: &framed,
        position,
    })
}

impl Hub {
    /// Enqueues `push` to every local connection it targets. The frame is
    /// encoded once; each queue gets a reference to the same bytes.
    pub fn deliver(&self, push: &Push) -> Delivered {
        let m = &push.message;
        self.deliver_message(&push.target, &push.exclude, m.binary, &m.data, None)
    }

    /// Enqueues to the local connections `target` names, except those in
    /// `exclude`, the frames `frames` makes: each variant encoded once, at
    /// the first recipient that needs it, so a push with no recipient here
    /// costs no copy of its payload (the Redis engine hears of many of
    /// those).
    pub fn deliver_with(
        &self,
        target: &Target,
        exclude: &[ClientId],
        frames: &Frames<'_>,
    ) -> Delivered {
        let excluded = Exclusion::new(exclude);
        let mut sender = Sender::new(frames, &excluded, self);
        match target {
            Target::All => {
                for shard in self.shards.iter() {
                    let index = shard.read();
                    index.conns.iter().for_each(|(id, l)| sender.send(id, l));
                }
            }
            Target::Client(id) => {
                if let Some(local) = self.shard(*id).read().conns.get(id) {
                    sender.send(id, local);
                }
            }
            Target::Clients(ids) => {
                for id in distinct(ids) {
                    if let Some(local) = self.shard(*id).read().conns.get(id) {
                        sender.send(id, local);
                    }
                }
            }
            Target::Uids(uids) => {
                let uids: Vec<&String> = distinct(uids).collect();
                for shard in self.shards.iter() {
                    let index = shard.read();
                    // A connection has one uid, so distinct uids never overlap.
                    for uid in &uids {
                        for id in index.uids.get(uid.as_str()).into_iter().flatten() {
                            if let Some(local) = index.conns.get(id) {
                                sender.send(id, local);
                            }
                        }
                    }
                }
            }
            Target::Groups(groups) => {
                let groups: Vec<&String> = distinct(groups).collect();
                for shard in self.shards.iter() {
                    let index = shard.read();
                    // A connection lives in one shard: per-shard dedup is
                    // enough for a connection in several of the groups.
                    let mut seen = HashSet::new();
                    for group in &groups {
                        for id in index.groups.get(group.as_str()).into_iter().flatten() {
                            let Some(local) = index.conns.get(id) else {
                                continue;
                            };
                            if groups.len() == 1 || seen.insert(*id) {
                                sender.send(id, local);
                            }
                        }
                    }
                }
            }
        }
        sender.out
    }

    /// Delivers a push received on the channel of `group`, one of the
    /// push's `groups`: to the members of `group` that are in none of the
    /// groups listed before it. Each of those groups' channels brought the
    /// push to this node too (it holds their members), so every connection
    /// gets the push exactly once, from the first of its groups.
    pub fn deliver_group_part(
        &self,
        groups: &[&str],
        group: &str,
        exclude: &[ClientId],
        frames: &Frames<'_>,
    ) -> Delivered {
        let earlier = match groups.iter().position(|g| *g == group) {
            Some(pos) => &groups[..pos],
            None => &[],
        };
        // Linear: the list is read once (a set past a handful), then each
        // member costs a lookup per group it is in, whatever the list's
        // length (10,000 groups from Redis cost 10,000, not 10,000 per
        // member).
        let earlier = Earlier::new(earlier);
        let excluded = Exclusion::new(exclude);
        let mut sender = Sender::new(frames, &excluded, self);
        for shard in self.shards.iter() {
            let index = shard.read();
            for id in index.groups.get(group).into_iter().flatten() {
                let Some(local) = index.conns.get(id) else {
                    continue;
                };
                if !local.groups.iter().any(|m| earlier.contains(m)) {
                    sender.send(id, local);
                }
            }
        }
        sender.out
    }
}

/// Enqueues one push's frames, each encoded at the first recipient that
/// needs it.
struct Sender<'a> {
    plain: OnceCell<Bytes>,
    framed: OnceCell<Bytes>,
    frames: &'a Frames<'a>,
    excluded: &'a Exclusion<'a>,
    limits: &'a Limits,
    replays: &'a Replays,
    out: Delivered,
    /// Push-to-frame sampling: the accept time, and for each variant
    /// (plain, framed) its probe and how many queues took it.
    latency: &'a PushLatency,
    accepted: Option<Accepted>,
    probes: [(Option<Probe>, usize); 2],
    /// Both variants are one frame (see [`Sender::variant`]).
    one_frame: bool,
    /// `--write-delay`: where the writers' wake-ups go, and those of this
    /// push, handed over at once when it is done.
    held_wakes: Option<&'a HeldWakes>,
    to_wake: Vec<Arc<Outbox>>,
}

impl<'a> Sender<'a> {
    fn new(frames: &'a Frames<'a>, excluded: &'a Exclusion<'a>, hub: &'a Hub) -> Self {
        Sender {
            plain: OnceCell::new(),
            framed: OnceCell::new(),
            frames,
            excluded,
            limits: &hub.limits,
            replays: &hub.replays,
            out: Delivered::default(),
            latency: &hub.push_latency,
            accepted: push_latency::current(),
            probes: [(None, 0); 2],
            one_frame: false,
            held_wakes: hub.held_wakes().map(|h| &**h),
            to_wake: Vec::new(),
        }
    }

    /// A variant's frame, encoded (and maybe registered as a probe) by its
    /// first recipient.
    fn variant(&mut self, framed: bool) -> Bytes {
        let (cell, make) = match framed {
            true => (&self.framed, self.frames.framed),
            false => (&self.plain, self.frames.plain),
        };
        if let Some(frame) = cell.get() {
            return frame.clone();
        }
        let frame = cell.get_or_init(make).clone();
        let other = match framed {
            true => self.plain.get(),
            false => self.framed.get(),
        };
        if other.is_some_and(|o| o.as_ptr() == frame.as_ptr()) {
            // One frame for both (GatewayWorker's raw frames): the probe
            // of the first counts the recipients of both.
            self.one_frame = true;
        } else if let Some(accepted) = self.accepted {
            self.probes[usize::from(framed)].0 = self.latency.register(&frame, accepted);
        }
        frame
    }

    fn send(&mut self, id: &ClientId, local: &Local) {
        if self.excluded.contains(id) {
            return;
        }
        let framed = local.outbox.is_framed();
        let position = if framed { self.frames.position } else { None };
        let frame = self.variant(framed);
        let replays = self.replays;
        // Not one already given by this connection's replay: checked under
        // the outbox's lock, where the replay sets it (history::replay).
        let admits = || position.is_none_or(|p| replays.admits(id, p));
        let pushed = match self.held_wakes {
            None => local.outbox.push_if(frame, self.limits, admits),
            Some(_) => local
                .outbox
                .push_held(frame, self.limits, admits)
                .map(|(queued, wake)| {
                    if wake {
                        self.to_wake.push(local.outbox.clone());
                    }
                    queued
                }),
        };
        match pushed {
            Ok(queued) => {
                self.out.queued += 1;
                // A probe waits only for the writes that will happen.
                self.probes[usize::from(framed)].1 += usize::from(queued);
            }
            Err(_) => self.out.overflowed += 1,
        }
    }
}

impl Drop for Sender<'_> {
    fn drop(&mut self) {
        if let Some(held) = self.held_wakes {
            held.hold(&mut self.to_wake);
        }
        let [(plain, plain_n), (framed, framed_n)] = self.probes;
        if self.one_frame {
            if let Some(probe) = plain.or(framed) {
                self.latency.expect(probe, plain_n + framed_n);
            }
            return;
        }
        for (probe, queued) in self.probes {
            if let Some(probe) = probe {
                self.latency.expect(probe, queued);
            }
        }
    }
}

/// The groups listed before a channel's group; a set only when long.
enum Earlier<'a> {
    Few(&'a [&'a str]),
    Many(HashSet<&'a str>),
}

impl<'a> Earlier<'a> {
    fn new(groups: &'a [&'a str]) -> Self {
        if groups.len() <= 8 {
            Earlier::Few(groups)
        } else {
            Earlier::Many(groups.iter().copied().collect())
        }
    }

    fn contains(&self, group: &str) -> bool {
        match self {
            Earlier::Few(groups) => groups.contains(&group),
            Earlier::Many(set) => set.contains(group),
        }
    }
}

/// Connections a push skips; a set only when the list is long.
enum Exclusion<'a> {
    Few(&'a [ClientId]),
    Many(HashSet<ClientId>),
}

impl<'a> Exclusion<'a> {
    fn new(ids: &'a [ClientId]) -> Self {
        if ids.len() <= 8 {
            Exclusion::Few(ids)
        } else {
            Exclusion::Many(ids.iter().copied().collect())
        }
    }

    fn contains(&self, id: &ClientId) -> bool {
        match self {
            Exclusion::Few(ids) => ids.contains(id),
            Exclusion::Many(set) => set.contains(id),
        }
    }
}

/// The distinct items of `items`, in order: a set past a handful, so a
/// list of 80k client_ids costs O(n), not O(n²).
fn distinct<T: Eq + std::hash::Hash>(items: &[T]) -> impl Iterator<Item = &T> {
    let mut seen: HashSet<&T> = HashSet::new();
    let few = items.len() <= 8;
    items
        .iter()
        .enumerate()
        .filter(move |(i, item)| {
            if few {
                !items[..*i].contains(item)
            } else {
                seen.insert(*item)
            }
        })
        .map(|(_, item)| item)
}
