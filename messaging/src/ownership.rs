//! Partition ownership: a watchdog that makes sure every partition a consumer group reads has a
//! live reader.
//!
//! Kafka's group coordinator guarantees that, but the local broker (Tansu 0.6) does not: when a
//! member dies and another joins before the dead one's session expires, the dead member can be
//! given partitions, and its expiry triggers no rebalance, so those partitions are read by nobody,
//! for good; a member can also be left with no partitions at all (see the README, "The local
//! broker"). Tansu's DescribeGroups does not report assignments, so the group cannot be checked
//! through the broker. Instead every consumer writes what it reads to the service's own database
//! (`consumer_members`) every [`CHECK_EVERY`], and reads what the others wrote: a partition that
//! no live instance (one that wrote within [`LIVE_WITHIN`]) reads, for [`CHECKS_BEFORE_REBALANCE`]
//! checks in a row, makes the live instance with the smallest id leave the group and join again,
//! which forces a new generation with a fresh assignment. On Kafka every partition of a stable
//! group has a reader within a session timeout, so this only fires when something else is wrong.
//!
//! The liveness written here is the process's, not its progress: a consumer that waits out an
//! outage inside one record still owns its partitions.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use service_kit::shutdown::Shutdown;

/// How often a consumer writes its assignment and checks the group's.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How often the topic's partition count is read again from the broker (it changes only when an
/// operator adds partitions).
const PARTITIONS_EVERY: Duration = Duration::from_secs(60);
/// A member is live while its last write is this recent (three missed writes).
pub const LIVE_WITHIN: Duration = Duration::from_secs(15);
/// Checks in a row with a partition read by no live member before the group is rebalanced.
pub const CHECKS_BEFORE_REBALANCE: u32 = 2;
/// After this many checks in a row any member rebalances, not only the smallest: the smallest
/// may be unable to.
const CHECKS_BEFORE_ANYONE_REBALANCES: u32 = 4;

/// A live member of a group and the partitions of one topic it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub member: Uuid,
    pub partitions: Vec<i32>,
}

/// The partitions `0..partition_count` that no member in `live` reads.
pub fn unowned(partition_count: i32, live: &[Member]) -> Vec<i32> {
    (0..partition_count)
        .filter(|p| !live.iter().any(|m| m.partitions.contains(p)))
        .collect()
}

/// What one check concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every partition has a live reader.
    AllOwned,
    /// Some partitions have none; wait (another check, or another member acts).
    Waiting { unowned: Vec<i32>, checks: u32 },
    /// Some partitions have had no live reader for long enough: this member leaves the group
    /// and joins again.
    Rebalance { unowned: Vec<i32> },
}

/// The state of one consumer's watchdog: how many checks in a row found unread partitions.
#[derive(Debug, Default)]
pub struct Watchdog {
    checks: u32,
}

impl Watchdog {
    /// Decides after a check: `me` is this consumer's member id, `live` every live member
    /// (this one included) with what it reads.
    pub fn decide(&mut self, me: Uuid, partition_count: i32, live: &[Member]) -> Verdict {
        let unowned = unowned(partition_count, live);
        if unowned.is_empty() {
            self.checks = 0;
            return Verdict::AllOwned;
        }
        self.checks += 1;
        let smallest = live.iter().map(|m| m.member).min() == Some(me);
        let due = (smallest && self.checks >= CHECKS_BEFORE_REBALANCE)
            || self.checks >= CHECKS_BEFORE_ANYONE_REBALANCES;
        if due {
            self.checks = 0;
            Verdict::Rebalance { unowned }
        } else {
            Verdict::Waiting {
                unowned,
                checks: self.checks,
            }
        }
    }
}

/// Writes that `member` of `group` reads `partitions` of `topic`, now (the database's clock).
pub async fn record(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
    member: Uuid,
    partitions: &[i32],
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO consumer_members (consumer_group, topic, member, partitions) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (consumer_group, topic, member) DO UPDATE \
         SET partitions = EXCLUDED.partitions, seen_at = clock_timestamp()",
    )
    .bind(group)
    .bind(topic)
    .bind(member)
    .bind(partitions)
    .execute(conn)
    .await?;
    Ok(())
}

/// The members of `group` on `topic` that wrote within [`LIVE_WITHIN`]; rows of members gone
/// for an hour are deleted on the way.
pub async fn live_members(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
) -> sqlx::Result<Vec<Member>> {
    sqlx::query(
        "DELETE FROM consumer_members WHERE consumer_group = $1 AND topic = $2 \
         AND seen_at < clock_timestamp() - interval '1 hour'",
    )
    .bind(group)
    .bind(topic)
    .execute(&mut *conn)
    .await?;
    let rows: Vec<(Uuid, Vec<i32>)> = sqlx::query_as(
        "SELECT member, partitions FROM consumer_members WHERE consumer_group = $1 AND topic = $2 \
         AND seen_at >= clock_timestamp() - make_interval(secs => $3)",
    )
    .bind(group)
    .bind(topic)
    .bind(LIVE_WITHIN.as_secs_f64())
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(member, partitions)| Member { member, partitions })
        .collect())
}

/// Removes `member`'s rows: it stops reading (clean shutdown).
pub async fn leave(conn: &mut PgConnection, group: &str, member: Uuid) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM consumer_members WHERE consumer_group = $1 AND member = $2")
        .bind(group)
        .bind(member)
        .execute(conn)
        .await?;
    Ok(())
}

/// Runs the watchdog of `consumer` (member `me` of `group`) for `topic`, one of the topics of its
/// `subscription`, until `shutdown`; see the module docs.
pub async fn watch<C: ConsumerContext + 'static>(
    consumer: Arc<StreamConsumer<C>>,
    pool: PgPool,
    group: String,
    topic: String,
    subscription: Vec<String>,
    me: Uuid,
    shutdown: Shutdown,
) {
    let mut watchdog = Watchdog::default();
    let mut partitions = PartitionCount::default();
    metrics::counter!("consumer_forced_rebalances_total", "group" => group.clone()).absolute(0);
    loop {
        if shutdown.sleep(CHECK_EVERY).await.is_err() {
            break;
        }
        let checked = check(
            &consumer,
            &pool,
            (&group, &topic),
            me,
            &mut partitions,
            &mut watchdog,
        );
        // A check waits on the broker (the partition count, up to 5 s) and on the database:
        // during an outage it must not hold up the shutdown.
        let checked = tokio::select! {
            checked = checked => checked,
            _ = shutdown.wait() => break,
        };
        let verdict = match checked {
            Ok(verdict) => verdict,
            Err(e) => {
                tracing::debug!(%group, error = %format!("{e:#}"), "could not check the group's partition owners");
                continue;
            }
        };
        let unowned = match &verdict {
            Verdict::AllOwned => 0,
            Verdict::Waiting { unowned, .. } | Verdict::Rebalance { unowned } => unowned.len(),
        };
        metrics::gauge!("consumer_unowned_partitions", "group" => group.clone(), "topic" => topic.clone())
            .set(unowned as f64);
        match verdict {
            Verdict::AllOwned => {}
            Verdict::Waiting { unowned, checks } => {
                tracing::info!(%group, %topic, ?unowned, checks, "partitions without a live reader; checking again")
            }
            Verdict::Rebalance { unowned } => {
                tracing::warn!(%group, %topic, ?unowned,
                    "partitions have had no live reader for several checks (the broker left them \
                     assigned to a dead member or to nobody); leaving and rejoining the group to \
                     force a new assignment");
                metrics::counter!("consumer_forced_rebalances_total", "group" => group.clone())
                    .increment(1);
                consumer.unsubscribe();
                let topics: Vec<&str> = subscription.iter().map(String::as_str).collect();
                if let Err(e) = consumer.subscribe(&topics) {
                    tracing::warn!(%group, error = %e, "could not subscribe again; retrying at the next check");
                }
            }
        }
    }
    if let Ok(mut conn) = pool.acquire().await {
        leave(&mut conn, &group, me).await.ok();
    }
}

/// The partition count of a topic, read from the broker at most every [`PARTITIONS_EVERY`].
#[derive(Default)]
struct PartitionCount(Option<(usize, std::time::Instant)>);

impl PartitionCount {
    async fn get<C: ConsumerContext + 'static>(
        &mut self,
        consumer: &Arc<StreamConsumer<C>>,
        topic: &str,
    ) -> anyhow::Result<usize> {
        if let Some((count, at)) = self.0
            && at.elapsed() < PARTITIONS_EVERY
        {
            return Ok(count);
        }
        let consumer = consumer.clone();
        let topic = topic.to_owned();
        let count = tokio::task::spawn_blocking(move || {
            consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .map(|m| m.topics().first().map_or(0, |t| t.partitions().len()))
        })
        .await??;
        // A topic not created yet has no partitions: asked again at the next check.
        if count > 0 {
            self.0 = Some((count, std::time::Instant::now()));
        }
        Ok(count)
    }
}

async fn check<C: ConsumerContext + 'static>(
    consumer: &Arc<StreamConsumer<C>>,
    pool: &PgPool,
    (group, topic): (&str, &str),
    me: Uuid,
    partitions: &mut PartitionCount,
    watchdog: &mut Watchdog,
) -> anyhow::Result<Verdict> {
    let mine: Vec<i32> = consumer
        .assignment()?
        .elements_for_topic(topic)
        .iter()
        .map(|e| e.partition())
        .collect();
    let partition_count = partitions.get(consumer, topic).await?;
    let mut conn = pool.acquire().await?;
    record(&mut conn, group, topic, me, &mine).await?;
    let live = live_members(&mut conn, group, topic).await?;
    Ok(watchdog.decide(me, i32::try_from(partition_count)?, &live))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(n: u128, partitions: &[i32]) -> Member {
        Member {
            member: Uuid::from_u128(n),
            partitions: partitions.to_vec(),
        }
    }

    #[test]
    fn partitions_read_by_nobody_live_are_unowned() {
        assert_eq!(unowned(3, &[member(1, &[0]), member(2, &[2])]), [1]);
        assert_eq!(unowned(3, &[member(1, &[0, 1, 2])]), Vec::<i32>::new());
        assert_eq!(unowned(2, &[]), [0, 1]);
    }

    #[test]
    fn a_fully_owned_group_needs_nothing_and_resets_the_count() {
        let mut w = Watchdog::default();
        let me = Uuid::from_u128(1);
        assert!(matches!(
            w.decide(me, 3, &[member(1, &[0])]),
            Verdict::Waiting { checks: 1, .. }
        ));
        assert_eq!(w.decide(me, 3, &[member(1, &[0, 1, 2])]), Verdict::AllOwned);
        assert!(matches!(
            w.decide(me, 3, &[member(1, &[0])]),
            Verdict::Waiting { checks: 1, .. }
        ));
    }

    #[test]
    fn the_smallest_live_member_rebalances_after_two_checks() {
        let mut w = Watchdog::default();
        let live = [member(1, &[0]), member(2, &[1])];
        let me = Uuid::from_u128(1);
        assert_eq!(
            w.decide(me, 3, &live),
            Verdict::Waiting {
                unowned: vec![2],
                checks: 1
            }
        );
        assert_eq!(
            w.decide(me, 3, &live),
            Verdict::Rebalance { unowned: vec![2] }
        );
        assert!(
            matches!(w.decide(me, 3, &live), Verdict::Waiting { checks: 1, .. }),
            "counts again after acting"
        );
    }

    #[test]
    fn another_member_rebalances_only_if_the_smallest_has_not_after_four_checks() {
        let mut w = Watchdog::default();
        let live = [member(1, &[0]), member(2, &[1])];
        let me = Uuid::from_u128(2);
        for checks in 1..=3 {
            assert_eq!(
                w.decide(me, 3, &live),
                Verdict::Waiting {
                    unowned: vec![2],
                    checks
                }
            );
        }
        assert_eq!(
            w.decide(me, 3, &live),
            Verdict::Rebalance { unowned: vec![2] }
        );
    }

    #[test]
    fn a_lone_member_with_no_partitions_rebalances() {
        let mut w = Watchdog::default();
        let me = Uuid::from_u128(7);
        let live = [member(7, &[])];
        w.decide(me, 3, &live);
        assert_eq!(
            w.decide(me, 3, &live),
            Verdict::Rebalance {
                unowned: vec![0, 1, 2]
            }
        );
    }
}
