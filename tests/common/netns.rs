//! Many hosts on one machine: network namespaces on a private bridge, as
//! pods on a cluster network (issue 32, /work/shared/TESTBED.md).
//!
//! A [`Lab`] is one test's network: a Linux bridge with no address in the
//! machine's own namespace, and one namespace per [`Host`] plugged into it
//! by a veth pair, each with its own address in a private /24. Processes
//! run inside a host with `ip netns exec`; the test's own sockets (its
//! WebSocket clients, its API calls) run inside a host too, on a runtime
//! whose threads joined that namespace ([`Lab::run`]), so every packet of
//! the test stays on links the test made. Links can be cut (down, or one
//! pair of hosts dropped with iptables) and slowed (`tbf`).
//!
//! Names carry the test process's pid (`gn<pid hex><seq hex>`), so a lab
//! left by a killed test run is recognised and removed by the next one
//! ([`sweep`]). Everything a lab made goes on drop, even on panic.
//!
//! Root is needed. Where it is not available the tests fail with a clear
//! message, unless `GATECAST_SKIP_NETNS=1` says to skip them (then they
//! print why and return): never a silent pass.
#![allow(dead_code)]

use std::future::Future;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::{Node, OutputWithin, WAIT};

/// Prefix of every name a lab makes (namespaces, links).
const PREFIX: &str = "gn";

/// Ports every node listens on, as in a pod.
pub const PUBLIC_PORT: u16 = 8080;
/// The HTTP API's port.
pub const API_PORT: u16 = 8081;
/// The GatewayWorker inner port.
pub const INNER_PORT: u16 = 2900;
/// Redis's port on its host.
pub const REDIS_PORT: u16 = 6379;
/// A Sentinel's port on its host.
pub const SENTINEL_PORT: u16 = 26379;

/// One host: a network namespace with one interface (`eth0`) on the lab's
/// bridge.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its name in the test (`redis`, `a`...).
    pub role: String,
    /// The namespace's name.
    pub ns: String,
    /// Its address on the bridge.
    pub ip: Ipv4Addr,
    /// The veth end on the bridge side (in the machine's namespace).
    outer: String,
}

impl Host {
    /// `ip netns exec <ns> <program>`: a command that runs inside the host.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns, program]);
        command
    }

    /// Runs a command inside the host to its end (bounded); panics when it
    /// fails.
    pub fn sh(&self, program: &str, args: &[&str]) -> String {
        let out = self.command(program).args(args).output_within(WAIT);
        assert!(
            out.status.success(),
            "{program} {args:?} in {}: {}",
            self.ns,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// Why a lab cannot be made here, or `None` when it can.
fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: network namespaces need root".into());
    }
    let ip = Command::new("ip").arg("-V").output();
    if !ip.is_ok_and(|o| o.status.success()) {
        return Some("`ip` (iproute2) is not installed".into());
    }
    None
}

/// Whether the namespace tests may run. When they cannot: panics with the
/// reason, or with `GATECAST_SKIP_NETNS=1` prints it and returns false
/// (the caller returns). Never a silent pass.
pub fn available(test: &str) -> bool {
    let Some(why) = unavailable() else {
        return true;
    };
    if std::env::var("GATECAST_SKIP_NETNS").as_deref() == Ok("1") {
        eprintln!("SKIPPED {test}: {why} (GATECAST_SKIP_NETNS=1)");
        return false;
    }
    panic!(
        "{test} needs network namespaces, and {why}. Run the tests as root (CI does), or set \
         GATECAST_SKIP_NETNS=1 to skip them knowingly"
    );
}

/// One test's network.
pub struct Lab {
    base: String,
    bridge: String,
    /// First three octets of the lab's /24.
    net: [u8; 3],
    hosts: Mutex<Vec<Host>>,
    /// iptables rules added, to list in failure messages.
    cuts: Mutex<Vec<(String, Ipv4Addr)>>,
}

/// `program` run in the machine's own network namespace, wherever it is
/// started from: a test's code inside [`Lab::run`] is in a host's
/// namespace, and its children would be too.
fn root(program: &str) -> Command {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    static ROOT: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    // The main thread's: the test harness never moves it.
    let fd = ROOT
        .get_or_init(|| std::fs::File::open("/proc/self/ns/net").expect("own namespace"))
        .as_raw_fd();
    let mut command = Command::new(program);
    // SAFETY: setns is async-signal-safe; the fd stays open for the
    // process's life (a static).
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// Runs `ip` with `args` in the machine's namespace; panics on failure.
fn ip(args: &[&str]) {
    let out = root("ip").args(args).output_within(WAIT);
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The same, ignoring failures (clean-up of what may be gone already).
fn ip_quiet(args: &[&str]) {
    let _ = root("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Lab {
    /// A new, empty lab (a bridge). Call [`available`] first. Removes the
    /// leftovers of dead test processes once per process.
    pub fn new() -> Lab {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(sweep);
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let base = format!("{PREFIX}{:06x}{:02x}", pid & 0xff_ffff, seq & 0xff);
        let bridge = format!("{base}br");
        // Isolated anyway (the bridge has no address here), but distinct
        // per lab so a listing of addresses tells the labs apart.
        let net = [10, 100 + (pid % 100) as u8, (seq % 250) as u8];
        ip(&["link", "add", &bridge, "type", "bridge"]);
        let lab = Lab {
            base,
            bridge,
            net,
            hosts: Mutex::new(Vec::new()),
            cuts: Mutex::new(Vec::new()),
        };
        ip(&["link", "set", &lab.bridge, "up"]);
        lab
    }

    /// Adds a host named `role` (`redis`, `a`, `client`...) with the next
    /// address of the lab's /24.
    pub fn host(&self, role: &str) -> Host {
        let mut hosts = self.hosts.lock().unwrap();
        let index = hosts.len();
        assert!(index < 200, "too many hosts in one lab");
        let ns = format!("{}-{role}", self.base);
        let outer = format!("{}v{index:x}", self.base);
        let [a, b, c] = self.net;
        let ip4 = Ipv4Addr::new(a, b, c, 10 + index as u8);
        ip(&["netns", "add", &ns]);
        // Recorded at once, so a failure below still removes it.
        let host = Host {
            role: role.to_owned(),
            ns: ns.clone(),
            ip: ip4,
            outer: outer.clone(),
        };
        hosts.push(host.clone());
        drop(hosts);
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["link", "set", &outer, "master", &self.bridge]);
        ip(&["link", "set", &outer, "up"]);
        let cidr = format!("{ip4}/24");
        ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        // A default route, so a node finds its own address as in a pod
        // (no --advertise-ip). Nothing is beyond the bridge.
        ip(&["-n", &ns, "route", "add", "default", "dev", "eth0"]);
        host
    }

    /// Takes `host`'s link down: its packets are dropped both ways,
    /// connections are not reset (a real partition).
    pub fn link_down(&self, host: &Host) {
        ip(&["link", "set", &host.outer, "down"]);
    }

    /// Brings `host`'s link back.
    pub fn link_up(&self, host: &Host) {
        ip(&["link", "set", &host.outer, "up"]);
    }

    /// Drops every packet between `host` and `peer` (iptables in `host`),
    /// both ways; the rest of `host`'s traffic flows. Nothing is reset.
    pub fn cut(&self, host: &Host, peer: &Host) {
        let peer_ip = peer.ip.to_string();
        host.sh("iptables", &["-I", "INPUT", "-s", &peer_ip, "-j", "DROP"]);
        host.sh("iptables", &["-I", "OUTPUT", "-d", &peer_ip, "-j", "DROP"]);
        self.cuts.lock().unwrap().push((host.ns.clone(), peer.ip));
    }

    /// Undoes [`Lab::cut`].
    pub fn restore(&self, host: &Host, peer: &Host) {
        let peer_ip = peer.ip.to_string();
        host.sh("iptables", &["-D", "INPUT", "-s", &peer_ip, "-j", "DROP"]);
        host.sh("iptables", &["-D", "OUTPUT", "-d", &peer_ip, "-j", "DROP"]);
        self.cuts
            .lock()
            .unwrap()
            .retain(|(ns, ip)| !(*ns == host.ns && *ip == peer.ip));
    }

    /// Limits `host`'s link to `rate` (tc syntax: `1mbit`) both ways, with
    /// a token bucket (`tbf`; netem is not available here).
    pub fn slow(&self, host: &Host, rate: &str) {
        let tbf = [
            "root", "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms",
        ];
        let mut inside = vec!["qdisc", "replace", "dev", "eth0"];
        inside.extend(tbf);
        host.sh("tc", &inside);
        let mut outside = vec!["qdisc", "replace", "dev", &host.outer];
        outside.extend(tbf);
        let out = root("tc").args(&outside).output_within(WAIT);
        assert!(out.status.success(), "tc {outside:?}");
    }

    /// Removes the limit of [`Lab::slow`].
    pub fn unslow(&self, host: &Host) {
        let _ = host
            .command("tc")
            .args(["qdisc", "del", "dev", "eth0", "root"])
            .output_within(WAIT);
        let _ = root("tc")
            .args(["qdisc", "del", "dev", &host.outer, "root"])
            .output_within(WAIT);
    }

    /// Opens `n` TCP connections to `to` from inside `host`, on a thread
    /// that joined its namespace: a socket stays in the namespace it was
    /// made in, so a runtime running elsewhere (in another host, through
    /// [`Lab::run`]) can use them (`tokio::net::TcpStream::from_std`).
    /// Clients on two hosts at once this way. Panics when one fails.
    pub fn connect_from(
        &self,
        host: &Host,
        to: std::net::SocketAddr,
        n: usize,
    ) -> Vec<std::net::TcpStream> {
        let path = format!("/run/netns/{}", host.ns);
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                enter(&path);
                (0..n)
                    .map(|i| {
                        std::net::TcpStream::connect_timeout(&to, WAIT)
                            .unwrap_or_else(|e| panic!("connection {i} to {to}: {e}"))
                    })
                    .collect()
            });
            match thread.join() {
                Ok(out) => out,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Bytes waiting in the queue of the link toward `host` (the `tbf` of
    /// [`Lab::slow`] on the bridge side): more than 0 while its link is
    /// saturated.
    pub fn backlog_toward(&self, host: &Host) -> u64 {
        let out = root("tc")
            .args(["-s", "qdisc", "show", "dev", &host.outer])
            .output_within(WAIT);
        // `... backlog 12345b 10p requeues 0`
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        words
            .find(|w| *w == "backlog")
            .and_then(|_| words.next())
            .and_then(|b| {
                // `45420b`, or `44Kb`, `1Mb` as some versions print it.
                let b = b.trim_end_matches('b');
                let (digits, unit) = match b.strip_suffix('K') {
                    Some(d) => (d, 1024),
                    None => b.strip_suffix('M').map_or((b, 1), |d| (d, 1 << 20)),
                };
                digits.parse::<u64>().ok().map(|v| v * unit)
            })
            .unwrap_or(0)
    }

    /// Runs `future` to its end with every socket it opens inside `host`:
    /// on a runtime of its own whose threads all joined the host's
    /// namespace (threads inherit it from the one that builds the
    /// runtime). A panic inside is this call's panic.
    pub fn run<F>(&self, host: &Host, future: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let path = format!("/run/netns/{}", host.ns);
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                enter(&path);
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a runtime")
                    .block_on(future)
            });
            match thread.join() {
                Ok(out) => out,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// A gatecast node on `host`, listening on the pod ports of every
    /// address (8080 public, 8081 API, 2900 inner), with `args` added. No
    /// --advertise-ip: the node finds its own address. The API has no key
    /// (`--api-insecure`) nor the inner port (`--gateway-insecure`): only
    /// the lab's hosts reach them. Its addresses in
    /// the returned [`Node`] are the host's.
    pub fn node(&self, host: &Host, args: &[&str]) -> Node {
        let mut command = host.command(env!("CARGO_BIN_EXE_gatecast"));
        command
            .args(["--listen", &format!("0.0.0.0:{PUBLIC_PORT}")])
            .args(["--api-listen", &format!("0.0.0.0:{API_PORT}")])
            .env("GATECAST_INNER_LISTEN", format!("0.0.0.0:{INNER_PORT}"))
            // Reachable only from the lab's own hosts.
            .args(["--api-insecure", "--gateway-insecure"]);
        super::test_defaults(&mut command);
        let mut node = Node::start_command(command, args);
        node.public = (host.ip, PUBLIC_PORT).into();
        node.api = (host.ip, API_PORT).into();
        node.inner = (host.ip, INNER_PORT).into();
        node
    }

    /// A `redis-server` on `host`, port 6379 of every address, with
    /// `extra` arguments (`--replicaof <ip> 6379`...); waits until it
    /// answers.
    pub fn redis(&self, host: &Host, extra: &[&str]) -> NsRedis {
        let dir = std::env::temp_dir().join(format!("gatecast-{}-{REDIS_PORT}", host.ns));
        std::fs::create_dir_all(&dir).unwrap();
        let mut command = host.command("redis-server");
        command
            .args(["--port", &REDIS_PORT.to_string(), "--bind", "0.0.0.0"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(extra);
        NsRedis::until_up(command, host, REDIS_PORT, dir)
    }

    /// A Sentinel on `host` (port 26379) watching the primary at
    /// `primary:6379` as `mymaster`, with `quorum`, a 1 s down-after and a
    /// 5 s failover timeout.
    pub fn sentinel(&self, host: &Host, primary: &Host, quorum: u32) -> NsRedis {
        let dir = std::env::temp_dir().join(format!("gatecast-{}-{SENTINEL_PORT}", host.ns));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {SENTINEL_PORT}\nbind 0.0.0.0\nprotected-mode no\ndir {}\n\
                 sentinel monitor mymaster {} {REDIS_PORT} {quorum}\n\
                 sentinel down-after-milliseconds mymaster 1000\n\
                 sentinel failover-timeout mymaster 5000\n",
                dir.display(),
                primary.ip
            ),
        )
        .unwrap();
        let mut command = host.command("redis-server");
        command.arg(&conf).arg("--sentinel");
        NsRedis::until_up(command, host, SENTINEL_PORT, dir)
    }
}

impl NsRedis {
    /// Spawns `command` and waits (bounded) until it answers PING.
    fn until_up(mut command: Command, host: &Host, port: u16, dir: std::path::PathBuf) -> NsRedis {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server starts (scripts/test installs it)");
        let redis = NsRedis {
            child: Some(child),
            host: host.clone(),
            port,
            dir,
        };
        let deadline = std::time::Instant::now() + WAIT;
        while redis.cli(&["PING"]) != "PONG" {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server in {} did not come up",
                host.ns
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }
}

/// Joins the namespace at `path` (this thread only).
fn enter(path: &str) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    use std::os::fd::AsRawFd;
    // SAFETY: a valid namespace fd, owned by `file` for the call.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

impl Drop for Lab {
    fn drop(&mut self) {
        let hosts = std::mem::take(&mut *self.hosts.lock().unwrap());
        for host in &hosts {
            remove_namespace(&host.ns);
            ip_quiet(&["link", "del", &host.outer]);
        }
        ip_quiet(&["link", "del", &self.bridge]);
    }
}

/// Kills what still runs in namespace `ns`, then deletes it. Never
/// panics (it runs in drops, maybe while unwinding).
fn remove_namespace(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    ip_quiet(&["netns", "del", ns]);
}

/// The pid in a name this harness made (`gn<6 hex pid><seq>...`).
fn owner(name: &str) -> Option<u32> {
    let hex = name.strip_prefix(PREFIX)?.get(..6)?;
    u32::from_str_radix(hex, 16).ok()
}

/// Whether a name was made by a test process that is gone.
fn orphaned(name: &str) -> bool {
    let Some(pid) = owner(name) else {
        return false;
    };
    // Same truncation as the names: a live process whose pid matches keeps
    // its names (never removes another run's lab).
    let alive = std::fs::read_dir("/proc").map(|dir| {
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .any(|p| p & 0xff_ffff == pid)
    });
    !alive.unwrap_or(true)
}

/// Removes namespaces and links left by test processes that died without
/// dropping their lab (SIGKILL, a crash).
pub fn sweep() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if orphaned(name) {
            eprintln!("netns: removing namespace {name} left by a dead test");
            remove_namespace(name);
        }
    }
    let Ok(out) = root("ip").args(["-o", "link", "show"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `12: name@peer: <...`
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or("");
        if orphaned(name) {
            eprintln!("netns: removing link {name} left by a dead test");
            ip_quiet(&["link", "del", name]);
        }
    }
}

/// A `redis-server` (or Sentinel) on a lab host.
pub struct NsRedis {
    child: Option<std::process::Child>,
    /// Where it runs.
    pub host: Host,
    /// Its port.
    pub port: u16,
    dir: std::path::PathBuf,
}

impl NsRedis {
    /// `redis://<host ip>:<port>`.
    pub fn url(&self) -> String {
        format!("redis://{}:{}", self.host.ip, self.port)
    }

    /// `redis-cli` inside its host; trimmed stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self
            .host
            .command("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output_within(WAIT);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Kills the server.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NsRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls a node's `/readyz` from inside its own host (over the host's
/// loopback, so a slowed or cut link does not delay the poll itself)
/// every 100 ms on a thread of its own, until dropped.
pub struct ReadyWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(Duration, u16)>>>,
}

impl ReadyWatch {
    /// Starts polling `http://127.0.0.1:<API_PORT>/readyz` inside `host`.
    pub fn start(host: &Host) -> ReadyWatch {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let path = format!("/run/netns/{}", host.ns);
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            enter(&path);
            let started = std::time::Instant::now();
            let mut seen = Vec::new();
            while !flag.load(Ordering::Acquire) {
                seen.push((started.elapsed(), readyz_status()));
                std::thread::sleep(Duration::from_millis(100));
            }
            seen
        });
        ReadyWatch {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops polling; every answer other than 200 with when it came
    /// (since the start), and how many polls there were.
    pub fn finish(mut self) -> (Vec<(Duration, u16)>, usize) {
        self.stop.store(true, Ordering::Release);
        let seen = self
            .thread
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        let polls = seen.len();
        (seen.into_iter().filter(|(_, s)| *s != 200).collect(), polls)
    }
}

/// The longest stretch of `/readyz` answers other than 200 in what
/// [`ReadyWatch::finish`] returned: answers at most 250 ms apart (polls
/// are 100 ms apart) are one stretch, which lasts from its first to its
/// last answer plus one poll.
pub fn longest_unready(unready: &[(Duration, u16)]) -> Duration {
    let mut longest = Duration::ZERO;
    let mut start: Option<(Duration, Duration)> = None;
    for &(at, _) in unready {
        start = match start {
            Some((first, last)) if at - last <= Duration::from_millis(250) => Some((first, at)),
            _ => Some((at, at)),
        };
        if let Some((first, last)) = start {
            longest = longest.max(last - first + Duration::from_millis(100));
        }
    }
    longest
}

impl Drop for ReadyWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One `GET /readyz` on this thread's loopback: the status, 0 when it
/// failed (bounded by 1 s timeouts).
fn readyz_status() -> u16 {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], API_PORT));
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    if stream
        .write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return 0;
    }
    let mut head = [0u8; 12];
    if stream.read_exact(&mut head).is_err() {
        return 0;
    }
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
