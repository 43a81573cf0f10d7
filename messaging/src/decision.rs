//! The whole park / retry / dead-letter decision for one message, as two pure functions that
//! every path of the consumer runtime asks: the main consumer, the retry consumers, and the
//! drain of a released key's parked messages.
//!
//! - [`gate`], before anything is applied: given where the message was read ([`Stage`]), its
//!   key's parking head (read under the key's lock) and the message's id, may it be applied, must
//!   it wait behind its key, or is it a copy that must not act at all?
//! - [`after`], once the handler has answered ([`Attempt`]): where the message goes next (nowhere,
//!   a retry topic, the DLQ) and whether its key's retry chain has ended, so the parked messages
//!   are applied and the key released.
//!
//! The rule that keeps a key's events in order: **only the key's current head ends its chain**.
//! A retry-topic copy of a message that no longer heads its key (a second copy, sent again after
//! a crash inside the offset-commit window, whose chain another copy already ended) is a stray:
//! it is never applied and never releases the key, even while a newer head is still retrying.

use uuid::Uuid;

/// Where a message was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// A subscribed topic.
    Main,
    /// A retry topic: a copy sent there when its key was parked with it as the head.
    Retry,
    /// The parking table, while draining a released key (the key's lock held, oldest first).
    Parked,
}

/// What the key's parking says about a message before it is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Apply it now.
    Apply,
    /// Its key waits for another message's retry: store it behind that head.
    Park,
    /// It is its key's head, read again from a subscribed topic (the consumer stopped after
    /// sending it to a retry topic but before its offset was committed): send it on to a retry
    /// topic again; it stays the head.
    ResumeRetry,
    /// A retry copy of a message that does not head its key: do not apply it, do not touch the
    /// key; skipped if it was applied or still waits in the parking table ([`Attempt::Parked`]),
    /// dead-lettered otherwise ([`Attempt::Withheld`]).
    Stray,
}

/// Before applying `message` read at `stage`, given its key's parking head (`None`: the key is
/// not parked). `message` is `None` when the record carries no readable message id.
pub fn gate(stage: Stage, head: Option<Uuid>, message: Option<Uuid>) -> Gate {
    let is_head = head.is_some() && head == message;
    match stage {
        Stage::Main if head.is_none() => Gate::Apply,
        Stage::Main if is_head => Gate::ResumeRetry,
        Stage::Main => Gate::Park,
        Stage::Retry if is_head => Gate::Apply,
        Stage::Retry => Gate::Stray,
        // The drain takes the oldest parked message under the key's lock: it is next in line.
        Stage::Parked => Gate::Apply,
    }
}

/// What became of a message this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Applied now (its inbox row written in the same transaction).
    Applied,
    /// Its inbox row was already there: applied before.
    Duplicate,
    /// The handler said "not yet" (retryable).
    NotYet,
    /// The handler said it can never apply.
    Permanent,
    /// The record cannot be decoded at all.
    Undecodable,
    /// Not tried: a stray copy ([`Gate::Stray`]) that was never applied.
    Withheld,
    /// Stored behind its key ([`Gate::Park`]), or, for a stray, found still waiting there.
    Parked,
}

/// Where a message goes after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Done with it: its offset may be committed.
    Done,
    /// To retry topic number `attempt` (1-based), its key parked with it as the head.
    Retry { attempt: usize },
    /// To the dead-letter topic, after `attempts` attempts.
    DeadLetter { class: Class, attempts: usize },
}

/// The `dlq-error-class` of a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// It can never apply.
    Permanent,
    /// Still "not yet" after its last retry (or a stray copy whose chain ended without it).
    Retryable,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Permanent => "permanent",
            Class::Retryable => "retryable",
        }
    }
}

/// The decision after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Action {
    pub route: Route,
    /// The message headed its key and its chain has ended (applied or dead-lettered): apply the
    /// key's parked messages and release it.
    pub release_key: bool,
}

/// After `attempt` at a message read at `stage` that passed `gate`. `attempts_so_far` is the
/// message's `retry-attempt` header, read only in the retry stage (a record on a subscribed
/// topic or in the parking table starts from 0 whatever it claims); `retry_stages` is how many
/// retry topics are configured.
pub fn after(
    stage: Stage,
    gate: Gate,
    attempt: Attempt,
    attempts_so_far: usize,
    retry_stages: usize,
) -> Action {
    let so_far = if stage == Stage::Retry {
        attempts_so_far
    } else {
        0
    };
    let this_attempt = so_far.saturating_add(1);
    // Only the head of a key, read from a retry topic, ends the key's chain.
    let heads_key = stage == Stage::Retry && gate == Gate::Apply;
    let (route, chain_ends) = match attempt {
        Attempt::Applied | Attempt::Duplicate | Attempt::Parked => (Route::Done, true),
        Attempt::NotYet if so_far < retry_stages => (
            Route::Retry {
                attempt: this_attempt,
            },
            false,
        ),
        Attempt::NotYet | Attempt::Withheld => (
            Route::DeadLetter {
                class: Class::Retryable,
                attempts: this_attempt,
            },
            true,
        ),
        Attempt::Permanent | Attempt::Undecodable => (
            Route::DeadLetter {
                class: Class::Permanent,
                attempts: this_attempt,
            },
            true,
        ),
    };
    Action {
        route,
        release_key: heads_key && chain_ends,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAGES: [Stage; 3] = [Stage::Main, Stage::Retry, Stage::Parked];
    const ATTEMPTS: [Attempt; 7] = [
        Attempt::Applied,
        Attempt::Duplicate,
        Attempt::NotYet,
        Attempt::Permanent,
        Attempt::Undecodable,
        Attempt::Withheld,
        Attempt::Parked,
    ];

    fn ids() -> (Uuid, Uuid) {
        (Uuid::from_u128(1), Uuid::from_u128(2))
    }

    #[test]
    fn gate_main_applies_free_keys_parks_behind_another_head_and_resumes_its_own() {
        let (me, other) = ids();
        assert_eq!(gate(Stage::Main, None, Some(me)), Gate::Apply);
        assert_eq!(gate(Stage::Main, Some(other), Some(me)), Gate::Park);
        assert_eq!(gate(Stage::Main, Some(me), Some(me)), Gate::ResumeRetry);
        assert_eq!(gate(Stage::Main, Some(other), None), Gate::Park);
    }

    #[test]
    fn gate_retry_applies_only_the_current_head() {
        let (me, other) = ids();
        assert_eq!(gate(Stage::Retry, Some(me), Some(me)), Gate::Apply);
        // A newer head is retrying: this copy of an earlier head must not act.
        assert_eq!(gate(Stage::Retry, Some(other), Some(me)), Gate::Stray);
        // The chain already ended through another copy.
        assert_eq!(gate(Stage::Retry, None, Some(me)), Gate::Stray);
        assert_eq!(gate(Stage::Retry, Some(other), None), Gate::Stray);
        assert_eq!(gate(Stage::Retry, None, None), Gate::Stray);
    }

    #[test]
    fn gate_parked_messages_are_next_in_line() {
        let (me, other) = ids();
        for head in [None, Some(me), Some(other)] {
            assert_eq!(gate(Stage::Parked, head, Some(me)), Gate::Apply);
        }
    }

    #[test]
    fn only_the_heads_end_of_chain_releases_its_key() {
        for stage in STAGES {
            for g in [Gate::Apply, Gate::Park, Gate::ResumeRetry, Gate::Stray] {
                for attempt in ATTEMPTS {
                    for so_far in 0..4 {
                        let action = after(stage, g, attempt, so_far, 3);
                        let chain_ended = !matches!(action.route, Route::Retry { .. });
                        let expected = stage == Stage::Retry && g == Gate::Apply && chain_ended;
                        assert_eq!(
                            action.release_key, expected,
                            "{stage:?} {g:?} {attempt:?} after {so_far}: {action:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_stray_copy_never_releases_and_is_skipped_or_dead_lettered() {
        assert_eq!(
            after(Stage::Retry, Gate::Stray, Attempt::Duplicate, 1, 3),
            Action {
                route: Route::Done,
                release_key: false
            }
        );
        assert_eq!(
            after(Stage::Retry, Gate::Stray, Attempt::Parked, 1, 3),
            Action {
                route: Route::Done,
                release_key: false
            }
        );
        assert_eq!(
            after(Stage::Retry, Gate::Stray, Attempt::Withheld, 1, 3),
            Action {
                route: Route::DeadLetter {
                    class: Class::Retryable,
                    attempts: 2
                },
                release_key: false
            }
        );
    }

    #[test]
    fn not_yet_goes_through_every_retry_topic_then_to_the_dlq() {
        for stage in STAGES {
            let first = after(stage, Gate::Apply, Attempt::NotYet, 0, 3);
            assert_eq!(first.route, Route::Retry { attempt: 1 }, "{stage:?}");
        }
        assert_eq!(
            after(Stage::Retry, Gate::Apply, Attempt::NotYet, 2, 3).route,
            Route::Retry { attempt: 3 }
        );
        assert_eq!(
            after(Stage::Retry, Gate::Apply, Attempt::NotYet, 3, 3),
            Action {
                route: Route::DeadLetter {
                    class: Class::Retryable,
                    attempts: 4
                },
                release_key: true
            }
        );
        // No retry topics configured: straight to the DLQ.
        assert_eq!(
            after(Stage::Main, Gate::Apply, Attempt::NotYet, 0, 0).route,
            Route::DeadLetter {
                class: Class::Retryable,
                attempts: 1
            }
        );
    }

    #[test]
    fn retry_headers_count_only_in_the_retry_stage() {
        // A record on a subscribed topic claiming to be on its last attempt still gets every retry.
        for stage in [Stage::Main, Stage::Parked] {
            assert_eq!(
                after(stage, Gate::Apply, Attempt::NotYet, 99, 3).route,
                Route::Retry { attempt: 1 }
            );
            assert_eq!(
                after(stage, Gate::Apply, Attempt::Permanent, usize::MAX, 3).route,
                Route::DeadLetter {
                    class: Class::Permanent,
                    attempts: 1
                }
            );
        }
        // A forged huge count in a retry topic cannot overflow.
        assert_eq!(
            after(Stage::Retry, Gate::Apply, Attempt::Permanent, usize::MAX, 3).route,
            Route::DeadLetter {
                class: Class::Permanent,
                attempts: usize::MAX
            }
        );
    }

    #[test]
    fn permanent_and_undecodable_are_dead_lettered_at_once() {
        for stage in STAGES {
            for attempt in [Attempt::Permanent, Attempt::Undecodable] {
                assert!(
                    matches!(
                        after(stage, Gate::Apply, attempt, 0, 3).route,
                        Route::DeadLetter {
                            class: Class::Permanent,
                            ..
                        }
                    ),
                    "{stage:?} {attempt:?}"
                );
            }
        }
    }

    #[test]
    fn applied_duplicate_and_parked_are_done() {
        for stage in STAGES {
            for attempt in [Attempt::Applied, Attempt::Duplicate, Attempt::Parked] {
                assert_eq!(
                    after(stage, Gate::Apply, attempt, 0, 3).route,
                    Route::Done,
                    "{stage:?} {attempt:?}"
                );
            }
        }
    }
}
