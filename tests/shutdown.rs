//! Graceful shutdown of one process (SPEC section 1): on SIGTERM the node
//! reports not ready, refuses new connections, closes its clients with 1001
//! and exits 0 within `--shutdown-grace`.

mod common;

use std::time::Duration;

use common::{Client, Node, OutputWithin, Refused, Seen};
use tokio::time::Instant;

const GRACE: Duration = Duration::from_secs(5);

/// Room for the process to stop and be reaped once the grace period is over.
const EXIT_SLACK: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_clients_with_1001_and_exits_0_within_grace() {
    let mut node = Node::start(&["--shutdown-grace", "5s"]);
    let mut first = Client::connect(&node.ws_url("")).await;
    // The second client never answers the close frame, so the node keeps
    // draining (it waits for the answer) while the checks below run.
    let mut second = Client::connect(&node.ws_url("")).await;
    assert_eq!(node.get_status(false, "/readyz").await, 200);

    let term = Instant::now();
    node.signal("TERM");
    assert_eq!(first.next().await, Seen::Close(Some(1001)), "first client");
    // Draining: not ready on the API listener, still alive.
    assert_eq!(node.get_status(false, "/readyz").await, 503);
    assert_eq!(node.get_status(false, "/healthz").await, 200);
    // New WebSocket connections are refused (no listener, or not a 101).
    let url = node.ws_url("");
    match Client::try_connect(&url, &[]).await {
        Err(Refused::Io) => {}
        Err(Refused::Status(status)) => assert_ne!(status, 101),
        Ok(client) => panic!("a new client connected while draining: {}", client.id),
    }

    let status = node
        .wait_exit((GRACE + EXIT_SLACK).saturating_sub(term.elapsed()))
        .await;
    assert!(status.success(), "exit status {status}");
    // The second client got its close frame too, before the node went.
    assert_eq!(
        second.next().await,
        Seen::Close(Some(1001)),
        "second client"
    );
}

/// Readiness turns 503 before the clients are told to go, so a load
/// balancer stops sending new clients first. With --drain-spread the closes
/// go out over 2 s, one client per 100 ms: readiness is polled from the
/// signal on, and when it first reads 503 clients must still be open, each
/// of them then closed with 1001. (A node that closed first and flipped
/// readiness after would have closed them all long before.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_503_before_the_clients_get_1001() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    const CLIENTS: usize = 20;
    let mut node = Node::start(&["--shutdown-grace", "5s", "--drain-spread", "2s"]);
    let closed = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for _ in 0..CLIENTS {
        let mut client = Client::connect(&node.ws_url("")).await;
        let closed = closed.clone();
        readers.push(tokio::spawn(async move {
            let seen = client.next().await;
            closed.fetch_add(1, Ordering::SeqCst);
            assert_eq!(seen, Seen::Close(Some(1001)), "{}", client.id);
            assert_eq!(client.next().await, Seen::Ended, "{}", client.id);
        }));
    }
    assert_eq!(node.get_status(false, "/readyz").await, 200);
    assert_eq!(closed.load(Ordering::SeqCst), 0);

    let term = Instant::now();
    node.signal("TERM");
    let closed_when_unready = loop {
        // Read before asking: a close counted here came before the 503.
        let before = closed.load(Ordering::SeqCst);
        if node.get_status(false, "/readyz").await == 503 {
            break before;
        }
        assert!(term.elapsed() < common::WAIT, "readiness never turned 503");
    };
    assert!(
        closed_when_unready < CLIENTS,
        "every client was closed before readiness turned 503"
    );
    for reader in readers {
        reader.await.unwrap();
    }
    let status = node
        .wait_exit((GRACE + EXIT_SLACK).saturating_sub(term.elapsed()))
        .await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_clients_that_answer_exits_0() {
    let mut node = Node::start(&["--shutdown-grace", "5s"]);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client::connect(&node.ws_url("")).await);
    }
    let term = Instant::now();
    node.signal("TERM");
    for mut client in clients {
        // Reading on after the close frame answers it (tungstenite replies)
        // and sees the server end the connection.
        assert_eq!(client.next().await, Seen::Close(Some(1001)));
        assert_eq!(client.next().await, Seen::Ended);
    }
    let status = node
        .wait_exit((GRACE + EXIT_SLACK).saturating_sub(term.elapsed()))
        .await;
    assert!(status.success(), "exit status {status}");
}

/// With --drain-spread the closes go out in slices over that time (so the
/// clients do not all reconnect elsewhere at once): still every client gets
/// 1001 and the node exits 0 within the grace. (When each slice goes out is
/// not asserted: timings on a shared machine are not reliable.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_spread_still_closes_every_client_with_1001_and_exits_0_within_grace() {
    let mut node = Node::start(&["--shutdown-grace", "5s", "--drain-spread", "2s"]);
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(Client::connect(&node.ws_url("")).await);
    }
    let term = Instant::now();
    node.signal("TERM");
    for mut client in clients {
        assert_eq!(
            client.next().await,
            Seen::Close(Some(1001)),
            "{}",
            client.id
        );
        assert_eq!(client.next().await, Seen::Ended);
    }
    let status = node
        .wait_exit((GRACE + EXIT_SLACK).saturating_sub(term.elapsed()))
        .await;
    assert!(status.success(), "exit status {status}");
}

#[test]
fn a_drain_spread_longer_than_three_quarters_of_the_grace_is_refused() {
    // On free ports: were the check to go, the node would start, not bind
    // the default ports, and be killed at the deadline.
    let out = common::gatecast_command()
        .args(["--shutdown-grace", "4s", "--drain-spread", "3500ms"])
        .output_within(common::WAIT);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--drain-spread"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_also_drains_and_exits_0() {
    let mut node = Node::start(&["--shutdown-grace", "5s"]);
    let mut client = Client::connect(&node.ws_url("")).await;
    let term = Instant::now();
    node.signal("INT");
    assert_eq!(client.next().await, Seen::Close(Some(1001)));
    assert_eq!(client.next().await, Seen::Ended);
    let status = node
        .wait_exit((GRACE + EXIT_SLACK).saturating_sub(term.elapsed()))
        .await;
    assert!(status.success(), "exit status {status}");
}

/// Starts `gatecast` on loopback ports and sends it `sig` the moment it logs
/// that it listens; returns how it exited.
fn signal_as_soon_as_listening(sig: &str) -> std::process::ExitStatus {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let mut child = common::gatecast_command()
        .args(["--shutdown-grace", "5s"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("gatecast starts");
    // A shell waiting to run its builtin `kill`, so the signal goes out
    // microseconds after the line, not after a fork and exec.
    let mut killer = Command::new("sh")
        .arg("-c")
        .arg(format!("read _ && kill -{sig} {}", child.id()))
        .stdin(Stdio::piped())
        .spawn()
        .expect("sh starts");
    let mut trigger = killer.stdin.take().unwrap();
    // The log is read on a thread so that every wait below is bounded: a
    // node that never listens, or never exits, is killed and fails the test.
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let fail = |child: &mut std::process::Child, why: &str| -> ! {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{why}");
    };
    let deadline = std::time::Instant::now() + common::WAIT + GRACE + EXIT_SLACK;
    let mut signalled = false;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if !signalled && line.contains(r#""message":"listening""#) {
                    trigger.write_all(b"\n").unwrap();
                    trigger.flush().unwrap();
                    signalled = true;
                }
                eprintln!("[node] {line}");
            }
            // stdout closed: the process is gone or going.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = killer.kill();
                fail(&mut child, "the node did not exit in time after the signal")
            }
        }
    }
    // Closing its stdin ends the shell's `read` if it is still waiting.
    drop(trigger);
    let killed = killer.wait().unwrap();
    if !signalled {
        fail(&mut child, "the node never logged that it listens");
    }
    assert!(killed.success(), "kill -{sig} worked");
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() >= deadline {
            fail(&mut child, "node did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_right_after_listening_still_exits_0() {
    // Once the node says it listens, a SIGTERM or SIGINT must take the
    // graceful path (exit 0), not the signal's default action (killed).
    // The window right after start-up is short: try it a few times.
    for round in 0..5 {
        for sig in ["TERM", "INT"] {
            let status = signal_as_soon_as_listening(sig);
            assert!(
                status.success(),
                "SIG{sig}, round {round}: exit status {status}"
            );
        }
    }
}

/// A critical background task that fails (see `gatecast::task`) stops the
/// node as a signal does, and `run` returns why, so the binary exits 1
/// with the reason. Run in-process: no input makes a task of the binary
/// fail, so the test trips the node's `Fatal` itself once the node runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_critical_task_drains_the_node_and_run_returns_the_reason() {
    use clap::Parser;
    use gatecast::server::{run_with, StartError};
    use gatecast::task::Fatal;
    let config = gatecast::Config::try_parse_from([
        "gatecast",
        "--listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
        "--inner-listen",
        "127.0.0.1:0",
        "--advertise-ip",
        "127.0.0.1",
        "--shutdown-grace",
        "2s",
    ])
    .unwrap();
    let fatal = Fatal::new();
    let node = run_with(config, std::future::pending(), fatal.clone());
    let trip = async {
        tokio::task::yield_now().await;
        fatal.trip("the test failed a task".into());
    };
    let (result, ()) = tokio::time::timeout(GRACE + EXIT_SLACK, async { tokio::join!(node, trip) })
        .await
        .expect("the node stops within its grace");
    match result {
        Err(StartError::Fatal(reason)) => assert_eq!(reason, "the test failed a task"),
        other => panic!("expected StartError::Fatal, got {other:?}"),
    }
}
