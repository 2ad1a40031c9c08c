//! The stored bytes: a small versioned envelope around one cached response.
//!
//! Layout (all integers big-endian):
//! `"TSE" version:u8 kind:u8 key_len:u32 key status:u16 stored_at:u64 fresh_until:u64
//! revalidate_until:u64 stale_until:u64 fill_ms:u32 n_headers:u16 (name_len:u16 name value_len:u32 value)*
//! body_len:u32 body`. Times are milliseconds since the Unix epoch.
//!
//! Decoding never panics: anything short, foreign, of another version or for another key
//! is an error, which the caller treats as a miss.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

const MAGIC: &[u8; 3] = b"TSE";
const VERSION: u8 = 1;

/// What an envelope holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A cacheable response.
    Response = 0,
    /// Hit-for-pass: the last answer for this key was uncacheable; skip the lock.
    Pass = 1,
}

/// One cached response, shared by L1 and L2.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) kind: Kind,
    pub(crate) key: String,
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) stored_at: u64,
    /// Until then it is fresh.
    pub(crate) fresh_until: u64,
    /// Until then, once stale, it is served at once while one refresh runs
    /// (stale-while-revalidate).
    pub(crate) revalidate_until: u64,
    /// Until then, once stale, it is served when the upstream fails (stale-if-error).
    pub(crate) stale_until: u64,
    /// How long the fill took: the δ of early refresh.
    pub(crate) fill_ms: u32,
}

/// Why bytes could not be decoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("not an envelope")]
    Foreign,
    #[error("envelope version {0} is not supported")]
    Version(u8),
    #[error("envelope is truncated or malformed")]
    Malformed,
    #[error("envelope belongs to another key")]
    OtherKey,
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Entry {
    pub(crate) fn is_fresh_at(&self, now: u64) -> bool {
        now < self.fresh_until
    }

    /// Stale but inside the stale-while-revalidate window.
    pub(crate) fn is_revalidatable_at(&self, now: u64) -> bool {
        !self.is_fresh_at(now) && now < self.revalidate_until
    }

    /// Usable at all: fresh, or stale inside a grace window.
    pub(crate) fn is_usable_at(&self, now: u64) -> bool {
        now < self.stale_until
    }

    /// XFetch (Vattani et al., VLDB 2015): refresh early with a probability that grows as
    /// expiry nears, scaled by how long the last fill took. `r` is uniform in (0, 1].
    pub(crate) fn refresh_early(&self, now: u64, beta: f64, r: f64) -> bool {
        let lead = -(self.fill_ms as f64) * beta * r.ln();
        now as f64 + lead >= self.fresh_until as f64
    }

    /// Time left until the entry stops being usable at all.
    pub(crate) fn time_to_live(&self, now: u64) -> Duration {
        Duration::from_millis(self.stale_until.saturating_sub(now))
    }

    /// Age in whole seconds, for the `Age` header.
    pub(crate) fn age_secs(&self, now: u64) -> u64 {
        now.saturating_sub(self.stored_at) / 1000
    }

    /// The memory this entry takes, for the L1 weigher: its bytes plus the bookkeeping
    /// around them (the header map's table and one allocation per value, the entry, moka's
    /// node), estimated from RSS measured with 100k entries (`benches/compare.sh`).
    pub(crate) fn weight(&self) -> u32 {
        const PER_HEADER: usize = 64;
        const PER_ENTRY: usize = 1024;
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + PER_HEADER)
            .sum();
        (self.body.len() + self.key.len() + headers + PER_ENTRY).min(u32::MAX as usize) as u32
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.weight() as usize);
        out.put_slice(MAGIC);
        out.put_u8(VERSION);
        out.put_u8(self.kind as u8);
        out.put_u32(self.key.len() as u32);
        out.put_slice(self.key.as_bytes());
        out.put_u16(self.status.as_u16());
        out.put_u64(self.stored_at);
        out.put_u64(self.fresh_until);
        out.put_u64(self.revalidate_until);
        out.put_u64(self.stale_until);
        out.put_u32(self.fill_ms);
        let n = self.headers.len().min(u16::MAX as usize);
        out.put_u16(n as u16);
        for (name, value) in self.headers.iter().take(n) {
            out.put_u16(name.as_str().len() as u16);
            out.put_slice(name.as_str().as_bytes());
            out.put_u32(value.len() as u32);
            out.put_slice(value.as_bytes());
        }
        out.put_u32(self.body.len() as u32);
        out.put_slice(&self.body);
        out
    }

    /// Decodes `bytes`, which must belong to `expected_key`.
    pub(crate) fn decode(bytes: Bytes, expected_key: &str) -> Result<Entry, DecodeError> {
        let mut r = Reader {
            buf: &bytes,
            pos: 0,
        };
        if r.take(3).map_err(|_| DecodeError::Foreign)? != MAGIC {
            return Err(DecodeError::Foreign);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let kind = match r.u8()? {
            0 => Kind::Response,
            1 => Kind::Pass,
            _ => return Err(DecodeError::Malformed),
        };
        let key_len = r.u32()? as usize;
        let key = r.take(key_len)?;
        if key != expected_key.as_bytes() {
            return Err(DecodeError::OtherKey);
        }
        let status = StatusCode::from_u16(r.u16()?).map_err(|_| DecodeError::Malformed)?;
        let stored_at = r.u64()?;
        let fresh_until = r.u64()?;
        let revalidate_until = r.u64()?;
        let stale_until = r.u64()?;
        let fill_ms = r.u32()?;
        let n = r.u16()? as usize;
        // The count is untrusted: never let it size an allocation (HeaderMap panics past 32768).
        let mut headers = HeaderMap::with_capacity(n.min(64));
        for _ in 0..n {
            let len = r.u16()? as usize;
            let name = HeaderName::from_bytes(r.take(len)?).map_err(|_| DecodeError::Malformed)?;
            let len = r.u32()? as usize;
            let value =
                HeaderValue::from_bytes(r.take(len)?).map_err(|_| DecodeError::Malformed)?;
            headers.append(name, value);
        }
        let body_len = r.u32()? as usize;
        let start = r.pos;
        r.take(body_len)?;
        if r.pos != bytes.len() {
            return Err(DecodeError::Malformed);
        }
        Ok(Entry {
            kind,
            key: expected_key.to_owned(),
            status,
            headers,
            body: bytes.slice(start..start + body_len),
            stored_at,
            fresh_until,
            revalidate_until,
            stale_until,
            fill_ms,
        })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Malformed)?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Malformed)?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        Entry {
            kind: Kind::Response,
            key: "GET http://example.com/a?b=c".into(),
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"hello world"),
            stored_at: 1,
            fresh_until: 2,
            revalidate_until: 3,
            stale_until: 4,
            fill_ms: 5,
        }
    }

    #[test]
    fn round_trip() {
        let e = sample();
        let d = Entry::decode(Bytes::from(e.encode()), &e.key).unwrap();
        assert_eq!(d.kind, e.kind);
        assert_eq!(d.status, e.status);
        assert_eq!(d.headers, e.headers);
        assert_eq!(d.body, e.body);
        assert_eq!(
            (
                d.stored_at,
                d.fresh_until,
                d.revalidate_until,
                d.stale_until,
                d.fill_ms
            ),
            (1, 2, 3, 4, 5)
        );
    }

    #[test]
    fn other_key_foreign_and_version_are_errors() {
        let e = sample();
        let bytes = Bytes::from(e.encode());
        assert_eq!(
            Entry::decode(bytes.clone(), "GET http://other/").unwrap_err(),
            DecodeError::OtherKey
        );
        assert_eq!(
            Entry::decode(Bytes::from_static(b"{\"json\":1}"), &e.key).unwrap_err(),
            DecodeError::Foreign
        );
        let mut v2 = bytes.to_vec();
        v2[3] = 2;
        assert_eq!(
            Entry::decode(Bytes::from(v2), &e.key).unwrap_err(),
            DecodeError::Version(2)
        );
    }

    #[test]
    fn windows_and_early_refresh() {
        let mut e = sample();
        e.fresh_until = 1000;
        e.revalidate_until = 2000;
        e.stale_until = 3000;
        e.fill_ms = 100;
        assert!(e.is_fresh_at(999) && !e.is_fresh_at(1000));
        assert!(
            e.is_revalidatable_at(1000)
                && !e.is_revalidatable_at(2000)
                && !e.is_revalidatable_at(500)
        );
        assert!(e.is_usable_at(2999) && !e.is_usable_at(3000));
        // r = 1 never refreshes early; a small r does near expiry, not far from it.
        assert!(!e.refresh_early(999, 1.0, 1.0));
        assert!(e.refresh_early(900, 1.0, 0.1));
        assert!(!e.refresh_early(0, 1.0, 0.1));
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_decodes_without_panic() {
        let e = sample();
        let bytes = e.encode();
        for len in 0..bytes.len() {
            assert!(Entry::decode(Bytes::copy_from_slice(&bytes[..len]), &e.key).is_err());
        }
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                let _ = Entry::decode(Bytes::from(b), &e.key);
            }
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Entry::decode(Bytes::from(longer), &e.key).is_err());
    }
}
