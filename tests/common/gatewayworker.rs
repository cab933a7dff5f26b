//! GatewayWorker's side of the suites: nodes on Redis serving the
//! Register, and real PHP BusinessWorker processes
//! (tests/gatewayworker/worker.php) found through it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::WAIT;

/// The options of a node on the Redis at `redis_url` that serves the
/// Register: a 1 s heartbeat (the Register's list follows nodes coming and
/// going within seconds), the Register on a free loopback port, then
/// `extra`.
pub fn register_node_args<'a>(redis_url: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--redis-url",
        redis_url,
        "--node-heartbeat",
        "1s",
        "--register-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    args
}

/// A real PHP BusinessWorker process (tests/gatewayworker/worker.php).
pub struct PhpWorker {
    child: Child,
    /// Its output, line by line.
    pub lines: mpsc::Receiver<String>,
    /// Its name (`name` of [`PhpWorker::start`]).
    pub name: String,
}

impl PhpWorker {
    /// Starts worker `name`, finding the gateways through the Register at
    /// `register` with `secret_key`.
    pub fn start(register: SocketAddr, name: &str, secret_key: &str) -> PhpWorker {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/gatewayworker/worker.php"
        );
        let mut child = Command::new("php")
            .args([script, &register.to_string(), name, secret_key])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("php runs (scripts/test installs php8.2-cli)");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let tag = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        PhpWorker {
            child,
            lines,
            name: name.to_owned(),
        }
    }

    /// Waits (bounded) for an output line starting with `prefix`.
    pub async fn expect_line(&self, prefix: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{} never printed {prefix:?}",
                        self.name
                    );
                    tokio::task::yield_now().await;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("{} exited before printing {prefix:?}", self.name)
                }
            }
        }
    }

    /// Kills the process and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PhpWorker {
    fn drop(&mut self) {
        self.kill();
    }
}
