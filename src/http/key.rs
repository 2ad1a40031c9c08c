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

/// The canonical key of a request: a base (the default key or the key function's) plus
/// the values of the varied headers and, for per-user caching, a hash of the credentials
/// (the canonical key is stored in Redis: credentials never are).
pub(crate) fn request_key(
    mut canonical: String,
    parts: &Parts,
    vary: &[HeaderName],
    per_user: bool,
    accept_encoding: bool,
) -> String {
    // Normalized before this (`br`, `gzip` or none): the encoding of the stored body.
    if let Some(coding) = parts
        .headers
        .get(http::header::ACCEPT_ENCODING)
        .filter(|_| accept_encoding)
    {
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
        let _ = write!(canonical, "\nuser:{}", crate::tier::hex(&user.finalize()));
    }
    canonical
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: http::Request<()>) -> Parts {
        req.into_parts().0
    }

    #[test]
    fn vary_and_users_change_the_key() {
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
        let key = |p: &Parts, vary: &[HeaderName], per_user| {
            request_key(default_key(p), p, vary, per_user, true)
        };
        assert_ne!(key(&a, &vary, false), key(&b, &vary, false));
        assert_eq!(key(&a, &[], false), key(&b, &[], false));

        let user = |token: &'static str| {
            parts(
                http::Request::get("http://h/p")
                    .header("authorization", token)
                    .body(())
                    .unwrap(),
            )
        };
        let (u1, u2) = (user("Bearer 1"), user("Bearer 2"));
        let k1 = key(&u1, &[], true);
        assert_ne!(k1, key(&u2, &[], true));
        assert!(
            !k1.contains("Bearer"),
            "credentials stay out of the stored key"
        );
    }
}
