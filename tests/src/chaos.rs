//! The fault-injection run: the whole system (real binaries, a Tansu broker, a Postgres cluster of
//! the run's own) under continuous load (orders of 1-3 lines, cancellations, POSTs repeated with
//! their Idempotency-Key) while faults are injected at random moments; then the load stops, the
//! system is left to go quiet, and the run checks what a user would: every accepted order
//! finished, each the way its customer's requests say it must, `saga audit` has 0 findings, and
//! the dead-letter topics are empty.
//!
//! Faults ([`Fault`]): `kill -9` of the relay (also just after it starts on a backlog, so in the
//! middle of a batch), of each service; the broker stopped (SIGSTOP) for longer than the
//! consumers' session timeout; Postgres stopped in immediate mode and started again; a second
//! instance of each service joining and then leaving or killed; a second relay taking over from
//! a killed leader; the inventory database's connections cut (a proxy); `kill -9` of the saga
//! monitor, which must then show what a monitor never killed shows ([`monitor`]).
//!
//! Settings from the environment: `CHAOS_SECS` (how long faults are injected), `CHAOS_RATE`
//! (orders per second offered), `CHAOS_SEED` (the fault schedule and the orders' shapes; printed
//! at the start so that a failing run can be repeated).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

mod monitor;

use crate::pg_cluster::PgCluster;
use crate::{Proc, Process, Stack, StackOptions};

/// The faults the run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    KillRelay,
    KillRelayMidBatch,
    KillOrderService,
    KillInventoryService,
    PauseBroker,
    RestartPostgres,
    SecondOrderService,
    SecondInventoryService,
    RelayTakeover,
    CutInventoryDatabase,
    KillPaymentService,
    KillGateway,
    GatewayErrors,
    GatewayHangs,
    SecondPaymentService,
    KillMonitor,
}

impl Fault {
    pub const ALL: [Fault; 16] = [
        Fault::KillRelay,
        Fault::KillRelayMidBatch,
        Fault::KillOrderService,
        Fault::KillInventoryService,
        Fault::PauseBroker,
        Fault::RestartPostgres,
        Fault::SecondOrderService,
        Fault::SecondInventoryService,
        Fault::RelayTakeover,
        Fault::CutInventoryDatabase,
        Fault::KillPaymentService,
        Fault::KillGateway,
        Fault::GatewayErrors,
        Fault::GatewayHangs,
        Fault::SecondPaymentService,
        Fault::KillMonitor,
    ];

    /// Whether this fault can hold a saga up for as long as the saga deadline (30 s): a consumer
    /// group waiting out a session timeout and a rebalance, or a database or broker away. A relay
    /// killed or replaced is back within a few seconds, its rows waiting in the outbox; the
    /// saga monitor takes no part in any saga.
    pub fn can_hold_a_saga_up(self) -> bool {
        !matches!(
            self,
            Fault::KillRelay | Fault::KillRelayMidBatch | Fault::RelayTakeover | Fault::KillMonitor
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillRelay => "kill -9 relay",
            Fault::KillRelayMidBatch => "kill -9 relay mid-batch",
            Fault::KillOrderService => "kill -9 order-service",
            Fault::KillInventoryService => "kill -9 inventory-service",
            Fault::PauseBroker => "broker stopped (SIGSTOP) 12-15 s",
            Fault::RestartPostgres => "Postgres immediate stop + start",
            Fault::SecondOrderService => "second order-service joins, leaves or is killed",
            Fault::SecondInventoryService => "second inventory-service joins, leaves or is killed",
            Fault::RelayTakeover => "second relay takes over from killed leader",
            Fault::CutInventoryDatabase => "inventory database connections cut 2-6 s",
            Fault::KillPaymentService => "kill -9 payment-service",
            Fault::KillGateway => "kill -9 payment-gateway (calls wait on its port)",
            Fault::GatewayErrors => "payment-gateway answers 503 for 2-6 s",
            Fault::GatewayHangs => "payment-gateway hangs every call for 3-8 s",
            Fault::SecondPaymentService => "second payment-service joins, leaves or is killed",
            Fault::KillMonitor => "kill -9 saga-monitor",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// How long faults are injected (the load runs as long).
    pub duration: Duration,
    /// Orders offered per second.
    pub rate: f64,
    pub seed: u64,
    /// Pause between two faults, drawn from this range (seconds).
    pub gap_secs: (f64, f64),
}

impl ChaosOptions {
    /// `CHAOS_SECS` (default `default_secs`), `CHAOS_RATE` (default `default_rate`), `CHAOS_SEED`
    /// (default: random).
    pub fn from_env(default_secs: u64, default_rate: f64) -> ChaosOptions {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let secs = var("CHAOS_SECS").map_or(default_secs, |v| {
            v.parse().expect("CHAOS_SECS: a number of seconds")
        });
        ChaosOptions {
            duration: Duration::from_secs(secs),
            rate: var("CHAOS_RATE").map_or(default_rate, |v| {
                v.parse().expect("CHAOS_RATE: orders per second")
            }),
            seed: var("CHAOS_SEED").map_or_else(rand::random, |v| {
                v.parse().expect("CHAOS_SEED: an unsigned number")
            }),
            gap_secs: (1.0, 4.0),
        }
    }
}

/// What a run did and found.
#[derive(Debug)]
pub struct Outcome {
    /// How often each fault happened (a relay kill counts as mid-batch only when it was shown
    /// to land inside a batch).
    pub faults: BTreeMap<Fault, u32>,
    /// Kills meant to land mid-batch that did not (nothing published and not yet deleted).
    pub missed_mid_batch: u32,
    /// Orders the saga deadline cancelled (each must be explained by a fault, or is a
    /// violation).
    pub deadline_cancels: usize,
    /// Final status → orders.
    pub statuses: BTreeMap<String, u64>,
    pub accepted: usize,
    pub replays: u64,
    pub cancels: u64,
    /// The last `saga audit --json` report.
    pub audit: Value,
    /// What the saga monitor and its witness agreed on.
    pub monitor: monitor::Agreed,
    /// Broken promises, each in words; empty when the run passed.
    pub violations: Vec<String>,
    pub load_secs: f64,
    pub quiesce_secs: f64,
}

impl Outcome {
    pub fn summary(&self) -> String {
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(f, n)| format!("  {n:>3} × {}", f.name()))
            .collect();
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect();
        format!(
            "faults injected ({} in {:.0} s of load; relay kills that missed a batch, not \
             counted: {}):\n{}\norders accepted: {} ({}; by a step's timeout during faults: {}); \
             cancel requests: {}; idempotent replays: {}\nquiet after the load: {:.0} s\n\
             saga audit: {} findings, dead letters {}\nsaga monitor: {} sagas and {} steps, \
             the same as a monitor never killed\nviolations: {}",
            self.faults.values().sum::<u32>(),
            self.load_secs,
            self.missed_mid_batch,
            faults.join("\n"),
            self.accepted,
            statuses.join(", "),
            self.deadline_cancels,
            self.cancels,
            self.replays,
            self.quiesce_secs,
            self.audit["findings"].as_array().map_or(0, |f| f.len()),
            self.audit["dead_letters"],
            self.monitor.sagas,
            self.monitor.steps,
            if self.violations.is_empty() {
                "none".to_owned()
            } else {
                self.violations.join("\n  ")
            }
        )
    }
}

/// What the customer's requests say an order must end as.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// No cancel request: CONFIRMED; REJECTED only for an order of a scarce sku; CANCELLED only by
    /// the saga deadline while a fault held the saga up ([`explained_by_faults`]).
    Saga,
    /// A cancel request was accepted (202) or found it already cancelling (200).
    Cancelled,
    /// A cancel request was refused (409): the order was REJECTED.
    Rejected,
}

/// An order the load placed: what it must end as, and which skus it asked for.
#[derive(Debug, Clone)]
struct Accepted {
    expect: Expect,
    skus: Vec<String>,
}

/// One fault, from the moment it was injected until it was undone and the stack was ready again.
#[derive(Debug, Clone)]
pub struct FaultWindow {
    pub fault: Fault,
    pub started: DateTime<Utc>,
    pub ended: DateTime<Utc>,
}

/// How long a fault may still hold sagas up after it was undone: a consumer group takes a
/// session timeout (10 s) and a rebalance or two to read again, with room for a loaded machine.
const RECOVERY: chrono::TimeDelta = chrono::TimeDelta::seconds(45);

/// Whether a fault that can hold a saga up was in progress, or recovering from, between `from`
/// and `to`.
fn explained_by_faults(faults: &[FaultWindow], from: DateTime<Utc>, to: DateTime<Utc>) -> bool {
    faults
        .iter()
        .filter(|f| f.fault.can_hold_a_saga_up())
        .any(|f| f.started <= to && f.ended + RECOVERY >= from)
}

const PLENTY: [&str; 6] = ["P0", "P1", "P2", "P3", "P4", "P5"];
const SCARCE: [&str; 2] = ["S0", "S1"];
const PLENTY_STOCK: i64 = 10_000_000;
const SCARCE_STOCK: i64 = 40;

/// The load: one task per order, offered at a fixed rate (open loop).
struct Load {
    http: reqwest::Client,
    /// order-service URLs the load may use (a second instance is added while it runs).
    targets: RwLock<Vec<String>>,
    rng: Mutex<StdRng>,
    accepted: Mutex<HashMap<Uuid, Accepted>>,
    /// Every customer that placed an order → the order its POST was answered with (none when
    /// the run gave up on it): the orders database must hold exactly these.
    customers: Mutex<HashMap<Uuid, Option<Uuid>>>,
    violations: Mutex<Vec<String>>,
    replays: AtomicU64,
    cancels: AtomicU64,
    retries: AtomicU64,
    /// Requests keep being retried until then.
    give_up_at: Mutex<Option<Instant>>,
}

impl Load {
    fn violation(&self, what: String) {
        eprintln!("chaos: VIOLATION: {what}");
        self.violations.lock().expect("lock").push(what);
    }

    fn target(&self) -> String {
        let targets = self.targets.read().expect("lock");
        let i = self
            .rng
            .lock()
            .expect("lock")
            .random_range(0..targets.len());
        targets[i].clone()
    }

    fn gave_up(&self) -> bool {
        self.give_up_at
            .lock()
            .expect("lock")
            .is_some_and(|t| Instant::now() >= t)
    }

    /// POSTs `body` to `path` of some order-service until it answers something other than a
    /// 5xx or a connection error; `None` when the run gave up retrying.
    async fn post(
        &self,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> Option<(StatusCode, Value)> {
        loop {
            let mut request = self
                .http
                .post(format!("{}{path}", self.target()))
                .timeout(Duration::from_secs(10));
            if let Some(body) = body {
                request = request.json(body);
            }
            if let Some(key) = key {
                request = request.header("Idempotency-Key", key);
            }
            match request.send().await {
                Ok(r) if !r.status().is_server_error() => {
                    let status = r.status();
                    match r.json::<Value>().await {
                        Ok(body) => return Some((status, body)),
                        // The body was cut off (the service was killed while answering): ask
                        // again, with the same Idempotency-Key.
                        Err(_) if status.is_success() => {}
                        Err(_) => return Some((status, Value::Null)),
                    }
                }
                _ => {}
            }
            if self.gave_up() {
                return None;
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// One customer: places an order (retrying with its Idempotency-Key until answered),
    /// sometimes repeats the POST, sometimes cancels.
    async fn customer(self: Arc<Self>) {
        let (customer_id, body, skus, replay, cancel_after) = {
            let mut rng = self.rng.lock().expect("lock");
            let lines = rng.random_range(1..=3);
            let mut skus: Vec<&str> = PLENTY.iter().chain(SCARCE.iter()).copied().collect();
            skus.shuffle(&mut *rng);
            let skus: Vec<String> = skus[..lines].iter().map(|s| s.to_string()).collect();
            let items: Vec<Value> = skus
                .iter()
                .map(|sku| json!({"sku": sku, "quantity": rng.random_range(1..=3)}))
                .collect();
            let customer_id = Uuid::new_v4();
            let body = json!({"customer_id": customer_id, "items": items});
            let replay = rng.random_bool(0.1);
            let cancel_after = rng
                .random_bool(0.2)
                .then(|| Duration::from_millis(rng.random_range(0..3000)));
            (customer_id, body, skus, replay, cancel_after)
        };
        self.customers
            .lock()
            .expect("lock")
            .insert(customer_id, None);
        let key = Uuid::new_v4().to_string();
        let Some((status, answer)) = self.post("/orders", Some(&body), Some(&key)).await else {
            self.violation(format!("POST /orders (key {key}) never answered"));
            return;
        };
        let Some(order_id) = answer["order_id"]
            .as_str()
            .and_then(|s| s.parse::<Uuid>().ok())
        else {
            self.violation(format!("POST /orders answered {status}: {answer}"));
            return;
        };
        if status != StatusCode::CREATED {
            self.violation(format!("POST /orders answered {status} for {order_id}"));
        }
        self.customers
            .lock()
            .expect("lock")
            .insert(customer_id, Some(order_id));
        let accepted = |expect| Accepted {
            expect,
            skus: skus.clone(),
        };
        self.accepted
            .lock()
            .expect("lock")
            .insert(order_id, accepted(Expect::Saga));
        if replay {
            self.replays.fetch_add(1, Ordering::Relaxed);
            match self.post("/orders", Some(&body), Some(&key)).await {
                Some((_, again)) if again["order_id"].as_str() == Some(&order_id.to_string()) => {}
                other => self.violation(format!(
                    "POST /orders repeated with Idempotency-Key {key} answered {other:?}, not order {order_id}"
                )),
            }
        }
        if let Some(after) = cancel_after {
            tokio::time::sleep(after).await;
            self.cancels.fetch_add(1, Ordering::Relaxed);
            let expect = match self
                .post(&format!("/orders/{order_id}/cancel"), None, None)
                .await
            {
                Some((StatusCode::ACCEPTED | StatusCode::OK, _)) => Expect::Cancelled,
                Some((StatusCode::CONFLICT, _)) => Expect::Rejected,
                other => {
                    self.violation(format!("cancelling {order_id} answered {other:?}"));
                    return;
                }
            };
            self.accepted
                .lock()
                .expect("lock")
                .insert(order_id, accepted(expect));
        }
    }
}

/// Runs the load and the faults, lets the system go quiet, and checks everything.
pub async fn run(test: &str, options: ChaosOptions) -> Outcome {
    eprintln!(
        "chaos: seed {} (CHAOS_SEED), {:?} of faults (CHAOS_SECS), {} orders/s (CHAOS_RATE)",
        options.seed, options.duration, options.rate
    );
    let mut rng = StdRng::seed_from_u64(options.seed);
    // Beside the stack's log directory, which the stack empties when it starts.
    let pg_log_dir = crate::target_dir()
        .join("e2e-logs")
        .join(format!("{test}-postgres"));
    let pg_dir = std::env::temp_dir().join(format!("order-saga-chaos-{}", Uuid::new_v4().simple()));
    let cluster = tokio::task::block_in_place(|| PgCluster::start(&pg_dir, &pg_log_dir))
        .expect("starting the run's own Postgres cluster");
    let mut stack = Stack::start_with(
        test,
        StackOptions {
            postgres_url: Some(cluster.url()),
            inventory_db_proxy: true,
            // The product's own step timeouts: orders held up by a fault may be cancelled by
            // them, which is one more path to check (the payment's asks for the refund first).
            saga_deadline: None,
            payment_timeout: None,
            ..StackOptions::default()
        },
    )
    .await;
    for (i, sku) in PLENTY.iter().enumerate() {
        stack.put_product(sku, 100 + i as i64, PLENTY_STOCK).await;
    }
    for sku in SCARCE {
        stack.put_product(sku, 5_000, SCARCE_STOCK).await;
    }
    let witness = monitor::start(&mut stack).await;

    let load = Arc::new(Load {
        http: reqwest::Client::new(),
        targets: RwLock::new(vec![stack.order_url.clone()]),
        rng: Mutex::new(StdRng::seed_from_u64(options.seed ^ 0x5eed)),
        accepted: Mutex::default(),
        customers: Mutex::default(),
        violations: Mutex::default(),
        replays: AtomicU64::new(0),
        cancels: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        give_up_at: Mutex::new(None),
    });
    let stop_load = Arc::new(AtomicBool::new(false));
    let generator = {
        let (load, stop) = (load.clone(), stop_load.clone());
        let interval = Duration::from_secs_f64(1.0 / options.rate);
        tokio::spawn(async move {
            let mut customers = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                customers.spawn(load.clone().customer());
            }
            while customers.join_next().await.is_some() {}
        })
    };

    // Faults: every kind once in a random order, then at random until the duration is over.
    let started = Instant::now();
    let mut faults: BTreeMap<Fault, u32> = BTreeMap::new();
    let mut windows: Vec<FaultWindow> = Vec::new();
    let mut missed_mid_batch = 0;
    let mut first_round = Fault::ALL.to_vec();
    first_round.shuffle(&mut rng);
    let mut instance = 0;
    loop {
        let fault = match first_round.pop() {
            Some(f) => f,
            None if started.elapsed() < options.duration => {
                Fault::ALL[rng.random_range(0..Fault::ALL.len())]
            }
            None => break,
        };
        let gap = rng.random_range(options.gap_secs.0..options.gap_secs.1);
        tokio::time::sleep(Duration::from_secs_f64(gap)).await;
        // A process that died by itself would make the next fault a no-op (a kill -9 of a dead
        // process does nothing) and its absence would pass for the fault's effect.
        let exited = stack.exited();
        if !exited.is_empty() {
            load.violation(format!(
                "{exited:?} exited by itself before fault {instance}; {}",
                stack.where_logs_are()
            ));
            break;
        }
        instance += 1;
        eprintln!(
            "chaos: {:>5.1} s: {} ({} orders accepted so far)",
            started.elapsed().as_secs_f64(),
            fault.name(),
            load.accepted.lock().expect("lock").len()
        );
        let window_start = Utc::now();
        let injected = inject(fault, &mut stack, &cluster, &load, &mut rng, instance).await;
        windows.push(FaultWindow {
            fault,
            started: window_start,
            ended: Utc::now(),
        });
        if injected.happened {
            *faults.entry(fault).or_default() += 1;
        }
        missed_mid_batch += injected.missed_mid_batch;
    }
    let load_secs = started.elapsed().as_secs_f64();
    stop_load.store(true, Ordering::SeqCst);
    *load.give_up_at.lock().expect("lock") = Some(Instant::now() + Duration::from_secs(120));
    eprintln!(
        "chaos: {load_secs:.0} s: faults over, load stopping; waiting for the system to go quiet"
    );
    generator.await.expect("load generator");

    let quiet_started = Instant::now();
    let accepted: HashMap<Uuid, Accepted> = load.accepted.lock().expect("lock").clone();
    let (audit, quiet) = quiesce(&stack, &accepted).await;
    let quiesce_secs = quiet_started.elapsed().as_secs_f64();

    let mut violations = std::mem::take(&mut *load.violations.lock().expect("lock"));
    if let Err(not_quiet) = quiet {
        violations.push(not_quiet);
    }
    for fault in Fault::ALL {
        if !faults.contains_key(&fault) {
            violations.push(format!(
                "the run never injected {:?} ({})",
                fault,
                fault.name()
            ));
        }
    }
    let exited = stack.exited();
    if !exited.is_empty() {
        violations.push(format!("{exited:?} exited by itself during the run"));
    }
    let customers = load.customers.lock().expect("lock").clone();
    one_order_per_customer(&stack, &customers, &mut violations).await;
    let (statuses, deadline_cancels) =
        final_statuses(&stack, &accepted, &windows, &mut violations).await;
    if audit["ok"] != json!(true) {
        violations.push(describe_findings(&audit));
    }
    let ids: Vec<Uuid> = accepted.keys().copied().collect();
    let agreed = monitor::agree(&stack, &witness, &ids)
        .await
        .unwrap_or_else(|difference| {
            violations.push(difference);
            monitor::Agreed::default()
        });
    if audit["dead_letters"]
        .as_object()
        .is_none_or(|groups| groups.values().any(|n| n != &json!(0)))
    {
        violations.push(format!("dead letters: {}", audit["dead_letters"]));
    }
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    for status in statuses.values() {
        *by_status.entry(status.clone()).or_default() += 1;
    }
    let outcome = Outcome {
        faults,
        missed_mid_batch,
        deadline_cancels,
        statuses: by_status,
        accepted: accepted.len(),
        replays: load.replays.load(Ordering::Relaxed),
        cancels: load.cancels.load(Ordering::Relaxed),
        audit,
        monitor: agreed,
        violations,
        load_secs,
        quiesce_secs,
    };
    eprintln!(
        "chaos: seed {}; requests retried {} times\n{}\n{}",
        options.seed,
        load.retries.load(Ordering::Relaxed),
        outcome.summary(),
        stack.where_logs_are()
    );
    drop(stack);
    drop(cluster);
    outcome
}

/// The audit's findings in a few lines: how many of each kind, and the first few.
fn describe_findings(audit: &Value) -> String {
    let Some(findings) = audit["findings"].as_array() else {
        return format!("saga audit could not run: {audit}");
    };
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for f in findings {
        let kind = f["kind"].as_str().unwrap_or("?");
        let group = f["group"]
            .as_str()
            .map(|g| format!(" ({g})"))
            .unwrap_or_default();
        *kinds.entry(format!("{kind}{group}")).or_default() += 1;
    }
    let first: Vec<String> = findings.iter().take(5).map(Value::to_string).collect();
    format!(
        "saga audit found {} findings: {kinds:?}; the first: {}",
        findings.len(),
        first.join(", ")
    )
}

/// Whether a fault happened as meant, and how many relay kills meant for the middle of a batch
/// landed after it first.
struct Injected {
    happened: bool,
    missed_mid_batch: u32,
}

impl Injected {
    const AS_MEANT: Injected = Injected {
        happened: true,
        missed_mid_batch: 0,
    };
}

/// How many times a kill meant to land inside a batch is tried before the fault is given up.
const MID_BATCH_TRIES: u32 = 5;

/// Injects one fault and undoes it.
async fn inject(
    fault: Fault,
    stack: &mut Stack,
    cluster: &PgCluster,
    load: &Load,
    rng: &mut StdRng,
    instance: u32,
) -> Injected {
    match fault {
        Fault::KillRelay => {
            relay(stack).kill9();
            tokio::time::sleep(between(rng, 0.0, 2.0)).await;
            stack.start_process(Process::Relay).await;
        }
        Fault::KillRelayMidBatch => {
            for attempt in 0..MID_BATCH_TRIES {
                // Let a backlog build up (longer at each try), start the relay on it, and kill
                // it once it has read its first batch (`relay_batch_size` counts a batch before
                // it is produced) plus up to 20 ms: while that batch's records are being produced
                // and acknowledged.
                relay(stack).kill9();
                tokio::time::sleep(Duration::from_secs(2 + u64::from(attempt))).await;
                let after = between(rng, 0.0, 0.02);
                stack.launch(Process::Relay);
                let url = stack.relay_metrics_url.clone();
                wait_for_first_batch(stack, &url).await;
                tokio::time::sleep(after).await;
                relay(stack).kill9();
                // Landed inside a batch: rows it published are still in the outbox, so the next
                // relay publishes them again and the inboxes must skip the copies.
                let (orders, inventory) = stack.published_outbox_rows().await;
                let republished = orders + inventory;
                stack.start_process(Process::Relay).await;
                eprintln!(
                    "chaos:          the kill left {republished} published rows in the outbox"
                );
                if republished > 0 {
                    return Injected {
                        happened: true,
                        missed_mid_batch: attempt,
                    };
                }
            }
            return Injected {
                happened: false,
                missed_mid_batch: MID_BATCH_TRIES,
            };
        }
        Fault::KillOrderService => {
            stack.kill(Process::OrderService);
            tokio::time::sleep(between(rng, 0.0, 2.0)).await;
            stack.start_process(Process::OrderService).await;
        }
        Fault::KillInventoryService => {
            let down = between(rng, 0.0, 2.0);
            stack.restart(Process::InventoryService, down).await;
        }
        Fault::PauseBroker => {
            // Longer than the consumers' session timeout (10 s): the broker expires them.
            let down = between(rng, 12.0, 15.0);
            stack.broker.pause();
            tokio::time::sleep(down).await;
            stack.broker.resume();
        }
        Fault::RestartPostgres => {
            let down = between(rng, 0.5, 3.0);
            tokio::task::block_in_place(|| cluster.stop_immediate()).expect("pg_ctl stop");
            tokio::time::sleep(down).await;
            tokio::task::block_in_place(|| cluster.pg_ctl_start()).expect("pg_ctl start");
        }
        Fault::SecondOrderService => {
            let (up, kill) = (between(rng, 3.0, 8.0), rng.random_bool(0.5));
            let name = format!("order-service-{instance}");
            let (mut second, listener) = stack.spawn_instance(Process::OrderService, &name).await;
            let url = crate::url_of(&listener);
            load.targets.write().expect("lock").push(url.clone());
            tokio::time::sleep(up).await;
            load.targets.write().expect("lock").retain(|t| t != &url);
            end_second_instance(load, &mut second, kill);
        }
        Fault::SecondInventoryService => {
            let (up, kill) = (between(rng, 3.0, 8.0), rng.random_bool(0.5));
            let name = format!("inventory-service-{instance}");
            let (mut second, _listener) =
                stack.spawn_instance(Process::InventoryService, &name).await;
            tokio::time::sleep(up).await;
            end_second_instance(load, &mut second, kill);
        }
        Fault::RelayTakeover => {
            let up = between(rng, 1.0, 3.0);
            let (mut standby, listener) = stack
                .spawn_instance(Process::Relay, &format!("outbox-relay-{instance}"))
                .await;
            tokio::time::sleep(up).await;
            if !standby.is_running() {
                load.violation(format!(
                    "the standby relay {} exited by itself",
                    standby.name
                ));
            }
            stack.replace(Process::Relay, standby, listener);
        }
        Fault::CutInventoryDatabase => {
            let down = between(rng, 2.0, 6.0);
            let proxy = stack.inventory_proxy.as_ref().expect("inventory proxy");
            proxy.take_down();
            tokio::time::sleep(down).await;
            proxy.bring_up();
        }
        Fault::KillPaymentService => {
            let down = between(rng, 0.0, 2.0);
            stack.restart(Process::PaymentService, down).await;
        }
        Fault::KillGateway => {
            let down = between(rng, 0.0, 3.0);
            stack.restart(Process::Gateway, down).await;
        }
        Fault::GatewayErrors | Fault::GatewayHangs => {
            let (mode, down) = match fault {
                Fault::GatewayErrors => ("error", between(rng, 2.0, 6.0)),
                _ => ("hang", between(rng, 3.0, 8.0)),
            };
            set_gateway_mode(stack, load, mode).await;
            tokio::time::sleep(down).await;
            set_gateway_mode(stack, load, "ok").await;
        }
        Fault::KillMonitor => {
            stack.kill(Process::Monitor);
            tokio::time::sleep(between(rng, 0.0, 2.0)).await;
            stack.start_process(Process::Monitor).await;
        }
        Fault::SecondPaymentService => {
            let (up, kill) = (between(rng, 3.0, 8.0), rng.random_bool(0.5));
            let name = format!("payment-service-{instance}");
            let (mut second, _listener) =
                stack.spawn_instance(Process::PaymentService, &name).await;
            tokio::time::sleep(up).await;
            end_second_instance(load, &mut second, kill);
        }
    }
    Injected::AS_MEANT
}

/// Sets the stand-in processor's fault mode (`PUT /faults`); a knob it refuses is a violation.
async fn set_gateway_mode(stack: &Stack, load: &Load, mode: &str) {
    let answer = stack
        .http
        .put(format!("{}/faults", stack.gateway_url))
        .json(&json!({ "mode": mode }))
        .send()
        .await;
    if !answer.is_ok_and(|a| a.status().is_success()) {
        load.violation(format!("the processor did not take fault mode {mode}"));
    }
}

/// Ends a second service instance: `kill -9`, or SIGTERM and a clean exit. Either way it must
/// still have been running, and a SIGTERM must end it promptly.
fn end_second_instance(load: &Load, second: &mut Proc, kill: bool) {
    if !second.is_running() {
        load.violation(format!("{} exited by itself", second.name));
    } else if kill {
        second.kill9();
    } else if !second.stop_within(Duration::from_secs(15)) {
        load.violation(format!(
            "{} did not exit within 15 s of SIGTERM",
            second.name
        ));
    }
}

fn between(rng: &mut StdRng, from_secs: f64, to_secs: f64) -> Duration {
    Duration::from_secs_f64(rng.random_range(from_secs..to_secs))
}

fn relay(stack: &mut Stack) -> &mut Proc {
    stack.own_proc(Process::Relay)
}

/// Polls the relay's `<url>/metrics` every 5 ms until it has read a batch (at most 60 s).
async fn wait_for_first_batch(stack: &Stack, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = stack.http.get(format!("{url}/metrics")).send().await
            && let Ok(text) = r.text().await
            && crate::sum_metric(&text, "relay_batch_size_count", &[]) > 0.0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "{url} read no batch within 60 s; {}",
        stack.where_logs_are()
    );
}

/// How long the system gets to finish every saga after the load stops: the retry schedule's
/// last delay (60 s) and a rebalance or two, with room for a loaded machine.
const QUIET_WITHIN: Duration = Duration::from_secs(300);

/// How long the audit may still have findings once every order is terminal and the outboxes
/// are empty (records the consumers have not applied yet, a retry's last delay of 60 s among
/// them).
const SETTLED_FINDINGS_WITHIN: Duration = Duration::from_secs(90);

/// Waits until every accepted order is terminal and both outboxes are empty, then until
/// `saga audit` (grace 0, outbox age 0) has nothing to say, or [`QUIET_WITHIN`] is over. Returns
/// the last audit report, and an error saying what was still moving if the system never went
/// quiet.
async fn quiesce(stack: &Stack, accepted: &HashMap<Uuid, Accepted>) -> (Value, Result<(), String>) {
    let ids: Vec<Uuid> = accepted.keys().copied().collect();
    let orders = stack.orders_pool().await;
    let inventory = stack.inventory_pool().await;
    let payments = stack.payments_pool().await;
    let deadline = Instant::now() + QUIET_WITHIN;
    let mut last_report = Instant::now();
    // Once settled, findings that are still there after this are not records in flight.
    let mut settled_since: Option<Instant> = None;
    loop {
        // A count that could not be read (-1) is not quiet.
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM orders WHERE order_id = ANY($1) \
             AND status NOT IN ('CONFIRMED', 'REJECTED', 'CANCELLED')",
        )
        .bind(&ids)
        .fetch_one(&orders)
        .await
        .unwrap_or(-1);
        let mut outboxes = Vec::new();
        for pool in [&orders, &inventory, &payments] {
            outboxes.push(
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
                    .fetch_one(pool)
                    .await
                    .unwrap_or(-1),
            );
        }
        let outbox: i64 = outboxes.iter().sum();
        let settled = open == 0 && outboxes.iter().all(|n| *n == 0);
        if settled {
            settled_since.get_or_insert_with(Instant::now);
        } else {
            settled_since = None;
        }
        let settled_for = settled_since.map_or(Duration::ZERO, |since| since.elapsed());
        let out_of_time = Instant::now() >= deadline || settled_for >= SETTLED_FINDINGS_WITHIN;
        if settled || out_of_time {
            let (status, report, stderr) = stack.audit("0s", &["--outbox-age", "0s"]);
            let report = if status == 2 || report.is_null() {
                json!({"ok": false, "findings": [format!("saga audit failed: {stderr}")]})
            } else {
                report
            };
            if settled && report["ok"] == json!(true) {
                return (report, Ok(()));
            }
            if out_of_time {
                let what = if settled {
                    format!(
                        "the audit still had findings {SETTLED_FINDINGS_WITHIN:?} after every order \
                         was terminal and both outboxes empty"
                    )
                } else {
                    format!(
                        "{open} orders not terminal and {outbox} outbox rows {QUIET_WITHIN:?} after \
                         the load's end"
                    )
                };
                return (report, Err(format!("the system did not go quiet: {what}")));
            }
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            eprintln!("chaos: going quiet: {open} orders not terminal, {outbox} outbox rows");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(if settled { 3 } else { 1 })).await;
    }
}

/// Every customer's POSTs (one Idempotency-Key, retried after 5xx, cut-off answers and
/// connection errors, sometimes replayed on purpose) made exactly one order, the one it was
/// answered with: a retry that created a second order is a violation.
async fn one_order_per_customer(
    stack: &Stack,
    customers: &HashMap<Uuid, Option<Uuid>>,
    violations: &mut Vec<String>,
) {
    let pool = stack.orders_pool().await;
    let rows: Vec<(Uuid, Vec<Uuid>)> =
        sqlx::query_as("SELECT customer_id, array_agg(order_id) FROM orders GROUP BY customer_id")
            .fetch_all(&pool)
            .await
            .expect("reading the orders per customer");
    pool.close().await;
    let stored: HashMap<Uuid, Vec<Uuid>> = rows.into_iter().collect();
    let mut wrong = Vec::new();
    for (customer, orders) in &stored {
        match customers.get(customer) {
            None => wrong.push(format!(
                "orders {orders:?} of customer {customer}, who never asked"
            )),
            Some(_) if orders.len() > 1 => wrong.push(format!(
                "customer {customer} has {} orders: {orders:?}",
                orders.len()
            )),
            Some(Some(answered)) if orders[0] != *answered => wrong.push(format!(
                "customer {customer} was answered order {answered}, but order {} was stored",
                orders[0]
            )),
            Some(_) => {}
        }
    }
    for (customer, answered) in customers {
        if let Some(order) = answered
            && !stored.contains_key(customer)
        {
            wrong.push(format!(
                "customer {customer} was answered order {order}, which was not stored"
            ));
        }
    }
    if !wrong.is_empty() {
        violations.push(format!(
            "{} customers do not have exactly the one order they were answered with ({} orders stored for {} customers), for example {:?}",
            wrong.len(),
            stored.values().map(Vec::len).sum::<usize>(),
            customers.len(),
            &wrong[..wrong.len().min(10)]
        ));
    }
}

/// The final status of every accepted order; adds a violation for each one missing, not
/// terminal, or not what its customer's requests and the run's faults explain. Returns the
/// statuses and how many orders the saga deadline cancelled.
async fn final_statuses(
    stack: &Stack,
    accepted: &HashMap<Uuid, Accepted>,
    faults: &[FaultWindow],
    violations: &mut Vec<String>,
) -> (HashMap<Uuid, String>, usize) {
    let ids: Vec<Uuid> = accepted.keys().copied().collect();
    let pool = stack.orders_pool().await;
    type Row = (Uuid, String, Option<String>, DateTime<Utc>, Value);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT order_id, status, reason, created_at, history FROM order_status_view \
         WHERE order_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&pool)
    .await
    .expect("reading the orders");
    pool.close().await;
    let rows: HashMap<Uuid, Row> = rows.into_iter().map(|r| (r.0, r)).collect();
    let mut wrong = Vec::new();
    let mut deadline_cancels = 0;
    for (id, order) in accepted {
        let Some((_, status, reason, created_at, history)) = rows.get(id) else {
            wrong.push(format!("{id}: accepted but not stored"));
            continue;
        };
        let reason = reason.as_deref().unwrap_or("");
        let problem = match (order.expect, status.as_str()) {
            (Expect::Saga, "CONFIRMED") | (Expect::Cancelled, "CANCELLED") => None,
            (Expect::Saga | Expect::Rejected, "REJECTED") => rejection_problem(&order.skus, reason),
            (Expect::Saga, "CANCELLED") => {
                deadline_cancels += 1;
                // A step's timeout: the reservation's cancels at once, the payment's asks for
                // the refund first.
                let cancelling_at =
                    status_at(history, "REFUNDING").or_else(|| status_at(history, "CANCELLING"));
                if !reason.contains("DEADLINE_EXCEEDED") && !reason.contains("PAYMENT_TIMEOUT") {
                    Some(format!(
                        "CANCELLED, nobody asked, and the reason is {reason:?}"
                    ))
                } else if !cancelling_at
                    .is_some_and(|at| explained_by_faults(faults, *created_at, at))
                {
                    Some(format!(
                        "cancelled by the saga deadline (created {created_at}, cancelling at \
                         {cancelling_at:?}) while no fault was in progress or recovering"
                    ))
                } else {
                    None
                }
            }
            (expect, status) => Some(format!("expected {expect:?}, is {status}")),
        };
        if let Some(problem) = problem {
            wrong.push(format!("{id}: {problem}"));
        }
    }
    if !wrong.is_empty() {
        violations.push(format!(
            "{} accepted orders did not end as expected, for example {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(10)]
        ));
    }
    let statuses = rows.into_iter().map(|(id, row)| (id, row.1)).collect();
    (statuses, deadline_cancels)
}

/// What is wrong with a rejection: only stock of a scarce sku can run out, and the reason must
/// say so (the plentiful skus never run short).
fn rejection_problem(skus: &[String], reason: &str) -> Option<String> {
    let scarce_short = SCARCE.iter().any(|sku| {
        skus.iter().any(|s| s == sku)
            && reason.contains(&format!("insufficient stock for sku {sku} "))
    });
    let plenty_named = PLENTY
        .iter()
        .any(|sku| reason.contains(&format!("sku {sku}")));
    (!scarce_short || plenty_named).then(|| {
        format!(
            "REJECTED for skus {skus:?} with reason {reason:?}: only a scarce sku can run short"
        )
    })
}

/// When an order's history says it entered `status`.
fn status_at(history: &Value, status: &str) -> Option<DateTime<Utc>> {
    history
        .as_array()?
        .iter()
        .find(|h| h["status"] == status)
        .and_then(|h| h["at"].as_str()?.parse().ok())
}
