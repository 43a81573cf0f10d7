//! Wire formats: Avro single-object encoding (the default on Kafka) and plain JSON with the schema's
//! field names (for hand-made test events, e.g. with `kcat`), plus the content-type dispatch used
//! by consumers.
//!
//! Single-object encoding: `C3 01`, then the 8-byte little-endian CRC-64-AVRO (Rabin) fingerprint
//! of the writer schema's parsing canonical form, then the Avro binary datum.

use apache_avro::types::Value;
use apache_avro::{from_avro_datum, to_avro_datum};

use crate::error::{DecodeError, bounded};
use crate::events::Event;
use crate::registry::{Writer, entry, index_of, writer_of};

/// Content type of Avro single-object encoded payloads.
pub const AVRO_CONTENT_TYPE: &str = "application/avro";
/// Content type of JSON payloads (schema field names; needs an `event-type` header).
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// The two marker bytes that start every single-object encoded payload.
pub const SINGLE_OBJECT_MARKER: [u8; 2] = [0xC3, 0x01];
/// Marker plus fingerprint.
pub(crate) const HEADER_LEN: usize = 10;

/// Encodes an event with Avro single-object encoding.
///
/// Infallible: every value of the Rust types is valid for its schema (the test suite encodes every
/// variant), so a failure here would be a mismatch between `src/events.rs` and `avro/*.avsc`, a
/// programming bug, and panics.
pub fn encode(event: &Event) -> Vec<u8> {
    let entry = entry(event.index());
    let datum = event
        .to_avro_value()
        .and_then(|value| value.resolve(&entry.schema))
        .and_then(|value| to_avro_datum(&entry.schema, value))
        .unwrap_or_else(|e| {
            panic!(
                "bug: {} does not match its Avro schema: {e}",
                event.event_type()
            )
        });
    let mut bytes = Vec::with_capacity(HEADER_LEN + datum.len());
    bytes.extend_from_slice(&SINGLE_OBJECT_MARKER);
    bytes.extend_from_slice(&entry.fingerprint);
    bytes.extend_from_slice(&datum);
    bytes
}

/// Encodes an event as JSON with the schema's field names (ids as UUID strings, times as integer
/// milliseconds, enums as their symbols): the format [`decode_json`] reads. The event type is not
/// part of the JSON; it travels in the `event-type` header ([`Event::event_type`]).
pub fn encode_json(event: &Event) -> Vec<u8> {
    event
        .to_json()
        .expect("bug: serializing plain structs to JSON cannot fail")
}

/// Decodes an Avro single-object encoded payload, choosing the schema by its fingerprint.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let (writer, body) = split_header(bytes)?;
    decode_body(&writer, body)
}

/// Decodes a JSON payload of the given event type. Rejects unknown event types, malformed JSON,
/// unknown, missing or mistyped fields, and values that do not validate against the Avro schema.
pub fn decode_json(event_type: &str, bytes: &[u8]) -> Result<Event, DecodeError> {
    let index =
        index_of(event_type).ok_or_else(|| DecodeError::UnknownEventType(bounded(event_type)))?;
    let event_type = Event::EVENT_TYPES[index];
    let invalid = |e: serde_json::Error| DecodeError::InvalidJson {
        event_type,
        message: bounded(e.to_string()),
    };
    let event = Event::from_json(index, bytes).map_err(invalid)?;
    // The typed parse succeeded, so the bytes are well-formed JSON; now check the same JSON
    // against the Avro schema itself (e.g. UUID syntax, enum symbols, number ranges).
    let raw: serde_json::Value = serde_json::from_slice(bytes).map_err(invalid)?;
    Value::from(raw)
        .resolve(&entry(index).schema)
        .map_err(|e| DecodeError::SchemaMismatch {
            event_type,
            message: bounded(e.to_string()),
        })?;
    within_bounds(event)
}

/// Decodes a consumed record from its `content-type` and `event-type` headers.
///
/// * `application/json` (parameters such as `; charset=utf-8` and letter case ignored): JSON via
///   [`decode_json`]; the event type is required ([`DecodeError::MissingEventType`]).
/// * anything else, or no content type: Avro single-object encoding via [`decode`]; an event type,
///   when given, must name the schema found by the fingerprint
///   ([`DecodeError::EventTypeMismatch`]).
pub fn decode_with_content_type(
    content_type: Option<&str>,
    event_type: Option<&str>,
    bytes: &[u8],
) -> Result<Event, DecodeError> {
    if content_type.is_some_and(is_json_content_type) {
        let event_type = event_type.ok_or(DecodeError::MissingEventType)?;
        return decode_json(event_type, bytes);
    }
    let (writer, body) = split_header(bytes)?;
    let actual = Event::EVENT_TYPES[writer.index];
    if let Some(header) = event_type
        && header != actual
    {
        return Err(DecodeError::EventTypeMismatch {
            header: bounded(header),
            actual,
        });
    }
    decode_body(&writer, body)
}

fn is_json_content_type(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .eq_ignore_ascii_case(JSON_CONTENT_TYPE)
}

/// Checks marker and fingerprint; returns the schema the record was written with and the Avro
/// body.
fn split_header(bytes: &[u8]) -> Result<(Writer, &[u8]), DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::TooShort { len: bytes.len() });
    }
    let (header, body) = bytes.split_at(HEADER_LEN);
    let (marker, fingerprint) = header.split_at(2);
    if marker != SINGLE_OBJECT_MARKER {
        return Err(DecodeError::BadMarker {
            found: [marker[0], marker[1]],
        });
    }
    let writer = writer_of(fingerprint).ok_or_else(|| {
        let mut le = [0u8; 8];
        le.copy_from_slice(fingerprint);
        DecodeError::UnknownFingerprint {
            fingerprint: u64::from_le_bytes(le),
        }
    })?;
    Ok((writer, body))
}

fn decode_body(writer: &Writer, body: &[u8]) -> Result<Event, DecodeError> {
    let index = writer.index;
    let event_type = Event::EVENT_TYPES[index];
    let mut rest = body;
    // A record of an older schema is resolved into the current one.
    let reader = writer.older.then(|| &entry(index).schema);
    let value = from_avro_datum(writer.schema, &mut rest, reader).map_err(|e| {
        DecodeError::CorruptBody {
            event_type,
            message: bounded(e.to_string()),
        }
    })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            event_type,
            count: rest.len(),
        });
    }
    let event = Event::from_avro_value(index, &value).map_err(|e| DecodeError::Mapping {
        event_type,
        message: bounded(e.to_string()),
    })?;
    within_bounds(event)
}

/// Every decoded event is also checked against the contract's bounds ([`crate::limits`]).
fn within_bounds(event: Event) -> Result<Event, DecodeError> {
    event
        .check_bounds()
        .map_err(|error| DecodeError::OutOfBounds {
            event_type: event.event_type(),
            error,
        })?;
    Ok(event)
}
