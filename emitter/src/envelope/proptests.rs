//! Properties of the envelope codec: whatever bytes arrive on a channel,
//! decoding never panics and a refusal says why; what a node writes, a
//! node reads back unchanged.

use proptest::prelude::*;

use super::*;
use crate::keys::{Channel, Keys};
use crate::{ClientId, NodeId};

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Push),
        Just(Op::Close),
        Just(Op::BindUid),
        Just(Op::UnbindUid),
        Just(Op::JoinGroup),
        Just(Op::LeaveGroup),
        Just(Op::Ungroup),
        Just(Op::SetSession),
        Just(Op::UpdateSession),
        Just(Op::Reply),
    ]
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((".{0,4}", inner), 0..4)
                .prop_map(|e| Value::Object(e.into_iter().collect())),
        ]
    })
}

fn arb_session() -> impl Strategy<Value = Session> {
    prop::collection::vec((".{0,6}", arb_json()), 0..4).prop_map(|e| e.into_iter().collect())
}

fn arb_strings() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(".{0,12}", 0..4)
}

fn arb_envelope() -> impl Strategy<Value = Envelope> {
    (
        (
            proptest::option::of(".{0,12}"),
            arb_op(),
            arb_strings(),
            proptest::option::of(".{0,20}"),
            proptest::option::of(".{0,12}"),
            proptest::option::of(".{0,12}"),
        ),
        (
            arb_strings(),
            arb_strings(),
            proptest::option::of(prop::collection::vec(any::<u8>(), 0..64)),
            any::<bool>(),
            proptest::option::of(arb_session()),
        ),
        (
            proptest::option::of(any::<u64>()),
            proptest::option::of(".{0,12}"),
            proptest::option::of(".{0,12}"),
            any::<bool>(),
            prop::collection::vec(any::<u64>(), 0..4),
            proptest::option::of(any::<u64>()),
        ),
    )
        .prop_map(
            |(
                (origin, op, client_ids, client_id, uid, group),
                (groups, exclude, data, binary, session),
                (req, reply_to, error, reply_channel, reqs, ts),
            )| Envelope {
                origin,
                v: VERSION,
                op,
                client_ids,
                client_id,
                uid,
                group,
                groups,
                exclude,
                data: data.map(Bytes::from),
                binary,
                session,
                req,
                reply_to,
                reply_channel,
                error,
                reqs,
                ts,
            },
        )
}

/// A refusal names what was wrong: never an empty message.
fn explains(e: &DecodeError) -> bool {
    let text = e.to_string();
    text.starts_with("malformed envelope: ") && text.len() > 20
        || text.starts_with("unsupported envelope version ")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn what_is_written_reads_back_unchanged(e in arb_envelope()) {
        let bytes = e.encode();
        prop_assert_eq!(&Envelope::decode(&bytes).unwrap(), &e);
        let r = EnvelopeRef::decode(&bytes).unwrap();
        prop_assert_eq!(&r.to_owned(), &e);
        // The echo check reads the origin from the first key, exactly.
        prop_assert_eq!(peek_origin(&bytes), e.origin.as_deref());
    }

    #[test]
    fn any_bytes_decode_or_are_refused_with_a_reason(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        match EnvelopeRef::decode(&bytes) {
            Ok(e) => prop_assert_eq!(e.v, VERSION),
            Err(e) => prop_assert!(explains(&e), "{}", e),
        }
        let _ = peek_origin(&bytes);
    }

    #[test]
    fn damaged_envelopes_never_panic(
        e in arb_envelope(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = e.encode().to_vec();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        if let Err(e) = EnvelopeRef::decode(&bytes) {
            prop_assert!(explains(&e), "{}", e);
        }
        let _ = peek_origin(&bytes);
        // Every strict prefix is incomplete: refused, never half-read.
        let whole = e.encode();
        let cut = at.index(whole.len());
        prop_assert!(EnvelopeRef::decode(&whole[..cut]).is_err());
        let _ = peek_origin(&whole[..cut]);
    }

    #[test]
    fn other_versions_are_refused_as_such(e in arb_envelope(), v in 2u32..) {
        let mut e = e;
        e.v = v;
        let bytes = e.encode();
        let refused = EnvelopeRef::decode(&bytes);
        prop_assert!(matches!(refused, Err(DecodeError::Version(got)) if got == v));
    }

    #[test]
    fn channel_names_round_trip_and_any_name_parses_safely(
        prefix in "[a-z]{1,6}",
        name in ".{0,16}",
        ip in any::<u32>(),
        port in any::<u16>(),
        junk in ".{0,40}",
    ) {
        let keys = Keys::new(&prefix);
        let (group, uid) = (keys.group_channel(&name), keys.uid_channel(&name));
        prop_assert_eq!(keys.parse_channel(&group), Some(Channel::Group(&name)));
        prop_assert_eq!(keys.parse_channel(&uid), Some(Channel::Uid(&name)));
        let node = NodeId::new(ip.into(), port);
        let channel = keys.node_channel(node);
        prop_assert_eq!(keys.parse_channel(&channel), Some(Channel::Node(node)));
        let _ = keys.parse_channel(&junk);
        let _ = keys.partition_node(&junk);
    }

    #[test]
    fn ids_round_trip_and_garbage_is_refused(
        ip in any::<u32>(),
        port in any::<u16>(),
        conn in any::<u32>(),
        junk in ".{0,24}",
    ) {
        let id = ClientId::new(NodeId::new(ip.into(), port), conn);
        prop_assert_eq!(id.to_string().parse::<ClientId>().unwrap(), id);
        prop_assert_eq!(id.to_string().to_uppercase().parse::<ClientId>().unwrap(), id);
        if let Ok(parsed) = junk.parse::<ClientId>() {
            prop_assert_eq!(parsed.to_string(), junk.to_lowercase());
        }
        if let Ok(parsed) = junk.parse::<NodeId>() {
            prop_assert_eq!(parsed.to_string(), junk.to_lowercase());
        }
    }
}
