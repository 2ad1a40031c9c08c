//! Cache keys: a canonical request description, hashed with SHA-256.

use std::fmt::Write as _;
use std::sync::Arc;

use http::request::Parts;
use http::HeaderName;
use sha2::{Digest, Sha256};

/// A user-supplied key function: the canonical key of a request, or `None` to bypass the
/// cache for it.
pub(crate) type KeyFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// The default canonical key: `METHOD scheme://authority/path?query`.
///
/// The authority comes from the request URI, else from the `Host` header; the scheme
/// defaults to `http`. Custom key functions can start from this and add to it.
///
/// ```
/// let req = http::Request::get("/users/7?full=1")
///     .header("host", "api.example.com")
///     .body(())
///     .unwrap();
/// let (parts, ()) = req.into_parts();
/// assert_eq!(
///     tower_stampede::default_key(&parts),
///     "GET http://api.example.com/users/7?full=1"
/// );
/// ```
pub fn default_key(parts: &Parts) -> String {
    let scheme = parts.uri.scheme_str().unwrap_or("http");
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let method = parts.method.as_str();
    // Room for what `Key::new` appends, so the string is allocated once.
    let mut key =
        String::with_capacity(method.len() + scheme.len() + authority.len() + path.len() + 64);
    for part in [method, " ", scheme, "://", authority, path] {
        key.push_str(part);
    }
    key
}

/// A request's key: the canonical text (stored in the envelope and compared on read) and
/// its hash (the L1 key and, in hex, the Redis hash tag).
#[derive(Debug)]
pub(crate) struct Key {
    pub(crate) canonical: String,
    pub(crate) hash: [u8; 32],
    /// Cached per user: the credentials are part of the key.
    pub(crate) per_user: bool,
}

impl Key {
    /// The hash in hex: the Redis hash tag and the wake-up message.
    pub(crate) fn hex(&self) -> String {
        hex(&self.hash)
    }

    /// The first 16 hex digits, formatted only if a log or span asks for them.
    pub(crate) fn short(&self) -> impl std::fmt::Display + '_ {
        struct Short<'a>(&'a [u8; 32]);
        impl std::fmt::Display for Short<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&hex(&self.0[..8]))
            }
        }
        Short(&self.hash)
    }
}

/// A `Hasher` for key hashes, which are uniform already: their first eight bytes serve.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn write(&mut self, bytes: &[u8]) {
        if let Some(head) = bytes.first_chunk::<8>() {
            self.0 ^= u64::from_le_bytes(*head);
        }
    }

    fn write_usize(&mut self, _length_prefix: usize) {}

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Builds [`Prehashed`] hashers.
pub(crate) type PrehashedState = std::hash::BuildHasherDefault<Prehashed>;

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

impl Key {
    /// Builds the key from a canonical base plus the values of the varied headers and, for
    /// per-user caching, a hash of the credentials (the canonical key is stored in Redis:
    /// credentials never are).
    pub(crate) fn new(
        mut canonical: String,
        parts: &Parts,
        vary: &[HeaderName],
        per_user: bool,
    ) -> Key {
        // Normalized before this (`br`, `gzip` or none): the encoding of the stored body.
        if let Some(coding) = parts.headers.get(http::header::ACCEPT_ENCODING) {
            canonical.push_str("\naccept-encoding:");
            canonical.push_str(coding.to_str().unwrap_or(""));
        }
        for name in vary {
            let _ = write!(canonical, "\n{name}:");
            for (i, v) in parts.headers.get_all(name).iter().enumerate() {
                if i > 0 {
                    canonical.push(',');
                }
                canonical.push_str(&String::from_utf8_lossy(v.as_bytes()));
            }
        }
        if per_user {
            let mut user = Sha256::new();
            for name in [http::header::AUTHORIZATION, http::header::COOKIE] {
                for v in parts.headers.get_all(&name) {
                    user.update(name.as_str());
                    user.update(b":");
                    user.update(v.as_bytes());
                    user.update(b"\n");
                }
            }
            let _ = write!(canonical, "\nuser:{}", hex(&user.finalize()));
        }
        let hash: [u8; 32] = Sha256::digest(canonical.as_bytes()).into();
        Key {
            canonical,
            hash,
            per_user,
        }
    }
}

/// Parses the 64 hex digits of a wake-up message back into a hash.
pub(crate) fn parse_hex(s: &[u8]) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: http::Request<()>) -> Parts {
        req.into_parts().0
    }

    #[test]
    fn vary_and_users_change_the_hash_and_hex_round_trips() {
        let a = parts(
            http::Request::get("http://h/p")
                .header("accept-language", "en")
                .body(())
                .unwrap(),
        );
        let b = parts(
            http::Request::get("http://h/p")
                .header("accept-language", "fr")
                .body(())
                .unwrap(),
        );
        let vary = [HeaderName::from_static("accept-language")];
        let ka = Key::new(default_key(&a), &a, &vary, false);
        let kb = Key::new(default_key(&b), &b, &vary, false);
        assert_ne!(ka.hash, kb.hash);
        assert_eq!(
            Key::new(default_key(&a), &a, &[], false).hash,
            Key::new(default_key(&b), &b, &[], false).hash
        );
        assert_eq!(parse_hex(ka.hex().as_bytes()), Some(ka.hash));
        assert_eq!(parse_hex(b"zz"), None);

        let u1 = parts(
            http::Request::get("http://h/p")
                .header("authorization", "Bearer 1")
                .body(())
                .unwrap(),
        );
        let u2 = parts(
            http::Request::get("http://h/p")
                .header("authorization", "Bearer 2")
                .body(())
                .unwrap(),
        );
        let k1 = Key::new(default_key(&u1), &u1, &[], true);
        assert_ne!(k1.hash, Key::new(default_key(&u2), &u2, &[], true).hash);
        assert!(
            !k1.canonical.contains("Bearer"),
            "credentials stay out of the stored key"
        );
    }
}
