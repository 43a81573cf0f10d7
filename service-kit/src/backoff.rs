//! Exponential backoff with jitter: the one schedule every retry loop of the system uses (the
//! consumer runtime waiting out an outage, the relay reconnecting, the job runner rescheduling a
//! failed job), each with its own first and longest delay.

use std::time::Duration;

use rand::Rng;

/// A delay that doubles from `first` with every attempt, up to `max`, with full jitter on its
/// upper half (so that many waiters who failed together do not retry together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// For what is not the work's fault (a database or broker away for now): 100 ms to 10 s.
    pub const TRANSIENT: Backoff = Backoff {
        first: Duration::from_millis(100),
        max: Duration::from_secs(10),
    };

    /// The delay before attempt `attempt + 1`, after `attempt` (≥ 1) failures: between half and
    /// all of `first × 2^(attempt-1)`, capped at `max`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self
            .first
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max);
        let half = base / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }
}

/// [`Backoff::TRANSIENT`]'s delay after `attempt` failures.
pub fn transient(attempt: u32) -> Duration {
    Backoff::TRANSIENT.delay(attempt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_doubles_from_the_first_and_is_capped() {
        let b = Backoff {
            first: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        for attempt in 1..40 {
            let delay = b.delay(attempt);
            let base = Duration::from_secs(1 << (attempt - 1).min(16)).min(b.max);
            assert!(
                delay >= base / 2 && delay <= base,
                "attempt {attempt}: {delay:?} not within [{:?}, {base:?}]",
                base / 2
            );
        }
        assert!(transient(1) <= Duration::from_millis(100));
        assert!(transient(4) >= Duration::from_millis(400));
        assert!(transient(40) <= Duration::from_secs(10));
    }
}
