//! Real `redis-server` processes on free loopback ports.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::OutputWithin;

/// How many free ports a server start tries before giving up.
const START_ATTEMPTS: usize = 5;

/// A free loopback port (bound then released; the caller binds it next).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` started for one test, killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers.
    pub fn start() -> RedisServer {
        Self::start_args(&[])
    }

    /// Starts a server with extra `redis-server` arguments on a free port,
    /// and on another one if a server of another test took that port
    /// between [`free_port`] and the bind.
    pub fn start_args(extra: &[&str]) -> RedisServer {
        Self::on_a_free_port(|port| Self::try_start(port, extra))
    }

    /// Starts a server on `port` (e.g. again after a restart).
    pub fn start_on(port: u16) -> RedisServer {
        Self::start_with(port, &[])
    }

    /// Starts a server on `port` with extra `redis-server` arguments; fails
    /// the test if the port is not its own.
    pub fn start_with(port: u16, extra: &[&str]) -> RedisServer {
        Self::try_start(port, extra).unwrap_or_else(|why| panic!("{why}"))
    }

    fn try_start(port: u16, extra: &[&str]) -> Result<RedisServer, String> {
        let dir = Self::dir_for(port);
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server starts (scripts/test installs it)");
        Self::until_up(child, port, dir)
    }

    /// Runs `start` on free ports until one is this server's own.
    fn on_a_free_port(start: impl Fn(u16) -> Result<RedisServer, String>) -> RedisServer {
        let mut why = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match start(free_port()) {
                Ok(server) => return server,
                Err(e) => why.push(e),
            }
        }
        panic!("no free port for redis-server in {START_ATTEMPTS} attempts: {why:?}")
    }

    /// Waits until the server on `port` answers and is `child` itself, not
    /// a server of another test that took the port first (ours then fails
    /// to bind and exits).
    fn until_up(mut child: Child, port: u16, dir: PathBuf) -> Result<RedisServer, String> {
        let pid = child.id();
        let deadline = std::time::Instant::now() + super::WAIT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for redis-server") {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(format!("redis-server on port {port} exited: {status}"));
            }
            let info = cli_on(port, &["INFO", "server"]);
            match info_field(&info, "process_id") {
                Some(p) if p == pid.to_string() => {
                    return Ok(RedisServer {
                        child: Some(child),
                        port,
                        dir,
                    })
                }
                Some(other) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(format!(
                        "port {port} answers for process {other}, not our redis-server {pid}"
                    ));
                }
                None => {}
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("redis-server on port {port} did not come up");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A Sentinel on a free port watching the master at `master_port` as
    /// `mymaster` (see [`RedisServer::start_sentinel`]).
    pub fn sentinel_for(master_port: u16) -> RedisServer {
        Self::on_a_free_port(|port| Self::try_sentinel(port, master_port))
    }

    /// A Sentinel on `port` watching the master at `master_port` as
    /// `mymaster`, with a quorum of 1 and a 1 s down-after.
    pub fn start_sentinel(port: u16, master_port: u16) -> RedisServer {
        Self::try_sentinel(port, master_port).unwrap_or_else(|why| panic!("{why}"))
    }

    fn try_sentinel(port: u16, master_port: u16) -> Result<RedisServer, String> {
        let dir = Self::dir_for(port);
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
                 sentinel monitor mymaster 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds mymaster 1000\n\
                 sentinel failover-timeout mymaster 5000\n",
                dir.display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server --sentinel starts");
        Self::until_up(child, port, dir)
    }

    /// A fresh directory: unique per start, so a server that lost its port
    /// never shares (or removes) the directory of the one that won it.
    fn dir_for(port: u16) -> PathBuf {
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("gatecast-redis-{port}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Its working directory (where `SAVE` writes `dump.rdb`).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends a signal (`STOP`, `CONT`...) to the server process: a paused
    /// Redis keeps its connections open and answers nothing.
    pub fn signal(&self, sig: &str) {
        let out = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .output_within(super::WAIT);
        assert!(
            out.status.success(),
            "kill -{sig}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs a `redis-cli` command against this server; returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        cli_on(self.port, args)
    }

    /// The process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// For a Sentinel: waits (bounded) until it lists the replica on
    /// `replica_port` as a healthy replica of `mymaster`, linked to the
    /// master. Before that a failover has nothing to promote.
    pub fn wait_knows_replica(&self, replica_port: u16) {
        let deadline = std::time::Instant::now() + super::WAIT;
        loop {
            let out = self.cli(&["SENTINEL", "REPLICAS", "mymaster"]);
            let lines: Vec<&str> = out.lines().map(str::trim).collect();
            // redis-cli prints each replica as name/value lines.
            let value = |name: &str| {
                lines
                    .iter()
                    .position(|l| *l == name)
                    .and_then(|i| lines.get(i + 1).copied())
            };
            if value("port") == Some(&replica_port.to_string())
                && value("flags") == Some("slave")
                && value("master-link-status") == Some("ok")
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "Sentinel does not know the replica on port {replica_port}: {out}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (SHUTDOWN NOSAVE) and waits for the process to end.
    pub fn stop(&mut self) {
        let _ = self.cli(&["SHUTDOWN", "NOSAVE"]);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `redis-cli` against `port` (bounded); its trimmed stdout.
fn cli_on(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output_within(super::WAIT);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The value of `name` in an `INFO` answer.
fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
        .map(str::to_owned)
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters (no replicas) on free ports.
pub struct RedisCluster {
    /// The masters.
    pub servers: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers, creates the cluster and waits
    /// until every node reports `cluster_state:ok`.
    pub fn start() -> RedisCluster {
        let servers: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_args(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output_within(super::WAIT * 3);
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = std::time::Instant::now() + super::WAIT;
        for s in &servers {
            while !s.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(
                    std::time::Instant::now() < deadline,
                    "cluster did not become ok"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster { servers }
    }

    /// `redis-cluster://` URL naming every master.
    pub fn url(&self) -> String {
        let first = &self.servers[0];
        let others: Vec<String> = self.servers[1..]
            .iter()
            .map(|s| format!("node=127.0.0.1:{}", s.port))
            .collect();
        format!(
            "redis-cluster://127.0.0.1:{}?{}",
            first.port,
            others.join("&")
        )
    }
}
