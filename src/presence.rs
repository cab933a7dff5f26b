//! Presence events (`--presence-events`): a uid online / offline, a group
//! occupied / vacated, cluster-wide. The transitions are decided where the
//! membership lives (the Redis scripts that write a node's partition, or
//! the hub of a single node) and handed to the node as [`Notice`]s, which
//! become events ([`deliver`]). The node that purges a dead one hands on
//! the dead node's close events the same way.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::events::{Detail, Event, PresenceChange};
use crate::gateway::Gateway;
use crate::gatewayworker::php::session_to_php;
use crate::gatewayworker::workers::{Event as WorkerEvent, Route};
use crate::hub::Hub;
use crate::ids::{ClientId, NodeId};
use crate::session::Session;

/// Notices waiting to become events. A full queue drops (counted as
/// dropped events), as the events queue does.
pub const QUEUE: usize = 10_000;

/// Which presence events are on.
#[derive(Debug, Clone, Default)]
pub struct PresenceSettings {
    /// online / offline of uids.
    pub uid: bool,
    /// occupied / vacated of groups.
    pub group: bool,
    /// `--presence-grace`.
    pub grace: Duration,
    /// `--presence-prefixes`: only uids and groups whose name starts with
    /// one of these have events (empty: all).
    pub prefixes: Vec<String>,
}

impl PresenceSettings {
    /// Whether any presence event is on.
    pub fn any(&self) -> bool {
        self.uid || self.group
    }

    /// Whether `name` (a uid or a group) has events, by its prefix.
    pub fn watches(&self, name: &str) -> bool {
        self.prefixes.is_empty() || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }

    /// The flags the scripts take: `u`, `g`, `ug` or `` (off), then the
    /// prefixes, each after a newline (presence.lua splits them off).
    pub fn flags(&self) -> String {
        let kinds = match (self.uid, self.group) {
            (true, true) => "ug",
            (true, false) => "u",
            (false, true) => "g",
            (false, false) => "",
        };
        let mut flags = kinds.to_owned();
        for prefix in &self.prefixes {
            flags.push('\n');
            flags.push_str(prefix);
        }
        flags
    }
}

/// Something an engine learnt that becomes an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// A presence transition, decided once for the whole cluster.
    Presence {
        /// What changed.
        change: PresenceChange,
        /// The uid or group.
        name: String,
        /// Orders the transitions of one name (Redis's clock in µs at the
        /// decision, strictly increasing per name).
        seq: u64,
    },
    /// A connection of a dead node, purged by this one.
    Closed {
        /// The connection.
        client_id: ClientId,
        /// Its uid when it was purged.
        uid: Option<String>,
        /// Its session when it was purged.
        session: Session,
    },
}

/// Where an engine sends its notices: never waits, drops when full.
#[derive(Debug, Clone)]
pub struct Notices {
    tx: mpsc::Sender<Notice>,
}

impl Notices {
    /// The handle and its receiving end.
    pub fn new() -> (Self, mpsc::Receiver<Notice>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Notices { tx }, rx)
    }

    /// Queues a notice; false when it was dropped (queue full).
    pub fn send(&self, notice: Notice) -> bool {
        self.tx.try_send(notice).is_ok()
    }

    /// Queues a notice, waiting up to [`WAIT`] for room: for background
    /// tasks (purges, due transitions) whose bursts may pass the queue.
    pub async fn send_wait(&self, notice: Notice) -> bool {
        tokio::time::timeout(WAIT, self.tx.send(notice))
            .await
            .is_ok_and(|sent| sent.is_ok())
    }
}

/// Presence decided from the hub, for the in-process engine (one node: the
/// hub is the whole gateway). Every change of a name is reconciled with
/// the hub under one lock, so transitions alternate and end in the truth.
#[derive(Debug, Default)]
pub struct LocalPresence {
    settings: PresenceSettings,
    notices: Option<Notices>,
    /// Names announced present, or waiting out their grace (with the
    /// generation that started it).
    state: std::sync::Arc<parking_lot::Mutex<LocalState>>,
}

#[derive(Debug, Default)]
struct LocalState {
    names: std::collections::HashMap<(bool, String), Option<u64>>,
    next: u64,
}

impl LocalPresence {
    /// Presence from the hub, as `settings` say, to `notices`.
    pub fn new(settings: PresenceSettings, notices: Option<Notices>) -> Self {
        LocalPresence {
            notices: notices.filter(|_| settings.any()),
            settings,
            state: Default::default(),
        }
    }

    /// Whether `uid` events are on (else nothing needs reconciling).
    pub fn uids(&self) -> bool {
        self.notices.is_some() && self.settings.uid
    }

    /// Whether `group` events are on.
    pub fn groups(&self) -> bool {
        self.notices.is_some() && self.settings.group
    }

    /// Reconciles `name` (a uid when `uid`, else a group) with what `hub`
    /// holds now, after a change that may have touched it.
    pub fn reconcile(&self, hub: &std::sync::Arc<Hub>, uid: bool, name: &str) {
        let Some(notices) = &self.notices else { return };
        let held = move |hub: &Hub, name: &str| {
            if uid {
                hub.has_uid(name)
            } else {
                hub.has_group(name)
            }
        };
        if (uid && !self.settings.uid) || (!uid && !self.settings.group) {
            return;
        }
        if !self.settings.watches(name) {
            return;
        }
        let (on, off) = if uid {
            (PresenceChange::Online, PresenceChange::Offline)
        } else {
            (PresenceChange::Occupied, PresenceChange::Vacated)
        };
        let key = (uid, name.to_owned());
        // Read under the lock: concurrent changes of one name are reconciled
        // one after the other, each with the hub as it is then.
        let mut state = self.state.lock();
        let present = held(hub, name);
        state.next += 1;
        let seq = state.next;
        match (present, state.names.get(&key).copied()) {
            (true, None) => {
                state.names.insert(key, None);
                notices.send(Notice::Presence {
                    change: on,
                    name: name.to_owned(),
                    seq,
                });
            }
            // Back within the grace: neither event.
            (true, Some(Some(_))) => {
                state.names.insert(key, None);
            }
            (false, Some(None)) if self.settings.grace.is_zero() => {
                state.names.remove(&key);
                notices.send(Notice::Presence {
                    change: off,
                    name: name.to_owned(),
                    seq,
                });
            }
            (false, Some(None)) => {
                state.names.insert(key.clone(), Some(seq));
                let shared = self.state.clone();
                let notices = notices.clone();
                let grace = self.settings.grace;
                let hub = hub.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    let mut state = shared.lock();
                    if state.names.get(&key) == Some(&Some(seq)) && !held(&hub, &key.1) {
                        state.names.remove(&key);
                        state.next += 1;
                        let seq = state.next;
                        notices.send(Notice::Presence {
                            change: off,
                            name: key.1,
                            seq,
                        });
                    }
                });
            }
            _ => {}
        }
    }
}

/// Parses the transitions a script returned: flat triples of kind (`+u`,
/// `-u`, `+g`, `-g`), name and seq.
pub fn transitions(flat: &[String]) -> Vec<Notice> {
    flat.chunks_exact(3)
        .filter_map(|t| {
            let change = match t[0].as_str() {
                "+u" => PresenceChange::Online,
                "-u" => PresenceChange::Offline,
                "+g" => PresenceChange::Occupied,
                "-g" => PresenceChange::Vacated,
                _ => return None,
            };
            Some(Notice::Presence {
                change,
                name: t[1].clone(),
                seq: t[2].parse().unwrap_or(0),
            })
        })
        .collect()
}

/// Turns notices into events until the engine drops its handle.
pub async fn deliver(
    gw: std::sync::Arc<Gateway>,
    node: NodeId,
    mut rx: mpsc::Receiver<Notice>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let notice = tokio::select! {
            notice = rx.recv() => match notice {
                Some(notice) => notice,
                None => return,
            },
            // The engine holds the sender and the gateway the engine: the
            // channel never closes by itself.
            () = stop.cancelled() => return,
        };
        let event = match notice {
            Notice::Presence { change, name, seq } => {
                // BusinessWorkers hear it too, as gatecast's command 241.
                let mut body = serde_json::json!({"type": change.kind(), "seq": seq});
                body[change.field()] = serde_json::json!(name);
                let body = body.to_string();
                gw.workers.send(
                    &nowhere(),
                    ClientId::new(node, 0),
                    WorkerEvent::Presence(body.as_bytes()),
                    Vec::new,
                );
                Event::new(
                    ClientId::new(node, 0),
                    None,
                    Session::new(),
                    Detail::Presence { change, name, seq },
                )
            }
            Notice::Closed {
                client_id,
                uid,
                session,
            } => {
                // BusinessWorkers hear it as the dead node would have told
                // them: onClose of its client_id, with its last session.
                gw.workers
                    .send(&nowhere(), client_id, WorkerEvent::Close, || {
                        if session.is_empty() {
                            Vec::new()
                        } else {
                            session_to_php(&session)
                        }
                    });
                Event::new(client_id, uid, session, Detail::Close)
            }
        };
        let Some(events) = &gw.events else { continue };
        events.emit_wait(event, &gw.metrics, WAIT).await;
    }
}

/// The route of an event that is about no connection of this node (a
/// presence transition, a purged connection): any worker takes it, and
/// the client's address is unknown.
fn nowhere() -> Route {
    Route::new(std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Longest wait for room in the events queue, per notice (a purge of a
/// large node is a burst), and in the notices queue for background tasks.
pub const WAIT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_transitions_parse_and_unknown_kinds_are_skipped() {
        let flat: Vec<String> = ["+u", "alice", "17", "?x", "y", "1", "-g", "room", "18"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let got = transitions(&flat);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[1],
            Notice::Presence {
                change: PresenceChange::Vacated,
                name: "room".into(),
                seq: 18
            }
        );
    }

    #[test]
    fn prefixes_narrow_the_names_and_ride_after_the_flags() {
        let settings = PresenceSettings {
            uid: true,
            group: true,
            grace: Duration::ZERO,
            prefixes: vec!["room:".into(), "vip:".into()],
        };
        assert!(settings.watches("vip:ann") && settings.watches("room:7"));
        assert!(!settings.watches("bob") && !settings.watches("lobby"));
        assert_eq!(settings.flags(), "ug\nroom:\nvip:");
        let all = PresenceSettings {
            uid: true,
            ..Default::default()
        };
        assert!(all.watches("anyone"));
        assert_eq!(all.flags(), "u");
    }
}
