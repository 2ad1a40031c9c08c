//! A `redis-server` that speaks only TLS, with a throwaway CA made by the `openssl` CLI in
//! its temp dir: a server certificate for `127.0.0.1`/`localhost`, a client certificate
//! for mutual TLS, and a second, unrelated CA for "wrong CA" tests.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{free_port, run_tool, server_args, temp_dir, Node};

const CA_CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = tower-stampede CA_NAME
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
";

const LEAF_CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = localhost
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
";

/// A TLS-only `redis-server` (`--port 0 --tls-port P`) and the certificates to talk to it.
/// Killed on drop; the temp dir (keys included) removed.
pub struct TlsRedis {
    node: Option<Node>,
    dir: PathBuf,
    mutual: bool,
}

fn openssl(dir: &Path, args: &[&str]) {
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    let out = run_tool("openssl", &args_in(dir, &args), Duration::from_secs(30));
    assert!(
        out.status.success(),
        "openssl {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Relative file names in `args` made absolute in `dir` (openssl runs in our cwd).
fn args_in(dir: &Path, args: &[OsString]) -> Vec<OsString> {
    args.iter()
        .map(|a| match a.to_str() {
            Some(s) if s.ends_with(".pem") || s.ends_with(".cnf") || s.ends_with(".csr") => {
                dir.join(s).into_os_string()
            }
            _ => a.clone(),
        })
        .collect()
}

/// A self-signed P-256 CA as `<name>.pem` (certificate) and `<name>-key.pem`.
fn make_ca(dir: &Path, name: &str) {
    let (cert, key) = (format!("{name}.pem"), format!("{name}-key.pem"));
    // Each CA its own name: a CA with the same name but another key is a different case
    // (rustls says `BadSignature`, not `UnknownIssuer`).
    let config = format!("{name}.cnf");
    std::fs::write(dir.join(&config), CA_CONFIG.replace("CA_NAME", name)).expect("write CA config");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "2",
            "-config",
            &config,
            "-extensions",
            "ca",
        ],
    );
}

/// A P-256 key and a certificate signed by the `ca` CA with the `[kind]` extensions of
/// `leaf.cnf`, as `<kind>.pem` and `<kind>-key.pem`.
fn make_leaf(dir: &Path, ca: &str, kind: &str, serial: &str) {
    let (cert, key, csr) = (
        format!("{kind}.pem"),
        format!("{kind}-key.pem"),
        format!("{kind}.csr"),
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-config",
            "leaf.cnf",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-set_serial",
            serial,
            "-days",
            "2",
            "-out",
            &cert,
            "-extfile",
            "leaf.cnf",
            "-extensions",
            kind,
        ],
    );
}

impl TlsRedis {
    /// A server that accepts clients with or without a certificate
    /// (`--tls-auth-clients optional`).
    pub fn start() -> TlsRedis {
        TlsRedis::start_with(false)
    }

    /// A server that requires a client certificate signed by the test CA
    /// (`--tls-auth-clients yes`).
    pub fn start_mutual() -> TlsRedis {
        TlsRedis::start_with(true)
    }

    fn start_with(mutual: bool) -> TlsRedis {
        let dir = temp_dir("tls");
        std::fs::write(dir.join("leaf.cnf"), LEAF_CONFIG).expect("write leaf.cnf");
        make_ca(&dir, "ca");
        make_ca(&dir, "wrong-ca");
        make_leaf(&dir, "ca", "server", "2");
        make_leaf(&dir, "ca", "client", "3");
        let mut tls = TlsRedis {
            node: None,
            dir: dir.clone(),
            mutual,
        };
        let log = dir.join("redis.log");
        let path = |name: &str| OsString::from(dir.join(name));
        let node = Node::start(
            log.clone(),
            free_port,
            |port| {
                let mut args = server_args(0, &dir, &log);
                args.extend([
                    "--bind".into(),
                    "127.0.0.1".into(),
                    "--tls-port".into(),
                    port.to_string().into(),
                    "--tls-cert-file".into(),
                    path("server.pem"),
                    "--tls-key-file".into(),
                    path("server-key.pem"),
                    "--tls-ca-cert-file".into(),
                    path("ca.pem"),
                    "--tls-auth-clients".into(),
                    if mutual { "yes" } else { "optional" }.into(),
                ]);
                args
            },
            |port| tls.cli_ping(port),
        );
        tls.node = Some(node);
        tls
    }

    /// `redis-cli --tls` PING with the test CA (and the client certificate on a mutual
    /// server), bounded: 2 s.
    fn cli_ping(&self, port: u16) -> bool {
        let mut args: Vec<OsString> =
            vec!["--tls".into(), "--cacert".into(), self.ca_pem_path().into()];
        if self.mutual {
            args.extend([
                "--cert".into(),
                self.client_cert_path().into(),
                "--key".into(),
                self.client_key_path().into(),
            ]);
        }
        args.extend(["-h", "127.0.0.1", "-p", &port.to_string(), "PING"].map(OsString::from));
        let out = run_tool("redis-cli", &args, Duration::from_secs(2));
        out.status.success() && out.stdout.starts_with(b"PONG")
    }

    /// The TLS port.
    pub fn port(&self) -> u16 {
        self.node.as_ref().expect("running").port()
    }

    /// `rediss://127.0.0.1:P/`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.port())
    }

    /// The test CA's certificate (PEM), which signed the server and client certificates.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A second CA's certificate (PEM) that signed nothing of ours.
    pub fn wrong_ca_pem_path(&self) -> PathBuf {
        self.dir.join("wrong-ca.pem")
    }

    /// A client certificate (PEM) signed by the test CA, for mutual TLS.
    pub fn client_cert_path(&self) -> PathBuf {
        self.dir.join("client.pem")
    }

    /// The client certificate's private key (PEM, PKCS#8).
    pub fn client_key_path(&self) -> PathBuf {
        self.dir.join("client-key.pem")
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        self.node = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
