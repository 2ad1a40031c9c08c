//! A Sentinel deployment of our own: one master, one replica and three sentinels (quorum
//! 2) on free loopback ports, with timeouts short enough that a promotion takes seconds.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use super::{free_port, info_field, ping, query, server_args, temp_dir, wait_until, Node};

/// `down-after-milliseconds` of our sentinels: how long the master may be silent before
/// a sentinel counts it as down.
pub const DOWN_AFTER_MS: u64 = 1000;

/// `failover-timeout` of our sentinels, in milliseconds.
pub const FAILOVER_TIMEOUT_MS: u64 = 3000;

/// How long the setup and a promotion may take before a test gives up.
const LIMIT: Duration = Duration::from_secs(30);

/// A master, its replica (`--replicaof`) and three sentinels monitoring the master under
/// one name. Every process is killed on drop and the temp dir removed.
pub struct SentinelSetup {
    name: String,
    dir: PathBuf,
    master: Node,
    replica: Node,
    sentinels: Vec<Node>,
}

fn sentinel_query<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> Result<T, String> {
    let mut cmd = redis::cmd("SENTINEL");
    for a in args {
        cmd.arg(*a);
    }
    query(port, &cmd).map_err(|e| format!("sentinel :{port} SENTINEL {args:?}: {e}"))
}

/// The master address sentinel `port` reports for `name`.
fn reported_master(port: u16, name: &str) -> Result<u16, String> {
    let (host, master): (String, String) =
        sentinel_query(port, &["get-master-addr-by-name", name])?;
    match (host.as_str(), master.parse()) {
        ("127.0.0.1", Ok(p)) => Ok(p),
        _ => Err(format!("sentinel :{port} reports {host}:{master}")),
    }
}

fn replication_field(port: u16, field: &str) -> Result<Option<String>, String> {
    let info: String =
        query(port, redis::cmd("INFO").arg("replication")).map_err(|e| format!(":{port}: {e}"))?;
    Ok(info_field(&info, field))
}

fn data_node(dir: &std::path::Path, role: &str, extra: Vec<OsString>) -> Node {
    let log = dir.join(format!("{role}.log"));
    let node_dir = dir.join(role);
    std::fs::create_dir_all(&node_dir).expect("create node dir");
    Node::start(
        log.clone(),
        free_port,
        |port| {
            let mut args = server_args(port, &node_dir, &log);
            args.extend(["--bind".into(), "127.0.0.1".into()]);
            args.extend(extra.iter().cloned());
            args
        },
        ping,
    )
}

impl SentinelSetup {
    /// Starts the master, the replica (waiting until its link is up), then three sentinels
    /// monitoring the master as `name`, and waits (bounded) until every sentinel reports
    /// that master, knows the replica and the two other sentinels, and has a quorum.
    pub fn start(name: &str) -> SentinelSetup {
        let dir = temp_dir("sentinel");
        let master = data_node(&dir, "master", Vec::new());
        let master_port = master.port();
        let replicaof = ["--replicaof", "127.0.0.1", &master_port.to_string()];
        let replica = data_node(&dir, "replica", replicaof.map(OsString::from).to_vec());
        let replica_port = replica.port();
        // A sentinel learns replicas from the master's INFO, every 10 s after the first;
        // starting them after the link is up lets them see it at once.
        wait_until("replica link up", LIMIT, || {
            match replication_field(replica_port, "master_link_status")?.as_deref() {
                Some("up") => Ok(()),
                other => Err(format!("link {other:?}")),
            }
        });
        let sentinels = (0..3)
            .map(|i| {
                let conf = dir.join(format!("sentinel-{i}.conf"));
                let log = dir.join(format!("sentinel-{i}.log"));
                let dir = &dir;
                Node::start(
                    log.clone(),
                    free_port,
                    |port| {
                        // Sentinel rewrites its config file: a fresh, writable one per try.
                        let text = format!(
                            "port {port}\n\
                             bind 127.0.0.1\n\
                             dir {dir}\n\
                             logfile {log}\n\
                             sentinel announce-ip 127.0.0.1\n\
                             sentinel monitor {name} 127.0.0.1 {master_port} 2\n\
                             sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}\n\
                             sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}\n\
                             sentinel parallel-syncs {name} 1\n",
                            dir = dir.display(),
                            log = log.display(),
                        );
                        std::fs::write(&conf, text).expect("write sentinel config");
                        vec![conf.clone().into(), "--sentinel".into()]
                    },
                    ping,
                )
            })
            .collect();
        let setup = SentinelSetup {
            name: name.to_owned(),
            dir,
            master,
            replica,
            sentinels,
        };
        let ports = setup.sentinel_ports();
        wait_until("sentinels ready", LIMIT, || {
            for &port in &ports {
                let reported = reported_master(port, name)?;
                if reported != master_port {
                    return Err(format!(":{port} reports master :{reported}"));
                }
                let replicas: Vec<HashMap<String, String>> =
                    sentinel_query(port, &["replicas", name])?;
                let known = replicas.iter().any(|r| {
                    r.get("port") == Some(&replica_port.to_string())
                        && r.get("flags").map(String::as_str) == Some("slave")
                        && r.get("master-link-status").map(String::as_str) == Some("ok")
                });
                if !known {
                    return Err(format!(":{port} knows replicas {replicas:?}"));
                }
                let others: Vec<HashMap<String, String>> =
                    sentinel_query(port, &["sentinels", name])?;
                if others.len() != 2 {
                    return Err(format!(":{port} knows {} other sentinels", others.len()));
                }
                let _: String = sentinel_query(port, &["ckquorum", name])?;
            }
            Ok(())
        });
        setup
    }

    fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(Node::port).collect()
    }

    /// The name the sentinels monitor the master under.
    pub fn master_name(&self) -> &str {
        &self.name
    }

    /// `redis://127.0.0.1:P` for each of the three sentinels.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinel_ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The port of the server started as the master.
    pub fn master_port(&self) -> u16 {
        self.master.port()
    }

    /// The port of the server started as the replica (the master after a promotion).
    pub fn replica_port(&self) -> u16 {
        self.replica.port()
    }

    /// Kills the master (SIGKILL).
    pub fn kill_master(&mut self) {
        self.master.kill();
    }

    /// Waits (bounded: 30 s) until every sentinel reports the replica as the master and
    /// the replica says `role:master`. Returns the new master's port.
    pub fn wait_for_promotion(&self) -> u16 {
        let new = self.replica.port();
        let ports = self.sentinel_ports();
        wait_until("promotion", LIMIT, || {
            for &port in &ports {
                let reported = reported_master(port, &self.name)?;
                if reported != new {
                    return Err(format!(":{port} reports master :{reported}"));
                }
            }
            match replication_field(new, "role")?.as_deref() {
                Some("master") => Ok(new),
                role => Err(format!(":{new} has role {role:?}")),
            }
        })
    }

    /// All logs, for a failure message.
    pub fn logs(&self) -> String {
        std::iter::once(&self.master)
            .chain(std::iter::once(&self.replica))
            .chain(&self.sentinels)
            .map(|n| format!("--- :{} ---\n{}", n.port(), n.log()))
            .collect()
    }
}

impl Drop for SentinelSetup {
    fn drop(&mut self) {
        self.sentinels.clear();
        self.replica.kill();
        self.master.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
