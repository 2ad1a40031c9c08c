//! TLS to Redis (feature `tls`): `rediss://` URLs for one Redis, a Cluster or Sentinel,
//! verified against the system's roots or a private CA, with an optional client
//! certificate for mutual TLS. The connections use rustls; the ring crypto provider is
//! installed for the process the first time a tier is built, unless the application
//! installed one already.

use std::fmt;
use std::sync::Once;

/// The TLS material for `rediss://` connections: a private CA to verify the server with,
/// and a client certificate for servers that ask for one (`tls-auth-clients yes`).
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_stampede::{Backend, TlsOptions};
/// let tls = TlsOptions::new()
///     .ca_pem(std::fs::read("ca.pem")?)
///     .client_cert(std::fs::read("client.pem")?, std::fs::read("client-key.pem")?);
/// let backend = Backend::redis("rediss://redis.internal:6380/")?.with_tls(tls)?;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct TlsOptions {
    ca_pem: Option<Vec<u8>>,
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("TlsOptions")
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "set"))
            .field("client_cert", &self.client.as_ref().map(|_| "set"))
            .finish()
    }
}

impl TlsOptions {
    /// Verify against the system's roots, with no client certificate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Verify the server against this CA certificate (PEM) instead of the system's roots.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Present this client certificate and key (both PEM) to servers that ask for one.
    pub fn client_cert(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.client = Some((cert_pem.into(), key_pem.into()));
        self
    }

    pub(crate) fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca_pem.clone(),
        }
    }
}

/// Installs rustls' ring provider as the process default, once (an application that
/// installed another one keeps it).
pub(crate) fn install_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
