//! Validation of [`Config`]: what clap cannot check on its own (relations
//! between options, durations too short to work, weak or placeholder
//! secrets, ports reachable from other hosts without a key).

use std::time::Duration;

use super::{
    Config, DrainSpread, MAX_CLIENT_JWT_LEEWAY, MIN_INNER_MAX_PACKET, MIN_NODE_HEARTBEAT,
    MIN_PING_INTERVAL, MIN_PING_TIMEOUT, MIN_REQUEST_HEAD_BYTES, MIN_SECRET_BYTES,
    MIN_SHUTDOWN_GRACE,
};

/// Values that deployment files and docs have shipped as placeholders (and
/// the usual ones): a secret that is one of these, ignoring case and the
/// characters `-`, `_`, `.`, ` `, is refused even when long enough, since
/// anyone who read the files knows it. One that contains a word of
/// [`PLACEHOLDER_WORDS`] is refused too ("change-me-in-production").
const PLACEHOLDER_SECRETS: &[&str] = &[
    "changeme",
    "changeit",
    "changemeplease",
    "secret",
    "password",
    "example",
    "placeholder",
    "replaceme",
    "replacemewithalongrandomapikey",
    "replacemewithalongrandomjwtsecret",
    "yourapikey",
    "yoursecret",
    "yourjwtsecret",
    "apikey",
    "jwtsecret",
    "test",
    "todo",
];

const PLACEHOLDER_WORDS: &[&str] = &["changeme", "replaceme", "placeholder"];

/// Refuses a secret that is short or a known placeholder, naming the flag.
pub(super) fn strong_secret(flag: &str, value: &str) -> Result<(), String> {
    let folded: String = value
        .chars()
        .filter(|c| !matches!(c, '-' | '_' | '.' | ' '))
        .flat_map(char::to_lowercase)
        .collect();
    if PLACEHOLDER_SECRETS.contains(&folded.as_str())
        || PLACEHOLDER_WORDS.iter().any(|word| folded.contains(word))
    {
        // The value itself is not echoed: it may be a real secret.
        return Err(format!(
            "{flag} is a placeholder value that deployment files and docs ship: \
             generate a random one, e.g. `openssl rand -hex 32`"
        ));
    }
    if value.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "{flag} must be at least {MIN_SECRET_BYTES} bytes (got {}): generate a \
             random one, e.g. `openssl rand -hex 32`",
            value.len()
        ));
    }
    Ok(())
}

/// `Err` naming `flag` when `value` is below `min`.
fn at_least(flag: &str, value: Duration, min: Duration) -> Result<(), String> {
    if value < min {
        return Err(format!(
            "{flag} must be at least {} (got {})",
            humantime::format_duration(min),
            humantime::format_duration(value)
        ));
    }
    Ok(())
}

impl Config {
    /// Checks what clap cannot: relations between options, and durations
    /// too short to work (a zero interval panics the task that ticks on
    /// it).
    pub fn validate(&self) -> Result<(), String> {
        if self.client_queue == 0 {
            return Err("--client-queue must be at least 1".into());
        }
        if self.max_list_items == 0 {
            return Err("--max-list-items must be at least 1".into());
        }
        if self.client_queue_bytes == 0 {
            return Err("--client-queue-bytes must be at least 1".into());
        }
        if self.max_message_bytes == 0 {
            return Err("--max-message-bytes must be at least 1".into());
        }
        at_least("--ping-interval", self.ping_interval, MIN_PING_INTERVAL)?;
        at_least("--ping-timeout", self.ping_timeout, MIN_PING_TIMEOUT)?;
        if self.ping_timeout <= self.ping_interval {
            return Err(format!(
                "--ping-timeout must be longer than --ping-interval, the time a \
                 client has to answer a ping (got {} and {})",
                humantime::format_duration(self.ping_timeout),
                humantime::format_duration(self.ping_interval)
            ));
        }
        at_least("--message-timeout", self.message_timeout, MIN_PING_INTERVAL)?;
        self.validate_history()?;
        self.validate_presence()?;
        at_least("--node-heartbeat", self.node_heartbeat, MIN_NODE_HEARTBEAT)?;
        if !self.redis_lost_grace.is_zero() {
            at_least(
                "--redis-lost-grace",
                self.redis_lost_grace,
                Duration::from_secs(1),
            )?;
        }
        at_least("--resume-window", self.resume_window, MIN_NODE_HEARTBEAT)?;
        at_least("--shutdown-grace", self.shutdown_grace, MIN_SHUTDOWN_GRACE)?;
        // The clients closed last still need time to answer and the node to
        // leave Redis: at most three quarters of the grace.
        if let DrainSpread::Fixed(spread) = self.drain_spread {
            if spread > self.shutdown_grace * 3 / 4 {
                return Err(format!(
                    "--drain-spread must be at most three quarters of --shutdown-grace \
                     (got {} and {})",
                    humantime::format_duration(spread),
                    humantime::format_duration(self.shutdown_grace)
                ));
            }
        }
        at_least(
            "--rebalance-interval",
            self.rebalance_interval,
            MIN_PING_INTERVAL,
        )?;
        if !(0.0..=10.0).contains(&self.rebalance_tolerance) {
            return Err("--rebalance-tolerance must be between 0 and 10".into());
        }
        if !(self.rebalance_rate > 0.0 && self.rebalance_rate <= 1.0) {
            return Err("--rebalance-rate must be above 0 and at most 1".into());
        }
        if self.evacuate_rate == 0 {
            return Err("--evacuate-rate must be at least 1".into());
        }
        if let Some(key) = &self.api_key {
            strong_secret("--api-key", key)?;
        }
        if let Some(secret) = &self.client_jwt_secret {
            strong_secret("--client-jwt-secret", secret)?;
        }
        if self.client_jwt_secret.is_some() && self.client_jwt_public_key.is_some() {
            return Err("set --client-jwt-secret or --client-jwt-public-key, not both".into());
        }
        if self.redis_password.is_some() && self.redis_url.is_none() {
            return Err("--redis-password needs --redis-url".into());
        }
        if self.events && self.redis_url.is_none() && self.events_webhook.is_none() {
            return Err("--events needs --redis-url (events stream) or --events-webhook".into());
        }
        if self.events_webhook.is_some() && self.redis_url.is_some() {
            return Err(
                "--events-webhook is for a single node: with --redis-url events go to the stream"
                    .into(),
            );
        }
        if self.events_redis_url.is_some() && self.redis_url.is_none() {
            return Err(
                "--events-redis-url needs --redis-url (it only moves the events stream)".into(),
            );
        }
        if self.events_max_bytes == 0 {
            return Err("--events-max-bytes must be at least 1".into());
        }
        if self.events_queue_bytes == 0 {
            return Err("--events-queue-bytes must be at least 1".into());
        }
        if self.max_session_bytes < 2 {
            return Err("--max-session-bytes must be at least 2 (the empty session, {})".into());
        }
        if self.events_max_len < 1 {
            return Err("--events-max-len must be at least 1".into());
        }
        if self.redis_prefix.is_empty() {
            return Err("--redis-prefix must not be empty".into());
        }
        self.validate_secure_defaults()?;
        self.validate_gateway()?;
        Ok(())
    }

    /// `--presence-events` and `--presence-prefixes` (issue 31).
    fn validate_presence(&self) -> Result<(), String> {
        let presence = self.presence();
        if let Some(bad) = self
            .presence_events
            .iter()
            .find(|p| !p.is_empty() && p.as_str() != "uid" && p.as_str() != "group")
        {
            return Err(format!(
                "--presence-events takes uid and group, comma-separated (got {bad:?})"
            ));
        }
        if (presence.uid || presence.group) && !self.events {
            return Err("--presence-events needs --events".into());
        }
        if presence.prefixes.iter().any(|p| p.contains('\n')) {
            return Err("--presence-prefixes: a prefix cannot hold a newline".into());
        }
        Ok(())
    }

    /// `--history-*` (issue 27).
    fn validate_history(&self) -> Result<(), String> {
        if !(1..=10_000).contains(&self.history_size) {
            return Err("--history-size must be between 1 and 10000".into());
        }
        at_least("--history-ttl", self.history_ttl, Duration::from_secs(1))
    }

    /// The GatewayWorker ports: a key (strong unless
    /// --gateway-weak-key-ok) whenever they are reachable from other hosts.
    fn validate_gateway(&self) -> Result<(), String> {
        let key = self.gateway_secret_key.as_str();
        if !key.is_empty() && !self.gateway_weak_key_ok {
            strong_secret("--gateway-secret-key", key).map_err(|e| {
                format!("{e} (--gateway-weak-key-ok accepts it, for a PHP fleet that cannot change its key yet)")
            })?;
        }
        if key.is_empty() && !self.gateway_insecure {
            let inner = ("--inner-listen", Some(self.inner_bind()));
            for (flag, addr) in [inner, ("--register-listen", self.register_listen)] {
                if let Some(addr) = addr.filter(|a| !a.ip().is_loopback()) {
                    return Err(format!(
                        "{flag} {addr} is reachable from other hosts: set \
                         --gateway-secret-key (GatewayWorker's secretKey, e.g. `openssl rand \
                         -hex 32`), or --gateway-insecure to serve it without one"
                    ));
                }
            }
        }
        if self.inner_max_packet < MIN_INNER_MAX_PACKET {
            return Err(format!(
                "--inner-max-packet must be at least {MIN_INNER_MAX_PACKET} (got {})",
                self.inner_max_packet
            ));
        }
        Ok(())
    }
}

/// Checks of the options that keep a node safe on the public internet
/// (issue 16), kept apart from the rest of `validate`.
impl Config {
    fn validate_secure_defaults(&self) -> Result<(), String> {
        if self.client_jwt_leeway > MAX_CLIENT_JWT_LEEWAY {
            return Err(format!(
                "--client-jwt-leeway must be at most {} (got {})",
                humantime::format_duration(MAX_CLIENT_JWT_LEEWAY),
                humantime::format_duration(self.client_jwt_leeway)
            ));
        }
        for (flag, value) in [
            ("--client-jwt-audience", &self.client_jwt_audience),
            ("--client-jwt-issuer", &self.client_jwt_issuer),
        ] {
            if value.as_deref() == Some("") {
                return Err(format!("{flag} must not be empty"));
            }
        }
        at_least(
            "--handshake-timeout",
            self.handshake_timeout,
            MIN_PING_INTERVAL,
        )?;
        if self.max_request_head_bytes < MIN_REQUEST_HEAD_BYTES {
            return Err(format!(
                "--max-request-head-bytes must be at least {MIN_REQUEST_HEAD_BYTES} (got {})",
                self.max_request_head_bytes
            ));
        }
        if self.connect_rate_per_ip > 0 && self.connect_burst_per_ip == 0 {
            return Err("--connect-burst-per-ip must be at least 1".into());
        }
        if self.client_message_rate > 0 && self.client_message_burst == 0 {
            return Err("--client-message-burst must be at least 1".into());
        }
        if self.api_key.as_ref().is_some_and(|key| key.is_empty()) {
            return Err("--api-key must not be empty (unset it to run without a key)".into());
        }
        if self.api_key.is_none() && !self.api_listen.ip().is_loopback() && !self.api_insecure {
            return Err(format!(
                "--api-listen {} is reachable from other hosts: set --api-key, or \
                 --api-insecure to serve the API without one",
                self.api_listen
            ));
        }
        // An empty entry (`--events-headers ""`) forwards nothing.
        if let Some(bad) = self.events_headers.iter().find(|name| {
            !name.is_empty() && axum::http::HeaderName::from_bytes(name.as_bytes()).is_err()
        }) {
            return Err(format!("--events-headers: {bad:?} is not a header name"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn validate(args: &[&str]) -> Result<(), String> {
        let mut argv = vec!["gatecast"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv).unwrap().validate()
    }

    #[test]
    fn durations_too_short_to_work_are_refused_naming_the_flag() {
        for (args, flag) in [
            (&["--node-heartbeat", "1ns"][..], "--node-heartbeat"),
            (&["--node-heartbeat", "99ms"], "--node-heartbeat"),
            (&["--ping-interval", "0s"], "--ping-interval"),
            (&["--ping-timeout", "100ms"], "--ping-timeout"),
            (&["--shutdown-grace", "500ms"], "--shutdown-grace"),
            (&["--redis-lost-grace", "500ms"], "--redis-lost-grace"),
            (
                &["--ping-interval", "30s", "--ping-timeout", "30s"],
                "--ping-timeout",
            ),
        ] {
            let error = validate(args).expect_err(&format!("{args:?} refused"));
            assert!(error.starts_with(flag), "{args:?}: {error}");
        }
    }

    #[test]
    fn the_shortest_durations_tests_use_are_accepted() {
        for args in [
            &["--node-heartbeat", "100ms"][..],
            &["--ping-interval", "100ms"],
            &["--ping-interval", "200ms", "--ping-timeout", "600ms"],
            &["--shutdown-grace", "1s"],
            &["--redis-lost-grace", "1s"],
            &["--redis-lost-grace", "0"],
        ] {
            validate(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
    }

    #[test]
    fn client_jwt_options_have_safe_defaults_and_bounds() {
        let c = Config::try_parse_from(["gatecast"]).unwrap();
        assert!(c.client_jwt_require_exp);
        assert!(!c.client_jwt_enforce_exp);
        assert_eq!(c.client_jwt_leeway, Duration::from_secs(30));
        let c = Config::try_parse_from(["gatecast", "--client-jwt-require-exp=false"]).unwrap();
        assert!(!c.client_jwt_require_exp);
        for (args, flag) in [
            (&["--client-jwt-leeway", "10m"][..], "--client-jwt-leeway"),
            (&["--client-jwt-audience", ""], "--client-jwt-audience"),
            (&["--client-jwt-issuer", ""], "--client-jwt-issuer"),
            (&["--events-headers", "origin,bad name"], "--events-headers"),
            (&["--api-key", ""], "--api-key"),
            (&["--api-listen", "0.0.0.0:8081"], "--api-listen"),
            (&["--api-listen", "10.0.0.7:8081"], "--api-listen"),
            (&["--api-listen", "[::]:8081"], "--api-listen"),
        ] {
            let error = validate(args).expect_err(&format!("{args:?} refused"));
            assert!(error.starts_with(flag), "{args:?}: {error}");
        }
    }

    #[test]
    fn a_reachable_api_needs_a_key_or_an_explicit_insecure() {
        for args in [
            &["--api-listen", "127.0.0.1:0"][..],
            &["--api-listen", "[::1]:8081"],
            &[
                "--api-listen",
                "0.0.0.0:8081",
                "--api-key",
                "config-test-api-key-01",
            ],
            &["--api-listen", "0.0.0.0:8081", "--api-insecure"],
        ] {
            validate(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
    }

    #[test]
    fn reachable_gateway_ports_need_a_strong_key_or_an_explicit_flag() {
        const KEY: &str = "config-test-gateway-key-01";
        for (args, flag) in [
            (&["--inner-listen", "0.0.0.0:2900"][..], "--inner-listen"),
            (&["--inner-listen", "10.0.0.7:2900"], "--inner-listen"),
            (&["--register-listen", "0.0.0.0:1236"], "--register-listen"),
            (&["--gateway-secret-key", "s3cret"], "--gateway-secret-key"),
            (
                &["--gateway-secret-key", "change-me-please-now"],
                "--gateway-secret-key",
            ),
            (&["--inner-max-packet", "1000"], "--inner-max-packet"),
        ] {
            let error = validate(args).expect_err(&format!("{args:?} refused"));
            assert!(error.starts_with(flag), "{args:?}: {error}");
        }
        for args in [
            &["--inner-listen", "127.0.0.1:2900"][..],
            &["--register-listen", "127.0.0.1:1236"],
            &[
                "--inner-listen",
                "0.0.0.0:2900",
                "--gateway-secret-key",
                KEY,
            ],
            &[
                "--register-listen",
                "0.0.0.0:1236",
                "--gateway-secret-key",
                KEY,
            ],
            &["--inner-listen", "0.0.0.0:2900", "--gateway-insecure"],
            &["--gateway-secret-key", "s3cret", "--gateway-weak-key-ok"],
        ] {
            validate(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
        let weak = Config::try_parse_from([
            "gatecast",
            "--gateway-secret-key",
            "s3cret",
            "--gateway-weak-key-ok",
        ])
        .unwrap();
        assert!(weak
            .warnings()
            .iter()
            .any(|w| w.contains("--gateway-weak-key-ok")));
    }
}
