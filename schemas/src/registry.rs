//! The embedded Avro schemas (`avro/*.avsc`, compiled in with `include_str!`), parsed once, and
//! their CRC-64-AVRO (Rabin) fingerprints used by the single-object encoding.

use std::sync::LazyLock;

use apache_avro::Schema;
use apache_avro::rabin::Rabin;

use crate::events::{Event, SCHEMA_SOURCES};

/// Upper bound (bytes for strings, items for arrays) that apache-avro may allocate for one
/// length read from a payload. 1 MiB is Kafka's default maximum message size, so it never rejects
/// a message that the broker accepted, while a corrupt length prefix cannot make the decoder
/// reserve gigabytes (the library default is 512 MiB items).
pub(crate) const MAX_AVRO_ALLOCATION: usize = 1 << 20;

pub(crate) struct Entry {
    pub(crate) source: &'static str,
    pub(crate) schema: Schema,
    pub(crate) fingerprint: [u8; 8],
}

static REGISTRY: LazyLock<Vec<Entry>> = LazyLock::new(|| {
    // apache-avro's limit is process-wide and fixed by whichever happens first: this call or the
    // first decode anywhere in the process. Every decode of this crate goes through here first.
    apache_avro::max_allocation_bytes(MAX_AVRO_ALLOCATION);
    SCHEMA_SOURCES
        .iter()
        .zip(Event::EVENT_TYPES)
        .map(|(source, event_type)| {
            let schema = Schema::parse_str(source)
                .unwrap_or_else(|e| panic!("embedded schema {event_type}.avsc is invalid: {e}"));
            let fp = schema.fingerprint::<Rabin>().bytes;
            let fingerprint: [u8; 8] = fp
                .as_slice()
                .try_into()
                .expect("a Rabin fingerprint is 8 bytes");
            Entry {
                source,
                schema,
                fingerprint,
            }
        })
        .collect()
});

pub(crate) fn entry(index: usize) -> &'static Entry {
    &REGISTRY[index]
}

pub(crate) fn index_of(event_type: &str) -> Option<usize> {
    Event::EVENT_TYPES.iter().position(|t| *t == event_type)
}

pub(crate) fn index_of_fingerprint(fingerprint: &[u8]) -> Option<usize> {
    REGISTRY.iter().position(|e| e.fingerprint == fingerprint)
}

/// The Avro schema (JSON text, as in `avro/<event_type>.avsc`) of an event type.
pub fn schema_json(event_type: &str) -> Option<&'static str> {
    index_of(event_type).map(|i| entry(i).source)
}

/// The parsed Avro schema of an event type.
pub fn schema(event_type: &str) -> Option<&'static Schema> {
    index_of(event_type).map(|i| &entry(i).schema)
}

/// The CRC-64-AVRO (Rabin) fingerprint of the event type's schema canonical form, as the 8
/// little-endian bytes written after the `C3 01` marker of the single-object encoding.
pub fn fingerprint(event_type: &str) -> Option<[u8; 8]> {
    index_of(event_type).map(|i| entry(i).fingerprint)
}

/// The event type whose schema has this fingerprint (8 little-endian bytes), if any.
pub fn event_type_for_fingerprint(fingerprint: [u8; 8]) -> Option<&'static str> {
    index_of_fingerprint(&fingerprint).map(|i| Event::EVENT_TYPES[i])
}
