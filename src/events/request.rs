//! What connect events keep of the upgrade request: the query string
//! without the client's token, and the headers `--events-headers` names.

use serde_json::{Map, Value};

/// The query string of `/ws` as connect events carry it: without `token`
/// nor `resume`, so client credentials do not end up in the stream. Keys
/// are compared decoded, as the token is read: `?%74oken=` is a token too.
pub fn forwarded_query(query: &str) -> String {
    without_keys(query, &[b"token", b"resume"])
}

/// The query string without `resume`: a resume token is a credential (a
/// refused one may still be good), never handed on, whatever else is.
pub fn without_resume_token(query: &str) -> String {
    without_keys(query, &[b"resume"])
}

fn without_keys(query: &str, keys: &[&[u8]]) -> String {
    query
        .split('&')
        .filter(|pair| {
            let key = form_decode(pair.split('=').next().unwrap_or_default());
            !pair.is_empty() && !keys.contains(&key.as_slice())
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// `application/x-www-form-urlencoded` decoding of one key or value:
/// `+` is a space, `%XX` a byte; a `%` not followed by two hex digits
/// stays as it is.
fn form_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// The headers of an upgrade request that connect events carry: those
/// named in `names` (`--events-headers`), under their lower-case names.
pub fn forwarded_headers(names: &[String], headers: &axum::http::HeaderMap) -> Map<String, Value> {
    names
        .iter()
        .filter_map(|name| {
            let value = headers.get(name.as_str())?.to_str().ok()?;
            Some((name.to_ascii_lowercase(), Value::String(value.to_owned())))
        })
        .collect()
}
