//! The stored envelope: one versioned byte layout for every value the cache shares.
//!
//! Layout (all integers big-endian):
//! `"TSE" version:u8 kind:u8 key_len:u32 key stored_at:u64 fresh_until:u64
//! revalidate_until:u64 stale_until:u64 fill_ms:u32 n_tags:u16 (tag_len:u16 tag)*
//! payload_len:u32 payload`. Times are milliseconds since the Unix epoch. The payload is
//! the value in its codec's bytes (for the HTTP layer: status, headers and body).
//!
//! `stored_at` sits right after the key so that a Lua script can compare two envelopes'
//! ages with two `GETRANGE`s (see the store script in `tier/scripts.rs`).
//!
//! Decoding never panics: anything short, foreign, of another version, for another key or
//! past the bounds is an error, which the caller treats as a miss (and the next fill
//! overwrites). Every length field is checked against the bytes left before anything is
//! built from it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes};

const MAGIC: &[u8; 3] = b"TSE";
const VERSION: u8 = 2;

/// The most tags one entry carries.
pub(crate) const MAX_TAGS: usize = 64;
/// The longest tag, in bytes.
pub(crate) const MAX_TAG_LEN: usize = 256;
/// The fixed fields: magic, version, kind, key length, four times, fill time, tag count,
/// payload length.
const FIXED_LEN: usize = 3 + 1 + 1 + 4 + 4 * 8 + 4 + 2 + 4;

/// The largest envelope of ours for a key of `key_len` bytes and a payload of at most
/// `max_payload`: larger bytes in the tier are not ours, and are read no further than one
/// byte past it.
pub(crate) fn max_encoded_len(key_len: usize, max_payload: usize) -> usize {
    FIXED_LEN
        .saturating_add(key_len)
        .saturating_add(MAX_TAGS * (2 + MAX_TAG_LEN))
        .saturating_add(max_payload)
}

/// What an envelope holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A value.
    Value = 0,
    /// Hit-for-pass: the last answer for this key could not be stored; skip the lock.
    Pass = 1,
}

/// Everything about an entry but its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) kind: Kind,
    pub(crate) stored_at: u64,
    /// Until then it is fresh.
    pub(crate) fresh_until: u64,
    /// Until then, once stale, it is served at once while one refresh runs
    /// (stale-while-revalidate).
    pub(crate) revalidate_until: u64,
    /// Until then, once stale, it is served when the fill fails (stale-if-error).
    pub(crate) stale_until: u64,
    /// How long the fill took: the δ of early refresh.
    pub(crate) fill_ms: u32,
    pub(crate) tags: Vec<String>,
}

/// Why bytes could not be decoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    /// Not bytes of ours.
    #[error("not an envelope")]
    Foreign,
    /// Written by another version.
    #[error("envelope version {0} is not supported")]
    Version(u8),
    /// Cut short, or a length that does not add up.
    #[error("envelope is truncated or malformed")]
    Malformed,
    /// The entry of another key (a hash collision, or bytes copied by hand).
    #[error("envelope belongs to another key")]
    OtherKey,
    /// Past a bound: too many fields or too many bytes in them.
    #[error("envelope exceeds a bound")]
    TooLarge,
    /// The payload is not a value of the cache's type.
    #[error("payload does not decode: {0}")]
    Payload(String),
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long an entry lives, as its fill decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Windows {
    pub(crate) ttl: Duration,
    pub(crate) grace: Duration,
    pub(crate) stale_if_error: Duration,
}

impl Meta {
    /// A value's meta, stored at `now`.
    pub(crate) fn value(now: u64, w: Windows, fill_ms: u32, tags: Vec<String>) -> Meta {
        let ms = |d: Duration| d.as_millis().min(u64::MAX as u128 / 4) as u64;
        let fresh_until = now.saturating_add(ms(w.ttl));
        Meta {
            kind: Kind::Value,
            stored_at: now,
            fresh_until,
            revalidate_until: fresh_until.saturating_add(ms(w.grace)),
            stale_until: fresh_until.saturating_add(ms(w.grace.max(w.stale_if_error))),
            fill_ms,
            tags,
        }
    }

    /// A hit-for-pass marker's meta.
    pub(crate) fn pass(now: u64, ttl: Duration, fill_ms: u32) -> Meta {
        let until = now.saturating_add(ttl.as_millis().min(u64::MAX as u128 / 4) as u64);
        Meta {
            kind: Kind::Pass,
            stored_at: now,
            fresh_until: until,
            revalidate_until: until,
            stale_until: until,
            fill_ms,
            tags: Vec::new(),
        }
    }

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

    /// Age in whole seconds.
    pub(crate) fn age_secs(&self, now: u64) -> u64 {
        now.saturating_sub(self.stored_at) / 1000
    }

    fn tags_len(&self) -> usize {
        self.tags.iter().map(|t| t.len() + 2).sum()
    }
}

/// Encodes an entry of `key`. Tags past the bounds are left out (the decoder would refuse
/// them).
pub(crate) fn encode(key: &str, meta: &Meta, payload: &[u8]) -> Vec<u8> {
    let tags: Vec<&String> = meta
        .tags
        .iter()
        .filter(|t| t.len() <= MAX_TAG_LEN)
        .take(MAX_TAGS)
        .collect();
    let mut out = Vec::with_capacity(FIXED_LEN + key.len() + meta.tags_len() + payload.len());
    out.put_slice(MAGIC);
    out.put_u8(VERSION);
    out.put_u8(meta.kind as u8);
    out.put_u32(key.len() as u32);
    out.put_slice(key.as_bytes());
    out.put_u64(meta.stored_at);
    out.put_u64(meta.fresh_until);
    out.put_u64(meta.revalidate_until);
    out.put_u64(meta.stale_until);
    out.put_u32(meta.fill_ms);
    out.put_u16(tags.len() as u16);
    for tag in tags {
        out.put_u16(tag.len() as u16);
        out.put_slice(tag.as_bytes());
    }
    out.put_u32(payload.len().min(u32::MAX as usize) as u32);
    out.put_slice(payload);
    out
}

/// Decodes `bytes`, which must be an entry of `expected_key`: its meta and its payload (a
/// slice of `bytes`, no copy).
pub(crate) fn decode(bytes: &Bytes, expected_key: &str) -> Result<(Meta, Bytes), DecodeError> {
    let mut r = Reader { buf: bytes, pos: 0 };
    if r.take(3).map_err(|_| DecodeError::Foreign)? != MAGIC {
        return Err(DecodeError::Foreign);
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let kind = match r.u8()? {
        0 => Kind::Value,
        1 => Kind::Pass,
        _ => return Err(DecodeError::Malformed),
    };
    let key_len = r.u32()? as usize;
    if key_len != expected_key.len() {
        return Err(DecodeError::OtherKey);
    }
    if r.take(key_len)? != expected_key.as_bytes() {
        return Err(DecodeError::OtherKey);
    }
    let stored_at = r.u64()?;
    let fresh_until = r.u64()?;
    let revalidate_until = r.u64()?;
    let stale_until = r.u64()?;
    let fill_ms = r.u32()?;
    let n = r.u16()? as usize;
    if n > MAX_TAGS {
        return Err(DecodeError::TooLarge);
    }
    let mut tags = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.u16()? as usize;
        if len > MAX_TAG_LEN {
            return Err(DecodeError::TooLarge);
        }
        let tag = std::str::from_utf8(r.take(len)?).map_err(|_| DecodeError::Malformed)?;
        tags.push(tag.to_owned());
    }
    let len = r.u32()? as usize;
    let start = r.pos;
    r.take(len)?;
    if r.pos != bytes.len() {
        return Err(DecodeError::Malformed);
    }
    let meta = Meta {
        kind,
        stored_at,
        fresh_until,
        revalidate_until,
        stale_until,
        fill_ms,
        tags,
    };
    Ok((meta, bytes.slice(start..start + len)))
}

/// A bounds-checked reader over untrusted bytes.
pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Malformed)?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Malformed)?;
        self.pos = end;
        Ok(s)
    }

    /// The bytes not read yet.
    pub(crate) fn left(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Meta {
        Meta {
            kind: Kind::Value,
            stored_at: 1,
            fresh_until: 2,
            revalidate_until: 3,
            stale_until: 4,
            fill_ms: 5,
            tags: vec!["product:7".into(), "catalog".into()],
        }
    }

    const KEY: &str = "GET http://example.com/a?b=c";

    #[test]
    fn round_trip() {
        let bytes = Bytes::from(encode(KEY, &sample(), b"payload"));
        let (meta, payload) = decode(&bytes, KEY).unwrap();
        assert_eq!(meta, sample());
        assert_eq!(&payload[..], b"payload");
        assert!(bytes.len() <= max_encoded_len(KEY.len(), 7));
    }

    #[test]
    fn stored_at_follows_the_key() {
        // The store script reads it there.
        let bytes = encode(KEY, &sample(), b"");
        let at = 9 + KEY.len();
        assert_eq!(&bytes[at..at + 8], &1u64.to_be_bytes());
    }

    #[test]
    fn other_key_foreign_version_and_bounds_are_errors() {
        let bytes = Bytes::from(encode(KEY, &sample(), b"x"));
        assert_eq!(
            decode(&bytes, "GET http://other/").unwrap_err(),
            DecodeError::OtherKey
        );
        assert_eq!(
            decode(&Bytes::from_static(b"{\"json\":1}"), KEY).unwrap_err(),
            DecodeError::Foreign
        );
        let mut v9 = bytes.to_vec();
        v9[3] = 9;
        assert_eq!(
            decode(&Bytes::from(v9), KEY).unwrap_err(),
            DecodeError::Version(9)
        );
        let mut many = sample();
        many.tags = (0..MAX_TAGS + 10).map(|i| format!("t{i}")).collect();
        many.tags.push("x".repeat(MAX_TAG_LEN + 1));
        let capped = decode(&Bytes::from(encode(KEY, &many, b"")), KEY)
            .unwrap()
            .0;
        assert_eq!(
            capped.tags.len(),
            MAX_TAGS,
            "the encoder keeps within bounds"
        );
        // A hostile tag count is refused before anything is allocated for it.
        let mut hostile = encode(
            KEY,
            &Meta {
                tags: vec![],
                ..sample()
            },
            b"",
        );
        let at = 9 + KEY.len() + 36;
        hostile[at..at + 2].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(
            decode(&Bytes::from(hostile), KEY).unwrap_err(),
            DecodeError::TooLarge
        );
    }

    #[test]
    fn windows_and_early_refresh() {
        let mut m = sample();
        m.fresh_until = 1000;
        m.revalidate_until = 2000;
        m.stale_until = 3000;
        m.fill_ms = 100;
        assert!(m.is_fresh_at(999) && !m.is_fresh_at(1000));
        assert!(
            m.is_revalidatable_at(1000)
                && !m.is_revalidatable_at(2000)
                && !m.is_revalidatable_at(500)
        );
        assert!(m.is_usable_at(2999) && !m.is_usable_at(3000));
        assert!(!m.refresh_early(999, 1.0, 1.0));
        assert!(m.refresh_early(900, 1.0, 0.1));
        assert!(!m.refresh_early(0, 1.0, 0.1));
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_decodes_without_panic() {
        let bytes = encode(KEY, &sample(), b"hello world");
        for len in 0..bytes.len() {
            assert!(decode(&Bytes::copy_from_slice(&bytes[..len]), KEY).is_err());
        }
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                let _ = decode(&Bytes::from(b), KEY);
            }
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&Bytes::from(longer), KEY).is_err());
    }
}
