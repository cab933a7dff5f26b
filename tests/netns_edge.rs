//! The edges of a many-host deployment (issue 32, client side): a PHP
//! backend on a host of its own that knows only the Register, and clients
//! behind a slow link. Nodes on hosts of their own (network namespaces,
//! tests/common/netns.rs), all on the pod ports 8080/8081/2900 with their
//! own addresses and no `--advertise-ip`.
//!
//! Needs root (CI runs as root). Without it these tests fail with the
//! reason, unless `GATECAST_SKIP_NETNS=1` (then they say they skip).

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Mutex;

use common::netns::{self, Host, Lab, INNER_PORT};
use common::{eventually, Client, Node, OutputWithin, WAIT};
use gatecast::ids::ClientId;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// Short, so a node is listed by the Register within seconds.
const HEARTBEAT: &str = "1s";

/// GatewayWorker's usual Register port, served by every node here.
const REGISTER_PORT: u16 = 1236;

/// One lab at a time (as in tests/netns.rs): each runs several nodes, and a
/// slow link's figures must not be stretched by another test's load.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// GatewayClient on its own host.

/// The addresses a Register at `register` gives a GatewayClient now (as it
/// asks: one `worker_connect` line, one JSON line back).
async fn register_list(register: SocketAddr) -> BTreeSet<String> {
    let stream = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(register))
        .await
        .expect("TCP connect to the Register in time")
        .expect("the Register accepts");
    let mut stream = tokio::io::BufReader::new(stream);
    let hello = "{\"event\":\"worker_connect\",\"secret_key\":\"\"}\n";
    stream.get_mut().write_all(hello.as_bytes()).await.unwrap();
    let mut line = String::new();
    tokio::time::timeout(WAIT, stream.read_line(&mut line))
        .await
        .expect("the Register answers in time")
        .expect("a line");
    let message: Value = serde_json::from_str(&line).expect("a JSON line");
    message["addresses"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs tests/netns_edge/gatewayclient.php on `php` with the Register
/// addresses and the client pairs; its exit status and its output (stdout
/// then stderr). `GATECAST_GATEWAYCLIENT`, when set, passes through: the
/// script then uses walkor/GatewayClient itself.
async fn run_php(php: &Host, registers: &[String], pairs: &[[String; 2]]) -> (bool, String) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/netns_edge/gatewayclient.php"
    );
    let mut command = php.command("php");
    command.args([
        script,
        &json!(registers).to_string(),
        &json!(pairs).to_string(),
    ]);
    let out = tokio::task::spawn_blocking(move || command.output_within(WAIT * 3))
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Where a client_id says its node is.
fn node_of(client_id: &str) -> SocketAddrV4 {
    let id: ClientId = client_id.parse().expect("a client id");
    id.node().addr()
}

/// Three nodes on hosts of their own, all on inner port 2900 with their
/// own addresses and no `--advertise-ip`, each serving the Register; a PHP
/// backend on a fourth host knows only Register addresses. Through them it
/// gets every node's inner address (distinct real IPs, port 2900), binds
/// and joins clients on every node through the address in their
/// client_ids, asks the counts and uids (exact), and its pushes to a uid,
/// a client, a group and all reach the clients on every node, in order.
///
/// Then a fourth node advertises 127.0.0.1 (a pod whose address was not
/// found, or set wrong): the Register lists `127.0.0.1:2900`, its clients'
/// ids point at loopback, and the PHP host, which reaches that address on
/// itself, fails to drive them (the wrong-address case of docs/deploy.md).
#[test]
fn gatewayclient_on_its_own_host_reaches_every_node_through_the_register() {
    let test = "gatewayclient_on_its_own_host_reaches_every_node_through_the_register";
    if !netns::available(test) {
        return;
    }
    let _serial = serial();
    let lab = Lab::new();
    let redis_host = lab.host("redis");
    let node_hosts = [lab.host("a"), lab.host("b"), lab.host("c")];
    let (php, client, d_host) = (lab.host("php"), lab.host("client"), lab.host("d"));
    let redis = lab.redis(&redis_host, &[]);
    lab.run(&client, async {
        let url = redis.url();
        let register_listen = format!("0.0.0.0:{REGISTER_PORT}");
        let args = [
            "--redis-url",
            &url,
            "--node-heartbeat",
            HEARTBEAT,
            "--register-listen",
            &register_listen,
        ];
        let nodes: Vec<Node> = node_hosts.iter().map(|h| lab.node(h, &args)).collect();
        for node in &nodes {
            node.wait_ready().await;
        }
        let want: BTreeSet<String> = node_hosts
            .iter()
            .map(|h| format!("{}:{INNER_PORT}", h.ip))
            .collect();
        let register_of = |h: &Host| SocketAddr::from((h.ip, REGISTER_PORT));
        // Ready is not listed yet: the Register reads the node list from
        // Redis once a second.
        eventually("every Register lists the three nodes", || async {
            for h in &node_hosts {
                if register_list(register_of(h)).await != want {
                    return false;
                }
            }
            true
        })
        .await;

        // Two clients on each node: x (bound and joined by PHP), y.
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for (node, host) in nodes.iter().zip(&node_hosts) {
            let x = Client::connect(&node.ws_url("")).await;
            let y = Client::connect(&node.ws_url("")).await;
            for c in [&x, &y] {
                assert_eq!(
                    node_of(&c.id),
                    SocketAddrV4::new(host.ip, INNER_PORT),
                    "the client_id carries its node's real address"
                );
            }
            xs.push(x);
            ys.push(y);
        }
        let pairs: Vec<[String; 2]> = xs
            .iter()
            .zip(&ys)
            .map(|(x, y)| [x.id.clone(), y.id.clone()])
            .collect();
        // GatewayClient takes the first Register it reaches: C's, then A's
        // (as a list of Service addresses would be).
        let registers: Vec<String> = [&node_hosts[2], &node_hosts[0]]
            .iter()
            .map(|h| register_of(h).to_string())
            .collect();
        let (ok, text) = run_php(&php, &registers, &pairs).await;
        assert!(ok, "php failed: {text}");
        let out: Value = serde_json::from_str(text.lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("{e}: {text}"));
        eprintln!("gatewayclient.php ({}): {out}", out["library"]);
        assert_eq!(out["addresses"], json!(want), "from the Register");
        assert_eq!(out["count_all"], json!(6), "{out}");
        assert_eq!(out["count_g"], json!(3), "{out}");
        let mut group: Vec<&String> = xs.iter().map(|x| &x.id).collect();
        group.sort();
        assert_eq!(out["list_g"], json!(group), "{out}");
        for (k, (x, _)) in xs.iter().zip(&ys).enumerate() {
            assert_eq!(out[format!("uid_online_{k}")], json!(1), "{out}");
            assert_eq!(out[format!("client_ids_of_u{k}")], json!([x.id]), "{out}");
            assert_eq!(out[format!("online_y{k}")], json!(1), "{out}");
        }
        assert_eq!(out["uid_online_nobody"], json!(0), "{out}");
        // What each client received, in order.
        for (k, (x, y)) in xs.iter_mut().zip(ys.iter_mut()).enumerate() {
            for text in [format!("to-u{k}"), "to-g".into(), "to-all".into()] {
                x.expect_text(&text).await;
            }
            for text in [format!("to-y{k}"), "to-all".into()] {
                y.expect_text(&text).await;
            }
        }
        // The HTTP API agrees with what PHP wrote.
        assert_eq!(
            nodes[1]
                .ok("get_client_id_by_uid", json!({"uid": "u0"}))
                .await,
            json!([xs[0].id])
        );

        // A node advertising loopback: listed as 127.0.0.1:2900.
        let mut wrong = args.to_vec();
        wrong.extend(["--advertise-ip", "127.0.0.1"]);
        let d = lab.node(&d_host, &wrong);
        d.wait_ready().await;
        let loopback = format!("127.0.0.1:{INNER_PORT}");
        let mut with_d = want.clone();
        with_d.insert(loopback.clone());
        eventually("the Register lists D at 127.0.0.1", || async {
            register_list(register_of(&node_hosts[0])).await == with_d
        })
        .await;
        let on_d = Client::connect(&d.ws_url("")).await;
        let on_d2 = Client::connect(&d.ws_url("")).await;
        assert_eq!(
            node_of(&on_d.id),
            SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, INNER_PORT)
        );
        let mut with_pair = pairs.clone();
        with_pair.push([on_d.id.clone(), on_d2.id.clone()]);
        let (ok, text) = run_php(&php, &registers, &with_pair).await;
        eprintln!("gatewayclient.php with D at 127.0.0.1: ok {ok}: {text}");
        assert!(!ok, "PHP cannot reach D's clients: {text}");
        assert!(
            text.contains(&loopback),
            "the failure names the loopback address: {text}"
        );
    });
}
