//! Offset gaps: records a consumer should have received and did not. The saga's topics are neither
//! compacted nor transactional, so the offsets of a partition are consecutive: a consumer that
//! reads offset N + k right after N (k > 1), or whose first record of a partition it was just
//! given lies beyond the group's committed offset, has lost records. On Kafka that happens when
//! retention deletes records before they are read; on the local Tansu broker it happens when a
//! fetch starts inside a multi-record batch (see the README, "The local broker"). Either way it is
//! counted (`consumer_offset_gaps_total`) and logged with the missing range, and `saga audit`
//! lists the records that were never applied.

use std::collections::HashMap;
use std::ops::RangeInclusive;

/// The next offset expected on each partition a consumer reads.
#[derive(Debug, Default)]
pub struct GapTracker {
    next: HashMap<(String, i32), i64>,
}

impl GapTracker {
    /// Whether the tracker knows where `partition` of `topic` should continue.
    pub fn knows(&self, topic: &str, partition: i32) -> bool {
        self.next.contains_key(&(topic.to_owned(), partition))
    }

    /// Sets where `partition` of `topic` should continue: the group's committed offset, when the
    /// consumer has just been given the partition.
    pub fn expect(&mut self, topic: &str, partition: i32, next_offset: i64) {
        self.next.insert((topic.to_owned(), partition), next_offset);
    }

    /// Records that `offset` was received; returns the offsets skipped before it, if any.
    /// An offset at or below one already seen (a redelivery after a rewind) is no gap.
    pub fn observe(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Option<RangeInclusive<i64>> {
        let next = self
            .next
            .entry((topic.to_owned(), partition))
            .or_insert(offset);
        let gap = (offset > *next).then(|| *next..=offset - 1);
        *next = (*next).max(offset + 1);
        gap
    }

    /// Forgets every partition: after a rebalance the consumer continues from committed offsets,
    /// which it learns again.
    pub fn forget_all(&mut self) {
        self.next.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_offsets_are_no_gap() {
        let mut t = GapTracker::default();
        assert_eq!(
            t.observe("t", 0, 7),
            None,
            "the first record sets the place"
        );
        assert_eq!(t.observe("t", 0, 8), None);
        assert_eq!(t.observe("t", 1, 3), None, "partitions are tracked apart");
    }

    #[test]
    fn a_jump_is_a_gap_with_the_missing_range() {
        let mut t = GapTracker::default();
        t.observe("t", 0, 1);
        assert_eq!(t.observe("t", 0, 5), Some(2..=4));
        assert_eq!(t.observe("t", 0, 6), None);
    }

    #[test]
    fn a_first_record_beyond_the_committed_offset_is_a_gap() {
        let mut t = GapTracker::default();
        assert!(!t.knows("t", 2));
        t.expect("t", 2, 10);
        assert!(t.knows("t", 2));
        assert_eq!(t.observe("t", 2, 13), Some(10..=12));
        t.expect("t", 3, 10);
        assert_eq!(t.observe("t", 3, 10), None);
    }

    #[test]
    fn a_redelivery_of_older_offsets_is_no_gap_and_does_not_move_back() {
        let mut t = GapTracker::default();
        t.observe("t", 0, 5);
        assert_eq!(t.observe("t", 0, 3), None);
        assert_eq!(t.observe("t", 0, 6), None);
        t.forget_all();
        assert!(!t.knows("t", 0));
    }
}
