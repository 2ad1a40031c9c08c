//! A Redis Cluster of our own: 3 masters and 3 replicas on free loopback ports, made with
//! `redis-cli --cluster create`, with a node timeout short enough that a failover takes
//! seconds, not tens of seconds.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use super::{info_field, ping, query, run_tool, server_args, temp_dir, wait_until, Node};

/// Number of hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// `cluster-node-timeout` of our nodes, in milliseconds: how long a node may be
/// unreachable before the others count it as failing.
pub const NODE_TIMEOUT_MS: u64 = 2000;

/// How long the setup and a failover may take before a test gives up.
const LIMIT: Duration = Duration::from_secs(30);

/// Six `redis-server --cluster-enabled yes` nodes, three masters with a replica each,
/// covering all 16384 slots. Every node is killed on drop and the temp dir removed.
pub struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
    /// The slot ranges a master owned when [`kill`](RedisCluster::kill) took it down.
    killed_slots: HashMap<u16, Vec<(u16, u16)>>,
}

/// One line of `CLUSTER NODES`.
#[derive(Clone, Debug)]
struct NodeLine {
    port: u16,
    flags: Vec<String>,
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    fn failing(&self) -> bool {
        self.has("fail") || self.has("fail?")
    }

    fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(lo, hi)| lo <= slot && slot <= hi)
    }
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@cport[,host]> <flags> <master> <ping> <pong>
/// <epoch> <link> <slot>...`; slot entries are `N` or `N-M` (migration markers `[...]`
/// are skipped).
fn parse_nodes(text: &str) -> Result<Vec<NodeLine>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return Err(format!("short CLUSTER NODES line: {line}"));
            }
            let addr = fields[1].split(['@', ',']).next().unwrap_or("");
            let port = addr
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .ok_or_else(|| format!("no port in CLUSTER NODES line: {line}"))?;
            let flags = fields[2].split(',').map(str::to_owned).collect();
            let mut slots = Vec::new();
            for s in &fields[8..] {
                if s.starts_with('[') {
                    continue;
                }
                let (lo, hi) = s.split_once('-').unwrap_or((s, s));
                match (lo.parse(), hi.parse()) {
                    (Ok(lo), Ok(hi)) => slots.push((lo, hi)),
                    _ => return Err(format!("bad slot range {s} in: {line}")),
                }
            }
            Ok(NodeLine { port, flags, slots })
        })
        .collect()
}

fn cluster_nodes(port: u16) -> Result<Vec<NodeLine>, String> {
    let text: String =
        query(port, redis::cmd("CLUSTER").arg("NODES")).map_err(|e| format!(":{port}: {e}"))?;
    parse_nodes(&text)
}

fn cluster_info(port: u16) -> Result<String, String> {
    query(port, redis::cmd("CLUSTER").arg("INFO")).map_err(|e| format!(":{port}: {e}"))
}

fn replication_info(port: u16) -> Result<String, String> {
    query(port, redis::cmd("INFO").arg("replication")).map_err(|e| format!(":{port}: {e}"))
}

/// `cluster_state:ok` with every slot served, as `port` sees it.
fn state_ok(port: u16) -> Result<(), String> {
    let info = cluster_info(port)?;
    let state = info_field(&info, "cluster_state");
    let ok = info_field(&info, "cluster_slots_ok");
    if state.as_deref() == Some("ok") && ok.as_deref() == Some("16384") {
        Ok(())
    } else {
        Err(format!(":{port} says state {state:?}, slots ok {ok:?}"))
    }
}

/// A port for a cluster node: its bus port (port + 10000) must exist and be free too.
fn cluster_port() -> u16 {
    loop {
        let main = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = main.local_addr().expect("local addr").port();
        if port <= 55535 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

fn node_args(port: u16, dir: &std::path::Path, log: &std::path::Path) -> Vec<OsString> {
    let mut args = server_args(port, dir, log);
    args.extend(
        [
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &NODE_TIMEOUT_MS.to_string(),
            // A replica takes over however long its link to the master has been down.
            "--cluster-replica-validity-factor",
            "0",
        ]
        .map(OsString::from),
    );
    args
}

/// Starts one cluster-enabled node in `dir/node-<i>` (a fresh `nodes.conf` per try).
fn start_node(dir: &std::path::Path, i: usize) -> Node {
    let node_dir = dir.join(format!("node-{i}"));
    let log = dir.join(format!("node-{i}.log"));
    Node::start(
        log.clone(),
        cluster_port,
        |port| {
            let _ = std::fs::remove_dir_all(&node_dir);
            std::fs::create_dir_all(&node_dir).expect("create node dir");
            node_args(port, &node_dir, &log)
        },
        ping,
    )
}

/// A cluster-enabled node in no cluster (it owns no slots), for commands that need
/// cluster mode but no data, such as `CLUSTER KEYSLOT`. Killed on drop, temp dir removed.
pub struct LoneNode {
    node: Option<Node>,
    dir: PathBuf,
}

impl LoneNode {
    /// Starts the node.
    pub fn start() -> LoneNode {
        let dir = temp_dir("cluster-node");
        LoneNode {
            node: Some(start_node(&dir, 0)),
            dir,
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.node.as_ref().expect("running").port()
    }
}

impl Drop for LoneNode {
    fn drop(&mut self) {
        self.node = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RedisCluster {
    /// Starts six nodes, joins them with `redis-cli --cluster create ... --cluster-replicas
    /// 1`, and waits (bounded) until every node says `cluster_state:ok` with all slots
    /// covered, knows all six nodes, and every replica's link to its master is up.
    pub fn start() -> RedisCluster {
        let dir = temp_dir("cluster");
        let nodes: Vec<Node> = (0..6).map(|i| start_node(&dir, i)).collect();
        let cluster = RedisCluster {
            dir,
            nodes,
            killed_slots: HashMap::new(),
        };
        let mut args: Vec<OsString> = vec!["--cluster".into(), "create".into()];
        args.extend(
            cluster
                .nodes
                .iter()
                .map(|n| OsString::from(format!("127.0.0.1:{}", n.port()))),
        );
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(OsString::from));
        let out = run_tool("redis-cli", &args, LIMIT);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !stdout.contains("All 16384 slots covered") {
            panic!(
                "redis-cli --cluster create failed ({}):\n{stdout}\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                cluster.logs()
            );
        }
        let ports = cluster.ports();
        wait_until("cluster ready", LIMIT, || {
            for &port in &ports {
                state_ok(port)?;
                let lines = cluster_nodes(port)?;
                if lines.len() != 6 || lines.iter().any(NodeLine::failing) {
                    return Err(format!(":{port} sees {lines:?}"));
                }
                let masters = lines
                    .iter()
                    .filter(|l| l.has("master") && !l.slots.is_empty())
                    .count();
                let replicas = lines.iter().filter(|l| l.has("slave")).count();
                if (masters, replicas) != (3, 3) {
                    return Err(format!(
                        ":{port} sees {masters} masters, {replicas} replicas"
                    ));
                }
                let me = lines.iter().find(|l| l.has("myself")).ok_or("no myself")?;
                if me.has("slave") {
                    let repl = replication_info(port)?;
                    let link = info_field(&repl, "master_link_status");
                    if link.as_deref() != Some("up") {
                        return Err(format!("replica :{port} link {link:?}"));
                    }
                }
            }
            Ok(())
        });
        cluster
    }

    /// The ports of all six nodes, in start order.
    fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(Node::port).collect()
    }

    /// The ports of the nodes not killed.
    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(Node::port)
            .collect()
    }

    /// `redis://127.0.0.1:P` for all six nodes (killed ones included), in start order.
    pub fn urls(&self) -> Vec<String> {
        self.ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The ports of the live nodes that say they are a master owning slots, sorted.
    pub fn masters(&self) -> Vec<u16> {
        let mut masters: Vec<u16> = self
            .live_ports()
            .into_iter()
            .filter(|&port| {
                cluster_nodes(port).is_ok_and(|lines| {
                    lines
                        .iter()
                        .any(|l| l.has("myself") && l.has("master") && !l.slots.is_empty())
                })
            })
            .collect();
        masters.sort_unstable();
        masters
    }

    /// The port of the master serving `slot`, as the first live node sees it.
    pub fn master_of_slot(&self, slot: u16) -> u16 {
        assert!(slot < SLOTS, "slot {slot} out of range");
        let port = *self.live_ports().first().expect("a live node");
        let lines = cluster_nodes(port).unwrap_or_else(|e| panic!("CLUSTER NODES: {e}"));
        lines
            .iter()
            .find(|l| l.has("master") && !l.failing() && l.owns(slot))
            .map(|l| l.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}: {lines:?}"))
    }

    /// Kills the node on `port` (SIGKILL), remembering the slots it served.
    pub fn kill(&mut self, port: u16) {
        let slots = cluster_nodes(port)
            .ok()
            .and_then(|lines| lines.into_iter().find(|l| l.has("myself")))
            .map(|l| l.slots)
            .unwrap_or_default();
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no node on port {port}"));
        node.kill();
        if !slots.is_empty() {
            self.killed_slots.insert(port, slots);
        }
    }

    /// Waits (bounded: 30 s) until a replica of the killed master `old` has taken over its
    /// slots: every live node says `cluster_state:ok` with all slots covered, and sees
    /// `old` as failed and the new master as the owner of `old`'s slots. Returns the new
    /// master's port.
    pub fn wait_for_failover(&self, old: u16) -> u16 {
        let slots = self
            .killed_slots
            .get(&old)
            .unwrap_or_else(|| panic!(":{old} was not a killed master"))
            .clone();
        let (first, _) = slots[0];
        let live = self.live_ports();
        wait_until(&format!("failover of :{old}"), LIMIT, || {
            let mut new = None;
            for &port in &live {
                state_ok(port)?;
                let lines = cluster_nodes(port)?;
                let old_line = lines.iter().find(|l| l.port == old);
                if old_line.is_some_and(|l| !l.has("fail") || !l.slots.is_empty()) {
                    return Err(format!(":{port} sees :{old} as {old_line:?}"));
                }
                let owner = slots.iter().all(|&(lo, hi)| {
                    lines
                        .iter()
                        .any(|l| l.has("master") && !l.failing() && l.owns(lo) && l.owns(hi))
                });
                let by = lines
                    .iter()
                    .find(|l| l.has("master") && !l.failing() && l.owns(first))
                    .map(|l| l.port);
                match by {
                    Some(p) if owner && live.contains(&p) && new.is_none_or(|n| n == p) => {
                        new = Some(p)
                    }
                    _ => return Err(format!(":{port} sees slot {first} served by {by:?}")),
                }
            }
            let new = new.ok_or("no live node")?;
            let repl = replication_info(new)?;
            match info_field(&repl, "role").as_deref() {
                Some("master") => Ok(new),
                role => Err(format!(":{new} has role {role:?}")),
            }
        })
    }

    /// All node logs, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- node :{} ---\n{}", n.port(), n.log()))
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The hash slot of `key`, as Redis computes it: CRC16 (XMODEM) of the key, or of its
/// hash tag (the bytes between the first `{` and the first `}` after it, when not empty),
/// modulo 16384.
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|&b| b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    crc16(hashed) % SLOTS
}

/// CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, no reflection.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}
