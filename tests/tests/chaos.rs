//! The fault-injection run ([`e2e::chaos`]): load and every kind of fault at random moments, then
//! every accepted order must have finished as its customer's requests say, `saga audit` must find
//! nothing, and the dead-letter topics must be empty.
//!
//! In the suite it injects every fault at least once (about 75 s of load at 20 orders/s). A longer run:
//! `scripts/chaos.sh 600` (README, "Fault-injection runs").

use e2e::chaos::{self, ChaosOptions};

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn every_order_finishes_and_every_event_is_applied_once_under_faults() {
        e2e::requires_own_stack("kills, pauses and restarts every process and Postgres");
        let outcome = chaos::run("chaos", ChaosOptions::from_env(75, 20.0)).await;
        assert!(
            outcome.accepted >= 100,
            "only {} orders were accepted: the load did not run",
            outcome.accepted
        );
        assert!(
            outcome.violations.is_empty(),
            "promises broken under faults:\n{}",
            outcome.summary()
        );
    }
}
