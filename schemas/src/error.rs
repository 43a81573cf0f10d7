//! [`DecodeError`]: every way a payload can fail to become an [`Event`](crate::Event). Messages are
//! meant for humans (dead-letter reasons, logs).

use crate::codec::HEADER_LEN;

/// Why a payload could not be decoded. Decoding never panics; it returns one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the single-object header (marker + fingerprint).
    #[error(
        "payload of {len} bytes is too short for Avro single-object encoding \
         (needs at least {HEADER_LEN} bytes: marker C3 01 and an 8-byte schema fingerprint)"
    )]
    TooShort { len: usize },

    /// The first two bytes are not `C3 01`.
    #[error(
        "payload does not start with the Avro single-object marker C3 01 (found {:02X} {:02X})",
        found[0],
        found[1]
    )]
    BadMarker { found: [u8; 2] },

    /// No embedded schema has this fingerprint (shown as the little-endian `u64` of the 8
    /// header bytes, i.e. the CRC-64-AVRO value).
    #[error("unknown schema fingerprint 0x{fingerprint:016X}")]
    UnknownFingerprint { fingerprint: u64 },

    /// The Avro binary body is truncated or corrupt for the schema named by the fingerprint.
    #[error("corrupt Avro body for {event_type}: {message}")]
    CorruptBody {
        event_type: &'static str,
        message: String,
    },

    /// The body decoded but bytes were left over.
    #[error("{count} trailing bytes after the Avro body of {event_type}")]
    TrailingBytes {
        event_type: &'static str,
        count: usize,
    },

    /// The Avro value decoded but does not map to the Rust struct.
    #[error("Avro {event_type} value does not map to the Rust type: {message}")]
    Mapping {
        event_type: &'static str,
        message: String,
    },

    /// The event type (header) names no known event.
    #[error("unknown event type {0:?}")]
    UnknownEventType(String),

    /// A JSON payload came without an `event-type` header.
    #[error("missing event-type header, required for content type application/json")]
    MissingEventType,

    /// Malformed JSON, or JSON that does not map to the struct (unknown, missing, duplicate or
    /// mistyped field, unknown enum symbol, ...).
    #[error("invalid JSON for {event_type}: {message}")]
    InvalidJson {
        event_type: &'static str,
        message: String,
    },

    /// The JSON value does not validate against the event type's Avro schema.
    #[error("JSON {event_type} does not match its Avro schema: {message}")]
    SchemaMismatch {
        event_type: &'static str,
        message: String,
    },

    /// The event decoded but breaks a bound of the contract ([`crate::limits`]): a negative
    /// quantity, too many lines, a price above the largest, a reservation whose total is not the
    /// sum of its lines, ...
    #[error("{event_type} is outside the contract: {error}")]
    OutOfBounds {
        event_type: &'static str,
        error: crate::limits::BoundsError,
    },

    /// An `event-type` header disagrees with the schema the Avro payload was written with.
    #[error("event-type header {header:?} does not match the payload's schema {actual}")]
    EventTypeMismatch {
        header: String,
        actual: &'static str,
    },
}

/// Keeps messages that echo input (headers, library errors quoting values) to a sane length.
pub(crate) fn bounded(text: impl Into<String>) -> String {
    crate::limits::truncate_chars(text, 300)
}
