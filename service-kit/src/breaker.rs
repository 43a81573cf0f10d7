//! A circuit breaker for the calls to one outside service (the payment gateway): when enough of
//! the recent calls fail, it stops calling for a break, so that a service in trouble is not
//! buried under retries and the callers wait instead of each spending a timeout.
//!
//! - **Closed**: calls go through; their outcomes fill a sliding window (`window` long, in ten
//!   buckets). When the window holds at least `minimum_calls` and the failed share reaches
//!   `failure_ratio`, the breaker opens. The minimum is sized for this system's volume (a few
//!   calls a second in a demo, hundreds under load), not for a 100-call minimum that a quiet
//!   system would never reach.
//! - **Open**: every call is rejected at once with the time left of the break. The first break is
//!   `first_break`; each reopening without a close in between doubles it, up to `max_break`.
//! - **Half-open**: after the break, at most `probes` calls are let through at once (taken under
//!   one lock, so a crowd of callers cannot slip more through); the rest are rejected. When
//!   `probes` of them succeed, the breaker closes; when one fails, it opens again.
//!
//! Every change of state starts a new *generation*; a call's outcome counts only in the
//! generation it was let through in (a slow call from before an opening cannot close or open the
//! breaker later). A let-through call whose outcome is never recorded (its future dropped)
//! counts as nothing and gives its probe back.
//!
//! What counts as a failure is the caller's to say ([`Outcome::of_call`] for [`outbound`] calls:
//! no answer, a timeout, 5xx and 429 count; another 4xx is an answer, so it does not, and a
//! business "no" such as a declined card is a success here). A rejection is not a failure of the
//! work either: a job that meets an open breaker waits at least [`Rejected::retry_after`] and
//! spends no attempt ([`crate::jobs::JobError::Later`]).
//!
//! [`outbound`]: crate::outbound

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::outbound::CallError;

/// The time, injectable so that tests can move it.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Instant;
}

/// The machine's monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// How a breaker decides; see the module's documentation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub failure_ratio: f64,
    pub minimum_calls: u32,
    pub window: Duration,
    pub first_break: Duration,
    pub max_break: Duration,
    pub probes: u32,
}

impl Default for Settings {
    /// Half of at least 5 calls in 10 s fail → a break of 5 s, then 10, 20, 40, 60 s; 2 probes.
    fn default() -> Self {
        Settings {
            failure_ratio: 0.5,
            minimum_calls: 5,
            window: Duration::from_secs(10),
            first_break: Duration::from_secs(5),
            max_break: Duration::from_secs(60),
            probes: 2,
        }
    }
}

/// Settings a breaker cannot work with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("circuit breaker settings: {0}")]
pub struct InvalidSettings(&'static str);

impl Settings {
    pub fn validate(&self) -> Result<(), InvalidSettings> {
        let fail = |why| Err(InvalidSettings(why));
        if !(self.failure_ratio > 0.0 && self.failure_ratio <= 1.0) {
            return fail("the failure ratio must be above 0 and at most 1");
        }
        if self.minimum_calls == 0 {
            return fail("the minimum number of calls must be at least 1");
        }
        if self.probes == 0 {
            return fail("half-open needs at least one probe");
        }
        if self.window < Duration::from_millis(10) {
            return fail("the window must be at least 10 ms");
        }
        if self.first_break.is_zero() || self.first_break > self.max_break {
            return fail("the first break must be above zero and at most the longest break");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    const ALL: [State; 3] = [State::Closed, State::Open, State::HalfOpen];

    pub fn label(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

/// What a let-through call came to, as far as the breaker is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The service answered as a healthy service does (a business "no" included).
    Success,
    /// The service is in trouble: no answer, a timeout, an error of its own, "too many".
    Failure,
}

impl Outcome {
    /// The outcome of an [`outbound`](crate::outbound) call: a transient error (no answer, a
    /// timeout, a 5xx, an answer that is not what the API promises) and a "not now" (429, 503
    /// with `Retry-After`) are failures; a refusal (another 4xx) is an answer of a working
    /// service, so it is a success here.
    pub fn of_call<T>(result: &Result<T, CallError>) -> Outcome {
        match result {
            Ok(_) | Err(CallError::Permanent { .. }) => Outcome::Success,
            Err(CallError::Transient { .. } | CallError::Retryable { .. }) => Outcome::Failure,
        }
    }
}

/// A call the breaker did not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the circuit breaker {breaker} is {} (again in {retry_after:?})", state.label())]
pub struct Rejected {
    pub breaker: &'static str,
    pub state: State,
    /// How long a caller should wait before trying again: the time left of the break, or, in
    /// half-open, a moment for the probes to come back.
    pub retry_after: Duration,
}

/// How long a call rejected in half-open waits: the probes' answers are due soon.
const HALF_OPEN_WAIT: Duration = Duration::from_millis(500);
const BUCKETS: u32 = 10;

/// A circuit breaker; clones share one state.
#[derive(Clone)]
pub struct Breaker {
    shared: Arc<Shared>,
}

struct Shared {
    name: &'static str,
    settings: Settings,
    clock: Box<dyn Clock>,
    inner: Mutex<Inner>,
}

struct Inner {
    state: State,
    generation: u64,
    /// Closed: the recent outcomes.
    window: Window,
    /// Open: when the break ends.
    open_until: Instant,
    /// The break the next opening gets.
    next_break: Duration,
    /// Half-open: probes let through and not yet come back, and probes that succeeded.
    probes_out: u32,
    probes_passed: u32,
}

impl Breaker {
    /// A closed breaker named `name` (the `breaker` label of its metrics) on the system clock.
    pub fn new(name: &'static str, settings: Settings) -> Result<Breaker, InvalidSettings> {
        Breaker::with_clock(name, settings, SystemClock)
    }

    pub fn with_clock(
        name: &'static str,
        settings: Settings,
        clock: impl Clock,
    ) -> Result<Breaker, InvalidSettings> {
        settings.validate()?;
        let now = clock.now();
        let breaker = Breaker {
            shared: Arc::new(Shared {
                name,
                settings,
                clock: Box::new(clock),
                inner: Mutex::new(Inner {
                    state: State::Closed,
                    generation: 0,
                    window: Window::new(settings.window),
                    open_until: now,
                    next_break: settings.first_break,
                    probes_out: 0,
                    probes_passed: 0,
                }),
            }),
        };
        publish_state(name, State::Closed);
        Ok(breaker)
    }

    pub fn name(&self) -> &'static str {
        self.shared.name
    }

    /// Sets `circuit_breaker_state` to the state now. A breaker made before the metrics recorder
    /// was installed (at a service's start) exports its state only once this is called; a
    /// service calls it from a task that runs after start-up.
    pub fn publish_state(&self) {
        publish_state(self.shared.name, self.state());
    }

    /// The state now (an open breaker whose break is over reads as half-open).
    pub fn state(&self) -> State {
        let mut inner = self.shared.lock();
        self.shared.end_break_if_over(&mut inner);
        inner.state
    }

    /// Lets one call through, or says why not and for how long.
    pub fn try_acquire(&self) -> Result<Permit, Rejected> {
        let shared = &self.shared;
        let mut inner = shared.lock();
        shared.end_break_if_over(&mut inner);
        let now = shared.clock.now();
        let rejected = |state, retry_after| {
            metrics::counter!("circuit_breaker_calls_total", "breaker" => shared.name, "outcome" => "rejected").increment(1);
            Err(Rejected {
                breaker: shared.name,
                state,
                retry_after,
            })
        };
        let probe = match inner.state {
            State::Closed => false,
            State::Open => return rejected(State::Open, inner.open_until - now),
            State::HalfOpen if inner.probes_out + inner.probes_passed < shared.settings.probes => {
                inner.probes_out += 1;
                true
            }
            State::HalfOpen => return rejected(State::HalfOpen, HALF_OPEN_WAIT),
        };
        Ok(Permit {
            shared: Arc::clone(shared),
            generation: inner.generation,
            probe,
            started: now,
            recorded: false,
        })
    }

    /// Runs `call` if the breaker lets it through, and records what `judge` makes of its result.
    pub async fn call<T, F>(
        &self,
        call: F,
        judge: impl FnOnce(&T) -> Outcome,
    ) -> Result<T, Rejected>
    where
        F: Future<Output = T>,
    {
        let permit = self.try_acquire()?;
        let result = call.await;
        permit.record(judge(&result));
        Ok(result)
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state stays consistent under every step taken with the lock held, so a panic
        // elsewhere while it was held leaves nothing half-done.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn end_break_if_over(&self, inner: &mut Inner) {
        if inner.state == State::Open && self.clock.now() >= inner.open_until {
            self.transition(inner, State::HalfOpen);
        }
    }

    fn transition(&self, inner: &mut Inner, to: State) {
        let from = inner.state;
        let now = self.clock.now();
        inner.state = to;
        inner.generation += 1;
        inner.probes_out = 0;
        inner.probes_passed = 0;
        match to {
            State::Open => {
                inner.open_until = now + inner.next_break;
                tracing::warn!(
                    breaker = self.name,
                    from = from.label(),
                    break_secs = inner.next_break.as_secs_f64(),
                    "circuit breaker opened: calls are rejected until the break is over"
                );
                inner.next_break = (inner.next_break * 2).min(self.settings.max_break);
            }
            State::HalfOpen => {
                tracing::info!(
                    breaker = self.name,
                    probes = self.settings.probes,
                    "circuit breaker half-open: letting probes through"
                );
            }
            State::Closed => {
                inner.window.clear();
                inner.next_break = self.settings.first_break;
                tracing::info!(
                    breaker = self.name,
                    "circuit breaker closed: calls go through again"
                );
            }
        }
        metrics::counter!("circuit_breaker_transitions_total", "breaker" => self.name,
            "from" => from.label(), "to" => to.label())
        .increment(1);
        publish_state(self.name, to);
    }

    fn record(&self, generation: u64, probe: bool, outcome: Option<Outcome>, took: Duration) {
        let mut inner = self.lock();
        let current = generation == inner.generation;
        if current && probe {
            inner.probes_out -= 1;
        }
        let label = match outcome {
            Some(Outcome::Success) if current => "success",
            Some(Outcome::Failure) if current => "failure",
            _ => "ignored",
        };
        metrics::counter!("circuit_breaker_calls_total", "breaker" => self.name, "outcome" => label)
            .increment(1);
        if outcome.is_some() {
            metrics::histogram!("circuit_breaker_call_duration_seconds", "breaker" => self.name)
                .record(took.as_secs_f64());
        }
        let Some(outcome) = outcome.filter(|_| current) else {
            return;
        };
        let now = self.clock.now();
        match (inner.state, outcome) {
            (State::Closed, outcome) => {
                inner.window.add(now, outcome == Outcome::Failure);
                let (calls, failures) = inner.window.totals(now);
                if calls >= self.settings.minimum_calls
                    && f64::from(failures) >= self.settings.failure_ratio * f64::from(calls)
                {
                    self.transition(&mut inner, State::Open);
                }
            }
            (State::HalfOpen, Outcome::Success) => {
                inner.probes_passed += 1;
                if inner.probes_passed >= self.settings.probes {
                    self.transition(&mut inner, State::Closed);
                }
            }
            (State::HalfOpen, Outcome::Failure) => self.transition(&mut inner, State::Open),
            // Every opening starts a new generation: no permit of an open breaker's is current.
            (State::Open, _) => {}
        }
    }
}

/// One state series per state, 1 for the state the breaker is in and 0 for the others.
fn publish_state(name: &'static str, now: State) {
    for state in State::ALL {
        metrics::gauge!("circuit_breaker_state", "breaker" => name, "state" => state.label())
            .set(if state == now { 1.0 } else { 0.0 });
    }
}

/// A call let through. Record its outcome; dropped unrecorded, it counts as nothing.
#[must_use = "a let-through call's outcome must be recorded"]
pub struct Permit {
    shared: Arc<Shared>,
    generation: u64,
    probe: bool,
    started: Instant,
    recorded: bool,
}

impl Permit {
    pub fn record(mut self, outcome: Outcome) {
        self.recorded = true;
        let took = self
            .shared
            .clock
            .now()
            .saturating_duration_since(self.started);
        self.shared
            .record(self.generation, self.probe, Some(outcome), took);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.recorded {
            self.shared
                .record(self.generation, self.probe, None, Duration::ZERO);
        }
    }
}

/// Outcomes of the last `window`, in buckets of a tenth of it.
struct Window {
    bucket: Duration,
    window: Duration,
    /// (start, calls, failures), oldest first.
    buckets: VecDeque<(Instant, u32, u32)>,
}

impl Window {
    fn new(window: Duration) -> Window {
        Window {
            bucket: window / BUCKETS,
            window,
            buckets: VecDeque::with_capacity(BUCKETS as usize + 1),
        }
    }

    fn clear(&mut self) {
        self.buckets.clear();
    }

    fn add(&mut self, now: Instant, failed: bool) {
        self.forget_before(now);
        match self.buckets.back_mut() {
            Some((start, calls, failures)) if now < *start + self.bucket => {
                *calls = calls.saturating_add(1);
                *failures = failures.saturating_add(u32::from(failed));
            }
            _ => self.buckets.push_back((now, 1, u32::from(failed))),
        }
    }

    /// Calls and failures within the window.
    fn totals(&mut self, now: Instant) -> (u32, u32) {
        self.forget_before(now);
        self.buckets
            .iter()
            .fold((0, 0), |(c, f), (_, calls, failures)| {
                (c.saturating_add(*calls), f.saturating_add(*failures))
            })
    }

    fn forget_before(&mut self, now: Instant) {
        while self
            .buckets
            .front()
            .is_some_and(|(start, _, _)| *start + self.bucket + self.window <= now)
        {
            self.buckets.pop_front();
        }
    }
}

/// Describes the breakers' metrics to the Prometheus recorder.
pub fn describe_metrics() {
    metrics::describe_gauge!(
        "circuit_breaker_state",
        "1 for the state each circuit breaker is in (closed, open, half_open), 0 for the others"
    );
    metrics::describe_counter!(
        "circuit_breaker_transitions_total",
        "Changes of a circuit breaker's state, by from and to"
    );
    metrics::describe_counter!(
        "circuit_breaker_calls_total",
        "Calls through a circuit breaker by outcome: success, failure, rejected (not let through), ignored (counted in no generation: recorded after a change of state, or never recorded)"
    );
    metrics::describe_histogram!(
        "circuit_breaker_call_duration_seconds",
        metrics::Unit::Seconds,
        "How long the calls a circuit breaker let through took"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A clock that moves only when told.
    #[derive(Clone)]
    struct ManualClock {
        start: Instant,
        offset: Arc<Mutex<Duration>>,
    }

    impl ManualClock {
        fn new() -> ManualClock {
            ManualClock {
                start: Instant::now(),
                offset: Arc::default(),
            }
        }

        fn advance(&self, by: Duration) {
            *self.offset.lock().unwrap() += by;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            self.start + *self.offset.lock().unwrap()
        }
    }

    fn settings() -> Settings {
        Settings {
            failure_ratio: 0.5,
            minimum_calls: 4,
            window: Duration::from_secs(10),
            first_break: Duration::from_secs(5),
            max_break: Duration::from_secs(12),
            probes: 2,
        }
    }

    fn breaker() -> (Breaker, ManualClock) {
        let clock = ManualClock::new();
        let breaker = Breaker::with_clock("test", settings(), clock.clone()).unwrap();
        (breaker, clock)
    }

    fn calls(breaker: &Breaker, outcomes: &[Outcome]) {
        for outcome in outcomes {
            breaker.try_acquire().expect("let through").record(*outcome);
        }
    }

    use Outcome::{Failure, Success};

    /// Opens the breaker (four failures) and returns the break it got.
    fn open(breaker: &Breaker) -> Duration {
        calls(breaker, &[Failure; 4]);
        assert_eq!(breaker.state(), State::Open);
        breaker.try_acquire().err().expect("rejected").retry_after
    }

    #[test]
    fn stays_closed_below_the_minimum_of_calls_even_when_all_fail() {
        let (breaker, _) = breaker();
        calls(&breaker, &[Failure; 3]);
        assert_eq!(breaker.state(), State::Closed);
        calls(&breaker, &[Failure]);
        assert_eq!(breaker.state(), State::Open);
    }

    #[test]
    fn opens_at_the_failure_ratio_and_not_below_it() {
        let (breaker, _) = breaker();
        calls(&breaker, &[Success, Success, Success, Failure, Failure]);
        assert_eq!(breaker.state(), State::Closed, "2 of 5 is under half");
        calls(&breaker, &[Failure]);
        assert_eq!(breaker.state(), State::Open, "3 of 6 is half");
        let rejected = breaker
            .try_acquire()
            .err()
            .expect("an open breaker rejects");
        assert_eq!(rejected.state, State::Open);
        assert_eq!(rejected.retry_after, Duration::from_secs(5));
    }

    #[test]
    fn forgets_failures_older_than_the_window() {
        let (breaker, clock) = breaker();
        calls(&breaker, &[Failure; 3]);
        clock.advance(Duration::from_secs(11));
        calls(&breaker, &[Failure, Success, Success]);
        assert_eq!(
            breaker.state(),
            State::Closed,
            "the three old failures are gone"
        );
    }

    #[test]
    fn rejects_for_the_rest_of_the_break_then_lets_the_probes_through_and_no_more() {
        let (breaker, clock) = breaker();
        assert_eq!(open(&breaker), Duration::from_secs(5));
        clock.advance(Duration::from_secs(3));
        let rejected = breaker.try_acquire().err().unwrap();
        assert_eq!(rejected.retry_after, Duration::from_secs(2));
        clock.advance(Duration::from_secs(2));
        assert_eq!(breaker.state(), State::HalfOpen);
        let first = breaker.try_acquire().expect("first probe");
        let second = breaker.try_acquire().expect("second probe");
        let third = breaker.try_acquire().err().expect("no third probe");
        assert_eq!(third.state, State::HalfOpen);
        first.record(Success);
        assert_eq!(breaker.state(), State::HalfOpen, "one success of two");
        assert!(
            breaker.try_acquire().is_err(),
            "a probe that came back is not given again"
        );
        second.record(Success);
        assert_eq!(breaker.state(), State::Closed);
        calls(&breaker, &[Success; 10]);
    }

    #[test]
    fn a_failed_probe_reopens_with_a_break_that_doubles_up_to_the_longest() {
        let (breaker, clock) = breaker();
        let mut expected = [5, 10, 12, 12].map(Duration::from_secs).into_iter();
        let mut got = open(&breaker);
        loop {
            assert_eq!(got, expected.next().unwrap());
            if expected.len() == 0 {
                break;
            }
            clock.advance(got);
            breaker.try_acquire().expect("a probe").record(Failure);
            assert_eq!(breaker.state(), State::Open);
            got = breaker.try_acquire().err().unwrap().retry_after;
        }
        // Closing resets the break.
        clock.advance(got);
        calls(&breaker, &[Success, Success]);
        assert_eq!(breaker.state(), State::Closed);
        assert_eq!(open(&breaker), Duration::from_secs(5));
    }

    #[test]
    fn an_outcome_from_an_older_generation_is_ignored() {
        let (breaker, clock) = breaker();
        let slow = breaker.try_acquire().unwrap();
        let slow_failure = breaker.try_acquire().unwrap();
        open(&breaker);
        clock.advance(Duration::from_secs(5));
        let probe = breaker.try_acquire().unwrap();
        // Calls let through while closed come back during half-open: neither closes nor opens.
        slow.record(Success);
        slow_failure.record(Failure);
        assert_eq!(breaker.state(), State::HalfOpen);
        probe.record(Success);
        calls(&breaker, &[Success]);
        assert_eq!(breaker.state(), State::Closed);
    }

    #[test]
    fn a_probe_dropped_unrecorded_gives_its_place_back() {
        let (breaker, clock) = breaker();
        open(&breaker);
        clock.advance(Duration::from_secs(5));
        let a = breaker.try_acquire().unwrap();
        let b = breaker.try_acquire().unwrap();
        assert!(breaker.try_acquire().is_err());
        drop(a);
        assert_eq!(breaker.state(), State::HalfOpen);
        let c = breaker.try_acquire().expect("the dropped probe's place");
        b.record(Success);
        c.record(Success);
        assert_eq!(breaker.state(), State::Closed);
    }

    #[test]
    fn sorts_outbound_errors() {
        let transient: Result<(), _> = Err(CallError::Transient {
            reason: "timed out".into(),
            outcome_unknown: true,
        });
        let busy: Result<(), _> = Err(CallError::Retryable {
            reason: "429".into(),
            after: Duration::from_secs(1),
        });
        let refused: Result<(), _> = Err(CallError::Permanent {
            status: 422,
            reason: "bad card number".into(),
        });
        assert_eq!(Outcome::of_call(&transient), Failure);
        assert_eq!(Outcome::of_call(&busy), Failure);
        assert_eq!(Outcome::of_call(&refused), Success);
        assert_eq!(Outcome::of_call(&Ok::<_, CallError>(())), Success);
    }

    #[test]
    fn refuses_settings_it_cannot_work_with() {
        for broken in [
            Settings {
                failure_ratio: 0.0,
                ..settings()
            },
            Settings {
                failure_ratio: f64::NAN,
                ..settings()
            },
            Settings {
                probes: 0,
                ..settings()
            },
            Settings {
                minimum_calls: 0,
                ..settings()
            },
            Settings {
                first_break: Duration::from_secs(20),
                ..settings()
            },
        ] {
            assert!(
                Breaker::new("test", broken).is_err(),
                "{broken:?} was accepted"
            );
        }
        Settings::default().validate().unwrap();
    }

    /// 100 callers at once on a half-open breaker: the service sees the probes and no more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_hundred_concurrent_calls_in_half_open_reach_the_service_at_most_the_probe_count() {
        let (breaker, clock) = breaker();
        open(&breaker);
        clock.advance(Duration::from_secs(5));
        let (hits, rejected) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        // The service answers only once every caller has been let through or rejected, so the
        // probes are out while all the others ask.
        let answer = Arc::new(tokio::sync::Semaphore::new(0));
        let callers: Vec<_> = (0..100)
            .map(|_| {
                let (breaker, hits, rejected, answer) = (
                    breaker.clone(),
                    hits.clone(),
                    rejected.clone(),
                    answer.clone(),
                );
                tokio::spawn(async move {
                    let service = async {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let _ = answer.acquire().await;
                    };
                    if breaker.call(service, |_| Success).await.is_err() {
                        rejected.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        let all_asked = async {
            while hits.load(Ordering::SeqCst) + rejected.load(Ordering::SeqCst) < 100 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), all_asked)
            .await
            .expect("every caller asked");
        assert_eq!(
            hits.load(Ordering::SeqCst),
            2,
            "the service saw the probes only"
        );
        assert_eq!(rejected.load(Ordering::SeqCst), 98);
        answer.add_permits(100);
        for caller in callers {
            caller.await.unwrap();
        }
        assert_eq!(breaker.state(), State::Closed, "two probes passed");
    }
}
