//! How a value becomes the bytes the tier stores, and back.
//!
//! A [`Codec`] is a type with two functions; the cache never looks inside the bytes. The
//! default, [`DefaultCodec`], is [`Postcard`] (compact serde, feature `serde`, on by
//! default) or, without serde, [`Raw`] (for `Bytes`, `Vec<u8>` and `String`).

use bytes::Bytes;

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

/// Turns values of type `V` into bytes and back. Decoding takes bytes from the shared
/// tier, which are untrusted: it must fail, never panic, on bytes it did not write.
pub trait Codec<V>: Send + Sync + 'static {
    /// The bytes of `value`.
    fn encode(value: &V) -> Result<Vec<u8>, CodecError>;
    /// The value of `bytes`.
    fn decode(bytes: &Bytes) -> Result<V, CodecError>;

    /// Memory a decoded value takes beyond its encoded length (allocations, tables), for
    /// the in-process bound. Default 0.
    fn overhead(value: &V) -> usize {
        let _ = value;
        0
    }
}

/// Bytes as they are: for `Bytes`, `Vec<u8>` and `String` (checked UTF-8).
#[derive(Clone, Copy, Debug, Default)]
pub struct Raw;

impl Codec<Bytes> for Raw {
    fn encode(value: &Bytes) -> Result<Vec<u8>, CodecError> {
        Ok(value.to_vec())
    }
    fn decode(bytes: &Bytes) -> Result<Bytes, CodecError> {
        Ok(bytes.clone())
    }
}

impl Codec<Vec<u8>> for Raw {
    fn encode(value: &Vec<u8>) -> Result<Vec<u8>, CodecError> {
        Ok(value.clone())
    }
    fn decode(bytes: &Bytes) -> Result<Vec<u8>, CodecError> {
        Ok(bytes.to_vec())
    }
}

impl Codec<String> for Raw {
    fn encode(value: &String) -> Result<Vec<u8>, CodecError> {
        Ok(value.as_bytes().to_vec())
    }
    fn decode(bytes: &Bytes) -> Result<String, CodecError> {
        String::from_utf8(bytes.to_vec()).map_err(|e| CodecError(e.to_string()))
    }
}

/// Any `Serialize + DeserializeOwned` value, in [postcard](https://docs.rs/postcard)'s
/// compact format (feature `serde`).
///
/// Measured against JSON for a typical API profile (`cargo bench --bench layer --features
/// __bench -- codec`; figures in the README's "Performance" section).
#[cfg(feature = "serde")]
#[derive(Clone, Copy, Debug, Default)]
pub struct Postcard;

#[cfg(feature = "serde")]
impl<V> Codec<V> for Postcard
where
    V: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    fn encode(value: &V) -> Result<Vec<u8>, CodecError> {
        postcard::to_allocvec(value).map_err(|e| CodecError(e.to_string()))
    }
    fn decode(bytes: &Bytes) -> Result<V, CodecError> {
        postcard::from_bytes(bytes).map_err(|e| CodecError(e.to_string()))
    }
}

/// The codec of [`Cache<V>`](crate::Cache) when none is named: [`Postcard`] with the
/// `serde` feature, [`Raw`] without.
#[cfg(feature = "serde")]
pub type DefaultCodec = Postcard;

/// The codec of [`Cache<V>`](crate::Cache) when none is named: [`Postcard`] with the
/// `serde` feature, [`Raw`] without.
#[cfg(not(feature = "serde"))]
pub type DefaultCodec = Raw;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_round_trips_and_refuses_bad_utf8() {
        let s = "héllo".to_owned();
        assert_eq!(
            <Raw as Codec<String>>::decode(&Bytes::from(
                <Raw as Codec<String>>::encode(&s).unwrap()
            ))
            .unwrap(),
            s
        );
        assert!(<Raw as Codec<String>>::decode(&Bytes::from_static(b"\xff\xfe")).is_err());
    }

    #[cfg(feature = "serde")]
    #[test]
    fn postcard_round_trips_and_refuses_garbage() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Profile {
            id: u64,
            name: String,
            tags: Vec<String>,
        }
        let p = Profile {
            id: 42,
            name: "ada".into(),
            tags: vec!["x".into()],
        };
        let bytes = Bytes::from(<Postcard as Codec<Profile>>::encode(&p).unwrap());
        assert_eq!(<Postcard as Codec<Profile>>::decode(&bytes).unwrap(), p);
        assert!(<Postcard as Codec<Profile>>::decode(&Bytes::from_static(b"\xff")).is_err());
    }
}
