//! The Kafka record headers of the saga's wire contract, named once. Every producer and reader
//! of a header (the relay, the consumers, the retry and dead-letter writers, `saga`) uses these
//! names (the README lists them under "Topics and records").

/// The event's own id (a UUID): the inbox dedupes on it.
pub const MESSAGE_ID: &str = "message-id";
/// The event's type name (`OrderPlaced`, ...): must match the payload's schema.
pub const EVENT_TYPE: &str = "event-type";
/// `application/vnd.saga.avro` (Avro single-object encoding) or `application/json`.
pub const CONTENT_TYPE: &str = "content-type";
/// The order id the event belongs to.
pub const CORRELATION_ID: &str = "correlation-id";
/// The `message-id` of the event whose handling emitted this one, when there is one.
pub const CAUSATION_ID: &str = "causation-id";
/// W3C Trace Context of the span that emitted the event.
pub const TRACEPARENT: &str = "traceparent";
/// W3C Trace Context vendor state, carried on when short enough.
pub const TRACESTATE: &str = "tracestate";

/// The prefix of the headers only a consumer group's own retry copies carry.
pub const RETRY_PREFIX: &str = "retry-";
/// The attempt a retry copy is on (informative: the retry topic's number is what counts).
pub const RETRY_ATTEMPT: &str = "retry-attempt";
/// When a retry copy may be applied, in milliseconds since the Unix epoch.
pub const RETRY_NOT_BEFORE: &str = "retry-not-before";
/// Where the record was first consumed from.
pub const RETRY_ORIGINAL_TOPIC: &str = "retry-original-topic";
pub const RETRY_ORIGINAL_PARTITION: &str = "retry-original-partition";
pub const RETRY_ORIGINAL_OFFSET: &str = "retry-original-offset";
/// When the record first failed (RFC 3339).
pub const RETRY_FIRST_FAILURE_AT: &str = "retry-first-failure-at";
/// Why the last attempt said "not yet".
pub const RETRY_REASON: &str = "retry-reason";

/// The prefix of the headers a dead letter carries besides the record's own.
pub const DLQ_PREFIX: &str = "dlq-";
/// Where the dead-lettered record was first consumed from.
pub const DLQ_ORIGINAL_TOPIC: &str = "dlq-original-topic";
pub const DLQ_ORIGINAL_PARTITION: &str = "dlq-original-partition";
pub const DLQ_ORIGINAL_OFFSET: &str = "dlq-original-offset";
/// The consumer group that gave up on it.
pub const DLQ_CONSUMER_GROUP: &str = "dlq-consumer-group";
/// `permanent` (can never apply) or `retryable` (still "not yet" after its last retry).
pub const DLQ_ERROR_CLASS: &str = "dlq-error-class";
/// Why, in plain words.
pub const DLQ_ERROR_MESSAGE: &str = "dlq-error-message";
/// How many attempts were made.
pub const DLQ_ATTEMPTS: &str = "dlq-attempts";
pub const DLQ_FIRST_FAILURE_AT: &str = "dlq-first-failure-at";
pub const DLQ_LAST_FAILURE_AT: &str = "dlq-last-failure-at";
/// `true` on a stub: a dead letter without the record's value, for a record too large to copy.
pub const DLQ_STUB: &str = "dlq-stub";
/// On a stub: how many bytes the record had.
pub const DLQ_ORIGINAL_BYTES: &str = "dlq-original-bytes";
