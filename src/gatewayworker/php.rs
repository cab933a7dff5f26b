//! PHP `serialize()` / `unserialize()` for the values GatewayWorker exchanges,
//! their mapping to and from JSON, and PHP's `array_replace_recursive`.
//!
//! GatewayWorker stores a connection's session as a `serialize()`d PHP array,
//! GatewayClient sends sessions that way (`setSession`, `updateSession`), and
//! every query reply is a `serialize()`d value. gatecast keeps sessions as
//! JSON objects, so this module converts between the two and merges as the
//! gateway does.
//!
//! # What is covered
//!
//! `null`, `bool`, `int` (i64), `float`, `string` (bytes, not necessarily
//! UTF-8) and `array` (an ordered map with int or string keys). Objects
//! (`O:`, `C:`, `E:`), references (`r:`, `R:`) and the escaped string form
//! (`S:`) are refused with [`PhpError::Unsupported`]: GatewayWorker never
//! produces them, and its own decoder refuses classes.
//!
//! Output is byte for byte what PHP 8 writes (`serialize_precision = -1`:
//! floats in the shortest form that reads back exactly, `1.0E+25` style past
//! 17 integer digits or below 1e-4). Input follows PHP's grammar with these
//! differences, all on input PHP's `serialize()` never writes: bytes after the
//! value are an error (PHP 8.2 ignores them), an `i:` out of the i64 range is
//! an error (PHP 8.2 clamps it), and nesting and element counts are limited
//! ([`Limits`]).
//!
//! As in PHP, a string key that is a canonical integer (`"5"`, `"-3"`, not
//! `"05"` or `"-0"`) *is* an integer key, and a repeated key keeps its first
//! position and takes the last value.
//!
//! # Hostile input
//!
//! [`unserialize`] never panics, never recurses deeper than
//! [`Limits::max_depth`], and checks every declared length against the bytes
//! that remain before allocating anything for it (an array entry takes at
//! least 6 bytes, so `a:4294967295:{` fails at once), so memory stays
//! proportional to the input.
//!
//! # Why not a crate
//!
//! Written by hand because none of the crates on crates.io fits:
//! - `muesli` 0.1.0 keeps mixed arrays and byte strings, but its recursive
//!   parser has no depth limit (`a:1:{i:0;` repeated overflows the stack),
//!   it cannot read floats with an exponent (`d:1.0E+25;`, which PHP 8 writes),
//!   and it writes `1e25` as `d:10000000000000000000000000;`;
//! - `serde_php` 0.5 / `php_serde` 0.6 go through serde: an array must be
//!   either a list with keys 0..n-1 or have only string keys (a mixed array, as
//!   GatewayWorker's query replies often are, is refused), there is no
//!   `INF`/`NAN`, no depth limit, and a declared string length is allocated
//!   before it is read (`s:4000000000:"` asks for 4 GB).
//!
//! # JSON mapping
//!
//! [`Value::to_json`] is what PHP's `json_encode` does, and [`Value::from_json`]
//! what `json_decode($json, true)` does, with these choices where JSON cannot
//! say what PHP holds:
//! - an array whose keys are 0..n-1 in order (including the empty array)
//!   becomes a JSON array, any other a JSON object with the keys as strings;
//! - a string that is not UTF-8 becomes `{"$php_bytes": "<standard base64>"}`,
//!   and [`Value::from_json`] turns exactly that shape (one key, base64 of
//!   bytes that are not UTF-8) back into the bytes, so binary strings survive a
//!   trip through gatecast's JSON sessions unchanged; a *key* that is not UTF-8
//!   is converted lossily (invalid sequences become U+FFFD);
//! - `INF`, `-INF` and `NAN` become `null` (JSON has no such numbers);
//! - a JSON integer beyond i64 becomes a float, as in PHP.

use std::fmt;

use base64::Engine as _;
use indexmap::IndexMap;
use serde_json::Map;

use crate::session::Session;

mod unserialize;

pub use unserialize::{unserialize, unserialize_with};

/// The JSON key that marks a PHP string that is not UTF-8 (see the module doc).
pub const BYTES_KEY: &str = "$php_bytes";

/// A PHP value, as far as GatewayWorker's messages go.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null` (`N;`).
    Null,
    /// `true` / `false` (`b:1;`).
    Bool(bool),
    /// An integer (`i:5;`); PHP's int is 64-bit on every platform GatewayWorker
    /// runs on.
    Int(i64),
    /// A float (`d:0.1;`), including `INF`, `-INF` and `NAN`.
    Float(f64),
    /// A string: bytes, since PHP strings need not be UTF-8.
    String(Vec<u8>),
    /// An array: PHP's ordered map.
    Array(Array),
}

/// A PHP array: keys are unique and keep their insertion order.
pub type Array = IndexMap<Key, Value>;

/// A PHP array key.
///
/// Build string keys with [`Key::from_bytes`] (or `From<&str>`), which turns
/// canonical integers into [`Key::Int`] as PHP does, so that two keys PHP
/// considers the same compare equal here too.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// An integer key.
    Int(i64),
    /// A string key that is not a canonical integer.
    String(Vec<u8>),
}

impl Key {
    /// The key PHP uses for the string `bytes`: `"5"` and `"-3"` are the
    /// integers 5 and -3, while `"05"`, `"-0"`, `" 5"` and integers beyond
    /// i64 stay strings.
    pub fn from_bytes(bytes: Vec<u8>) -> Key {
        match canonical_int(&bytes) {
            Some(n) => Key::Int(n),
            None => Key::String(bytes),
        }
    }

    /// The key as JSON writes it: integers in decimal, strings lossily
    /// converted to UTF-8.
    pub fn to_json_key(&self) -> String {
        match self {
            Key::Int(n) => n.to_string(),
            Key::String(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        }
    }
}

impl From<&str> for Key {
    fn from(key: &str) -> Key {
        Key::from_bytes(key.as_bytes().to_vec())
    }
}

impl From<i64> for Key {
    fn from(key: i64) -> Key {
        Key::Int(key)
    }
}

/// PHP's `ZEND_HANDLE_NUMERIC_STR`: the integer a string key stands for, if any.
fn canonical_int(bytes: &[u8]) -> Option<i64> {
    let digits = bytes.strip_prefix(b"-").unwrap_or(bytes);
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // "0" is an integer; "05", "-0" and "-05" are not.
    if digits[0] == b'0' && bytes.len() > 1 {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// How much [`unserialize_with`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The deepest array nesting accepted; a top-level array is depth 1.
    pub max_depth: usize,
    /// The most array entries accepted, summed over every array in the value.
    pub max_elements: usize,
}

impl Limits {
    /// 128 levels (serde_json's own recursion limit, so a session gatecast
    /// holds as JSON comes back through PHP) and 100 000 array entries (about
    /// 12 MB of memory at some 115 bytes an entry; sessions are far smaller).
    pub const DEFAULT: Limits = Limits {
        max_depth: 128,
        max_elements: 100_000,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// Why some bytes are not a PHP value this module reads. Every variant names
/// the byte offset where reading stopped, for the log line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhpError {
    /// The input ends in the middle of a value.
    #[error("serialized PHP value ends early (byte {offset})")]
    UnexpectedEnd {
        /// Where more input was needed.
        offset: usize,
    },
    /// A byte that PHP's grammar does not allow there.
    #[error("serialized PHP value: expected {expected} at byte {offset}")]
    Expected {
        /// Where the unexpected byte is.
        offset: usize,
        /// What the grammar wanted.
        expected: &'static str,
    },
    /// A type tag that is not PHP's at all.
    #[error("serialized PHP value: unknown type {tag:?} at byte {offset}")]
    UnknownType {
        /// Where the tag is.
        offset: usize,
        /// The tag byte, as a Latin-1 char.
        tag: char,
    },
    /// A PHP object, reference or escaped string: valid PHP, refused here.
    #[error("serialized PHP {what} at byte {offset} is not accepted (only null, bool, int, float, string and array are)")]
    Unsupported {
        /// Where it starts.
        offset: usize,
        /// What it is.
        what: &'static str,
    },
    /// An `i:` (value or key) outside the i64 range.
    #[error("serialized PHP integer at byte {offset} is out of the 64-bit range")]
    IntegerOutOfRange {
        /// Where the integer starts.
        offset: usize,
    },
    /// A string or array claims more than the bytes that remain could hold.
    #[error("serialized PHP value: declared length {declared} at byte {offset} runs past the end of the input")]
    LengthPastEnd {
        /// Where the length is.
        offset: usize,
        /// The declared length (saturated at u64::MAX).
        declared: u64,
    },
    /// Arrays nest deeper than [`Limits::max_depth`].
    #[error("serialized PHP value nests deeper than {max} arrays (byte {offset})")]
    TooDeep {
        /// Where the array that is one too deep starts.
        offset: usize,
        /// The limit.
        max: usize,
    },
    /// More array entries than [`Limits::max_elements`].
    #[error("serialized PHP value has more than {max} array entries (byte {offset})")]
    TooManyElements {
        /// Where the array that went over starts.
        offset: usize,
        /// The limit.
        max: usize,
    },
    /// An array key that is neither `i:` nor `s:`.
    #[error("serialized PHP array key at byte {offset} is neither an integer nor a string")]
    InvalidKey {
        /// Where the key starts.
        offset: usize,
    },
    /// Bytes left after a complete value.
    #[error("serialized PHP value is followed by unexpected bytes at byte {offset}")]
    TrailingBytes {
        /// Where the extra bytes start.
        offset: usize,
    },
    /// A value that should be a PHP array (a session) is something else.
    #[error("serialized PHP value is a {found}, not an array")]
    NotAnArray {
        /// The PHP type found.
        found: &'static str,
    },
}

/// PHP's `serialize($value)`, byte for byte as PHP 8 writes it.
///
/// Recursive: values from [`unserialize`] or [`Value::from_json`] nest at most
/// 128 deep, so the stack is safe for them.
pub fn serialize(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    serialize_into(value, &mut out);
    out
}

/// [`serialize`], appending to `out` (to build a reply in one buffer).
pub fn serialize_into(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"N;"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"b:1;" } else { b"b:0;" }),
        Value::Int(n) => {
            out.extend_from_slice(b"i:");
            out.extend_from_slice(n.to_string().as_bytes());
            out.push(b';');
        }
        Value::Float(f) => {
            out.extend_from_slice(b"d:");
            out.extend_from_slice(format_float(*f).as_bytes());
            out.push(b';');
        }
        Value::String(bytes) => write_string(bytes, out),
        Value::Array(array) => {
            out.extend_from_slice(b"a:");
            out.extend_from_slice(array.len().to_string().as_bytes());
            out.extend_from_slice(b":{");
            for (key, value) in array {
                match key {
                    Key::Int(n) => serialize_into(&Value::Int(*n), out),
                    Key::String(bytes) => write_string(bytes, out),
                }
                serialize_into(value, out);
            }
            out.push(b'}');
        }
    }
}

fn write_string(bytes: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"s:");
    out.extend_from_slice(bytes.len().to_string().as_bytes());
    out.extend_from_slice(b":\"");
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\";");
}

/// A float as PHP 8 writes it with `serialize_precision = -1` (its
/// `smart_str_append_double` / `zend_gcvt` with 17 digits): the shortest
/// digits that read back exactly; exponent form (`1.0E+25`, `1.5E-7`) when the
/// decimal point would sit more than 17 digits right of the first digit or
/// more than 3 zeros left of it; no `.0` on integral values (`d:1;`);
/// `INF`, `-INF`, `NAN`; `-0` for negative zero.
pub fn format_float(f: f64) -> String {
    if f.is_nan() {
        return "NAN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "INF".into() } else { "-INF".into() };
    }
    // zend_dtoa mode 0 (David Gay's): the fewest digits that read back
    // exactly and, among those, the closest to the value, ties to even.
    // Rust's `{:e}` gives the fewest digits but breaks an exact tie upwards
    // (…532.125 becomes …532.13 where PHP writes …532.12); its fixed-precision
    // form rounds the exact value half to even, so take that when it still
    // reads back. Either is "d.ddde<exp>".
    let shortest = format!("{:e}", f.abs());
    let significant = shortest
        .split('e')
        .next()
        .map_or(1, |m| m.bytes().filter(u8::is_ascii_digit).count());
    let nearest = format!("{:.*e}", significant.saturating_sub(1), f.abs());
    let sci = if nearest.parse::<f64>().ok() == Some(f.abs()) {
        nearest
    } else {
        shortest
    };
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let exponent: i32 = exponent.parse().unwrap_or(0);
    // zend_dtoa's decpt: the value is 0.DIGITS × 10^decpt.
    let decpt = exponent + 1;
    let mut out = String::with_capacity(digits.len() + 8);
    if f.is_sign_negative() {
        out.push('-');
    }
    if !(-3..=17).contains(&decpt) {
        let (first, rest) = digits.split_at(1);
        out.push_str(first);
        out.push('.');
        out.push_str(if rest.is_empty() { "0" } else { rest });
        out.push('E');
        out.push(if exponent < 0 { '-' } else { '+' });
        out.push_str(&exponent.unsigned_abs().to_string());
    } else if decpt <= 0 {
        out.push_str("0.");
        for _ in decpt..0 {
            out.push('0');
        }
        out.push_str(&digits);
    } else {
        let point = decpt.unsigned_abs() as usize;
        if digits.len() > point {
            out.push_str(&digits[..point]);
            out.push('.');
            out.push_str(&digits[point..]);
        } else {
            out.push_str(&digits);
            for _ in digits.len()..point {
                out.push('0');
            }
        }
    }
    out
}

impl Value {
    /// The PHP type name, for errors and logs.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// A PHP string from UTF-8 text.
    pub fn string(text: impl Into<String>) -> Value {
        Value::String(text.into().into_bytes())
    }

    /// What PHP's `json_encode` makes of this value, with the choices the
    /// module doc lists for what JSON cannot hold.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(n) => serde_json::Value::from(*n),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
            Value::String(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => serde_json::Value::String(text.to_owned()),
                Err(_) => {
                    let mut marker = Map::new();
                    marker.insert(
                        BYTES_KEY.to_owned(),
                        base64::engine::general_purpose::STANDARD
                            .encode(bytes)
                            .into(),
                    );
                    serde_json::Value::Object(marker)
                }
            },
            Value::Array(array) if is_list(array) => {
                serde_json::Value::Array(array.values().map(Value::to_json).collect())
            }
            Value::Array(array) => serde_json::Value::Object(array_to_map(array)),
        }
    }

    /// What PHP's `json_decode($json, true)` makes of `json`: objects become
    /// arrays whose canonical-integer keys are integers, and the
    /// `{"$php_bytes": …}` marker becomes the bytes it holds.
    pub fn from_json(json: &serde_json::Value) -> Value {
        match json {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(n) => Value::Int(n),
                // Beyond i64 (or a float): PHP makes it a float too.
                None => n.as_f64().map_or(Value::Null, Value::Float),
            },
            serde_json::Value::String(text) => Value::string(text.as_str()),
            serde_json::Value::Array(items) => Value::Array(
                (0i64..)
                    .zip(items)
                    .map(|(i, item)| (Key::Int(i), Value::from_json(item)))
                    .collect(),
            ),
            serde_json::Value::Object(map) => match bytes_marker(map) {
                Some(bytes) => Value::String(bytes),
                None => Value::Array(map_to_array(map)),
            },
        }
    }

    /// PHP's `array_replace_recursive($this, $update)`: every key of `update`
    /// replaces the same key here, except that where both hold arrays they
    /// merge the same way, key by key (list indexes included). When `self` or
    /// `update` is not an array, `update` replaces `self` (PHP would throw).
    pub fn replace_recursive(&mut self, update: Value) {
        match (self, update) {
            (Value::Array(base), Value::Array(update)) => replace_array(base, update),
            (base, update) => *base = update,
        }
    }
}

/// PHP's `array_replace_recursive` on two arrays.
fn replace_array(base: &mut Array, update: Array) {
    for (key, new) in update {
        match (base.get_mut(&key), new) {
            (Some(Value::Array(old)), Value::Array(new)) => replace_array(old, new),
            // PHP's zend_hash_update: an existing key keeps its place, a new
            // one goes at the end.
            (_, new) => {
                base.insert(key, new);
            }
        }
    }
}

impl From<&serde_json::Value> for Value {
    fn from(json: &serde_json::Value) -> Value {
        Value::from_json(json)
    }
}

impl From<&Value> for serde_json::Value {
    fn from(value: &Value) -> serde_json::Value {
        value.to_json()
    }
}

impl fmt::Display for Value {
    /// The serialized form, lossily as UTF-8 (for logs and test failures).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&serialize(self)))
    }
}

/// PHP's `array_is_list`: keys 0..n-1 in order.
fn is_list(array: &Array) -> bool {
    (0i64..)
        .zip(array.keys())
        .all(|(i, key)| *key == Key::Int(i))
}

fn array_to_map(array: &Array) -> Map<String, serde_json::Value> {
    array
        .iter()
        .map(|(key, value)| (key.to_json_key(), value.to_json()))
        .collect()
}

fn map_to_array(map: &Map<String, serde_json::Value>) -> Array {
    map.iter()
        .map(|(key, value)| (Key::from(key.as_str()), Value::from_json(value)))
        .collect()
}

/// The bytes of a `{"$php_bytes": "<base64>"}` marker, if `map` is exactly one
/// that [`Value::to_json`] could have written (bytes that are not UTF-8).
fn bytes_marker(map: &Map<String, serde_json::Value>) -> Option<Vec<u8>> {
    if map.len() != 1 {
        return None;
    }
    let encoded = map.get(BYTES_KEY)?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    std::str::from_utf8(&bytes).is_err().then_some(bytes)
}

/// PHP's `array_replace_recursive($base, $update)` on JSON values, as PHP
/// would compute it after `json_decode($json, true)` and before
/// `json_encode`: JSON arrays merge index by index like PHP lists (an update
/// `["x"]` replaces only index 0), and an empty update (`[]` or `{}`, the same
/// PHP array) changes nothing. See [`Value::replace_recursive`].
pub fn array_replace_recursive(
    base: &serde_json::Value,
    update: &serde_json::Value,
) -> serde_json::Value {
    let mut merged = Value::from_json(base);
    merged.replace_recursive(Value::from_json(update));
    merged.to_json()
}

/// A gatecast session as GatewayWorker stores it: `serialize()` of the PHP
/// array (`a:0:{}` for an empty session).
pub fn session_to_php(session: &Session) -> Vec<u8> {
    serialize(&Value::Array(map_to_array(session)))
}

/// A session GatewayClient sent (`setSession`, `updateSession`) as a gatecast
/// session. Empty input is the empty session (GatewayWorker's "no session
/// yet"); anything but an array is [`PhpError::NotAnArray`]. Top-level keys
/// are always object keys, even when the PHP array is a list, so a session
/// stays a JSON object.
pub fn session_from_php(bytes: &[u8]) -> Result<Session, PhpError> {
    if bytes.is_empty() {
        return Ok(Session::new());
    }
    match unserialize(bytes)? {
        Value::Array(array) => Ok(array_to_map(&array)),
        other => Err(PhpError::NotAnArray {
            found: other.type_name(),
        }),
    }
}

/// GatewayWorker's `updateSession` on gatecast sessions: PHP's
/// `array_replace_recursive($session, $update)`, keeping the result a JSON
/// object at the top level.
pub fn replace_session(session: &Session, update: &Session) -> Session {
    let mut merged = map_to_array(session);
    replace_array(&mut merged, map_to_array(update));
    array_to_map(&merged)
}

#[cfg(test)]
mod tests;
