//! The one encoding used for everything this crate stores or sends that is not
//! application bytes: openraft's own types, as MessagePack with named fields
//! (`rmp-serde`), so adding a field later does not break old data.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Encodes a value for storage or the wire.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(value)
}

/// Decodes a stored or received value.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}
