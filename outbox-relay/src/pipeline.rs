//! What one source's publisher knows between reads (pure, no I/O): where the next read of the
//! outbox starts, how many rows are with the producer, and how large the next read may be.
//!
//! # Reading ahead without skipping a row
//! While earlier rows are still being acknowledged, the next read must not return them again,
//! and must not skip a row either. The cursor keeps the id range the reads since the last reset
//! have covered ([`Cursor::range`]): every row in it that will ever commit has been read, or its
//! id is a **hole** (a read did not get it: its transaction had not committed yet, had rolled
//! back, or the row is of an aggregate type without a topic). The next read asks for the rows
//! below the range (commits that came late), the holes, and the rows above the range, and takes
//! the lowest ids of all three. So a late commit is published by the first read that can see it,
//! before any higher id of that read; and per order, rows are written one transaction after
//! another, so no row of an order can be visible while an earlier row of the same order is not.
//! That is the same guarantee as reading the oldest rows of the table every time, which is what
//! the relay did before it read ahead, without reading the rows in flight again.
//!
//! When nothing is with the producer any more (the usual state of an idle relay), the cursor is
//! reset and the next read is the plain "oldest rows in the table". A failure, or more holes
//! than [`MAX_HOLES`], **stalls** the pipeline: nothing more is read until everything sent has
//! been acknowledged, and then the next read starts from the oldest row, so a row that was read
//! but not sent is read again before anything after it.

use crate::outbox::Cursor;

/// Most holes tracked; beyond, the pipeline stalls and starts again from the oldest row.
pub const MAX_HOLES: usize = 1_000;

/// The smallest read.
pub const MIN_BATCH: i64 = 16;

#[derive(Debug)]
pub struct Pipeline {
    cursor: Cursor,
    in_flight: usize,
    limit: i64,
    max_batch: i64,
    max_in_flight: usize,
    stalled: bool,
}

impl Pipeline {
    pub fn new(max_batch: i64, max_in_flight: usize) -> Pipeline {
        let max_batch = max_batch.max(1);
        Pipeline {
            cursor: Cursor::default(),
            in_flight: 0,
            limit: MIN_BATCH.min(max_batch),
            max_batch,
            max_in_flight: max_in_flight.max(1),
            stalled: false,
        }
    }

    /// Where the next read starts.
    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// Rows sent and not yet acknowledged (or failed).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The most rows the next read may return, or `None` when no read may happen now (stalled,
    /// or the producer holds `max_in_flight` rows already).
    pub fn next_limit(&self) -> Option<i64> {
        let room = self.max_in_flight.saturating_sub(self.in_flight) as i64;
        (!self.stalled && room > 0).then(|| self.limit.min(room))
    }

    /// A read with `limit` returned the rows `ids` (in id order), all of which are now sent.
    /// Widens the covered range to them, records the holes that revealed, and adapts the next
    /// read's size: doubled after a full read (a backlog), else twice what came back.
    pub fn read(&mut self, ids: &[i64], limit: i64) {
        self.in_flight += ids.len();
        self.limit = if ids.len() as i64 >= limit {
            (limit * 2).min(self.max_batch)
        } else {
            (ids.len() as i64 * 2).clamp(MIN_BATCH.min(self.max_batch), self.max_batch)
        };
        let (Some(&lowest), Some(&highest)) = (ids.first(), ids.last()) else {
            return;
        };
        self.cursor.holes.retain(|h| ids.binary_search(h).is_err());
        // The ids newly covered: the whole span of a first read; else what lies below or above
        // the range. Every id there that did not come back is a hole.
        let newly: Vec<(i64, i64)> = match self.cursor.range {
            None => vec![(lowest, highest)],
            Some((below, above)) => [(lowest, below - 1), (above + 1, highest)]
                .into_iter()
                .filter(|(from, to)| from <= to)
                .collect(),
        };
        let missing: i64 = newly
            .iter()
            .map(|(from, to)| {
                let returned = ids.iter().filter(|id| (*from..=*to).contains(*id)).count();
                to - from + 1 - returned as i64
            })
            .sum();
        if self.cursor.holes.len() as i64 + missing > MAX_HOLES as i64 {
            self.stall();
            return;
        }
        for (from, to) in newly {
            let mut returned = ids.iter().filter(|id| (from..=to).contains(*id)).peekable();
            for id in from..=to {
                if returned.peek() == Some(&&id) {
                    returned.next();
                } else {
                    self.cursor.holes.push(id);
                }
            }
        }
        self.cursor.holes.sort_unstable();
        self.cursor.range = Some(match self.cursor.range {
            None => (lowest, highest),
            Some((below, above)) => (below.min(lowest), above.max(highest)),
        });
    }

    /// `n` rows of a read were not sent after all (the producer refused them): they will be read
    /// again once everything sent has been acknowledged.
    pub fn unsent(&mut self, n: usize) {
        self.in_flight = self.in_flight.saturating_sub(n);
        self.stall();
        self.reset_when_empty();
    }

    /// `n` rows sent are done with: acknowledged and deleted, or failed (then call
    /// [`Pipeline::stall`] too).
    pub fn done(&mut self, n: usize) {
        self.in_flight = self.in_flight.saturating_sub(n);
        self.reset_when_empty();
    }

    /// Reads nothing more until everything sent is done; then starts from the oldest row.
    pub fn stall(&mut self) {
        self.stalled = true;
        self.reset_when_empty();
    }

    fn reset_when_empty(&mut self) {
        if self.in_flight == 0 {
            self.cursor = Cursor::default();
            self.stalled = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_pipeline_reads_from_the_oldest_row() {
        let mut p = Pipeline::new(500, 2000);
        assert_eq!(p.next_limit(), Some(MIN_BATCH));
        p.read(&[10, 11, 12], 16);
        assert_eq!(p.cursor().range, Some((10, 12)));
        assert!(p.cursor().holes.is_empty());
        p.done(3);
        assert_eq!(p.cursor(), &Cursor::default());
    }

    #[test]
    fn a_read_ahead_starts_above_the_rows_in_flight_and_asks_for_the_holes() {
        let mut p = Pipeline::new(500, 2000);
        p.read(&[1, 2, 3, 4], 4);
        // 6 and 8 were not committed when this read ran.
        p.read(&[5, 7, 9], 8);
        assert_eq!(p.cursor().range, Some((1, 9)));
        assert_eq!(p.cursor().holes, vec![6, 8]);
        assert_eq!(p.in_flight(), 7);
        // 8 commits: the next read returns it (before 10, 11) and it is no longer a hole.
        p.read(&[8, 10, 11], 16);
        assert_eq!(p.cursor().holes, vec![6]);
        assert_eq!(p.cursor().range, Some((1, 11)));
        // Everything acknowledged: start again from the oldest row, where 6 is found if it
        // ever commits.
        p.done(10);
        assert_eq!(p.cursor(), &Cursor::default());
    }

    #[test]
    fn a_read_of_holes_only_keeps_the_cursor() {
        let mut p = Pipeline::new(500, 2000);
        p.read(&[1, 3], 16);
        p.read(&[2], 16);
        assert_eq!(p.cursor().range, Some((1, 3)));
        assert!(p.cursor().holes.is_empty());
    }

    #[test]
    fn a_commit_that_came_late_below_the_range_widens_it_downwards() {
        let mut p = Pipeline::new(500, 2000);
        // 3 was not committed when the first read found 5..7 as the oldest rows.
        p.read(&[5, 6, 7], 16);
        // It commits, and so does its order's next row, 9: 3 comes first.
        p.read(&[3, 8, 9], 16);
        assert_eq!(p.cursor().range, Some((3, 9)));
        assert_eq!(p.cursor().holes, vec![4]);
    }

    #[test]
    fn reads_grow_with_a_backlog_and_shrink_without() {
        let mut p = Pipeline::new(500, 100_000);
        let mut next_id = 1;
        let mut read = |p: &mut Pipeline, n: i64| {
            let ids: Vec<i64> = (next_id..next_id + n).collect();
            next_id += n;
            let limit = p.next_limit().unwrap();
            p.read(&ids, limit);
        };
        for _ in 0..10 {
            let limit = p.next_limit().unwrap();
            read(&mut p, limit);
        }
        assert_eq!(p.next_limit(), Some(500));
        read(&mut p, 3);
        assert_eq!(p.next_limit(), Some(MIN_BATCH));
    }

    #[test]
    fn no_read_beyond_the_rows_in_flight_allowed() {
        let mut p = Pipeline::new(500, 40);
        p.read(&(1..=32).collect::<Vec<_>>(), 32);
        assert_eq!(p.next_limit(), Some(8));
        p.read(&(33..=40).collect::<Vec<_>>(), 8);
        assert_eq!(p.next_limit(), None);
        p.done(10);
        assert_eq!(p.next_limit(), Some(10));
    }

    #[test]
    fn rows_not_sent_stall_the_pipeline_until_everything_sent_is_done_then_it_rereads() {
        let mut p = Pipeline::new(500, 2000);
        p.read(&[1, 2, 3, 4], 16);
        p.read(&[5, 6, 7, 8], 16);
        // 7 and 8 could not be handed to the producer.
        p.unsent(2);
        assert_eq!(p.next_limit(), None);
        p.done(5);
        assert_eq!(p.next_limit(), None, "6 is still in flight");
        p.done(1);
        assert_eq!(p.cursor(), &Cursor::default(), "7 and 8 are read again");
        assert!(p.next_limit().is_some());
    }

    #[test]
    fn too_many_holes_stall_instead_of_growing() {
        let mut p = Pipeline::new(500, 2000);
        p.read(&[1], 16);
        p.read(&[5_000], 16);
        assert_eq!(p.in_flight(), 2);
        assert_eq!(p.next_limit(), None);
        assert!(p.cursor().holes.len() <= MAX_HOLES);
        p.done(2);
        assert_eq!(p.cursor(), &Cursor::default());
    }
}
