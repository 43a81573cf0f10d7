//! The projection: reads every projected topic (event topics, every group's retry topics and
//! dead-letter queue) and writes each batch's steps, the sagas they touch and the partitions'
//! next offsets in one transaction. Partitions are assigned by the monitor itself from its own
//! checkpoints (no consumer group, nothing committed to Kafka), so where it resumes is exactly
//! what its database holds: a kill at any moment neither loses nor doubles a step.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::FutureExt;
use messaging::delivery::Delivery;
use messaging::kafka::KafkaSettings;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use service_kit::shutdown::Shutdown;
use sqlx::PgPool;

use crate::step::{self, Unattributed};
use crate::store::{self, Checkpoints};

/// How often the topics are listed again: retry topics and DLQs of a service started after the
/// monitor appear within this long.
const DISCOVER_EVERY: Duration = Duration::from_secs(5);

/// The newest high watermark of each partition, from librdkafka's statistics (no extra request
/// to the broker): what the lag is measured against.
#[derive(Default)]
pub struct Watermarks(Mutex<HashMap<(String, i32), i64>>);

pub struct MonitorContext {
    watermarks: Arc<Watermarks>,
}

impl ClientContext for MonitorContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut marks = self.watermarks.0.lock().expect("watermarks");
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if *partition >= 0 && p.hi_offset >= 0 {
                    marks.insert((topic.clone(), *partition), p.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for MonitorContext {}

type MonitorConsumer = StreamConsumer<MonitorContext>;

/// Where a projection writes and how much it takes at once.
#[derive(Debug, Clone)]
pub struct Target {
    /// The schema of its tables ([`store::LIVE`] for the live projection).
    pub schema: String,
    /// The most records one transaction projects.
    pub max_batch: usize,
    /// Whether each batch recomputes the summaries of the sagas it touches (the live
    /// projection), or writes steps alone and leaves the summaries to
    /// [`store::summarize_all`] (a rebuild's first pass over the log, where a saga's records
    /// come in many batches and would be summarized again with each).
    pub summarize: bool,
    /// How long a batch waits, after its first record, for more to join it (0: it takes only
    /// what is already fetched). Each batch is one transaction of five statements whatever its
    /// size, so while records trickle in one at a time, waiting a little writes many in one.
    pub linger: Duration,
}

/// Projects until `shutdown` fires. Database errors are waited out with the batch held (it is
/// written when the database answers again, never skipped).
pub async fn run(
    pool: PgPool,
    kafka: KafkaSettings,
    target: Target,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut projector = Projector::new(pool, &kafka, target).await?;
    while projector.step(DISCOVER_EVERY, &shutdown).await?.is_some() {}
    tracing::info!("the projection stopped");
    Ok(())
}

/// A projection into one set of tables: its consumer, and where it stands in each partition (what
/// its checkpoints say, as of its last committed batch).
pub struct Projector {
    pool: PgPool,
    target: Target,
    consumer: Arc<MonitorConsumer>,
    watermarks: Arc<Watermarks>,
    positions: Checkpoints,
    assigned: HashSet<(String, i32)>,
    last_discovery: Option<Instant>,
    unattributed: UnattributedLog,
    left_out: OncePerMinute,
}

impl Projector {
    /// A projector that resumes from the checkpoints of `target`'s tables.
    pub async fn new(
        pool: PgPool,
        kafka: &KafkaSettings,
        target: Target,
    ) -> anyhow::Result<Projector> {
        let watermarks = Arc::new(Watermarks::default());
        let consumer: Arc<MonitorConsumer> = Arc::new(
            kafka
                .consumer(&[
                    // Names the client to the broker; no group is joined and nothing is committed.
                    ("group.id", "saga-monitor"),
                    ("enable.auto.commit", "false"),
                    ("enable.auto.offset.store", "false"),
                    ("auto.offset.reset", "earliest"),
                    ("fetch.wait.max.ms", "2000"),
                    ("statistics.interval.ms", "5000"),
                ])
                .create_with_context(MonitorContext {
                    watermarks: watermarks.clone(),
                })
                .context("creating the monitor's Kafka consumer")?,
        );
        let positions = store::checkpoints(&pool, &target.schema)
            .await
            .context("reading the projection's checkpoints")?;
        tracing::info!(
            partitions = positions.len(),
            schema = %target.schema,
            "projecting every saga topic from the checkpoints"
        );
        Ok(Projector {
            pool,
            target,
            consumer,
            watermarks,
            positions,
            assigned: HashSet::new(),
            last_discovery: None,
            unattributed: UnattributedLog::default(),
            left_out: OncePerMinute::default(),
        })
    }

    /// Recompute the summaries of the sagas each batch touches from now on.
    pub fn summarize_from_now_on(&mut self) {
        self.target.summarize = true;
    }

    /// The most records one batch takes.
    pub fn max_batch(&self) -> usize {
        self.target.max_batch
    }

    /// The next offset of each partition, as committed.
    pub fn positions(&self) -> &Checkpoints {
        &self.positions
    }

    /// The end of every assigned partition (the offset the next record will get), asked of the
    /// broker now in one request per broker (Tansu 0.6's can trail the log: a lower bound there).
    pub async fn high_watermarks(&self) -> anyhow::Result<Checkpoints> {
        let consumer = self.consumer.clone();
        let mut latest = TopicPartitionList::new();
        for (topic, partition) in &self.assigned {
            // A timestamp of -1 asks for the latest offset.
            latest.add_partition_offset(topic, *partition, Offset::End)?;
        }
        let ends = tokio::task::spawn_blocking(move || {
            consumer.offsets_for_times(latest, Duration::from_secs(30))
        })
        .await?
        .context("reading where each partition ends")?;
        Ok(ends
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(end) => Some(((e.topic().to_owned(), e.partition()), end)),
                _ => None,
            })
            .collect())
    }

    /// Whether the topics have been listed (and every partition assigned) at least once.
    pub fn has_listed_topics(&self) -> bool {
        self.last_discovery.is_some()
    }

    /// Projects what has arrived: waits up to `wait` for a record, then takes what is already
    /// fetched and what arrives within the target's linger (up to its batch size) and writes it
    /// in one transaction. Returns how many
    /// records it projected, or `None` once `shutdown` fired.
    pub async fn step(
        &mut self,
        wait: Duration,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Option<usize>> {
        if self
            .last_discovery
            .is_none_or(|t| t.elapsed() >= DISCOVER_EVERY)
        {
            match discover(&self.consumer, &self.positions, &mut self.assigned).await {
                Ok(()) => self.last_discovery = Some(Instant::now()),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "listing the topics failed; trying again in {DISCOVER_EVERY:?}");
                    if self.last_discovery.is_some() {
                        self.last_discovery = Some(Instant::now());
                    }
                }
            }
            // Every 5 s, as the client's statistics (the watermarks) come every 5 s too.
            export_lag(&self.watermarks, &self.positions);
        }
        let first = tokio::select! {
            _ = shutdown.wait() => return Ok(None),
            _ = tokio::time::sleep(wait) => return Ok(Some(0)),
            message = self.consumer.recv() => message,
        };
        let mut batch = Vec::with_capacity(self.target.max_batch);
        match first {
            Ok(m) => batch.push(Delivery::from_message(&m)),
            Err(e) => {
                tracing::warn!(error = %e, "reading from the broker failed; the client retries");
                return Ok(Some(0));
            }
        }
        // What is already fetched joins the batch, and what arrives within the linger.
        let until = Instant::now() + self.target.linger;
        while batch.len() < self.target.max_batch {
            let next = match self.consumer.recv().now_or_never() {
                Some(next) => next,
                None => {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    tokio::select! {
                        _ = shutdown.wait() => break,
                        _ = tokio::time::sleep(left) => break,
                        next = self.consumer.recv() => next,
                    }
                }
            };
            match next {
                Ok(m) => batch.push(Delivery::from_message(&m)),
                Err(e) => {
                    tracing::warn!(error = %e, "reading from the broker failed; the client retries");
                    break;
                }
            }
        }
        let (steps, reached) = steps_of(&batch, &self.positions, &mut self.unattributed);
        let applied = write(&self.pool, &self.target, &steps, &reached, shutdown).await?;
        for ((topic, partition), next) in reached {
            let position = self.positions.entry((topic, partition)).or_insert(0);
            *position = (*position).max(next);
        }
        let mut projected: HashMap<step::Kind, u64> = HashMap::new();
        for s in &steps {
            *projected.entry(s.kind).or_default() += 1;
        }
        for (_, kind) in &applied.left_out {
            *projected.entry(*kind).or_default() -= 1;
        }
        for (kind, n) in projected {
            metrics::counter!("monitor_steps_projected_total", "kind" => kind.as_str())
                .increment(n);
        }
        if let Some(&(order_id, _)) = applied.left_out.first() {
            let n = applied.left_out.len() as u64;
            metrics::counter!("monitor_steps_left_out_total").increment(n);
            if let Some(steps) = self.left_out.count(n) {
                tracing::warn!(%order_id, steps, max = store::MAX_STEPS_PER_SAGA,
                    "steps of sagas that already had the most a saga keeps were left out (this order's, and those since the last such line); their records stay on the topics");
            }
        }
        Ok(Some(batch.len()))
    }
}

/// The steps of `batch`, and the next offset each of its partitions reached. A record that is
/// no step of any saga is counted and logged (at most once a minute), and its offset still
/// advances; an offset past the one expected is a gap the broker made, logged.
fn steps_of(
    batch: &[Delivery],
    positions: &Checkpoints,
    unattributed: &mut UnattributedLog,
) -> (Vec<step::Step>, Checkpoints) {
    let mut reached: Checkpoints = HashMap::new();
    let mut steps = Vec::with_capacity(batch.len());
    for d in batch {
        let key = (d.topic.clone(), d.partition);
        let expected = reached.get(&key).or_else(|| positions.get(&key)).copied();
        if let Some(expected) = expected
            && d.offset > expected
        {
            metrics::counter!("monitor_offset_gaps_total", "topic" => d.topic.clone()).increment(1);
            tracing::warn!(topic = %d.topic, partition = d.partition, expected, got = d.offset,
                "records were skipped: the broker returned an offset past the next one (expired by retention, or a broker fault)");
        }
        let next = reached.entry(key).or_insert(0);
        *next = (*next).max(d.offset + 1);
        match step::of(d) {
            Ok(s) => steps.push(s),
            Err(why) => unattributed.record(d, &why),
        }
    }
    (steps, reached)
}

/// Writes one batch, waiting out database errors with the batch held; what it changed.
async fn write(
    pool: &PgPool,
    target: &Target,
    steps: &[step::Step],
    reached: &Checkpoints,
    shutdown: &Shutdown,
) -> anyhow::Result<store::Applied> {
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = async {
            let mut tx = pool.begin().await?;
            let applied =
                store::apply(&mut tx, &target.schema, steps, reached, target.summarize).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(applied)
        };
        match attempt.await {
            Ok(applied) => {
                tracing::debug!(
                    steps = applied.new_steps,
                    sagas = applied.sagas,
                    "projected a batch"
                );
                return Ok(applied);
            }
            Err(e) => {
                metrics::counter!("monitor_write_failures_total").increment(1);
                tracing::warn!(error = %e, retry_in = ?delay,
                    "writing the projection failed; the batch is held and written again");
                if shutdown.sleep(delay).await.is_err() {
                    anyhow::bail!("stopped while the projection's database was failing: {e}");
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Assigns every partition of every projected topic not yet assigned, from its checkpoint (or
/// the beginning).
async fn discover(
    consumer: &Arc<MonitorConsumer>,
    positions: &Checkpoints,
    assigned: &mut HashSet<(String, i32)>,
) -> anyhow::Result<()> {
    let listing = consumer.clone();
    let metadata = tokio::task::spawn_blocking(move || {
        listing
            .fetch_metadata(None, Duration::from_secs(10))
            .map(|m| {
                m.topics()
                    .iter()
                    .filter(|t| step::classify(t.name()).is_some())
                    .flat_map(|t| t.partitions().iter().map(|p| (t.name().to_owned(), p.id())))
                    .collect::<Vec<_>>()
            })
    })
    .await?
    .context("listing the broker's topics")?;
    let mut new = TopicPartitionList::new();
    let mut added = Vec::new();
    for (topic, partition) in metadata {
        if assigned.contains(&(topic.clone(), partition)) {
            continue;
        }
        let offset = match positions.get(&(topic.clone(), partition)) {
            Some(&next) => Offset::Offset(next),
            None => Offset::Beginning,
        };
        new.add_partition_offset(&topic, partition, offset)?;
        added.push(format!("{topic}[{partition}]"));
        assigned.insert((topic, partition));
    }
    if !added.is_empty() {
        consumer
            .incremental_assign(&new)
            .context("assigning partitions")?;
        tracing::info!(partitions = ?added, "projecting new partitions");
    }
    Ok(())
}

/// `monitor_projection_lag{topic, partition}`: records between the newest high watermark the
/// client has seen and the projection's position (Tansu 0.6's watermark can trail the log, so
/// the lag can read low there, never below 0).
fn export_lag(watermarks: &Watermarks, positions: &Checkpoints) {
    let marks = watermarks.0.lock().expect("watermarks");
    for ((topic, partition), high) in marks.iter() {
        let at = positions
            .get(&(topic.clone(), *partition))
            .copied()
            .unwrap_or(0);
        metrics::gauge!("monitor_projection_lag", "topic" => topic.clone(), "partition" => partition.to_string())
            .set((high - at).max(0) as f64);
    }
}

/// Counts records that are no step and logs them at most once a minute, so a flood of them
/// cannot flood the log.
#[derive(Default)]
struct UnattributedLog(OncePerMinute);

impl UnattributedLog {
    fn record(&mut self, d: &Delivery, why: &Unattributed) {
        metrics::counter!("monitor_records_unattributed_total", "topic" => d.topic.clone())
            .increment(1);
        if let Some(records) = self.0.count(1) {
            tracing::warn!(topic = %d.topic, partition = d.partition, offset = d.offset,
                records, reason = %why,
                "records that belong to no saga were skipped (this one and those since the last such line)");
        }
    }
}

/// Counts things that are logged at most once a minute.
#[derive(Default)]
struct OncePerMinute {
    since_last: u64,
    last: Option<Instant>,
}

impl OncePerMinute {
    /// Counts `n` more; when a line is due, how many it covers (these and those since the
    /// last line).
    fn count(&mut self, n: u64) -> Option<u64> {
        self.since_last += n;
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.since_last))
    }
}
