//! Behaviour of the codecs: round trips, the wire header, the examples, and rejection of bad input.

use apache_avro::Schema;
use apache_avro::rabin::Rabin;
use schemas::{
    BoundsError, CancelReason, DecodeError, Event, INVENTORY_TOPIC, ORDERS_TOPIC,
    OrderAwaitingPayment, OrderCancelled, OrderConfirmed, OrderItem, OrderPlaced,
    OrderRefundRequested, OrderRejected, PAYMENTS_TOPIC, PaymentConfirmed, PaymentDeclined,
    PaymentRefunded, ReservedLine, Shortage, StockReleased, StockReservationRejected,
    StockReserved, Uuid, decode, decode_json, decode_with_content_type, encode, encode_json,
};

const T0: i64 = 1_732_252_800_000;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}

/// One sample per event type, in the order of `Event::EVENT_TYPES`.
fn samples() -> Vec<Event> {
    vec![
        OrderPlaced {
            order_id: id(1),
            customer_id: id(2),
            items: vec![
                OrderItem {
                    sku: "SKU-1".into(),
                    quantity: 2,
                },
                OrderItem {
                    sku: "a.b_C-9".into(),
                    quantity: schemas::limits::MAX_QUANTITY,
                },
            ],
            placed_at: T0,
        }
        .into(),
        OrderAwaitingPayment {
            order_id: id(11),
            customer_id: id(2),
            amount_cents: 12_345,
            pay_by: T0 + 30_000,
            at: T0,
        }
        .into(),
        OrderConfirmed {
            order_id: id(3),
            total_cents: 12_345,
            confirmed_at: T0 + 1,
        }
        .into(),
        OrderRejected {
            order_id: id(4),
            reason: "no stock".into(),
            rejected_at: 0,
        }
        .into(),
        OrderRefundRequested {
            order_id: id(12),
            amount_cents: 0,
            reason: CancelReason::PaymentTimeout,
            requested_at: T0,
        }
        .into(),
        OrderCancelled {
            order_id: id(5),
            reason: CancelReason::DeadlineExceeded,
            cancelled_at: T0,
        }
        .into(),
        StockReserved {
            order_id: id(6),
            reservation_id: id(7),
            lines: vec![ReservedLine {
                sku: "SKU-1".into(),
                quantity: 3,
                unit_price_cents: 199,
            }],
            total_cents: 597,
            reserved_at: T0,
        }
        .into(),
        StockReservationRejected {
            order_id: id(8),
            reason: String::new(),
            shortages: vec![Shortage {
                sku: "SKU-2".into(),
                requested: 5,
                available: 0,
            }],
            rejected_at: schemas::limits::MAX_TIME_MILLIS,
        }
        .into(),
        StockReleased {
            order_id: id(9),
            reservation_id: id(10),
            reason: "order cancelled".into(),
            released_at: T0,
        }
        .into(),
        PaymentConfirmed {
            order_id: id(13),
            payment_id: id(14),
            amount_cents: schemas::limits::MAX_TOTAL_CENTS,
            confirmed_at: T0,
        }
        .into(),
        PaymentDeclined {
            order_id: id(15),
            payment_id: id(16),
            reason: "declined".into(),
            decline_code: "do_not_honor".into(),
            declined_at: T0,
        }
        .into(),
        PaymentRefunded {
            order_id: id(17),
            payment_id: id(18),
            refunded_cents: 0,
            refunded_at: T0,
        }
        .into(),
    ]
}

fn schema_source(event_type: &str) -> String {
    let path = format!("{}/avro/{event_type}.avsc", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(path).expect("schema file exists")
}

fn example(event_type: &str) -> Vec<u8> {
    let path = format!("{}/examples/{event_type}.json", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(path).expect("example file exists")
}

/// CRC-64-AVRO exactly as written in the Avro specification, independent of apache-avro.
fn crc64_avro(data: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    let table: Vec<u64> = (0..256u64)
        .map(|i| (0..8).fold(i, |fp, _| (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg())))
        .collect();
    data.iter().fold(EMPTY, |fp, &b| {
        (fp >> 8) ^ table[((fp ^ u64::from(b)) & 0xff) as usize]
    })
}

/// Small deterministic generator so failures reproduce.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn an_event_outside_the_contract_is_refused_by_both_decoders() {
    let forged: Event = OrderPlaced {
        order_id: id(1),
        customer_id: id(2),
        items: vec![OrderItem {
            sku: "SKU-1".into(),
            quantity: -5,
        }],
        placed_at: T0,
    }
    .into();
    let expected = Err(DecodeError::OutOfBounds {
        event_type: "OrderPlaced",
        error: BoundsError::OutOfRange {
            field: "items[0].quantity".into(),
            value: -5,
            min: 1,
            max: 1_000_000,
        },
    });
    assert_eq!(decode(&encode(&forged)), expected);
    assert_eq!(decode_json("OrderPlaced", &encode_json(&forged)), expected);
}

#[test]
fn samples_cover_every_event_type_in_order() {
    let types: Vec<_> = samples().iter().map(Event::event_type).collect();
    assert_eq!(types, Event::EVENT_TYPES);
}

#[test]
fn every_event_round_trips_through_avro_single_object_encoding() {
    for event in samples() {
        let bytes = encode(&event);
        assert_eq!(decode(&bytes), Ok(event.clone()), "{}", event.event_type());
    }
}

#[test]
fn every_event_round_trips_through_json() {
    for event in samples() {
        let json = encode_json(&event);
        assert_eq!(decode_json(event.event_type(), &json), Ok(event.clone()));
    }
}

#[test]
fn encoded_bytes_start_with_c3_01_and_the_schemas_little_endian_rabin_fingerprint() {
    for event in samples() {
        let event_type = event.event_type();
        let bytes = encode(&event);
        assert_eq!(bytes[..2], [0xC3, 0x01]);

        let schema = Schema::parse_str(&schema_source(event_type)).unwrap();
        let by_library = schema.fingerprint::<Rabin>().bytes;
        let by_spec = crc64_avro(schema.canonical_form().as_bytes()).to_le_bytes();
        assert_eq!(bytes[2..10], by_spec, "{event_type}");
        assert_eq!(bytes[2..10], by_library[..], "{event_type}");
        assert_eq!(schemas::fingerprint(event_type), Some(by_spec));
        assert_eq!(
            schemas::event_type_for_fingerprint(by_spec),
            Some(event_type)
        );
    }
}

#[test]
fn schema_files_are_records_in_the_saga_events_namespace_named_after_their_event_type() {
    for event_type in Event::EVENT_TYPES {
        let schema = schemas::schema(event_type).unwrap();
        let Schema::Record(record) = schema else {
            panic!("{event_type} is not a record");
        };
        assert_eq!(
            record.name.fullname(None),
            format!("saga.events.{event_type}")
        );
        assert_eq!(
            schemas::schema_json(event_type),
            Some(schema_source(event_type).as_str())
        );
    }
    assert_eq!(schemas::schema("Nope"), None);
}

#[test]
fn ids_are_avro_uuid_strings_and_times_are_timestamp_millis() {
    let Some(Schema::Record(record)) = schemas::schema("StockReleased") else {
        panic!()
    };
    assert_eq!(record.fields[0].schema, Schema::Uuid);
    assert_eq!(record.fields[1].schema, Schema::Uuid);
    assert_eq!(record.fields[3].schema, Schema::TimestampMillis);
    // The uuid is written as its 36-character text: length varint 72 (zig-zag 36), then ASCII.
    let event = &samples()[6];
    let bytes = encode(event);
    assert_eq!(bytes[10], 72);
    assert_eq!(&bytes[11..47], event.order_id().to_string().as_bytes());
}

#[test]
fn every_example_json_decodes_and_round_trips_through_encode_json() {
    for event_type in Event::EVENT_TYPES {
        let json = example(event_type);
        let event = decode_json(event_type, &json)
            .unwrap_or_else(|e| panic!("examples/{event_type}.json: {e}"));
        assert_eq!(event.event_type(), event_type);
        let reencoded = encode_json(&event);
        let original: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let again: serde_json::Value = serde_json::from_slice(&reencoded).unwrap();
        assert_eq!(again, original, "{event_type}");
        assert_eq!(decode_json(event_type, &reencoded), Ok(event.clone()));
        assert_eq!(decode(&encode(&event)), Ok(event));
    }
}

/// Who acts on each event: the table's two readings agree, every event of a service's topic
/// is acted on by someone but OrderRejected (inventory reserved nothing for it), and no group
/// acts on its own service's events.
#[test]
fn every_event_names_the_groups_that_act_on_it() {
    for event_type in Event::EVENT_TYPES {
        let event = decode_json(event_type, &example(event_type)).unwrap();
        assert_eq!(Event::readers_of(event_type), Some(event.read_by()));
        let own_group = match event.topic() {
            t if t == schemas::ORDERS_TOPIC => schemas::ORDER_SERVICE,
            t if t == schemas::INVENTORY_TOPIC => schemas::INVENTORY_SERVICE,
            _ => schemas::PAYMENT_SERVICE,
        };
        assert!(!event.read_by().contains(&own_group), "{event_type}");
        assert_eq!(
            event.read_by().is_empty(),
            event_type == "OrderRejected",
            "{event_type}"
        );
    }
    assert_eq!(Event::readers_of("NoSuchEvent"), None);
}

#[test]
fn examples_are_one_line_each_for_kcat() {
    for event_type in Event::EVENT_TYPES {
        let json = String::from_utf8(example(event_type)).unwrap();
        assert_eq!(json.trim_end().lines().count(), 1, "{event_type}");
    }
}

#[test]
fn events_know_their_type_order_topic_and_aggregate() {
    for event in samples() {
        let event_type = event.event_type();
        let (topic, aggregate) = if event_type.starts_with("Order") {
            (ORDERS_TOPIC, "order")
        } else if event_type.starts_with("Stock") {
            (INVENTORY_TOPIC, "inventory")
        } else {
            (PAYMENTS_TOPIC, "payment")
        };
        assert_eq!(event.topic(), topic);
        assert_eq!(event.aggregate_type(), aggregate);
        assert_eq!(schemas::topic_for_aggregate(aggregate), Some(topic));
    }
    assert_eq!(ORDERS_TOPIC, "orders.v1");
    assert_eq!(INVENTORY_TOPIC, "inventory.v1");
    assert_eq!(PAYMENTS_TOPIC, "payments.v1");
    assert_eq!(schemas::topic_for_aggregate("customer"), None);
    let ids: Vec<_> = samples().iter().map(Event::order_id).collect();
    assert_eq!(ids, [1, 11, 3, 4, 12, 5, 6, 8, 9, 13, 15, 17].map(id));
}

#[test]
fn cancel_reason_uses_the_avro_symbols_in_json() {
    let json = encode_json(&samples()[5]);
    let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(value["reason"], "DEADLINE_EXCEEDED");
    assert_eq!(
        CancelReason::CustomerRequest.to_string(),
        "CUSTOMER_REQUEST"
    );
}

#[test]
fn short_payloads_are_rejected_with_a_readable_message() {
    assert_eq!(decode(&[]), Err(DecodeError::TooShort { len: 0 }));
    let err = decode(&[0xC3, 0x01, 0x00]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("payload of 3 bytes is too short for Avro single-object"),
        "{err}"
    );
}

#[test]
fn a_wrong_marker_is_rejected() {
    let mut bytes = encode(&samples()[0]);
    bytes[0] = b'{';
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::BadMarker {
            found: [b'{', 0x01]
        })
    );
    assert!(decode(b"{\"order_id\":\"x\"}").is_err());
}

#[test]
fn an_unknown_fingerprint_is_rejected() {
    let mut bytes = encode(&samples()[0]);
    bytes[2..10].copy_from_slice(&0x0123_4567_89AB_CDEFu64.to_le_bytes());
    let err = decode(&bytes).unwrap_err();
    assert_eq!(
        err,
        DecodeError::UnknownFingerprint {
            fingerprint: 0x0123_4567_89AB_CDEF
        }
    );
    assert_eq!(
        err.to_string(),
        "unknown schema fingerprint 0x0123456789ABCDEF"
    );
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut bytes = encode(&samples()[2]);
    bytes.extend_from_slice(&[0, 0, 0]);
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::TrailingBytes {
            event_type: "OrderConfirmed",
            count: 3
        })
    );
}

#[test]
fn every_truncation_of_a_valid_payload_is_rejected() {
    for event in samples() {
        let bytes = encode(&event);
        for len in 0..bytes.len() {
            assert!(
                decode(&bytes[..len]).is_err(),
                "{} cut at {len}",
                event.event_type()
            );
        }
    }
}

#[test]
fn the_right_header_followed_by_garbage_is_rejected_without_panic() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for event_type in Event::EVENT_TYPES {
        let header = [
            &[0xC3, 0x01][..],
            &schemas::fingerprint(event_type).unwrap(),
        ]
        .concat();
        for len in 0..64 {
            let payload = [header.clone(), rng.bytes(len)].concat();
            // Random bytes are almost never a valid datum; all that matters is: no panic.
            let _ = decode(&payload);
        }
        let nonsense = [header, vec![0xFF; 40]].concat();
        assert!(
            matches!(decode(&nonsense), Err(DecodeError::CorruptBody { .. })),
            "{event_type}"
        );
    }
}

#[test]
fn random_bytes_and_flipped_bytes_never_panic() {
    let mut rng = XorShift(42);
    for len in 0..200 {
        assert!(decode(&rng.bytes(len)).is_err());
    }
    for event in samples() {
        let bytes = encode(&event);
        for i in 0..bytes.len() {
            for flip in [0x01, 0x80, 0xFF] {
                let mut corrupt = bytes.clone();
                corrupt[i] ^= flip;
                let _ = decode(&corrupt);
            }
        }
    }
}

#[test]
fn a_huge_length_prefix_is_rejected_instead_of_allocating() {
    let header = [
        &[0xC3, 0x01][..],
        &schemas::fingerprint("OrderPlaced").unwrap(),
    ]
    .concat();
    let uuid = |u: Uuid| [vec![72u8], u.to_string().into_bytes()].concat();
    // Array block count 2^40 (zig-zag varint), then nothing.
    let huge_count = vec![0x80, 0x80, 0x80, 0x80, 0x80, 0x40];
    let payload = [header.clone(), uuid(id(1)), uuid(id(2)), huge_count].concat();
    assert!(matches!(
        decode(&payload),
        Err(DecodeError::CorruptBody { .. })
    ));
    // A string claiming 2^40 bytes.
    let payload = [header, vec![0x80, 0x80, 0x80, 0x80, 0x80, 0x40]].concat();
    assert!(matches!(
        decode(&payload),
        Err(DecodeError::CorruptBody { .. })
    ));
}

#[test]
fn an_avro_value_that_does_not_fit_the_struct_is_rejected() {
    // A syntactically valid Avro string that is not a UUID in an id field.
    let header = [
        &[0xC3, 0x01][..],
        &schemas::fingerprint("OrderConfirmed").unwrap(),
    ]
    .concat();
    let not_a_uuid = [vec![72u8], vec![b'z'; 36]].concat();
    let payload = [header, not_a_uuid, vec![2, 2]].concat();
    assert!(decode(&payload).is_err());
}

fn json_error(event_type: &str, json: &str) -> DecodeError {
    decode_json(event_type, json.as_bytes()).expect_err(json)
}

#[test]
fn json_with_an_unknown_field_is_rejected() {
    let json = r#"{"order_id":"7c9e6679-7425-40de-944b-e07fc1f90ae7","total_cents":1,"confirmed_at":1,"extra":1}"#;
    let err = json_error("OrderConfirmed", json);
    assert!(matches!(err, DecodeError::InvalidJson { .. }), "{err}");
    assert!(err.to_string().contains("unknown field `extra`"), "{err}");
}

#[test]
fn json_with_an_unknown_field_in_a_nested_record_is_rejected() {
    let json = r#"{"order_id":"7c9e6679-7425-40de-944b-e07fc1f90ae7","customer_id":"7c9e6679-7425-40de-944b-e07fc1f90ae7","items":[{"sku":"a","quantity":1,"colour":"red"}],"placed_at":1}"#;
    assert!(matches!(
        json_error("OrderPlaced", json),
        DecodeError::InvalidJson { .. }
    ));
}

#[test]
fn json_with_a_missing_field_is_rejected() {
    let json = r#"{"order_id":"7c9e6679-7425-40de-944b-e07fc1f90ae7","total_cents":1}"#;
    let err = json_error("OrderConfirmed", json);
    assert!(
        err.to_string().contains("missing field `confirmed_at`"),
        "{err}"
    );
}

#[test]
fn json_with_a_wrong_type_is_rejected() {
    for json in [
        r#"{"order_id":"7c9e6679-7425-40de-944b-e07fc1f90ae7","total_cents":"1","confirmed_at":1}"#,
        r#"{"order_id":"7c9e6679-7425-40de-944b-e07fc1f90ae7","total_cents":1.5,"confirmed_at":1}"#,
        r#"{"order_id":"7c9e6679-7425-40de-944b-e07fc1f90ae7","total_cents":null,"confirmed_at":1}"#,
        r#"{"order_id":"not-a-uuid","total_cents":1,"confirmed_at":1}"#,
        r#"{"order_id":42,"total_cents":1,"confirmed_at":1}"#,
        r#"[1,2,3]"#,
    ] {
        assert!(matches!(
            json_error("OrderConfirmed", json),
            DecodeError::InvalidJson { .. }
        ));
    }
}

#[test]
fn malformed_json_is_rejected() {
    for json in ["", "{", "{\"order_id\":", "not json", "{} {}"] {
        assert!(matches!(
            json_error("OrderConfirmed", json),
            DecodeError::InvalidJson { .. }
        ));
    }
}

#[test]
fn json_with_a_bad_enum_symbol_is_rejected() {
    let json =
        r#"{"order_id":"7c9e6679-7425-40de-944b-e07fc1f90ae7","reason":"BORED","cancelled_at":1}"#;
    let err = json_error("OrderCancelled", json);
    assert!(err.to_string().contains("BORED"), "{err}");
    let lower = json.replace("BORED", "customer_request");
    assert!(decode_json("OrderCancelled", lower.as_bytes()).is_err());
}

#[test]
fn json_of_an_unknown_event_type_is_rejected() {
    let err = json_error("OrderShipped", "{}");
    assert_eq!(err, DecodeError::UnknownEventType("OrderShipped".into()));
    assert_eq!(err.to_string(), "unknown event type \"OrderShipped\"");
}

#[test]
fn json_of_another_event_type_is_rejected() {
    assert!(decode_json("OrderRejected", &example("OrderConfirmed")).is_err());
}

#[test]
fn content_type_json_needs_an_event_type_header() {
    let json = example("OrderPlaced");
    let expected = decode_json("OrderPlaced", &json).unwrap();
    assert_eq!(
        decode_with_content_type(Some("application/json"), Some("OrderPlaced"), &json),
        Ok(expected.clone())
    );
    assert_eq!(
        decode_with_content_type(
            Some("Application/JSON; charset=utf-8"),
            Some("OrderPlaced"),
            &json
        ),
        Ok(expected)
    );
    assert_eq!(
        decode_with_content_type(Some("application/json"), None, &json),
        Err(DecodeError::MissingEventType)
    );
}

#[test]
fn avro_is_the_default_content_type() {
    for event in samples() {
        let bytes = encode(&event);
        for content_type in [None, Some("application/avro"), Some("avro/binary")] {
            assert_eq!(
                decode_with_content_type(content_type, None, &bytes),
                Ok(event.clone())
            );
            assert_eq!(
                decode_with_content_type(content_type, Some(event.event_type()), &bytes),
                Ok(event.clone())
            );
        }
    }
}

#[test]
fn an_event_type_header_that_disagrees_with_the_avro_schema_is_rejected() {
    let bytes = encode(&samples()[0]);
    let err = decode_with_content_type(Some("application/avro"), Some("OrderConfirmed"), &bytes)
        .unwrap_err();
    assert_eq!(
        err,
        DecodeError::EventTypeMismatch {
            header: "OrderConfirmed".into(),
            actual: "OrderPlaced"
        }
    );
}

#[test]
fn avro_bytes_sent_as_json_are_rejected() {
    let bytes = encode(&samples()[0]);
    assert!(
        decode_with_content_type(Some("application/json"), Some("OrderPlaced"), &bytes).is_err()
    );
}

/// A record written before a schema changed (here: OrderCancelled before the payment step added
/// two reasons) stays on its topic for the topic's retention, and still decodes.
#[test]
fn a_record_written_with_an_older_schema_decodes_into_the_current_one() {
    let path = format!(
        "{}/avro/history/OrderCancelled.1.avsc",
        env!("CARGO_MANIFEST_DIR")
    );
    let old = Schema::parse_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let current = schemas::schema("OrderCancelled").unwrap();
    let old_fp = old.fingerprint::<Rabin>().bytes;
    assert_ne!(
        old_fp.as_slice(),
        current.fingerprint::<Rabin>().bytes.as_slice(),
        "the schema changed"
    );
    let event = OrderCancelled {
        order_id: id(5),
        reason: CancelReason::DeadlineExceeded,
        cancelled_at: T0,
    };
    let datum = apache_avro::to_avro_datum(&old, apache_avro::to_value(&event).unwrap()).unwrap();
    let mut bytes = vec![0xC3, 0x01];
    bytes.extend_from_slice(&old_fp);
    bytes.extend_from_slice(&datum);
    assert_eq!(
        decode(&bytes).unwrap(),
        Event::OrderCancelled(event.clone())
    );
    assert_eq!(
        decode_with_content_type(None, Some("OrderCancelled"), &bytes).unwrap(),
        Event::OrderCancelled(event)
    );
    // What is encoded now uses the current schema.
    let now = encode(&samples()[5]);
    assert_eq!(&now[2..10], current.fingerprint::<Rabin>().bytes.as_slice());
}

#[test]
fn a_decline_code_is_a_short_plain_code() {
    for bad in ["", "with space", "ü", &"x".repeat(65)] {
        let event = Event::PaymentDeclined(PaymentDeclined {
            order_id: id(1),
            payment_id: id(2),
            reason: "r".into(),
            decline_code: bad.to_owned(),
            declined_at: T0,
        });
        assert!(
            matches!(event.check_bounds(), Err(BoundsError::BadCode { .. })),
            "{bad:?} was accepted"
        );
    }
}
