use super::*;
use crate::gatewayworker::php_cli;
use base64::engine::general_purpose::STANDARD as BASE64;
use proptest::prelude::*;
use serde_json::json;

/// Equality that also holds for NaN (PHP writes every NaN as `NAN`).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => {
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((kx, vx), (ky, vy))| kx == ky && same(vx, vy))
        }
        _ => a == b,
    }
}

fn array(entries: Vec<(Key, Value)>) -> Value {
    Value::Array(entries.into_iter().collect())
}

fn reserialize(input: &str) -> Result<String, PhpError> {
    unserialize(input.as_bytes()).map(|v| String::from_utf8_lossy(&serialize(&v)).into_owned())
}

#[test]
fn serializes_scalars_as_php() {
    assert_eq!(serialize(&Value::Null), b"N;");
    assert_eq!(serialize(&Value::Bool(true)), b"b:1;");
    assert_eq!(serialize(&Value::Bool(false)), b"b:0;");
    assert_eq!(serialize(&Value::Int(-42)), b"i:-42;");
    assert_eq!(serialize(&Value::Int(i64::MIN)), b"i:-9223372036854775808;");
    assert_eq!(
        serialize(&Value::string("héllo")),
        "s:6:\"héllo\";".as_bytes()
    );
    assert_eq!(
        serialize(&Value::String(b"\xff\"};".to_vec())),
        b"s:4:\"\xff\"};\";"
    );
}

#[test]
fn serializes_arrays_as_php() {
    let value = array(vec![
        (Key::Int(0), Value::string("a")),
        (Key::from("k"), array(vec![(Key::Int(-3), Value::Null)])),
        (Key::from("5"), Value::Float(0.1)),
    ]);
    assert_eq!(
        String::from_utf8(serialize(&value)).unwrap(),
        r#"a:3:{i:0;s:1:"a";s:1:"k";a:1:{i:-3;N;}i:5;d:0.1;}"#
    );
    assert_eq!(serialize(&array(vec![])), b"a:0:{}");
}

/// Each float with what PHP 8.2's `serialize()` writes for it.
#[test]
fn formats_floats_as_php_8() {
    let cases: &[(f64, &str)] = &[
        (0.0, "0"),
        (-0.0, "-0"),
        (1.0, "1"),
        (0.1, "0.1"),
        (-2.5, "-2.5"),
        (1e25, "1.0E+25"),
        (1e14, "100000000000000"),
        (1e15, "1000000000000000"),
        (1.5e15, "1500000000000000"),
        (1e16, "10000000000000000"),
        (1e17, "1.0E+17"),
        (123456789012345678.0, "1.2345678901234568E+17"),
        (1e21, "1.0E+21"),
        (1e100, "1.0E+100"),
        (f64::MAX, "1.7976931348623157E+308"),
        (0.0001, "0.0001"),
        (0.00012345, "0.00012345"),
        (0.00001, "1.0E-5"),
        (1.5e-5, "1.5E-5"),
        (1e-7, "1.0E-7"),
        (-1e-10, "-1.0E-10"),
        (5e-324, "5.0E-324"),
        (2.5e-300, "2.5E-300"),
        (0.30000000000000004, "0.30000000000000004"),
        (100000.0, "100000"),
        (123.456, "123.456"),
        (f64::INFINITY, "INF"),
        (f64::NEG_INFINITY, "-INF"),
        (f64::NAN, "NAN"),
    ];
    for (value, php) in cases {
        assert_eq!(format_float(*value), *php, "{value:e}");
        let read = unserialize(format!("d:{php};").as_bytes()).unwrap();
        assert!(same(&read, &Value::Float(*value)), "{php} reads back");
    }
}

/// Input PHP 8.2 accepts, with what `serialize(unserialize($input))` gives.
const ACCEPTED: &[(&str, &str)] = &[
    (r#"a:1:{s:1:"5";i:1;}"#, "a:1:{i:5;i:1;}"),
    (r#"a:1:{s:2:"-0";i:1;}"#, r#"a:1:{s:2:"-0";i:1;}"#),
    (r#"a:1:{s:2:"05";i:1;}"#, r#"a:1:{s:2:"05";i:1;}"#),
    (r#"a:1:{s:2:"5 ";i:1;}"#, r#"a:1:{s:2:"5 ";i:1;}"#),
    (r#"a:1:{s:0:"";i:1;}"#, r#"a:1:{s:0:"";i:1;}"#),
    (
        r#"a:1:{s:19:"9223372036854775807";i:1;}"#,
        "a:1:{i:9223372036854775807;i:1;}",
    ),
    (
        r#"a:1:{s:19:"9223372036854775808";i:1;}"#,
        r#"a:1:{s:19:"9223372036854775808";i:1;}"#,
    ),
    (
        r#"a:1:{s:20:"-9223372036854775808";i:1;}"#,
        "a:1:{i:-9223372036854775808;i:1;}",
    ),
    ("a:2:{i:0;i:1;i:0;i:2;}", "a:1:{i:0;i:2;}"),
    ("a:3:{i:0;i:1;i:1;i:5;i:0;i:2;}", "a:2:{i:0;i:2;i:1;i:5;}"),
    (r#"a:2:{i:5;i:1;s:1:"5";i:2;}"#, "a:1:{i:5;i:2;}"),
    ("i:-9223372036854775808;", "i:-9223372036854775808;"),
    ("i:+5;", "i:5;"),
    ("i:05;", "i:5;"),
    ("d:1e5;", "d:100000;"),
    ("d:.5;", "d:0.5;"),
    ("d:5.;", "d:5;"),
    ("d:+1.5;", "d:1.5;"),
    ("d:-.5e-3;", "d:-0.0005;"),
    ("d:1E+400;", "d:INF;"),
    ("d:-INF;", "d:-INF;"),
    ("d:NAN;", "d:NAN;"),
    ("d:1.0E+25;", "d:1.0E+25;"),
    ("d:-0;", "d:-0;"),
    ("d:00.5;", "d:0.5;"),
    ("a:01:{i:0;i:1;}", "a:1:{i:0;i:1;}"),
    (r#"s:01:"a";"#, r#"s:1:"a";"#),
    ("a:0:{}", "a:0:{}"),
    ("b:1;", "b:1;"),
    ("b:0;", "b:0;"),
    ("N;", "N;"),
    (r#"s:0:"";"#, r#"s:0:"";"#),
];

/// Input PHP 8.2 refuses too.
const REFUSED: &[&str] = &[
    "",
    "i:;",
    "i:1",
    "i:1e3;",
    "i:-;",
    "d:+INF;",
    "d:inf;",
    "d:0x1A;",
    "d:1e;",
    "d:1.5E;",
    "d:e5;",
    "d:.;",
    "d:1_0;",
    "b:2;",
    "b:01;",
    r#"s:3:"ab";"#,
    r#"s:1:"ab";"#,
    r#"s:2:"ab""#,
    "a:1:{d:1.5;i:1;}",
    "a:1:{b:1;i:1;}",
    "a:1:{N;i:1;}",
    "a:1:{a:0:{}i:1;}",
    "a:-1:{}",
    "a:1:{i:0;i:1;",
    "a:2:{i:0;i:1;}",
    r#"E:7:"Foo:Bar";"#,
    "x:1;",
];

/// Input PHP 8.2 accepts that is refused here on purpose (see the module doc).
const REFUSED_HERE_ONLY: &[&str] = &[
    "i:9223372036854775808;",
    "i:1;xx",
    "a:1:{i:0;i:1;};",
    "N;N;",
    r#"S:1:"\61";"#,
    "a:1:{i:0;R:1;}",
    "a:2:{i:0;i:1;i:1;r:1;}",
    r#"O:8:"stdClass":0:{}"#,
    r#"C:3:"Foo":0:{}"#,
];

#[test]
fn reads_what_php_reads() {
    for (input, php) in ACCEPTED {
        assert_eq!(reserialize(input).as_deref(), Ok(*php), "{input}");
    }
    for input in REFUSED.iter().chain(REFUSED_HERE_ONLY) {
        assert!(reserialize(input).is_err(), "{input} is refused");
    }
}

#[test]
fn errors_say_what_is_wrong() {
    let err = |input: &str| unserialize(input.as_bytes()).unwrap_err();
    assert_eq!(err("i:1"), PhpError::UnexpectedEnd { offset: 3 });
    assert_eq!(
        err("i:9223372036854775808;"),
        PhpError::IntegerOutOfRange { offset: 2 }
    );
    assert_eq!(err("N;N;"), PhpError::TrailingBytes { offset: 2 });
    assert_eq!(
        err(r#"O:8:"stdClass":0:{}"#),
        PhpError::Unsupported {
            offset: 0,
            what: "object"
        }
    );
    assert_eq!(
        err("a:1:{i:0;R:1;}"),
        PhpError::Unsupported {
            offset: 9,
            what: "reference"
        }
    );
    assert_eq!(err("a:1:{N;i:1;}"), PhpError::InvalidKey { offset: 5 });
    assert_eq!(
        err("x:1;"),
        PhpError::UnknownType {
            offset: 0,
            tag: 'x'
        }
    );
    assert!(err("a:1:{s:1:\"a\";O:1:\"A\":0:{}}")
        .to_string()
        .contains("object at byte 13"));
}

#[test]
fn declared_lengths_are_checked_before_allocating() {
    for input in [
        "s:18446744073709551616:\"x\";",
        "s:99999999999999999999999999999:\"",
        "s:4000000000:\"abc\";",
        "a:4294967295:{",
        "a:10:{i:0;N;}",
    ] {
        assert!(
            matches!(
                unserialize(input.as_bytes()),
                Err(PhpError::LengthPastEnd { .. })
            ),
            "{input}"
        );
    }
}

#[test]
fn nesting_is_limited_without_blowing_the_stack() {
    let nested = |depth: usize| {
        let mut s = "a:1:{i:0;".repeat(depth);
        s.push_str("N;");
        s.push_str(&"}".repeat(depth));
        s
    };
    assert!(unserialize(nested(Limits::DEFAULT.max_depth).as_bytes()).is_ok());
    assert_eq!(
        unserialize(nested(Limits::DEFAULT.max_depth + 1).as_bytes()),
        Err(PhpError::TooDeep {
            offset: 9 * Limits::DEFAULT.max_depth,
            max: Limits::DEFAULT.max_depth
        })
    );
    // Far deeper than any stack could recurse: refused at the limit.
    assert!(matches!(
        unserialize(nested(1_000_000).as_bytes()),
        Err(PhpError::TooDeep { .. })
    ));
    // A scalar is depth 0.
    let flat = Limits {
        max_depth: 0,
        max_elements: 10,
    };
    assert!(unserialize_with(b"i:1;", flat).is_ok());
    assert!(unserialize_with(b"a:0:{}", flat).is_err());
}

#[test]
fn element_count_is_limited_over_the_whole_value() {
    let limits = Limits {
        max_depth: 8,
        max_elements: 3,
    };
    assert!(unserialize_with(b"a:3:{i:0;N;i:1;N;i:2;N;}", limits).is_ok());
    assert_eq!(
        unserialize_with(b"a:4:{i:0;N;i:1;N;i:2;N;i:3;N;}", limits),
        Err(PhpError::TooManyElements { offset: 0, max: 3 })
    );
    assert_eq!(
        unserialize_with(b"a:2:{i:0;a:2:{i:0;N;i:1;N;}i:1;N;}", limits),
        Err(PhpError::TooManyElements { offset: 9, max: 3 })
    );
}

#[test]
fn string_keys_that_are_canonical_integers_are_integers() {
    assert_eq!(Key::from("5"), Key::Int(5));
    assert_eq!(Key::from("-3"), Key::Int(-3));
    assert_eq!(Key::from("0"), Key::Int(0));
    assert_eq!(Key::from("-9223372036854775808"), Key::Int(i64::MIN));
    for text in [
        "",
        "-",
        "-0",
        "05",
        "-05",
        "+5",
        " 5",
        "5 ",
        "1.5",
        "1e3",
        "9223372036854775808",
        "-9223372036854775809",
        "00000000000000000000001",
    ] {
        assert_eq!(Key::from(text), Key::String(text.into()), "{text:?}");
    }
}

#[test]
fn php_arrays_become_json_as_json_encode_does() {
    let value = unserialize(
        br#"a:4:{s:4:"list";a:2:{i:0;s:1:"a";i:1;d:1.5;}s:5:"holey";a:1:{i:1;b:1;}s:5:"empty";a:0:{}i:7;d:INF;}"#,
    )
    .unwrap();
    assert_eq!(
        value.to_json(),
        json!({"list": ["a", 1.5], "holey": {"1": true}, "empty": [], "7": null})
    );
}

#[test]
fn bytes_that_are_not_utf8_survive_json() {
    let value = array(vec![(
        Key::from("bin"),
        Value::String(b"\xff\x00a".to_vec()),
    )]);
    let json = value.to_json();
    assert_eq!(json, json!({"bin": {"$php_bytes": "/wBh"}}));
    assert_eq!(Value::from_json(&json), value);
    // The marker shape holding UTF-8, or with more keys, is an ordinary object.
    for plain in [
        json!({"$php_bytes": "aGk="}),
        json!({"$php_bytes": "/wBh", "x": 1}),
        json!({"$php_bytes": "not base64!"}),
        json!({"$php_bytes": 5}),
    ] {
        assert!(
            matches!(Value::from_json(&plain), Value::Array(_)),
            "{plain}"
        );
    }
    // Keys are converted lossily.
    let key = array(vec![(Key::String(b"k\xff".to_vec()), Value::Int(1))]);
    assert_eq!(key.to_json(), json!({"k\u{fffd}": 1}));
}

#[test]
fn json_becomes_php_as_json_decode_does() {
    let json =
        json!({"5": 1, "05": 2, "-0": 3, "a": [true, null, 1.0], "big": 18446744073709551615u64});
    assert_eq!(
        String::from_utf8(serialize(&Value::from_json(&json))).unwrap(),
        r#"a:5:{i:5;i:1;s:2:"05";i:2;s:2:"-0";i:3;s:1:"a";a:3:{i:0;b:1;i:1;N;i:2;d:1;}s:3:"big";d:1.8446744073709552E+19;}"#
    );
}

#[test]
fn array_replace_recursive_merges_lists_by_index() {
    let cases = [
        (
            json!({"a": 1, "nested": {"x": 1, "y": 2}, "keep": true}),
            json!({"a": 2, "nested": {"y": 3, "z": 4}, "new": [1]}),
            json!({"a": 2, "nested": {"x": 1, "y": 3, "z": 4}, "keep": true, "new": [1]}),
        ),
        (
            json!({"tags": ["a", "b", "c"]}),
            json!({"tags": ["x"]}),
            json!({"tags": ["x", "b", "c"]}),
        ),
        (
            json!({"a": {"x": 1}}),
            json!({"a": []}),
            json!({"a": {"x": 1}}),
        ),
        (
            json!({"a": {"x": 1}}),
            json!({"a": null}),
            json!({"a": null}),
        ),
        (
            json!({"a": 1}),
            json!({"a": {"b": 2}}),
            json!({"a": {"b": 2}}),
        ),
        (json!([1, 2, 3]), json!({"1": 9}), json!([1, 9, 3])),
        (
            json!({"1": "a"}),
            json!({"0": "b"}),
            json!({"1": "a", "0": "b"}),
        ),
        (json!({"x": 1}), json!("scalar"), json!("scalar")),
    ];
    for (base, update, merged) in cases {
        assert_eq!(
            array_replace_recursive(&base, &update),
            merged,
            "{base} + {update}"
        );
    }
}

#[test]
fn sessions_cross_as_serialized_arrays() {
    let session = json!({"uid": 5, "name": "Ann", "tags": ["a"]})
        .as_object()
        .cloned()
        .unwrap();
    let bytes = session_to_php(&session);
    assert_eq!(
        String::from_utf8(bytes.clone()).unwrap(),
        r#"a:3:{s:3:"uid";i:5;s:4:"name";s:3:"Ann";s:4:"tags";a:1:{i:0;s:1:"a";}}"#
    );
    assert_eq!(session_from_php(&bytes).unwrap(), session);
    assert_eq!(session_to_php(&Session::new()), b"a:0:{}");
    assert_eq!(session_from_php(b"").unwrap(), Session::new());
    assert_eq!(session_from_php(b"a:0:{}").unwrap(), Session::new());
    // A list at the top stays an object.
    assert_eq!(
        serde_json::Value::Object(session_from_php(br#"a:1:{i:0;s:1:"x";}"#).unwrap()),
        json!({"0": "x"})
    );
    assert_eq!(
        session_from_php(b"i:1;"),
        Err(PhpError::NotAnArray { found: "int" })
    );
    let merged = replace_session(
        &session,
        json!({"tags": ["b", "c"], "uid": null})
            .as_object()
            .unwrap(),
    );
    assert_eq!(
        serde_json::Value::Object(merged),
        json!({"uid": null, "name": "Ann", "tags": ["b", "c"]})
    );
}

fn arb_key() -> impl Strategy<Value = Key> + Clone {
    prop_oneof![
        (-3i64..10).prop_map(Key::Int),
        any::<i64>().prop_map(Key::Int),
        "[a-z0-9-]{0,5}".prop_map(|s| Key::from(s.as_str())),
        proptest::collection::vec(any::<u8>(), 0..6).prop_map(Key::from_bytes),
    ]
}

fn arb_value(finite: bool, utf8_keys: bool) -> impl Strategy<Value = Value> {
    let float = any::<f64>().prop_filter("finite", move |f| !finite || f.is_finite());
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        float.prop_map(Value::Float),
        ".{0,6}".prop_map(Value::string),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::String),
    ];
    let key = arb_key().prop_filter("UTF-8 key", move |k| {
        !utf8_keys || !matches!(k, Key::String(b) if std::str::from_utf8(b).is_err())
    });
    leaf.prop_recursive(4, 48, 6, move |inner| {
        proptest::collection::vec((key.clone(), inner), 0..6)
            .prop_map(|entries| Value::Array(entries.into_iter().collect()))
    })
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,6}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
            proptest::collection::vec(("-?[0-9a-z]{0,3}", inner), 0..5)
                .prop_map(|entries| serde_json::Value::Object(entries.into_iter().collect())),
        ]
    })
}

/// Fragments of the grammar, so random input gets deep into the reader.
fn arb_token_soup() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        Just("a:"),
        Just("1"),
        Just("2"),
        Just("0"),
        Just(":{"),
        Just("}"),
        Just("i:"),
        Just(";"),
        Just("s:"),
        Just(":\""),
        Just("\""),
        Just("N;"),
        Just("b:1;"),
        Just("d:"),
        Just("1.5"),
        Just("E+3"),
        Just("-"),
        Just("INF"),
        Just("99999999999999999999"),
        Just("O:"),
        Just("R:"),
    ];
    proptest::collection::vec(token, 0..64).prop_map(|tokens| tokens.concat().into_bytes())
}

proptest! {
    #[test]
    fn serialize_then_unserialize_is_the_same_value(value in arb_value(false, false)) {
        let bytes = serialize(&value);
        let read = unserialize(&bytes).unwrap();
        prop_assert!(same(&read, &value), "{} read back as {}", value, read);
    }

    #[test]
    fn every_strict_prefix_is_an_error(value in arb_value(false, false)) {
        let bytes = serialize(&value);
        for end in 0..bytes.len() {
            prop_assert!(unserialize(&bytes[..end]).is_err());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = unserialize(&bytes);
    }

    #[test]
    fn grammar_fragments_never_panic(bytes in arb_token_soup()) {
        let _ = unserialize(&bytes);
        let _ = unserialize_with(&bytes, Limits { max_depth: 2, max_elements: 4 });
    }

    #[test]
    fn a_changed_byte_never_panics(
        value in arb_value(false, false),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = serialize(&value);
        if !bytes.is_empty() {
            let at = at.index(bytes.len());
            bytes[at] = byte;
        }
        let _ = unserialize(&bytes);
    }

    #[test]
    fn json_round_trip_keeps_php_values(value in arb_value(true, true)) {
        let back = Value::from_json(&value.to_json());
        prop_assert!(same(&back, &value), "{} came back as {}", value, back);
    }

    #[test]
    fn json_to_php_to_json_is_stable(json in arb_json()) {
        let once = Value::from_json(&json);
        let twice = Value::from_json(&once.to_json());
        prop_assert!(same(&once, &twice));
    }

    #[test]
    fn replacing_is_idempotent_and_keeps_base_order(
        base in arb_value(true, false),
        update in arb_value(true, false),
    ) {
        let mut once = base.clone();
        once.replace_recursive(update.clone());
        let mut twice = once.clone();
        twice.replace_recursive(update.clone());
        prop_assert!(same(&once, &twice));
        if let (Value::Array(b), Value::Array(u), Value::Array(m)) = (&base, &update, &once) {
            let expected: Vec<&Key> = b.keys().chain(u.keys().filter(|k| !b.contains_key(*k))).collect();
            prop_assert_eq!(m.keys().collect::<Vec<_>>(), expected);
        }
        let mut empty_update = base.clone();
        empty_update.replace_recursive(Value::Array(Array::new()));
        if matches!(base, Value::Array(_)) {
            prop_assert!(same(&empty_update, &base));
        }
    }
}

// Against PHP itself (skipped where `php` is not installed).

/// Values PHP builds; each printed as base64 of `serialize()`.
const PHP_CORPUS: &str = r#"
$deep = [];
for ($i = 0; $i < 100; $i++) { $deep = [$deep, "level" => $i]; }
$values = [
    null, true, false, 0, 1, -1, PHP_INT_MAX, PHP_INT_MIN,
    0.0, -0.0, 0.1, -2.5, 1e25, 1e-7, 1e15, 1e16, 1e17, 0.0001, 0.00001, 123456.789, 1/3,
    INF, -INF, NAN, PHP_FLOAT_EPSILON, PHP_FLOAT_MAX, PHP_FLOAT_MIN,
    "", "hello", "héllo wörld 中文", "\xff\xfe\x00binary", "quote\"semi;brace}colon:", str_repeat("x", 1000),
    [], [1, 2, 3], [3 => "c", 1 => "a", 2 => "b"],
    ["a" => 1, "b" => [1, 2, ["x" => null]]],
    [5 => "x", "5x" => "y", -3 => 1, "-0" => 2, "05" => 3, "" => 4, PHP_INT_MAX => 5, PHP_INT_MIN => 6, "9223372036854775808" => 7],
    ["uid" => "u1", "groups" => ["g1" => "g1", 7 => 7], "session" => serialize(["a" => 1, "b" => [true]])],
    ["get" => ["q" => "1"], "server" => ["REMOTE_ADDR" => "127.0.0.1", "REMOTE_PORT" => 51234], "cookie" => []],
    array_fill(0, 50, "z"),
    $deep,
];
foreach ($values as $v) { echo base64_encode(serialize($v)), "\n"; }
"#;

#[test]
fn php_values_read_and_write_back_byte_for_byte() {
    let Some(lines) = php_cli::lines(PHP_CORPUS, b"") else {
        return;
    };
    assert!(lines.len() > 40);
    for line in lines {
        let php = BASE64.decode(line).unwrap();
        let value =
            unserialize(&php).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&php)));
        assert_eq!(
            String::from_utf8_lossy(&serialize(&value)),
            String::from_utf8_lossy(&php)
        );
    }
}

#[test]
fn php_agrees_on_what_is_accepted() {
    let inputs: Vec<&str> = ACCEPTED
        .iter()
        .map(|(input, _)| *input)
        .chain(REFUSED.iter().copied())
        .collect();
    let stdin: String = inputs.iter().map(|i| BASE64.encode(i) + "\n").collect();
    let Some(lines) = php_cli::lines(
        r#"while (($l = fgets(STDIN)) !== false) {
            $in = base64_decode(trim($l));
            $v = @unserialize($in);
            echo ($v === false && $in !== 'b:0;') ? "REFUSED" : serialize($v), "\n";
        }"#,
        stdin.as_bytes(),
    ) else {
        return;
    };
    for (input, php) in inputs.iter().zip(lines) {
        let ours = reserialize(input).unwrap_or_else(|_| "REFUSED".into());
        assert_eq!(ours, php, "{input}");
    }
}

/// A small deterministic generator (xorshift), so the corpus is the same on
/// every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn floats_are_written_as_php_writes_them() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut floats = vec![
        0.0,
        -0.0,
        1.0,
        2f64.powi(53),
        2f64.powi(53) + 2.0,
        9007199254740993.0,
    ];
    for _ in 0..1500 {
        // Any bit pattern: every exponent, subnormals, NaN and INF.
        floats.push(f64::from_bits(rng.next()));
    }
    for _ in 0..1500 {
        // Short decimals around the switches to and from exponent form.
        let digits = rng.next() % 10u64.pow(1 + (rng.next() % 17) as u32);
        let exponent = (rng.next() % 50) as i32 - 25;
        let sign = if rng.next() % 2 == 0 { 1.0 } else { -1.0 };
        floats.push(sign * digits as f64 * 10f64.powi(exponent));
    }
    let stdin: String = floats
        .iter()
        .map(|f| format!("{:016x}\n", f.to_bits()))
        .collect();
    let Some(lines) = php_cli::lines(
        r#"while (($l = fgets(STDIN)) !== false) {
            echo serialize(unpack("E", hex2bin(trim($l)))[1]), "\n";
        }"#,
        stdin.as_bytes(),
    ) else {
        return;
    };
    assert_eq!(lines.len(), floats.len());
    for (f, php) in floats.iter().zip(lines) {
        let ours = String::from_utf8(serialize(&Value::Float(*f))).unwrap();
        assert_eq!(ours, php, "bits {:016x}", f.to_bits());
        let read = unserialize(php.as_bytes()).unwrap();
        assert!(same(&read, &Value::Float(*f)), "{php} reads back");
    }
}

/// JSON texts (not `-0`: serde_json reads it as the float -0.0, PHP as the
/// int 0).
const JSON_CORPUS: &[&str] = &[
    "null",
    "true",
    "0",
    "-0.0",
    "1.0",
    "1.5",
    "1e3",
    "1E+25",
    "12345678901234567890",
    "-12345678901234567890",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    r#""héllo""#,
    r#""\u0000""#,
    "[]",
    "{}",
    r#"[1,[2,{}]]"#,
    r#"{"5":1,"-3":2,"05":3,"-0":4,"":5,"a":6,"9223372036854775808":7,"-9223372036854775808":8,"1.5":9," 1":10}"#,
    r#"{"0":"a","1":"b"}"#,
    r#"{"1":"a","0":"b"}"#,
    r#"{"a":{"b":{"c":[true,false,null]}}}"#,
];

#[test]
fn json_becomes_the_php_value_json_decode_makes() {
    let stdin: String = JSON_CORPUS.iter().map(|j| format!("{j}\n")).collect();
    let Some(lines) = php_cli::lines(
        r#"while (($l = fgets(STDIN)) !== false) {
            echo base64_encode(serialize(json_decode(trim($l), true))), "\n";
        }"#,
        stdin.as_bytes(),
    ) else {
        return;
    };
    for (json, php) in JSON_CORPUS.iter().zip(lines) {
        let php = BASE64.decode(php).unwrap();
        let ours = serialize(&Value::from_json(&serde_json::from_str(json).unwrap()));
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&php),
            "{json}"
        );
    }
}

const MERGE_CORPUS: &[(&str, &str)] = &[
    (
        r#"{"a":1,"nested":{"x":1,"y":2},"keep":true}"#,
        r#"{"a":2,"nested":{"y":3,"z":4},"new":[1]}"#,
    ),
    (r#"{"tags":["a","b","c"]}"#, r#"{"tags":["x"]}"#),
    (r#"{"a":{"x":1}}"#, r#"{"a":[]}"#),
    (r#"{"a":[1,2]}"#, r#"{"a":{"1":"b"}}"#),
    (r#"{"a":{"0":"x","k":"v"}}"#, r#"{"a":["y"]}"#),
    (r#"{"a":1}"#, r#"{"a":{"b":2}}"#),
    (r#"{"a":{"b":2}}"#, r#"{"a":null}"#),
    (r#"{"0":"a","1":"b"}"#, r#"{"1":"c","2":"d"}"#),
    (r#"[1,2,3]"#, r#"[9]"#),
    (r#"{}"#, r#"{"x":1}"#),
    (r#"{"x":1}"#, r#"{}"#),
    (r#"{"5":"a","x":"b"}"#, r#"{"5":"c","05":"d"}"#),
    (
        r#"{"deep":{"l1":{"l2":{"l3":[1,{"k":"v"}]}}}}"#,
        r#"{"deep":{"l1":{"l2":{"l3":[null,{"k2":"v2"}]}}}}"#,
    ),
];

#[test]
fn array_replace_recursive_matches_php() {
    let stdin: String = MERGE_CORPUS
        .iter()
        .map(|(base, update)| format!("{base}\t{update}\n"))
        .collect();
    let Some(lines) = php_cli::lines(
        r#"while (($l = fgets(STDIN)) !== false) {
            [$base, $update] = explode("\t", trim($l));
            echo json_encode(array_replace_recursive(json_decode($base, true), json_decode($update, true))), "\n";
        }"#,
        stdin.as_bytes(),
    ) else {
        return;
    };
    for ((base, update), php) in MERGE_CORPUS.iter().zip(lines) {
        let ours = array_replace_recursive(
            &serde_json::from_str(base).unwrap(),
            &serde_json::from_str(update).unwrap(),
        );
        let php: serde_json::Value = serde_json::from_str(&php).unwrap();
        assert_eq!(ours, php, "{base} + {update}");
    }
}

/// The byte offset an error message names, if it names one.
fn named_offset(message: &str) -> Option<usize> {
    let rest = &message[message.find("byte ")? + 5..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

proptest! {
    /// A refusal is a clear error: a message, and the place it names is in
    /// the input (so a log line points at the offending byte).
    #[test]
    fn refusals_name_a_place_inside_the_input(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..128),
            arb_token_soup(),
        ],
    ) {
        let limits = Limits { max_depth: 2, max_elements: 4 };
        for result in [unserialize(&bytes), unserialize_with(&bytes, limits)] {
            if let Err(e) = result {
                let message = e.to_string();
                prop_assert!(message.starts_with("serialized PHP"), "{}", message);
                if let Some(offset) = named_offset(&message) {
                    prop_assert!(offset <= bytes.len(), "{} for {} bytes", message, bytes.len());
                }
            }
        }
    }
}
