//! The command line: every option documented, every option also an
//! environment variable.

mod common;

use std::process::Command;

use common::{OutputWithin, WAIT};

/// The binary for `--help`, with nothing set.
fn help() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gatecast"))
}

/// The binary on free loopback ports unless a test sets its own (through
/// the environment, so a flag still wins): a check that stops refusing
/// leaves a node that binds nothing shared, and the deadline of
/// [`OutputWithin`] kills it.
fn gatecast() -> Command {
    let mut command = help();
    command
        .env("GATECAST_LISTEN", "127.0.0.1:0")
        .env("GATECAST_API_LISTEN", "127.0.0.1:0")
        .env("GATECAST_INNER_LISTEN", "127.0.0.1:0")
        .env_remove("GATECAST_API_KEY");
    command
}

#[test]
fn help_lists_every_option_with_its_environment_variable() {
    let out = help().arg("--help").output_within(WAIT);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for (flag, env) in [
        ("--listen", "GATECAST_LISTEN"),
        ("--api-listen", "GATECAST_API_LISTEN"),
        ("--inner-listen", "GATECAST_INNER_LISTEN"),
        ("--register-listen", "GATECAST_REGISTER_LISTEN"),
        ("--gateway-secret-key", "GATECAST_GATEWAY_SECRET_KEY"),
        ("--gateway-insecure", "GATECAST_GATEWAY_INSECURE"),
        ("--gateway-weak-key-ok", "GATECAST_GATEWAY_WEAK_KEY_OK"),
        ("--inner-max-packet", "GATECAST_INNER_MAX_PACKET"),
        ("--advertise-ip", "GATECAST_ADVERTISE_IP"),
        ("--redis-url", "GATECAST_REDIS_URL"),
        ("--redis-prefix", "GATECAST_REDIS_PREFIX"),
        ("--redis-password", "GATECAST_REDIS_PASSWORD"),
        ("--api-key", "GATECAST_API_KEY"),
        ("--api-insecure", "GATECAST_API_INSECURE"),
        ("--client-jwt-secret", "GATECAST_CLIENT_JWT_SECRET"),
        ("--client-jwt-public-key", "GATECAST_CLIENT_JWT_PUBLIC_KEY"),
        (
            "--client-jwt-require-exp",
            "GATECAST_CLIENT_JWT_REQUIRE_EXP",
        ),
        ("--client-jwt-audience", "GATECAST_CLIENT_JWT_AUDIENCE"),
        ("--client-jwt-issuer", "GATECAST_CLIENT_JWT_ISSUER"),
        ("--client-jwt-leeway", "GATECAST_CLIENT_JWT_LEEWAY"),
        (
            "--client-jwt-enforce-exp",
            "GATECAST_CLIENT_JWT_ENFORCE_EXP",
        ),
        ("--allowed-origins", "GATECAST_ALLOWED_ORIGINS"),
        ("--welcome-frame", "GATECAST_WELCOME_FRAME"),
        ("--max-message-bytes", "GATECAST_MAX_MESSAGE_BYTES"),
        ("--client-queue", "GATECAST_CLIENT_QUEUE"),
        ("--max-list-items", "GATECAST_MAX_LIST_ITEMS"),
        ("--max-connections", "GATECAST_MAX_CONNECTIONS"),
        (
            "--max-connections-per-ip",
            "GATECAST_MAX_CONNECTIONS_PER_IP",
        ),
        ("--trusted-proxies", "GATECAST_TRUSTED_PROXIES"),
        ("--client-queue-bytes", "GATECAST_CLIENT_QUEUE_BYTES"),
        ("--write-delay", "GATECAST_WRITE_DELAY"),
        ("--ping-interval", "GATECAST_PING_INTERVAL"),
        ("--ping-timeout", "GATECAST_PING_TIMEOUT"),
        ("--message-timeout", "GATECAST_MESSAGE_TIMEOUT"),
        ("--shutdown-grace", "GATECAST_SHUTDOWN_GRACE"),
        ("--drain-spread", "GATECAST_DRAIN_SPREAD"),
        ("--handshake-rate", "GATECAST_HANDSHAKE_RATE"),
        ("--handshake-ramp", "GATECAST_HANDSHAKE_RAMP"),
        ("--reconnect-window", "GATECAST_RECONNECT_WINDOW"),
        ("--evacuate-rate", "GATECAST_EVACUATE_RATE"),
        ("--rebalance", "GATECAST_REBALANCE"),
        ("--rebalance-tolerance", "GATECAST_REBALANCE_TOLERANCE"),
        ("--rebalance-rate", "GATECAST_REBALANCE_RATE"),
        ("--rebalance-interval", "GATECAST_REBALANCE_INTERVAL"),
        ("--node-heartbeat", "GATECAST_NODE_HEARTBEAT"),
        ("--redis-lost-grace", "GATECAST_REDIS_LOST_GRACE"),
        ("--resume-window", "GATECAST_RESUME_WINDOW"),
        ("--api-max-body-bytes", "GATECAST_API_MAX_BODY_BYTES"),
        ("--events", "GATECAST_EVENTS"),
        ("--events-max-len", "GATECAST_EVENTS_MAX_LEN"),
        ("--events-queue-bytes", "GATECAST_EVENTS_QUEUE_BYTES"),
        ("--events-webhook", "GATECAST_EVENTS_WEBHOOK"),
        ("--events-headers", "GATECAST_EVENTS_HEADERS"),
        (
            "--max-connections-per-sub",
            "GATECAST_MAX_CONNECTIONS_PER_SUB",
        ),
        ("--max-handshakes", "GATECAST_MAX_HANDSHAKES"),
        ("--max-partial-bytes", "GATECAST_MAX_PARTIAL_BYTES"),
        ("--max-session-bytes", "GATECAST_MAX_SESSION_BYTES"),
        ("--events-max-bytes", "GATECAST_EVENTS_MAX_BYTES"),
        ("--events-stream-bytes", "GATECAST_EVENTS_STREAM_BYTES"),
        ("--events-redis-url", "GATECAST_EVENTS_REDIS_URL"),
        ("--worker-keep-token", "GATECAST_WORKER_KEEP_TOKEN"),
        ("--demo", "GATECAST_DEMO"),
        ("--history-size", "GATECAST_HISTORY_SIZE"),
        ("--history-ttl", "GATECAST_HISTORY_TTL"),
        ("--history-streams", "GATECAST_HISTORY_STREAMS"),
        ("--presence-events", "GATECAST_PRESENCE_EVENTS"),
        ("--presence-grace", "GATECAST_PRESENCE_GRACE"),
        ("--presence-prefixes", "GATECAST_PRESENCE_PREFIXES"),
        ("--log-format", "GATECAST_LOG_FORMAT"),
        ("--log-level", "GATECAST_LOG_LEVEL"),
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
        assert!(help.contains(&format!("[env: {env}")), "--help lacks {env}");
    }
    // Defaults are shown.
    assert!(help.contains("[default: 0.0.0.0:8080]"));
    assert!(help.contains("[default: 127.0.0.1:8081]"));
    assert!(help.contains("[default: 20s]"));
    assert!(help.contains(r#"[default: {"type":"welcome","client_id":"{client_id}"}]"#));
}

#[test]
fn options_come_from_the_environment_and_bad_values_are_refused() {
    let out = gatecast()
        .env("GATECAST_CLIENT_QUEUE", "0")
        .output_within(WAIT);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--client-queue"));

    let out = gatecast().args(["--history-size", "0"]).output_within(WAIT);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--history-size"));

    let out = gatecast()
        .args(["--ping-interval", "soon"])
        .output_within(WAIT);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ping-interval"));

    // A write delay is a moment, not a schedule.
    let out = gatecast()
        .env("GATECAST_WRITE_DELAY", "1s")
        .output_within(WAIT);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--write-delay"));

    // Two nodes cannot share an inner port: the second fails fast.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = gatecast()
        .env("GATECAST_INNER_LISTEN", format!("127.0.0.1:{port}"))
        .args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
        .output_within(WAIT);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("inner"));

    // So does a node whose Register port is taken.
    let out = gatecast()
        .env("GATECAST_INNER_LISTEN", "127.0.0.1:0")
        .args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
        .args(["--register-listen", &format!("127.0.0.1:{port}")])
        .output_within(WAIT);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("register"), "{stderr}");
}

/// Durations too short to work (a zero or near-zero interval used to panic
/// the task ticking on it and leave the node running without it) are
/// refused at start, naming the flag, from the command line and from the
/// environment alike.
#[test]
fn durations_too_short_to_work_are_refused_at_start() {
    for (args, env, flag) in [
        (&["--node-heartbeat", "1ns"][..], None, "--node-heartbeat"),
        (
            &[],
            Some(("GATECAST_NODE_HEARTBEAT", "50ms")),
            "--node-heartbeat",
        ),
        (&["--ping-interval", "10ms"], None, "--ping-interval"),
        (&["--ping-timeout", "100ms"], None, "--ping-timeout"),
        (
            &["--ping-interval", "10s", "--ping-timeout", "5s"],
            None,
            "--ping-timeout",
        ),
        (&["--shutdown-grace", "0s"], None, "--shutdown-grace"),
    ] {
        let mut command = gatecast();
        command.args(args);
        if let Some((key, value)) = env {
            command.env(key, value);
        }
        let out = command.output_within(WAIT);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?} {env:?}: {stderr}");
        assert!(
            stderr.contains(&format!("{flag} must be")),
            "{args:?} {env:?}: {stderr}"
        );
    }
}

/// A placeholder or short API key or HS256 secret is refused at start,
/// naming the option: applied as shipped, a public JWT secret lets anyone
/// mint tokens for any user.
#[test]
fn placeholder_and_short_secrets_are_refused_naming_the_option() {
    for (env, flag) in [
        ("GATECAST_API_KEY", "--api-key"),
        ("GATECAST_CLIENT_JWT_SECRET", "--client-jwt-secret"),
    ] {
        for (value, why) in [
            ("change-me", "placeholder"),
            ("changeme", "placeholder"),
            ("CHANGE_ME", "placeholder"),
            ("secret", "placeholder"),
            ("example", "placeholder"),
            ("REPLACE-ME-with-a-long-random-api-key", "placeholder"),
            ("REPLACE-ME-with-a-long-random-jwt-secret", "placeholder"),
            ("change-me-in-production-please", "placeholder"),
            ("s3cret", "at least 16 bytes"),
            ("0123456789abcde", "at least 16 bytes"),
        ] {
            let out = gatecast()
                .env(env, value)
                .args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
                .args(["--inner-listen", "127.0.0.1:0"])
                .output_within(WAIT);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{env}={value} was accepted");
            assert!(stderr.contains(flag), "{env}={value}: {stderr}");
            assert!(stderr.contains(why), "{env}={value}: {stderr}");
            if why == "placeholder" && value.len() >= 16 {
                assert!(!stderr.contains(value), "the value is not echoed: {stderr}");
            }
        }
    }
}

/// On an IPv6-primary dual-stack pod, status.podIPs lists the IPv6 address
/// first: the IPv4 one is taken. IPv6 only is refused, saying why.
#[test]
fn advertise_ip_takes_the_ipv4_of_a_list_and_refuses_ipv6_only() {
    let out = gatecast()
        .env("GATECAST_ADVERTISE_IP", "fd00::1")
        .output_within(WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--advertise-ip"), "{stderr}");
    assert!(stderr.contains("no IPv4 address"), "{stderr}");

    // A dual-stack list is accepted: the node starts (and is stopped here).
    let mut child = gatecast()
        .env("GATECAST_ADVERTISE_IP", "fd00::7,10.1.2.3")
        .args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
        .args(["--inner-listen", "127.0.0.1:0", "--log-format", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    // Read on a thread so the wait is bounded even if the line never comes.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + WAIT;
    while let Ok(line) =
        rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        seen.push_str(&line);
        if line.contains("10.1.2.3") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.contains("10.1.2.3"),
        "the node advertises the IPv4 address: {seen}"
    );
}

/// The internal API on an address other hosts can reach needs a key (or
/// an explicit `--api-insecure`); an empty key is refused rather than
/// taken as "no key".
#[test]
fn a_reachable_api_without_a_key_is_refused_at_start() {
    for (args, env, flag) in [
        (&["--api-listen", "0.0.0.0:0"][..], None, "--api-listen"),
        (
            &[],
            Some(("GATECAST_API_LISTEN", "0.0.0.0:0")),
            "--api-listen",
        ),
        (
            &["--api-listen", "127.0.0.1:0", "--api-key", ""],
            None,
            "--api-key",
        ),
    ] {
        let mut command = gatecast();
        command
            .args(["--listen", "127.0.0.1:0", "--inner-listen", "127.0.0.1:0"])
            .env_remove("GATECAST_API_KEY")
            .args(args);
        if let Some((key, value)) = env {
            command.env(key, value);
        }
        let out = command.output_within(WAIT);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?} {env:?}: {stderr}");
    }
}

/// `--help` shows which environment variables are read, never the values
/// of those that hold credentials (Redis and webhook URLs carry passwords
/// and keys).
#[test]
fn help_hides_the_values_of_secret_environment_variables() {
    let out = help()
        .arg("--help")
        .env("GATECAST_REDIS_URL", "redis://app:hunter2@redis:6379")
        .env(
            "GATECAST_EVENTS_WEBHOOK",
            "https://hooks.example/in?key=hunter2",
        )
        .env("GATECAST_API_KEY", "hunter2")
        .env("GATECAST_CLIENT_JWT_SECRET", "hunter2")
        .env("GATECAST_GATEWAY_SECRET_KEY", "hunter2")
        .output_within(WAIT);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("GATECAST_REDIS_URL"), "{help}");
    assert!(!help.contains("hunter2"), "{help}");
}

/// A node that exits before it listens fails the harness's start clearly
/// (and is not left running).
#[test]
fn a_node_that_never_listens_fails_the_start_clearly() {
    let result = std::panic::catch_unwind(|| common::Node::start(&["--ping-interval", "soon"]));
    let message = match result {
        Ok(_) => panic!("a node with a bad option started"),
        Err(panic) => panic.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(message.contains("listening"), "{message}");
}
