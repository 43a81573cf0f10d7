//! The embedded Avro schemas (`avro/*.avsc`, compiled in with `include_str!`), parsed once, and
//! their CRC-64-AVRO (Rabin) fingerprints used by the single-object encoding.
//!
//! Schemas evolve: a record written with an older schema of an event type stays on its topic for
//! the topic's retention, so it must still decode. The older schemas are kept in
//! `avro/history/<EventType>.<n>.avsc` and listed in [`HISTORY`]; a record whose fingerprint names
//! one is read with Avro schema resolution into the event type's current schema (a new enum
//! symbol, a new field with a default). Encoding always uses the current schema.

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

/// Older schemas that records on the topics may have been written with: (event type, schema).
pub(crate) const HISTORY: &[(&str, &str)] = &[
    // Before the payment step: CUSTOMER_REQUEST and DEADLINE_EXCEEDED only.
    (
        "OrderCancelled",
        include_str!("../avro/history/OrderCancelled.1.avsc"),
    ),
];

fn parsed(source: &'static str, what: &str) -> Entry {
    let schema = Schema::parse_str(source)
        .unwrap_or_else(|e| panic!("embedded schema {what} is invalid: {e}"));
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
}

static REGISTRY: LazyLock<Vec<Entry>> = LazyLock::new(|| {
    // apache-avro's limit is process-wide and fixed by whichever happens first: this call or the
    // first decode anywhere in the process. Every decode of this crate goes through here first.
    apache_avro::max_allocation_bytes(MAX_AVRO_ALLOCATION);
    SCHEMA_SOURCES
        .iter()
        .zip(Event::EVENT_TYPES)
        .map(|(source, event_type)| parsed(source, &format!("{event_type}.avsc")))
        .collect()
});

/// The older schemas, each with the index of its event type.
static OLDER: LazyLock<Vec<(usize, Entry)>> = LazyLock::new(|| {
    HISTORY
        .iter()
        .enumerate()
        .map(|(n, (event_type, source))| {
            let index = index_of(event_type)
                .unwrap_or_else(|| panic!("avro/history names an unknown event type {event_type}"));
            (
                index,
                parsed(source, &format!("history entry {n} of {event_type}")),
            )
        })
        .collect()
});

/// The schema a record was written with, found by its fingerprint.
pub(crate) struct Writer {
    pub(crate) index: usize,
    pub(crate) schema: &'static Schema,
    /// Whether it is an older schema than the event type's current one (read with resolution).
    pub(crate) older: bool,
}

pub(crate) fn entry(index: usize) -> &'static Entry {
    &REGISTRY[index]
}

pub(crate) fn index_of(event_type: &str) -> Option<usize> {
    Event::EVENT_TYPES.iter().position(|t| *t == event_type)
}

pub(crate) fn index_of_fingerprint(fingerprint: &[u8]) -> Option<usize> {
    writer_of(fingerprint).map(|w| w.index)
}

pub(crate) fn writer_of(fingerprint: &[u8]) -> Option<Writer> {
    if let Some(index) = REGISTRY.iter().position(|e| e.fingerprint == fingerprint) {
        return Some(Writer {
            index,
            schema: &REGISTRY[index].schema,
            older: false,
        });
    }
    OLDER
        .iter()
        .find(|(_, e)| e.fingerprint == fingerprint)
        .map(|(index, e)| Writer {
            index: *index,
            schema: &e.schema,
            older: true,
        })
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
