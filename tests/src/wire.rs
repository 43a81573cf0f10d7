//! A raw Kafka protocol connection, for tests of the broker itself: what a Fetch answers, batch by
//! batch, which a client library hides (librdkafka drops the records below the offset it asked
//! for and any it has seen). The messages are encoded and decoded by the `kafka-protocol` crate,
//! which shares no code with the broker.

use anyhow::{Context as _, bail, ensure};
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    CreateTopicsRequest, FetchRequest, ListOffsetsRequest, ProduceRequest, RequestHeader,
    ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Kafka's OFFSET_OUT_OF_RANGE error code.
pub const OFFSET_OUT_OF_RANGE: i16 = 1;

// Versions both Tansu 0.6.0 and Kafka 4 serve.
const PRODUCE_VERSION: i16 = 8;
const FETCH_VERSION: i16 = 11;
const LIST_OFFSETS_VERSION: i16 = 5;
const CREATE_TOPICS_VERSION: i16 = 5;

/// One connection to one broker (the partition's leader: the tests' brokers are single nodes).
pub struct Connection {
    stream: TcpStream,
    correlation_id: i32,
}

/// A fetch's answer for one partition.
#[derive(Debug)]
pub struct Fetched {
    pub error_code: i16,
    pub high_watermark: i64,
    /// The record batches as the broker sent them.
    pub records: Bytes,
}

/// A batch's place in the log, read from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSpan {
    pub base_offset: i64,
    pub record_count: i32,
}

impl BatchSpan {
    pub fn holds(&self, offset: i64) -> bool {
        (self.base_offset..self.base_offset + i64::from(self.record_count)).contains(&offset)
    }
}

impl Fetched {
    /// Each batch's base offset and record count, in the order sent (compressed batches are not
    /// decompressed).
    pub fn batches(&self) -> anyhow::Result<Vec<BatchSpan>> {
        Ok(
            RecordBatchDecoder::decode_batch_info(&mut self.records.clone())?
                .into_iter()
                .map(|info| BatchSpan {
                    base_offset: info.min_offset,
                    record_count: info.record_count,
                })
                .collect(),
        )
    }

    /// Every record sent, as (offset, value), in the order sent (uncompressed batches only).
    pub fn records(&self) -> anyhow::Result<Vec<(i64, String)>> {
        let mut records = Vec::new();
        for set in RecordBatchDecoder::decode_all(&mut self.records.clone())? {
            for record in set.records {
                let value = record.value.unwrap_or_default();
                records.push((record.offset, String::from_utf8(value.to_vec())?));
            }
        }
        Ok(records)
    }
}

impl Connection {
    pub async fn connect(bootstrap: &str) -> anyhow::Result<Connection> {
        let stream = TcpStream::connect(bootstrap)
            .await
            .with_context(|| format!("connecting to {bootstrap}"))?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            correlation_id: 0,
        })
    }

    async fn call<R: Request>(&mut self, request: &R, version: i16) -> anyhow::Result<R::Response> {
        self.correlation_id += 1;
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("e2e-wire")));
        let mut body = BytesMut::new();
        header.encode(&mut body, R::header_version(version))?;
        request.encode(&mut body, version)?;
        let mut frame = BytesMut::with_capacity(body.len() + 4);
        frame.put_u32(u32::try_from(body.len())?);
        frame.extend_from_slice(&body);
        self.stream.write_all(&frame).await?;
        let length = self.stream.read_u32().await.context("reading a response")?;
        let mut answer = vec![0; usize::try_from(length)?];
        self.stream.read_exact(&mut answer).await?;
        let mut answer = Bytes::from(answer);
        let header = ResponseHeader::decode(&mut answer, R::Response::header_version(version))?;
        ensure!(
            header.correlation_id == self.correlation_id,
            "answer {} to request {}",
            header.correlation_id,
            self.correlation_id
        );
        let response = R::Response::decode(&mut answer, version)?;
        ensure!(
            !answer.has_remaining(),
            "{} bytes left over",
            answer.remaining()
        );
        Ok(response)
    }

    /// Creates `topic` with `partitions` partitions (one replica).
    pub async fn create_topic(&mut self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        let request = CreateTopicsRequest::default()
            .with_topics(vec![
                CreatableTopic::default()
                    .with_name(topic_name(topic))
                    .with_num_partitions(partitions)
                    .with_replication_factor(1),
            ])
            .with_timeout_ms(30_000);
        let response = self.call(&request, CREATE_TOPICS_VERSION).await?;
        for result in response.topics {
            ensure!(
                result.error_code == 0,
                "creating {topic}: error {} {:?}",
                result.error_code,
                result.error_message
            );
        }
        Ok(())
    }

    /// Produces `values` to one partition as ONE record batch (acks=all) and returns its base
    /// offset.
    pub async fn produce_batch(
        &mut self,
        topic: &str,
        partition: i32,
        values: &[&str],
    ) -> anyhow::Result<i64> {
        let records: Vec<Record> = values
            .iter()
            .enumerate()
            .map(|(delta, value)| Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: 0,
                producer_id: -1,
                producer_epoch: -1,
                timestamp_type: TimestampType::Creation,
                offset: delta as i64,
                // No sequence (-1) for the batch; the encoder puts records whose offset minus
                // sequence agree in one batch.
                sequence: delta as i32 - 1,
                timestamp: chrono::Utc::now().timestamp_millis(),
                key: None,
                value: Some(Bytes::copy_from_slice(value.as_bytes())),
                headers: Default::default(),
            })
            .collect();
        let mut batch = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut batch,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )?;
        let request = ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![
                TopicProduceData::default()
                    .with_name(topic_name(topic))
                    .with_partition_data(vec![
                        PartitionProduceData::default()
                            .with_index(partition)
                            .with_records(Some(batch.freeze())),
                    ]),
            ]);
        let response = self.call(&request, PRODUCE_VERSION).await?;
        let answer = response
            .responses
            .iter()
            .flat_map(|topic| &topic.partition_responses)
            .find(|p| p.index == partition)
            .context("no answer for the partition")?;
        ensure!(
            answer.error_code == 0,
            "producing to {topic}/{partition}: error {}",
            answer.error_code
        );
        Ok(answer.base_offset)
    }

    /// One fetch of one partition from `offset` (read uncommitted, up to 1 MiB, waiting at most
    /// `max_wait_ms` for records).
    pub async fn fetch(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        max_wait_ms: i32,
    ) -> anyhow::Result<Fetched> {
        let request = FetchRequest::default()
            .with_replica_id((-1).into())
            .with_max_wait_ms(max_wait_ms)
            .with_min_bytes(1)
            .with_max_bytes(1 << 20)
            .with_isolation_level(0)
            .with_session_id(0)
            .with_session_epoch(-1)
            .with_topics(vec![
                FetchTopic::default()
                    .with_topic(topic_name(topic))
                    .with_partitions(vec![
                        FetchPartition::default()
                            .with_partition(partition)
                            .with_fetch_offset(offset)
                            .with_partition_max_bytes(1 << 20),
                    ]),
            ]);
        let response = self.call(&request, FETCH_VERSION).await?;
        ensure!(
            response.error_code == 0,
            "fetch: error {}",
            response.error_code
        );
        let data = response
            .responses
            .into_iter()
            .flat_map(|topic| topic.partitions)
            .find(|p| p.partition_index == partition)
            .context("no answer for the partition")?;
        Ok(Fetched {
            error_code: data.error_code,
            high_watermark: data.high_watermark,
            records: data.records.unwrap_or_default(),
        })
    }

    /// ListOffsets latest: the offset the next record will get (the high watermark).
    pub async fn latest_offset(&mut self, topic: &str, partition: i32) -> anyhow::Result<i64> {
        let request = ListOffsetsRequest::default()
            .with_replica_id((-1).into())
            .with_isolation_level(0)
            .with_topics(vec![
                ListOffsetsTopic::default()
                    .with_name(topic_name(topic))
                    .with_partitions(vec![
                        ListOffsetsPartition::default()
                            .with_partition_index(partition)
                            .with_timestamp(-1),
                    ]),
            ]);
        let response = self.call(&request, LIST_OFFSETS_VERSION).await?;
        let answer = response
            .topics
            .iter()
            .flat_map(|topic| &topic.partitions)
            .find(|p| p.partition_index == partition)
            .context("no answer for the partition")?;
        if answer.error_code != 0 {
            bail!(
                "list offsets of {topic}/{partition}: error {}",
                answer.error_code
            );
        }
        Ok(answer.offset)
    }
}

fn topic_name(topic: &str) -> TopicName {
    TopicName(StrBytes::from_string(topic.to_owned()))
}
