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
//! Unlike connect events (`--events`), nothing is filtered out: a worker
//! runs the application's own code, which often authenticates from
//! `$_GET['token']` or a session cookie, exactly as with GatewayWorker.

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
}

impl Handshake {
    /// `serialize(['get' => …, 'server' => …, 'cookie' => …])`.
    pub fn to_php(&self) -> Vec<u8> {
        let query = self.uri.query().unwrap_or_default();
        let mut data = Array::new();
        data.insert(Key::from("get"), Value::Array(parse_str(query)));
        data.insert(Key::from("server"), Value::Array(self.server(query)));
        data.insert(Key::from("cookie"), Value::Array(self.cookies()));
        php::serialize(&Value::Array(data))
    }

    fn server(&self, query: &str) -> Array {
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
        let target = self.uri.path_and_query().map_or("/", |p| p.as_str());
        set("REQUEST_URI", Value::string(target));
        set("SERVER_PROTOCOL", Value::string(version(self.version)));
        set("SERVER_NAME", Value::String(host_name(host).to_vec()));
        set("CONTENT_TYPE", header(header::CONTENT_TYPE));
        set("REMOTE_ADDR", Value::string(self.client.ip().to_string()));
        set("REMOTE_PORT", Value::Int(self.client.port().into()));
        set("SERVER_PORT", Value::Int(self.server_port.into()));
        for name in self.headers.keys() {
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
        let mut cookies = Array::new();
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
                insert(&mut cookies, name, Value::String(value));
            }
        }
        cookies
    }
}

/// PHP's `parse_str` for the shapes forms and clients send.
pub fn parse_str(query: &str) -> Array {
    let mut out = Array::new();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name.is_empty() {
            continue;
        }
        insert(&mut out, name.as_bytes(), Value::string(value.into_owned()));
    }
    out
}

/// Sets `name` (with PHP's `a[]` / `a[k]` forms) to `value` in `array`.
fn insert(array: &mut Array, name: &[u8], value: Value) {
    let (base, sub) = match name.iter().position(|&b| b == b'[') {
        Some(i) if i > 0 && name.ends_with(b"]") => {
            (&name[..i], Some(&name[i + 1..name.len() - 1]))
        }
        _ => (name, None),
    };
    let key = Key::from_bytes(php_key(base));
    let Some(sub) = sub else {
        array.insert(key, value);
        return;
    };
    let entry = array
        .entry(key)
        .or_insert_with(|| Value::Array(Array::new()));
    if !matches!(entry, Value::Array(_)) {
        *entry = Value::Array(Array::new());
    }
    let Value::Array(inner) = entry else {
        return;
    };
    if sub.is_empty() {
        // PHP appends at the next integer key.
        let next = inner
            .keys()
            .filter_map(|k| match k {
                Key::Int(n) => Some(n + 1),
                Key::String(_) => None,
            })
            .max()
            .unwrap_or(0);
        inner.insert(Key::Int(next), value);
    } else {
        inner.insert(Key::from_bytes(sub.to_vec()), value);
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

    #[test]
    fn host_names_lose_their_port() {
        assert_eq!(host_name(b"example.com:80"), b"example.com");
        assert_eq!(host_name(b"example.com"), b"example.com");
        assert_eq!(host_name(b"[::1]:80"), b"[::1]");
    }
}
