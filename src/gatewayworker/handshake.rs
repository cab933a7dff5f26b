//! The WebSocket handshake as `Events::onWebSocketConnect($client_id, $data)`
//! sees it: `$data` is `['get' => $_GET, 'server' => $_SERVER, 'cookie' =>
//! $_COOKIE]`, built as GatewayWorker's gateway builds it from Workerman's
//! request (`Gateway::onWebsocketConnect`).
//!
//! `get` and `cookie` follow PHP's parsing of a query string and a `Cookie`
//! header: `+` and `%XX` decoded, `a[]=1&a[]=2` a list, `a[k]=1` a map one
//! level deep, the last value of a repeated key winning. `server` has the
//! request line's parts, the addresses and every header as `HTTP_NAME`.
//!
//! Unlike connect events (`--events`), little is filtered out: a worker
//! runs the application's own code, which often authenticates from
//! `$_GET['token']` or a session cookie, exactly as with GatewayWorker. Two
//! exceptions: when gatecast itself verified the client's JWT (`?token=`
//! with client auth on), that token is gatecast's and is left out unless
//! `--worker-keep-token`; and headers whose names hold `_` are left out of
//! `$_SERVER`, as nginx and PHP-FPM do, since `X_Real_IP` and `X-Real-IP`
//! would both become `HTTP_X_REAL_IP` (a client could forge a proxy's).
//!
//! Bounded as PHP bounds it: at most [`MAX_INPUT_VARS`] entries in `get` and
//! in `cookie` (PHP's `max_input_vars`; later ones are dropped), and appends
//! (`a[]=`) cost O(1) each, so a long query cannot cost a node more than a
//! linear pass.

use std::net::SocketAddr;

use axum::http::{header, HeaderMap, Method, Uri, Version};

use super::php::{self, Array, Key, Value};

/// What the handshake told the node, kept until the connection is
/// registered and its events go out.
#[derive(Debug)]
pub struct Handshake {
    /// The request method (always GET for a WebSocket).
    pub method: Method,
    /// The request target, path and query.
    pub uri: Uri,
    /// The HTTP version.
    pub version: Version,
    /// Every header.
    pub headers: HeaderMap,
    /// The client: its address (after `--trusted-proxies`) and port.
    pub client: SocketAddr,
    /// The port the client connected to.
    pub server_port: u16,
    /// Leave `token` out of the query: gatecast verified it as the
    /// client's JWT, and the application's code has no use for it.
    pub strip_token: bool,
}

/// Most entries `get` or `cookie` holds: PHP's default `max_input_vars`.
/// PHP drops the ones past it (with a warning); so does gatecast.
pub const MAX_INPUT_VARS: usize = 1000;

/// Largest serialized handshake a worker gets. Past it (a huge request
/// head allowed by `--max-request-head-bytes`) `get` and `cookie` are sent
/// empty and `$_SERVER` keeps only the request line and addresses.
pub const MAX_HANDSHAKE_BYTES: usize = 256 << 10;

impl Handshake {
    /// `serialize(['get' => …, 'server' => …, 'cookie' => …])`.
    pub fn to_php(&self) -> Vec<u8> {
        let raw_query = self.uri.query().unwrap_or_default();
        let query = if self.strip_token {
            crate::events::forwarded_query(raw_query)
        } else {
            crate::events::without_resume_token(raw_query)
        };
        let body = self.serialize(&query, true);
        if body.len() <= MAX_HANDSHAKE_BYTES {
            return body;
        }
        self.serialize(&query, false)
    }

    /// The serialized `$data`; without `full`, only what stays small.
    fn serialize(&self, query: &str, full: bool) -> Vec<u8> {
        let (get, cookie) = if full {
            (parse_str(query), self.cookies())
        } else {
            (Array::new(), Array::new())
        };
        let mut data = Array::new();
        data.insert(Key::from("get"), Value::Array(get));
        data.insert(Key::from("server"), Value::Array(self.server(query, full)));
        data.insert(Key::from("cookie"), Value::Array(cookie));
        php::serialize(&Value::Array(data))
    }

    fn server(&self, query: &str, with_headers: bool) -> Array {
        let header = |name: header::HeaderName| {
            self.headers
                .get(name)
                .map_or(Value::Null, |v| Value::String(v.as_bytes().to_vec()))
        };
        let host = self
            .headers
            .get(header::HOST)
            .map(|h| h.as_bytes())
            .unwrap_or_default();
        let mut server = Array::new();
        let mut set = |key: &str, value: Value| {
            server.insert(Key::from(key), value);
        };
        set("QUERY_STRING", Value::string(query));
        set("REQUEST_METHOD", Value::string(self.method.as_str()));
        let target = if query.is_empty() {
            self.uri.path().to_owned()
        } else {
            format!("{}?{query}", self.uri.path())
        };
        set("REQUEST_URI", Value::string(target));
        set("SERVER_PROTOCOL", Value::string(version(self.version)));
        set("SERVER_NAME", Value::String(host_name(host).to_vec()));
        set("CONTENT_TYPE", header(header::CONTENT_TYPE));
        set("REMOTE_ADDR", Value::string(self.client.ip().to_string()));
        set("REMOTE_PORT", Value::Int(self.client.port().into()));
        set("SERVER_PORT", Value::Int(self.server_port.into()));
        let headers = self.headers.keys().filter(|_| with_headers);
        // nginx's `underscores_in_headers off`: see the module doc.
        for name in headers.filter(|name| !name.as_str().contains('_')) {
            let values: Vec<&[u8]> = self
                .headers
                .get_all(name)
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            let key = format!(
                "HTTP_{}",
                name.as_str().to_ascii_uppercase().replace('-', "_")
            );
            set(&key, Value::String(values.join(&b", "[..])));
        }
        server
    }

    fn cookies(&self) -> Array {
        let mut cookies = Input::default();
        for header in self.headers.get_all(header::COOKIE) {
            for pair in header.as_bytes().split(|&b| b == b';') {
                let pair = pair.trim_ascii();
                let (name, value) = match pair.iter().position(|&b| b == b'=') {
                    Some(i) => (&pair[..i], &pair[i + 1..]),
                    None => (pair, &b""[..]),
                };
                if name.is_empty() {
                    continue;
                }
                // PHP decodes `%XX` in cookie values, not `+`.
                let value: Vec<u8> = percent_encoding::percent_decode(value).collect();
                if !cookies.insert(name, Value::String(value)) {
                    return cookies.array;
                }
            }
        }
        cookies.array
    }
}

/// PHP's `parse_str` for the shapes forms and clients send, keeping the
/// first [`MAX_INPUT_VARS`] entries.
pub fn parse_str(query: &str) -> Array {
    let mut out = Input::default();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name.is_empty() {
            continue;
        }
        if !out.insert(name.as_bytes(), Value::string(value.into_owned())) {
            break;
        }
    }
    out.array
}

/// A superglobal being built: the array, and for each of its sub-arrays
/// the next index `a[]` appends at (PHP's `nNextFreeElement`), so an
/// append does not scan the keys.
#[derive(Default)]
struct Input {
    array: Array,
    next: std::collections::HashMap<Key, i64>,
    entries: usize,
}

impl Input {
    /// Sets `name` (with PHP's `a[]` / `a[k]` forms) to `value`; false once
    /// [`MAX_INPUT_VARS`] entries are in (and `value` is dropped).
    fn insert(&mut self, name: &[u8], value: Value) -> bool {
        if self.entries >= MAX_INPUT_VARS {
            return false;
        }
        self.entries += 1;
        let (base, sub) = match name.iter().position(|&b| b == b'[') {
            Some(i) if i > 0 && name.ends_with(b"]") => {
                (&name[..i], Some(&name[i + 1..name.len() - 1]))
            }
            _ => (name, None),
        };
        let key = Key::from_bytes(php_key(base));
        let Some(sub) = sub else {
            self.next.remove(&key);
            self.array.insert(key, value);
            return true;
        };
        let entry = self
            .array
            .entry(key.clone())
            .or_insert_with(|| Value::Array(Array::new()));
        if !matches!(entry, Value::Array(_)) {
            *entry = Value::Array(Array::new());
            self.next.remove(&key);
        }
        let Value::Array(inner) = entry else {
            return true;
        };
        let next = self.next.entry(key).or_insert(0);
        let sub = if sub.is_empty() {
            Key::Int(*next)
        } else {
            Key::from_bytes(sub.to_vec())
        };
        if let Key::Int(n) = sub {
            *next = (*next).max(n.saturating_add(1));
        }
        inner.insert(sub, value);
        true
    }
}

/// PHP turns `.` and ` ` in variable names into `_`.
fn php_key(name: &[u8]) -> Vec<u8> {
    name.iter()
        .map(|&b| if b == b'.' || b == b' ' { b'_' } else { b })
        .collect()
}

/// `Host` without its port (`[::1]:80` keeps its brackets off the port).
fn host_name(host: &[u8]) -> &[u8] {
    if host.starts_with(b"[") {
        return match host.iter().position(|&b| b == b']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.iter().rposition(|&b| b == b':') {
        Some(i) => &host[..i],
        None => host,
    }
}

fn version(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn get(array: &Array, key: &str) -> Value {
        array.get(&Key::from(key)).cloned().unwrap_or(Value::Null)
    }

    #[test]
    fn query_strings_parse_as_php_does() {
        let get_ = parse_str("token=a%2Bb+c&ids[]=1&ids[]=2&user[name]=x&a.b=1&empty=&=skipped");
        assert_eq!(get(&get_, "token"), Value::string("a+b c"));
        let Value::Array(ids) = get(&get_, "ids") else {
            panic!("ids is not an array")
        };
        assert_eq!(ids.get(&Key::Int(0)), Some(&Value::string("1")));
        assert_eq!(ids.get(&Key::Int(1)), Some(&Value::string("2")));
        let Value::Array(user) = get(&get_, "user") else {
            panic!("user is not an array")
        };
        assert_eq!(user.get(&Key::from("name")), Some(&Value::string("x")));
        assert_eq!(get(&get_, "a_b"), Value::string("1"));
        assert_eq!(get(&get_, "empty"), Value::string(""));
        assert_eq!(get_.len(), 5);
    }

    #[test]
    fn server_and_cookies_carry_the_request() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("chat.example:8080"));
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("sid=a%20b; theme=dark"),
        );
        headers.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        let handshake = Handshake {
            method: Method::GET,
            uri: "/ws?room=1".parse().unwrap(),
            version: Version::HTTP_11,
            headers,
            client: "203.0.113.9:5555".parse().unwrap(),
            server_port: 8080,
            strip_token: false,
        };
        let Value::Array(data) = php::unserialize(&handshake.to_php()).unwrap() else {
            panic!("not an array")
        };
        let Value::Array(server) = get(&data, "server") else {
            panic!("no server")
        };
        assert_eq!(get(&server, "QUERY_STRING"), Value::string("room=1"));
        assert_eq!(get(&server, "REQUEST_URI"), Value::string("/ws?room=1"));
        assert_eq!(get(&server, "SERVER_NAME"), Value::string("chat.example"));
        assert_eq!(get(&server, "REMOTE_ADDR"), Value::string("203.0.113.9"));
        assert_eq!(get(&server, "REMOTE_PORT"), Value::Int(5555));
        assert_eq!(get(&server, "SERVER_PORT"), Value::Int(8080));
        assert_eq!(get(&server, "CONTENT_TYPE"), Value::Null);
        assert_eq!(
            get(&server, "HTTP_X_FORWARDED_FOR"),
            Value::string("203.0.113.9")
        );
        let Value::Array(cookie) = get(&data, "cookie") else {
            panic!("no cookie")
        };
        assert_eq!(get(&cookie, "sid"), Value::string("a b"));
        assert_eq!(get(&cookie, "theme"), Value::string("dark"));
        let Value::Array(query) = get(&data, "get") else {
            panic!("no get")
        };
        assert_eq!(get(&query, "room"), Value::string("1"));
    }

    fn handshake(uri: &str, headers: HeaderMap, strip_token: bool) -> Array {
        let handshake = Handshake {
            method: Method::GET,
            uri: uri.parse().unwrap(),
            version: Version::HTTP_11,
            headers,
            client: "203.0.113.9:5555".parse().unwrap(),
            server_port: 8080,
            strip_token,
        };
        let Value::Array(data) = php::unserialize(&handshake.to_php()).unwrap() else {
            panic!("not an array")
        };
        data
    }

    #[test]
    fn appends_cost_no_scan_and_entries_stop_at_max_input_vars() {
        // 8,000 appends: quadratic before (32 million key visits, tens of
        // ms in release, seconds in debug); linear now.
        let query = "a[]=1&".repeat(8000);
        let started = std::time::Instant::now();
        let get_ = parse_str(&query);
        let took = started.elapsed();
        let Value::Array(a) = get(&get_, "a") else {
            panic!("a is not an array")
        };
        assert_eq!(a.len(), MAX_INPUT_VARS);
        assert_eq!(a.get_index(999).map(|(k, _)| k), Some(&Key::Int(999)));
        // Generous for a debug build on a loaded machine: 1,000 entries.
        assert!(took < std::time::Duration::from_millis(200), "{took:?}");

        // Appends follow explicit indexes, as PHP's next free element.
        let mixed = parse_str("b[5]=x&b[]=y&b[k]=z&b[]=w&c=1&c[]=2");
        let Value::Array(b) = get(&mixed, "b") else {
            panic!("b is not an array")
        };
        let keys: Vec<_> = b.keys().cloned().collect();
        assert_eq!(
            keys,
            [Key::Int(5), Key::Int(6), Key::from("k"), Key::Int(7)]
        );
        let Value::Array(c) = get(&mixed, "c") else {
            panic!("c is not an array")
        };
        assert_eq!(c.get(&Key::Int(0)), Some(&Value::string("2")));

        // Plain keys count too, and cookies have their own 1,000.
        let many: String = (0..1500).map(|i| format!("k{i}=v&")).collect();
        assert_eq!(parse_str(&many).len(), MAX_INPUT_VARS);
        let cookie: String = (0..1500).map(|i| format!("c{i}=v; ")).collect();
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
        let Value::Array(cookies) = get(&handshake("/ws", headers, false), "cookie") else {
            panic!("no cookie")
        };
        assert_eq!(cookies.len(), MAX_INPUT_VARS);
    }

    #[test]
    fn a_handshake_too_large_keeps_only_the_request_line() {
        let mut headers = HeaderMap::new();
        let big = "x".repeat(MAX_HANDSHAKE_BYTES);
        headers.insert("x-big", HeaderValue::from_str(&big).unwrap());
        let data = handshake("/ws?room=1", headers, false);
        let Value::Array(get_) = get(&data, "get") else {
            panic!("no get")
        };
        assert!(get_.is_empty());
        let Value::Array(server) = get(&data, "server") else {
            panic!("no server")
        };
        assert_eq!(get(&server, "REMOTE_ADDR"), Value::string("203.0.113.9"));
        assert_eq!(get(&server, "QUERY_STRING"), Value::string("room=1"));
        assert_eq!(get(&server, "HTTP_X_BIG"), Value::Null);
    }

    #[test]
    fn gatecasts_token_is_left_out_and_underscored_headers_skipped() {
        let mut headers = HeaderMap::new();
        headers.insert("x-real-ip", HeaderValue::from_static("198.51.100.1"));
        headers.insert("x_real_ip", HeaderValue::from_static("6.6.6.6"));
        let data = handshake("/ws?token=secret.jwt&room=1", headers.clone(), true);
        let Value::Array(get_) = get(&data, "get") else {
            panic!("no get")
        };
        assert_eq!(get(&get_, "token"), Value::Null);
        assert_eq!(get(&get_, "room"), Value::string("1"));
        let Value::Array(server) = get(&data, "server") else {
            panic!("no server")
        };
        assert_eq!(get(&server, "QUERY_STRING"), Value::string("room=1"));
        assert_eq!(get(&server, "REQUEST_URI"), Value::string("/ws?room=1"));
        // The proxy's header wins whatever the order the client sent.
        assert_eq!(
            get(&server, "HTTP_X_REAL_IP"),
            Value::string("198.51.100.1")
        );
        // Kept when gatecast did not verify it (or --worker-keep-token).
        let data = handshake("/ws?token=app-token", headers, false);
        let Value::Array(get_) = get(&data, "get") else {
            panic!("no get")
        };
        assert_eq!(get(&get_, "token"), Value::string("app-token"));
    }

    #[test]
    fn host_names_lose_their_port() {
        assert_eq!(host_name(b"example.com:80"), b"example.com");
        assert_eq!(host_name(b"example.com"), b"example.com");
        assert_eq!(host_name(b"[::1]:80"), b"[::1]");
    }
}
