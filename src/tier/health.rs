//! What a node can tell about its backend: [`StampedeLayer::check_backend`] and
//! [`Cache::check_backend`].
//!
//! [`StampedeLayer::check_backend`]: crate::StampedeLayer::check_backend
//! [`Cache::check_backend`]: crate::Cache::check_backend

use std::fmt;

#[cfg(feature = "redis")]
use super::conn::BackendError;
use super::Tier;

/// What a backend check found.
///
/// Its [`Display`](fmt::Display) is the sentence the check logs, for instance
/// `redis at 127.0.0.1:6390 unreachable: connection refused; serving from this process only
/// until it answers`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackendHealth {
    /// `"local"`, `"redis"`, `"redis-cluster"` or `"redis-sentinel"`.
    pub backend: &'static str,
    /// Where Redis is (`host:port`, or a socket path), never with its password; `None` for
    /// the local backend.
    pub address: Option<String>,
    /// Whether Redis answered.
    pub redis: RedisState,
    /// Whether the circuit breaker is open (or half-open, one trial testing Redis): calls
    /// skip Redis and the node serves from its own memory.
    pub breaker_open: bool,
}

/// Whether Redis answered a check.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisState {
    /// The local backend: there is no Redis to ask.
    NotUsed,
    /// Redis answered.
    Up,
    /// Redis did not answer, or refused us.
    Down(RedisProblem),
}

/// Why Redis did not answer a check.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedisProblem {
    /// Not reached: the cause in words (`connection refused`, `no answer within 250ms`,
    /// ...).
    Unreachable(String),
    /// Redis refused the password of the URL (`WRONGPASS`, or no password is set there).
    WrongPassword,
    /// Redis wants a password and the URL has none (`NOAUTH`).
    PasswordRequired,
    /// The TLS handshake failed: the server's certificate does not verify against the CA
    /// (for instance `invalid peer certificate: UnknownIssuer`), or the server refused
    /// ours. The cause as rustls said it.
    Tls(String),
    /// Redis answered with another error, as it said it.
    Other(String),
}

impl BackendHealth {
    /// True unless Redis is in use and did not answer.
    pub fn is_up(&self) -> bool {
        !matches!(self.redis, RedisState::Down(_))
    }

    fn address(&self) -> &str {
        self.address.as_deref().unwrap_or("?")
    }

    /// Logs the finding: INFO when Redis answered (or is not used), ERROR when it refused
    /// our credentials or TLS failed (a setting to fix), WARN otherwise.
    pub(crate) fn log(&self) {
        let redis = self.address();
        match &self.redis {
            RedisState::NotUsed | RedisState::Up => tracing::info!(redis = %redis, "{self}"),
            RedisState::Down(
                RedisProblem::WrongPassword | RedisProblem::PasswordRequired | RedisProblem::Tls(_),
            ) => {
                tracing::error!(redis = %redis, "{self}")
            }
            RedisState::Down(_) => tracing::warn!(redis = %redis, "{self}"),
        }
    }
}

impl fmt::Display for BackendHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const FALLBACK: &str = "serving from this process only until it answers";
        let addr = self.address();
        match &self.redis {
            RedisState::NotUsed => {
                f.write_str("no redis: caching and coalescing within this process only")
            }
            RedisState::Up => write!(f, "redis at {addr} answered"),
            RedisState::Down(RedisProblem::Unreachable(cause)) => {
                write!(f, "redis at {addr} unreachable: {cause}; {FALLBACK}")
            }
            RedisState::Down(RedisProblem::WrongPassword) => {
                f.write_str("redis rejected our credentials (WRONGPASS): check the URL's password")
            }
            RedisState::Down(RedisProblem::PasswordRequired) => {
                f.write_str("redis requires a password: add it to the URL")
            }
            RedisState::Down(RedisProblem::Tls(cause)) => write!(
                f,
                "redis at {addr} failed the TLS handshake: {cause}: check the CA and the client certificate; {FALLBACK}"
            ),
            RedisState::Down(RedisProblem::Other(error)) => {
                write!(f, "redis at {addr} answered an error: {error}; {FALLBACK}")
            }
        }
    }
}

/// What a failed call says about Redis, by the error's kind and code rather than its text.
#[cfg(feature = "redis")]
pub(crate) fn classify(error: &BackendError) -> RedisProblem {
    let e = match error {
        BackendError::Timeout(d) => {
            return RedisProblem::Unreachable(format!("no answer within {d:?}"))
        }
        BackendError::CircuitOpen => {
            return RedisProblem::Unreachable("skipped while the breaker is open".to_owned())
        }
        BackendError::Redis(e) => e,
    };
    match e.code() {
        Some("WRONGPASS") => return RedisProblem::WrongPassword,
        Some("NOAUTH") => return RedisProblem::PasswordRequired,
        _ => {}
    }
    if e.kind() == redis::ErrorKind::AuthenticationFailed {
        return RedisProblem::WrongPassword;
    }
    // The io error itself is not reachable through the redis error (it sits behind an
    // `Arc`), but its kind is, and its text names the rest ("connection reset", "host
    // unreachable").
    let text = e.to_string();
    if [
        "invalid peer certificate",
        "CertificateRequired",
        "tls handshake",
        "TLS handshake",
    ]
    .iter()
    .any(|t| text.contains(t))
    {
        return RedisProblem::Tls(text);
    }
    if e.is_connection_refusal() {
        return RedisProblem::Unreachable("connection refused".to_owned());
    }
    if e.is_timeout() {
        return RedisProblem::Unreachable("connection timed out".to_owned());
    }
    if e.is_io_error() || e.is_connection_dropped() {
        return RedisProblem::Unreachable(e.to_string());
    }
    RedisProblem::Other(e.to_string())
}

#[cfg(feature = "redis")]
impl<S: super::conn::Source> super::redis::RedisTier<S> {
    async fn health(&self) -> BackendHealth {
        let ping = self.ping().await;
        BackendHealth {
            backend: S::KIND,
            address: Some(self.address()),
            redis: match ping {
                Ok(()) => RedisState::Up,
                Err(e) => RedisState::Down(classify(&e)),
            },
            breaker_open: self.breaker_open(),
        }
    }
}

impl Tier {
    /// Asks the backend once whether it answers: with Redis, one `PING` under the Redis
    /// deadline (at least 1 s while the first connection is made), past the circuit
    /// breaker and without feeding it.
    pub(crate) async fn probe(&self) -> BackendHealth {
        match self {
            Tier::Local(_) => BackendHealth {
                backend: "local",
                address: None,
                redis: RedisState::NotUsed,
                breaker_open: false,
            },
            #[cfg(feature = "redis")]
            Tier::Redis(t) => t.health().await,
            #[cfg(feature = "cluster")]
            Tier::Cluster(t) => t.health().await,
            #[cfg(feature = "sentinel")]
            Tier::Sentinel(t) => t.health().await,
        }
    }
}

#[cfg(all(test, feature = "redis"))]
mod tests {
    use std::time::Duration;

    use std::io;

    use super::*;

    fn server_error(reply: &[u8]) -> BackendError {
        let value = redis::parse_redis_value(reply).expect("a RESP error reply");
        BackendError::Redis(value.extract_error().expect_err("an error reply"))
    }

    fn io_error(kind: io::ErrorKind) -> BackendError {
        BackendError::Redis(io::Error::from(kind).into())
    }

    #[test]
    fn credentials_problems_by_kind_and_code() {
        let auth = redis::RedisError::from((
            redis::ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        assert_eq!(
            classify(&BackendError::Redis(auth)),
            RedisProblem::WrongPassword
        );
        assert_eq!(
            classify(&server_error(
                b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
            )),
            RedisProblem::WrongPassword
        );
        assert_eq!(
            classify(&server_error(b"-NOAUTH Authentication required.\r\n")),
            RedisProblem::PasswordRequired
        );
    }

    #[test]
    fn unreachable_by_io_kind_and_deadline() {
        let cases = [
            (io::ErrorKind::ConnectionRefused, "connection refused"),
            (io::ErrorKind::TimedOut, "connection timed out"),
            (io::ErrorKind::ConnectionReset, "connection reset"),
            (io::ErrorKind::HostUnreachable, "host unreachable"),
        ];
        for (kind, cause) in cases {
            assert_eq!(
                classify(&io_error(kind)),
                RedisProblem::Unreachable(cause.to_owned()),
                "{kind:?}"
            );
        }
        assert_eq!(
            classify(&BackendError::Timeout(Duration::from_millis(250))),
            RedisProblem::Unreachable("no answer within 250ms".to_owned())
        );
    }

    #[test]
    fn other_answers_are_quoted() {
        let problem = classify(&server_error(b"-LOADING Redis is loading the dataset\r\n"));
        assert!(
            matches!(&problem, RedisProblem::Other(text) if text.contains("loading")),
            "{problem:?}"
        );
    }

    #[test]
    fn the_log_lines() {
        let health = |redis| BackendHealth {
            backend: "redis",
            address: Some("127.0.0.1:6390".to_owned()),
            redis,
            breaker_open: false,
        };
        let refused = RedisState::Down(RedisProblem::Unreachable("connection refused".into()));
        assert_eq!(
            health(refused).to_string(),
            "redis at 127.0.0.1:6390 unreachable: connection refused; serving from this process only until it answers"
        );
        assert_eq!(
            health(RedisState::Down(RedisProblem::WrongPassword)).to_string(),
            "redis rejected our credentials (WRONGPASS): check the URL's password"
        );
        assert_eq!(
            health(RedisState::Down(RedisProblem::PasswordRequired)).to_string(),
            "redis requires a password: add it to the URL"
        );
        assert_eq!(
            health(RedisState::Up).to_string(),
            "redis at 127.0.0.1:6390 answered"
        );
    }

    #[test]
    fn the_address_never_holds_the_password() {
        let client = redis::Client::open("redis://user:s3cret@127.0.0.1:6390/2").unwrap();
        assert_eq!(crate::tier::redacted(&client), "127.0.0.1:6390");
    }
}
