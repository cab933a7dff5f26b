//! Properties of the receive path: whatever a backend (or anyone with
//! access to Redis) publishes on whatever channel, the dispatcher acts on
//! it or counts and skips it, and never panics (a panic here would stop
//! the node). Runs the real `on_message` against a hub with connections in
//! it, on a node whose Redis clients are built but never connected.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tokio_util::sync::CancellationToken;

use super::super::client::Redis;
use super::super::envelope::Envelope;
use super::super::keys::Keys;
use super::super::mirror::Mirror;
use super::super::rpc::Rpc;
use super::super::scripts::Scripts;
use super::super::{RedisSettings, Shared};
use super::*;
use crate::hub::{Hub, Membership};
use crate::ids::IdMinter;
use crate::metrics::Metrics;
use crate::outbox::{Limits, Outbox};
use crate::session::Session;
use crate::task::Fatal;

const MAX_MESSAGE: usize = 64;
const MAX_LIST: usize = 4;

/// A node with three connections: all in group `g`, the first bound to
/// uid `u`.
fn node() -> (Arc<Shared>, Vec<(ClientId, Arc<Outbox>)>) {
    let node = NodeId::new(Ipv4Addr::LOCALHOST, 1);
    let hub = Arc::new(Hub::new(Limits {
        frames: 1 << 20,
        bytes: usize::MAX,
    }));
    let minter = IdMinter::new(node);
    let conns: Vec<(ClientId, Arc<Outbox>)> = (0..3)
        .map(|i| {
            let id = minter.mint();
            let outbox = Arc::new(Outbox::default());
            let m = Membership {
                uid: (i == 0).then(|| "u".to_owned()),
                groups: vec!["g".into()],
                session: Session::new(),
            };
            hub.insert(id, outbox.clone(), m);
            (id, outbox)
        })
        .collect();
    let url = "redis://127.0.0.1:1".to_owned();
    let shared = Shared {
        node,
        node_name: node.to_string(),
        instance: "proptest".into(),
        hub,
        metrics: Arc::new(Metrics::new()),
        keys: Keys::new("gatecast"),
        redis: Redis::build(
            &url,
            None,
            "gatecast:node:x".into(),
            "gatecast:node:x:reply".into(),
            Arc::default(),
            Arc::new(Metrics::new()),
            Box::new(|_| true),
        )
        .expect("a client is built without connecting"),
        inbox: Arc::default(),
        scripts: Scripts::default(),
        settings: RedisSettings {
            url,
            password: None,
            prefix: "gatecast".into(),
            heartbeat: Duration::from_secs(1),
            lost_grace: Duration::from_secs(10),
            reconnect_window: Duration::from_secs(5),
            info: serde_json::json!({}),
            max_message_bytes: MAX_MESSAGE,
            max_list_items: MAX_LIST,
            liveness_key: crate::gatewayworker::secret::GatewayKey::new(""),
            resume_window: Duration::from_secs(120),
            history: Default::default(),
            presence: Default::default(),
            notices: None,
        },
        mirror: Mirror::default(),
        rpc: Rpc::default(),
        registry: Default::default(),
        resumable: Default::default(),
        resumes: tokio::sync::Semaphore::new(1),
        reads: Default::default(),
        gaps: Default::default(),
        registered: AtomicBool::new(true),
        responsive: AtomicBool::new(true),
        writable: AtomicBool::new(true),
        holds: Default::default(),
        lost: AtomicBool::new(false),
        lag: Default::default(),
        stop: CancellationToken::new(),
        fatal: Fatal::new(),
    };
    (Arc::new(shared), conns)
}

fn frames(outbox: &Outbox) -> Vec<bytes::Bytes> {
    let mut batch = VecDeque::new();
    outbox.take(&mut batch);
    batch.into()
}

/// A string that is sometimes one the node knows (its connections, its
/// group and uid, its own name), so envelopes reach every branch.
fn arb_name(known: &'static [&'static str]) -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        4 => prop::sample::select(known).prop_map(str::to_owned),
        1 => ".{0,24}",
        1 => "[0-9a-f]{20}",
    ]
}

/// Placeholders replaced by the node's real client_ids and name.
const IDS: &[&str] = &["$0", "$1", "$2", "$node", "g", "u", ""];

fn arb_envelope() -> impl Strategy<Value = Envelope> {
    let op = prop::sample::select(vec![
        Op::Push,
        Op::Close,
        Op::BindUid,
        Op::UnbindUid,
        Op::JoinGroup,
        Op::LeaveGroup,
        Op::Ungroup,
        Op::SetSession,
        Op::UpdateSession,
        Op::Reply,
    ]);
    let list = prop::collection::vec(arb_name(IDS), 0..6);
    let session = proptest::option::of(
        prop::collection::vec((".{0,4}", any::<i64>()), 0..3).prop_map(|kv| {
            kv.into_iter()
                .map(|(k, v)| (k, serde_json::Value::from(v)))
                .collect::<Session>()
        }),
    );
    (
        (
            proptest::option::weighted(0.8, arb_name(IDS)),
            op,
            list.clone(),
            proptest::option::weighted(0.8, arb_name(IDS)),
            proptest::option::weighted(0.8, arb_name(IDS)),
            proptest::option::weighted(0.8, arb_name(IDS)),
        ),
        (
            list.clone(),
            list,
            proptest::option::weighted(0.8, prop::collection::vec(any::<u8>(), 0..80)),
            any::<bool>(),
            session,
            proptest::option::of(any::<u64>()),
            proptest::option::weighted(0.8, arb_name(IDS)),
        ),
    )
        .prop_map(
            |(
                (origin, op, client_ids, client_id, uid, group),
                (groups, exclude, data, binary, session, req, reply_to),
            )| {
                let mut e = Envelope::new(op);
                e.origin = origin;
                e.client_ids = client_ids;
                e.client_id = client_id;
                e.uid = uid;
                e.group = group;
                e.groups = groups;
                e.exclude = exclude;
                e.data = data.map(Into::into);
                e.binary = binary;
                e.session = session;
                e.req = req;
                e.reply_to = reply_to;
                e
            },
        )
}

/// Replaces the placeholders with the node's real names.
fn resolve(s: &mut String, shared: &Shared, conns: &[(ClientId, Arc<Outbox>)]) {
    match s.as_str() {
        "$0" | "$1" | "$2" => *s = conns[usize::from(s.as_bytes()[1] - b'0')].0.to_string(),
        "$node" => *s = shared.node_name.clone(),
        _ => {}
    }
}

fn resolved(mut e: Envelope, shared: &Shared, conns: &[(ClientId, Arc<Outbox>)]) -> Envelope {
    for s in e
        .client_ids
        .iter_mut()
        .chain(e.groups.iter_mut())
        .chain(e.exclude.iter_mut())
        .chain(e.origin.iter_mut())
        .chain(e.client_id.iter_mut())
        .chain(e.uid.iter_mut())
        .chain(e.group.iter_mut())
        .chain(e.reply_to.iter_mut())
    {
        resolve(s, shared, conns);
    }
    e
}

fn arb_channel() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just("gatecast:all".to_owned()),
        2 => Just("gatecast:group:g".to_owned()),
        2 => Just("gatecast:uid:u".to_owned()),
        5 => Just("gatecast:node:$node".to_owned()),
        1 => Just("gatecast:node:0a0000010b54".to_owned()),
        1 => ".{0,8}".prop_map(|s| format!("gatecast:group:{s}")),
        1 => ".{0,30}",
    ]
}

/// What reaches Redis: an envelope (sometimes damaged), bytes, or a value
/// of another type.
#[derive(Debug, Clone)]
enum Payload {
    Envelope(Box<Envelope>, Option<(prop::sample::Index, u8)>),
    Bytes(Vec<u8>),
    Integer(i64),
}

fn arb_payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        8 => (arb_envelope(), proptest::option::weighted(0.2, (any::<prop::sample::Index>(), any::<u8>())))
            .prop_map(|(e, damage)| Payload::Envelope(Box::new(e), damage)),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Payload::Bytes),
        1 => any::<i64>().prop_map(Payload::Integer),
    ]
}

proptest! {
    // Each case builds a node (fred clients, metrics): a few ms.
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_message_is_acted_on_or_counted_and_skipped(
        messages in prop::collection::vec((arb_channel(), arb_payload()), 1..10),
    ) {
        let (shared, conns) = node();
        for (channel, payload) in messages {
            let channel = channel.replace("$node", &shared.node_name);
            let value = match payload {
                Payload::Envelope(e, damage) => {
                    let mut bytes = resolved(*e, &shared, &conns).encode().to_vec();
                    if let Some((at, byte)) = damage {
                        let i = at.index(bytes.len());
                        bytes[i] = byte;
                    }
                    bytes
                }
                Payload::Bytes(b) => b,
                Payload::Integer(n) => n.to_string().into_bytes(),
            };
            let undecodable = shared.keys.parse_channel(&channel).is_some()
                && peek_origin(&value) != Some(shared.node_name.as_str())
                && EnvelopeRef::decode(&value).is_err();
            let (received, malformed) =
                (shared.metrics.pubsub_received.get(), shared.metrics.pubsub_malformed.get());
            shared.on_message(channel.as_bytes(), &value);
            prop_assert_eq!(shared.metrics.pubsub_received.get(), received + 1);
            let counted = shared.metrics.pubsub_malformed.get() - malformed;
            prop_assert!(counted <= 1);
            if undecodable {
                prop_assert_eq!(counted, 1, "an undecodable message is counted");
            }
        }
        // Whatever came, every frame queued to a client is one the API
        // could have sent: a text frame of UTF-8 or a binary frame, within
        // --max-message-bytes.
        for (_, outbox) in &conns {
            for frame in frames(outbox) {
                let mut got = Vec::new();
                let mut masked = frame[..2].to_vec();
                masked[1] |= 0x80;
                masked.extend_from_slice(&[0; 4]);
                masked.extend_from_slice(&frame[2..]);
                let _ = crate::frame::Reader::default().feed(&masked, 1 << 20, &mut |m| got.push(m));
                prop_assert!(frame.len() <= 2 + MAX_MESSAGE, "frame of {}", frame.len());
                prop_assert!(
                    matches!(got.as_slice(), [crate::frame::Incoming::Text(_) | crate::frame::Incoming::Binary(_)])
                        || frame[0] == 0x88,
                    "frame {:?}", frame
                );
            }
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_valid_push_to_all_reaches_every_connection_exactly(
        data in ".{0,60}",
        exclude in prop::sample::subsequence(vec![0usize, 1, 2], 0..=3),
    ) {
        prop_assume!(data.len() <= MAX_MESSAGE);
        let (shared, conns) = node();
        let mut e = Envelope::new(Op::Push);
        e.data = Some(data.clone().into());
        e.exclude = exclude.iter().map(|i| conns[*i].0.to_string()).collect();
        shared.on_message(b"gatecast:all", &e.encode());
        prop_assert_eq!(shared.metrics.pubsub_malformed.get(), 0);
        for (i, (_, outbox)) in conns.iter().enumerate() {
            let want: Vec<bytes::Bytes> = if exclude.contains(&i) {
                vec![]
            } else {
                vec![crate::frame::encode(crate::frame::Opcode::Text, data.as_bytes())]
            };
            prop_assert_eq!(frames(outbox), want);
        }
    }

}

proptest! {
    #[test]
    fn membership_commands_read_back_as_sent(
        op in prop::sample::select(vec![
            Op::BindUid, Op::UnbindUid, Op::JoinGroup, Op::LeaveGroup,
            Op::SetSession, Op::UpdateSession,
        ]),
        name in ".{1,40}",
        session in prop::collection::vec((".{0,6}", ".{0,6}"), 0..4),
    ) {
        let session: Session = session
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::from(v)))
            .collect();
        let valid = crate::name::Name::new(name.clone()).is_ok();
        let mut e = Envelope::new(op);
        let want = match op {
            Op::BindUid => { e.uid = Some(name.clone()); Change::BindUid(name) }
            Op::UnbindUid => { e.uid = Some(name.clone()); Change::UnbindUid(name) }
            Op::JoinGroup => { e.group = Some(name.clone()); Change::JoinGroup(name) }
            Op::LeaveGroup => { e.group = Some(name.clone()); Change::LeaveGroup(name) }
            _ => {
                e.session = Some(session.clone());
                Change::Session { session, merge: op == Op::UpdateSession }
            }
        };
        let bytes = e.encode();
        let got = Change::from_envelope(&EnvelopeRef::decode(&bytes).unwrap());
        if valid || matches!(want, Change::Session { .. }) {
            prop_assert_eq!(got, Ok(want));
        } else {
            prop_assert!(got.is_err());
        }
    }
}
