//! A stored HTTP answer and its codec: the payload of the cache's envelope.
//!
//! Layout (big-endian): `status:u16 n_headers:u16 (name_len:u16 name value_len:u32 value)*
//! body_len:u32 body [ext]`, where the optional `ext` (written by the standards mode) is
//! `"R" flags:u8 initial_age:u32 stale_ok_ms:u64`: what RFC 9111 needs beyond the envelope's
//! times (the corrected initial age, how long past freshness the copy may be served
//! without revalidation, whether it is a vary index). A payload without it decodes as a
//! 0.1 answer. Decoding never panics: anything short, or past the bounds
//! ([`MAX_HEADERS`], [`MAX_HEADER_BYTES`]), is an error (a miss that the next fill
//! overwrites); every length field is checked against the bytes left before anything is
//! built from it. The HTTP rules refuse to store an answer past those bounds, so the
//! encoder never writes what the decoder refuses.

use bytes::{BufMut, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::cache::entry::Reader;
use crate::cache::weight::heap;
use crate::cache::{Codec, CodecError};

/// The most header fields a stored answer holds.
pub(crate) const MAX_HEADERS: usize = 256;
/// The most bytes of header names and values, together, a stored answer holds.
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The framing: status, header count, body length, and per header the two lengths.
const FIXED_LEN: usize = 2 + 2 + 4;
const PER_HEADER_LEN: usize = 2 + 4;
/// One slot of a `HeaderMap`'s entries: the hash (padded), the name, the value and the
/// links to extra values.
const HEADER_SLOT: usize = std::mem::size_of::<usize>()
    + std::mem::size_of::<HeaderName>()
    + std::mem::size_of::<HeaderValue>()
    + std::mem::size_of::<Option<[usize; 2]>>();
/// One extra value of a repeated header: the value and its two links.
const EXTRA_SLOT: usize = std::mem::size_of::<HeaderValue>() + 4 * std::mem::size_of::<usize>();
/// What sharing a `Bytes` first costs: its shared header, allocated on the first clone (an
/// answer sent is a clone of the stored one).
const SHARED: usize = 3 * std::mem::size_of::<usize>();

/// The largest payload of an answer whose body is at most `max_body` bytes.
pub(crate) fn max_payload(max_body: usize) -> usize {
    FIXED_LEN
        .saturating_add(EXT_LEN)
        .saturating_add(MAX_HEADERS * PER_HEADER_LEN + MAX_HEADER_BYTES)
        .saturating_add(max_body)
}

/// Whether headers fit in a stored answer: at most [`MAX_HEADERS`] fields and
/// [`MAX_HEADER_BYTES`] of names and values.
pub(crate) fn headers_fit(headers: &HeaderMap) -> bool {
    headers.len() <= MAX_HEADERS
        && headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum::<usize>()
            <= MAX_HEADER_BYTES
}

/// One stored answer.
#[derive(Clone, Debug, Default)]
pub(crate) struct Response {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) ext: Ext,
}

/// What the standards mode stores beyond the answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ext {
    /// Written by the standards mode.
    pub(crate) rfc: bool,
    /// A vary index: no answer, but the names (in `Vary`) of the request headers whose
    /// values pick the variant.
    pub(crate) index: bool,
    /// The corrected initial age, in seconds.
    pub(crate) initial_age: u32,
    /// How long past freshness the copy may be served without revalidation, in ms.
    pub(crate) stale_ok_ms: u64,
}

const EXT_MAGIC: u8 = b'R';
const EXT_LEN: usize = 1 + 1 + 4 + 8;
const FLAG_INDEX: u8 = 1;

impl Response {
    /// Whether this is a vary index rather than an answer.
    pub(crate) fn is_index(&self) -> bool {
        self.ext.index
    }
}

/// The codec of stored answers.
pub(crate) struct HttpCodec;

impl Codec<Response> for HttpCodec {
    fn encode(value: &Response) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(FIXED_LEN + value.body.len() + 64 * value.headers.len());
        out.put_u16(value.status.as_u16());
        // The HTTP rules store only headers that fit (`headers_fit`); the cap is a backstop
        // so that whatever the caller did, the decoder accepts what is written.
        let mut n = 0;
        let mut size = 0;
        for (name, v) in value.headers.iter().take(MAX_HEADERS) {
            size += name.as_str().len() + v.len();
            if size > MAX_HEADER_BYTES {
                break;
            }
            n += 1;
        }
        out.put_u16(n as u16);
        for (name, v) in value.headers.iter().take(n) {
            out.put_u16(name.as_str().len() as u16);
            out.put_slice(name.as_str().as_bytes());
            out.put_u32(v.len() as u32);
            out.put_slice(v.as_bytes());
        }
        let body_len = u32::try_from(value.body.len())
            .map_err(|_| CodecError("body larger than 4 GiB".into()))?;
        out.put_u32(body_len);
        out.put_slice(&value.body);
        if value.ext.rfc {
            out.put_u8(EXT_MAGIC);
            out.put_u8(if value.ext.index { FLAG_INDEX } else { 0 });
            out.put_u32(value.ext.initial_age);
            out.put_u64(value.ext.stale_ok_ms);
        }
        Ok(out)
    }

    fn decode(bytes: &Bytes) -> Result<Response, CodecError> {
        decode(bytes).ok_or_else(|| CodecError("not a stored answer".into()))
    }

    fn overhead(value: &Response) -> usize {
        memory(value).saturating_sub(encoded_len(value))
    }
}

/// The length of a stored answer's payload.
fn encoded_len(value: &Response) -> usize {
    let headers: usize = value
        .headers
        .iter()
        .map(|(n, v)| PER_HEADER_LEN + n.as_str().len() + v.len())
        .sum();
    FIXED_LEN + headers + value.body.len() + if value.ext.rfc { EXT_LEN } else { 0 }
}

/// The heap a decoded answer holds: the header map's index and entries, every name and
/// value in an allocation of its own (standard names take none; they are charged as if
/// they did), and the body.
fn memory(value: &Response) -> usize {
    let headers = &value.headers;
    let usable = headers.capacity();
    let map = if usable == 0 {
        0
    } else {
        // `usable` is three quarters of the index's power-of-two length.
        let index = (usable + usable / 3).next_power_of_two();
        heap(index * 4) + heap(usable * HEADER_SLOT)
    };
    let extra = headers.len() - headers.keys_len();
    let extra = if extra == 0 {
        0
    } else {
        heap(extra.next_power_of_two() * EXTRA_SLOT)
    };
    let fields: usize = headers
        .keys()
        .map(|n| heap(n.as_str().len()) + heap(SHARED))
        .chain(headers.values().map(|v| heap(v.len()) + heap(SHARED)))
        .sum();
    let body = if value.body.is_empty() {
        0
    } else {
        heap(value.body.len()) + heap(SHARED)
    };
    map + extra + fields + body
}

fn decode(bytes: &Bytes) -> Option<Response> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let status = StatusCode::from_u16(r.u16().ok()?).ok()?;
    let n = r.u16().ok()? as usize;
    if n > MAX_HEADERS || n * PER_HEADER_LEN > r.left() {
        return None;
    }
    let mut headers = HeaderMap::with_capacity(n.min(64));
    let mut budget = MAX_HEADER_BYTES;
    for _ in 0..n {
        let len = r.u16().ok()? as usize;
        budget = budget.checked_sub(len)?;
        let name = HeaderName::from_bytes(r.take(len).ok()?).ok()?;
        let len = r.u32().ok()? as usize;
        budget = budget.checked_sub(len)?;
        let value = HeaderValue::from_bytes(r.take(len).ok()?).ok()?;
        // Never a panic inside the `http` crate, whatever the count said.
        headers.try_append(name, value).ok()?;
    }
    let body_len = r.u32().ok()? as usize;
    let start = r.pos;
    r.take(body_len).ok()?;
    let mut ext = Ext::default();
    if r.pos != bytes.len() {
        if r.left() != EXT_LEN || r.u8().ok()? != EXT_MAGIC {
            return None;
        }
        let flags = r.u8().ok()?;
        if flags & !FLAG_INDEX != 0 {
            return None;
        }
        ext = Ext {
            rfc: true,
            index: flags & FLAG_INDEX != 0,
            initial_age: r.u32().ok()?,
            stale_ok_ms: r.u64().ok()?,
        };
    }
    Some(Response {
        status,
        headers,
        // An allocation of its own: a slice would keep the whole envelope (key, tags,
        // headers) alive for as long as the entry lives, uncounted.
        body: Bytes::copy_from_slice(&bytes[start..start + body_len]),
        ext,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Response {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        Response {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"hello world"),
            ext: Ext::default(),
        }
    }

    #[test]
    fn round_trip() {
        let mut e = sample();
        for ext in [
            Ext::default(),
            Ext {
                rfc: true,
                index: true,
                initial_age: 7,
                stale_ok_ms: 1234,
            },
        ] {
            e.ext = ext;
            let bytes = Bytes::from(HttpCodec::encode(&e).unwrap());
            let d = HttpCodec::decode(&bytes).unwrap();
            assert_eq!(d.status, e.status);
            assert_eq!(d.headers, e.headers);
            assert_eq!(d.body, e.body);
            assert_eq!(d.ext, e.ext);
            assert!(bytes.len() <= max_payload(e.body.len()));
        }
    }

    /// A payload with `n` distinct header names, as hostile bytes in Redis may hold.
    fn with_headers(n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u16(200);
        out.put_u16(n.min(u16::MAX as usize) as u16);
        for i in 0..n {
            let name = format!("x-h{i}");
            out.put_u16(name.len() as u16);
            out.put_slice(name.as_bytes());
            out.put_u32(1);
            out.put_slice(b"v");
        }
        out.put_u32(0);
        out
    }

    #[test]
    fn thirty_thousand_headers_and_huge_lengths_are_errors_not_panics() {
        assert!(HttpCodec::decode(&Bytes::from(with_headers(30_000))).is_err());
        assert!(HttpCodec::decode(&Bytes::from(with_headers(MAX_HEADERS + 1))).is_err());
        assert!(HttpCodec::decode(&Bytes::from(with_headers(MAX_HEADERS))).is_ok());
        // A body length far past the bytes.
        let mut huge = with_headers(1);
        let at = huge.len() - 4;
        huge[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(HttpCodec::decode(&Bytes::from(huge)).is_err());
        // A value length far past the bytes.
        let mut huge = with_headers(1);
        huge[4 + 2 + 4..4 + 2 + 4 + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(HttpCodec::decode(&Bytes::from(huge)).is_err());
    }

    #[test]
    fn the_encoder_never_writes_what_the_decoder_refuses() {
        let mut e = sample();
        for i in 0..MAX_HEADERS + 50 {
            e.headers.append(
                HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        assert!(!headers_fit(&e.headers));
        let decoded = HttpCodec::decode(&Bytes::from(HttpCodec::encode(&e).unwrap())).unwrap();
        assert_eq!(decoded.headers.len(), MAX_HEADERS);
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_decodes_without_panic() {
        let bytes = HttpCodec::encode(&sample()).unwrap();
        for len in 0..bytes.len() {
            assert!(HttpCodec::decode(&Bytes::copy_from_slice(&bytes[..len])).is_err());
        }
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                let _ = HttpCodec::decode(&Bytes::from(b));
            }
        }
    }
}
