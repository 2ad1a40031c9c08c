//! The stored bytes: a small versioned envelope around one cached response.
//!
//! Layout (all integers big-endian):
//! `"TSE" version:u8 kind:u8 key_len:u32 key status:u16 stored_at:u64 fresh_until:u64
//! revalidate_until:u64 stale_until:u64 fill_ms:u32 n_headers:u16 (name_len:u16 name value_len:u32 value)*
//! body_len:u32 body`. Times are milliseconds since the Unix epoch.
//!
//! Decoding never panics: anything short, foreign, of another version, for another key or
//! past the bounds ([`MAX_HEADERS`], [`MAX_HEADER_BYTES`]) is an error, which the caller
//! treats as a miss. Every length field is checked against the bytes left (and the header
//! bounds) before anything is built from it. The HTTP rules refuse to store an answer past
//! those bounds, so the encoder never writes what the decoder refuses.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

const MAGIC: &[u8; 3] = b"TSE";
const VERSION: u8 = 1;

/// The most header fields an envelope holds.
pub(crate) const MAX_HEADERS: usize = 256;
/// The most bytes of header names and values, together, an envelope holds.
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The fixed fields: magic, version, kind, key length, status, four times, fill time,
/// header count and body length.
const FIXED_LEN: usize = 3 + 1 + 1 + 4 + 2 + 4 * 8 + 4 + 2 + 4;
/// The framing of one header field: name length and value length.
const PER_HEADER_LEN: usize = 2 + 4;

/// The largest envelope the encoder can write for a key of `key_len` bytes and a body of at
/// most `max_body` bytes: larger bytes in Redis cannot be ours.
pub(crate) fn max_encoded_len(key_len: usize, max_body: usize) -> usize {
    FIXED_LEN
        .saturating_add(key_len)
        .saturating_add(MAX_HEADERS * PER_HEADER_LEN + MAX_HEADER_BYTES)
        .saturating_add(max_body)
}

/// Whether headers fit in an envelope: at most [`MAX_HEADERS`] fields and
/// [`MAX_HEADER_BYTES`] of names and values.
pub(crate) fn headers_fit(headers: &HeaderMap) -> bool {
    headers.len() <= MAX_HEADERS
        && headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum::<usize>()
            <= MAX_HEADER_BYTES
}

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
    #[error("envelope headers exceed the bounds")]
    TooManyHeaders,
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
        // The HTTP rules store only headers that fit (`headers_fit`); the cap is a backstop
        // so that whatever the caller did, the decoder accepts what is written.
        let mut n = 0;
        let mut size = 0;
        for (name, value) in self.headers.iter().take(MAX_HEADERS) {
            size += name.as_str().len() + value.len();
            if size > MAX_HEADER_BYTES {
                break;
            }
            n += 1;
        }
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
        if key_len != expected_key.len() {
            return Err(DecodeError::OtherKey);
        }
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
        // The count is untrusted: bounded before anything is built (HeaderMap panics on
        // tens of thousands of names), and never the size of an allocation.
        if n > MAX_HEADERS {
            return Err(DecodeError::TooManyHeaders);
        }
        let mut headers = HeaderMap::with_capacity(n.min(64));
        let mut budget = MAX_HEADER_BYTES;
        for _ in 0..n {
            let len = r.u16()? as usize;
            budget = budget.checked_sub(len).ok_or(DecodeError::TooManyHeaders)?;
            let name = HeaderName::from_bytes(r.take(len)?).map_err(|_| DecodeError::Malformed)?;
            let len = r.u32()? as usize;
            budget = budget.checked_sub(len).ok_or(DecodeError::TooManyHeaders)?;
            let value =
                HeaderValue::from_bytes(r.take(len)?).map_err(|_| DecodeError::Malformed)?;
            headers
                .try_append(name, value)
                .map_err(|_| DecodeError::TooManyHeaders)?;
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

    /// The bytes of `sample()` up to its header count, then `n` as the count.
    fn head_with_count(e: &Entry, n: u16) -> Vec<u8> {
        let mut bytes = e.encode();
        let at = FIXED_LEN - 4 - 2 + e.key.len();
        bytes.truncate(at);
        bytes.extend(n.to_be_bytes());
        bytes
    }

    #[test]
    fn thirty_thousand_headers_are_an_error_not_a_panic() {
        let e = sample();
        let mut bytes = head_with_count(&e, 30_000);
        for i in 0..30_000u32 {
            let name = format!("x-h{i}");
            bytes.extend((name.len() as u16).to_be_bytes());
            bytes.extend(name.as_bytes());
            bytes.extend(1u32.to_be_bytes());
            bytes.push(b'v');
        }
        bytes.extend(0u32.to_be_bytes());
        assert_eq!(
            Entry::decode(Bytes::from(bytes), &e.key).unwrap_err(),
            DecodeError::TooManyHeaders
        );
        // One past the bound is refused as well, before a single header is read.
        let bytes = head_with_count(&e, MAX_HEADERS as u16 + 1);
        assert_eq!(
            Entry::decode(Bytes::from(bytes), &e.key).unwrap_err(),
            DecodeError::TooManyHeaders
        );
    }

    #[test]
    fn huge_length_fields_are_errors() {
        let e = sample();
        // Key length.
        let mut bytes = e.encode();
        bytes[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            Entry::decode(Bytes::from(bytes), &e.key).unwrap_err(),
            DecodeError::OtherKey
        );
        // A header name, a header value past the byte budget, a value past the end.
        let mut name = head_with_count(&e, 1);
        name.extend(u16::MAX.to_be_bytes());
        assert!(Entry::decode(Bytes::from(name), &e.key).is_err());
        for len in [MAX_HEADER_BYTES as u32, u32::MAX] {
            let mut value = head_with_count(&e, 1);
            value.extend(1u16.to_be_bytes());
            value.push(b'x');
            value.extend(len.to_be_bytes());
            value.extend(b"short");
            assert_eq!(
                Entry::decode(Bytes::from(value), &e.key).unwrap_err(),
                DecodeError::TooManyHeaders
            );
        }
        let mut value = head_with_count(&e, 1);
        value.extend(1u16.to_be_bytes());
        value.push(b'x');
        value.extend(1000u32.to_be_bytes());
        value.extend(b"short");
        assert_eq!(
            Entry::decode(Bytes::from(value), &e.key).unwrap_err(),
            DecodeError::Malformed
        );
        // The body length.
        let mut body = e.encode();
        let at = body.len() - e.body.len() - 4;
        body[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            Entry::decode(Bytes::from(body), &e.key).unwrap_err(),
            DecodeError::Malformed
        );
    }

    #[test]
    fn the_encoder_writes_only_what_the_decoder_accepts() {
        let mut e = sample();
        assert!(headers_fit(&e.headers));
        for i in 0..MAX_HEADERS {
            e.headers.append(
                HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        assert!(!headers_fit(&e.headers));
        let d = Entry::decode(Bytes::from(e.encode()), &e.key).unwrap();
        assert_eq!(d.headers.len(), MAX_HEADERS);

        let mut big = sample();
        let value = HeaderValue::from_bytes(&vec![b'v'; 40 * 1024]).unwrap();
        big.headers.insert("x-big-1", value.clone());
        big.headers.insert("x-big-2", value);
        assert!(!headers_fit(&big.headers));
        let d = Entry::decode(Bytes::from(big.encode()), &big.key).unwrap();
        assert!(d.headers.contains_key("x-big-1") && !d.headers.contains_key("x-big-2"));
    }

    #[test]
    fn the_largest_envelope_fits_the_largest_encoded_length() {
        let mut e = sample();
        e.headers.clear();
        // 256 fields of 256 bytes each: exactly the byte budget.
        let value = HeaderValue::from_bytes(&[b'v'; 250]).unwrap();
        for i in 0..MAX_HEADERS {
            e.headers.append(
                HeaderName::from_bytes(format!("x-{i:04}").as_bytes()).unwrap(),
                value.clone(),
            );
        }
        assert!(headers_fit(&e.headers));
        e.body = Bytes::from(vec![0u8; 1000]);
        let bytes = e.encode();
        assert_eq!(bytes.len(), max_encoded_len(e.key.len(), 1000));
        assert_eq!(
            Entry::decode(Bytes::from(bytes), &e.key)
                .unwrap()
                .headers
                .len(),
            MAX_HEADERS
        );
    }
}
