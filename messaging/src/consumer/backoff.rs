//! Waiting out what is not the message's fault: the one loop that repeats a step with backoff
//! ([`service_kit::backoff::Backoff::TRANSIENT`]) until it succeeds, shutdown comes, or the retry and
//! dead-letter producer has failed for good. Every path of the runtime uses it: a record's own
//! try, draining a released key, and the steps after a try (parking, retry and dead-letter sends).

use std::future::Future;

use super::{Delivery, Worker};
use schemas::headers;

/// Shutdown came (or the producer failed fatally) before the work was done: the record's offset
/// must not be stored, so it is read again after the restart.
pub(super) struct Interrupted;

/// What is being retried: it decides what a failure logs and counts, and whether shutdown
/// abandons a step in progress.
#[derive(Clone, Copy)]
pub(super) enum Retrying<'a> {
    /// A record's own try, in its transaction. Never abandoned half-way: shutdown lets the
    /// current message finish. Each failure counts in `consumer_transient_retries_total`.
    Record {
        delivery: &'a Delivery,
        event_type: &'static str,
    },
    /// One step of applying a released key's parked messages.
    Drain { key: &'a str },
    /// A step after the try: parking its key, sending it to a retry or dead-letter topic.
    Step,
}

impl<H> Worker<H> {
    /// Runs `step` until it succeeds, pausing with backoff on transient failures.
    pub(super) async fn until_done<F, Fut>(&self, step: F) -> Result<(), Interrupted>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        self.until_done_with(Retrying::Step, step).await
    }

    /// Runs `step` until it succeeds and returns its value; every error of `step` is transient
    /// by construction. Except for a record's own try ([`Retrying::Record`]), a step still
    /// running when shutdown comes is abandoned (a send waiting for a broker that is down would
    /// otherwise hold up the shutdown for as long as the outage lasts); the record's offset is
    /// then not stored, so it is read again after the restart. A Kafka producer that failed
    /// fatally ends the consumer (see [`Worker::fatal`]) instead of being retried forever.
    pub(super) async fn until_done_with<T, F, Fut>(
        &self,
        retrying: Retrying<'_>,
        mut step: F,
    ) -> Result<T, Interrupted>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<T>>,
    {
        let mut attempt = 0;
        loop {
            let result = match retrying {
                Retrying::Record { .. } => step().await,
                Retrying::Drain { .. } | Retrying::Step => tokio::select! {
                    result = step() => result,
                    _ = self.shutdown.wait() => return Err(Interrupted),
                },
            };
            let error = match result {
                Ok(value) => return Ok(value),
                Err(_) if self.producer_failed() => return Err(Interrupted),
                Err(e) => e,
            };
            attempt += 1;
            let delay = service_kit::backoff::transient(attempt);
            let error = format!("{error:#}");
            match retrying {
                Retrying::Record {
                    delivery,
                    event_type,
                } => {
                    self.count("consumer_transient_retries_total", delivery, event_type);
                    let message_id = schemas::limits::truncate_chars(
                        delivery.header(headers::MESSAGE_ID).unwrap_or(""),
                        64,
                    );
                    tracing::warn!(%message_id, event_type, attempt, ?delay, %error,
                        "transient failure; retrying the same message");
                }
                Retrying::Drain { key } => {
                    tracing::warn!(%key, %error, ?delay, "could not apply parked messages yet; retrying");
                }
                Retrying::Step => tracing::warn!(%error, ?delay, "retrying"),
            }
            if self.shutdown.sleep(delay).await.is_err() {
                return Err(Interrupted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rdkafka::producer::{FutureProducer, Producer as _};
    use sqlx::PgConnection;

    use super::*;
    use crate::consumer::{AfterCommit, Envelope, Handler, HandlerError};
    use crate::{kafka, retry};
    use service_kit::shutdown::Shutdown;

    struct NoHandler;

    impl Handler for NoHandler {
        async fn handle(
            &self,
            _: &mut PgConnection,
            _: &Envelope,
        ) -> Result<AfterCommit, HandlerError> {
            Ok(AfterCommit::none())
        }
    }

    /// A retry copy the broker refuses for good (here: not authorized for the topic) makes the
    /// gapless idempotent producer fatal. Before the fix the worker retried the send forever
    /// with `/readyz` green; now it stops and fires the consumers' fatal trigger, so the process
    /// exits to be restarted. librdkafka's mock cluster stands in for the broker (a real broker
    /// cannot be made to refuse on cue).
    #[tokio::test]
    async fn a_fatally_failed_producer_stops_the_consumers_instead_of_retrying_forever() {
        use rdkafka::mocking::MockCluster;
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster
            .create_topic("g.retry.1", 1, 1)
            .expect("retry topic");
        let kafka = kafka::KafkaSettings::new(&cluster.bootstrap_servers());
        let producer: FutureProducer = kafka.producer().create().expect("producer");
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 50],
        );
        let (fatal, fatal_fired) = Shutdown::new();
        let (_keep, shutdown) = Shutdown::new();
        let worker = Worker {
            group: "g".into(),
            max_batch: 1,
            pool: sqlx::postgres::PgPoolOptions::new()
                .connect_lazy("postgres://nobody@127.0.0.1:1/none")
                .expect("lazy pool"),
            handler: NoHandler,
            producer,
            retry_delays: vec![Duration::from_secs(1)],
            topics: vec!["orders.v1".into()],
            shutdown,
            fatal,
        };
        let delivery = Delivery {
            topic: "orders.v1".into(),
            partition: 0,
            offset: 7,
            timestamp: None,
            key: Some(b"order-1".to_vec()),
            payload: Some(b"payload".to_vec()),
            headers: vec![(
                "message-id".into(),
                Some(uuid::Uuid::new_v4().to_string().into_bytes()),
            )],
        };
        let sent = tokio::time::timeout(
            Duration::from_secs(60),
            worker.until_done(|| async {
                retry::send(
                    &worker.producer,
                    "g",
                    &delivery,
                    1,
                    Duration::from_secs(1),
                    "not yet",
                )
                .await
            }),
        )
        .await
        .expect("the worker gave up on the fatally failed producer within 60 s");
        assert!(sent.is_err(), "the send cannot have succeeded");
        assert!(
            worker.producer.client().fatal_error().is_some(),
            "the producer is fatal"
        );
        assert!(fatal_fired.is_fired(), "the consumers were told to stop");
    }
}
