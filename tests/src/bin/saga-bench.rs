//! `saga-bench`: in one run on one machine, measures the machine's own ceilings and the system
//! against them, prints the ratios and writes a JSON report. Nothing is asserted.
//!
//! - ceilings: an idempotent `acks=all` producer sending outbox-sized records straight to the
//!   broker, one record per batch and batched as the relay's producer batches; Postgres commits of small transactions, and `pgbench`, at 8 clients (the services'
//!   worker pool);
//! - relay: drain rate of a pre-filled outbox (both sources), and commit→acknowledged latency at
//!   fixed offered rates;
//! - saga: placed→terminal latency at fixed offered rates, open loop, and the highest rate the
//!   stack sustains (p99 under 1 s, no backlog left);
//! - resources: CPU and RSS of every process under load, CPU milliseconds per saga for each
//!   process and for Postgres, and the whole stack when idle (the Postgres server included);
//! - monitor: `saga-monitor rebuild` of a log of confirmed sagas' events (five each), produced
//!   straight to a broker of its own, from the start of the topics.
//!
//! Run it with `scripts/bench.sh` (release build; options after `--`):
//! `--quick` (smaller sizes, a minute or two), `--drain-rows N` (also the batched produce
//! ceiling's records), `--produce-records N` (the one-record-per-batch ceiling's),
//! `--relay-args "--batch-size 5000 …"` (the relay's flags in the drain and latency runs),
//! `--window-seconds S`, `--saga-rates 100,200,400,600`, `--search-steps N` (rates tried after
//! those in looking for the highest sustained one; 0 tries none), `--monitor-sagas N`, `--report PATH`;
//! `--only-monitor` runs the monitor's part alone, `--only-saga` the saga's (rates, the highest
//! sustained one, resources, idle).

use std::time::Duration;

use e2e::bench::{self, ceilings, progress, relay::RelayBench, resources, saga};
use serde_json::{Value, json};

struct Options {
    drain_rows: usize,
    relay_args: Vec<String>,
    produce_records: usize,
    window: Duration,
    pg_seconds: Duration,
    relay_rates: Vec<f64>,
    saga_rates: Vec<f64>,
    search_steps: usize,
    idle: Duration,
    monitor_sagas: usize,
    only_monitor: bool,
    only_saga: bool,
    report: std::path::PathBuf,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let number = |name: &str, default: f64| {
        value(name)
            .map(|v| {
                v.parse::<f64>()
                    .unwrap_or_else(|_| panic!("{name} wants a number, got {v:?}"))
            })
            .unwrap_or(default)
    };
    let quick = args.iter().any(|a| a == "--quick");
    let rates = |name: &str, default: &str| -> Vec<f64> {
        value(name)
            .unwrap_or_else(|| default.to_owned())
            .split(',')
            .map(|r| {
                r.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: {r:?} is not a rate"))
            })
            .collect()
    };
    Options {
        drain_rows: number("--drain-rows", if quick { 100_000.0 } else { 300_000.0 }) as usize,
        relay_args: value("--relay-args")
            .map(|v| v.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
        produce_records: number(
            "--produce-records",
            if quick { 20_000.0 } else { 100_000.0 },
        ) as usize,
        window: Duration::from_secs_f64(number("--window-seconds", if quick { 5.0 } else { 15.0 })),
        pg_seconds: Duration::from_secs(if quick { 3 } else { 10 }),
        relay_rates: rates("--relay-rates", "100,1000,5000"),
        saga_rates: rates("--saga-rates", "100,200,400,600"),
        search_steps: number("--search-steps", if quick { 1.0 } else { 4.0 }) as usize,
        idle: Duration::from_secs(if quick { 5 } else { 20 }),
        monitor_sagas: number("--monitor-sagas", if quick { 10_000.0 } else { 100_000.0 }) as usize,
        only_monitor: args.iter().any(|a| a == "--only-monitor"),
        only_saga: args.iter().any(|a| a == "--only-saga"),
        report: value("--report")
            .map(Into::into)
            .unwrap_or_else(|| e2e::target_dir().join("bench/report.json")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = options();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let profile = e2e::target_dir();
    if !profile.ends_with("release") {
        eprintln!(
            "warning: these are not release binaries ({}); scripts/bench.sh builds and runs the release ones",
            profile.display()
        );
    }
    let server = e2e::postgres_url();
    let log_dir = e2e::target_dir().join("bench-logs");
    let _ = std::fs::remove_dir_all(&log_dir);
    let mut report = json!({
        "machine": {"cores": cores, "binaries": profile.display().to_string()},
        "started_at": chrono::Utc::now().to_rfc3339(),
    });

    if options.only_saga {
        let part = measure_saga(&options, &server).await?;
        report["saga"] = part.json();
        report["idle"] = part.idle.json();
        report["idle_right_after_load"] = part.idle_after_load.json();
        println!(
            "\nsaga-bench on {cores} cores ({}), the saga only",
            profile.display()
        );
        part.print(None);
        return write_report(&options, &report);
    }
    if options.only_monitor {
        report["monitor_rebuild"] =
            bench::monitor::rebuild(&server, &log_dir.join("monitor"), options.monitor_sagas)
                .await?;
        print_monitor(&report["monitor_rebuild"]);
        return write_report(&options, &report);
    }

    // Ceilings.
    progress(format!(
        "Postgres ceiling: one-row transactions on 8 connections for {:?}",
        options.pg_seconds
    ));
    let commits = ceilings::commit_rate(&server, 8, options.pg_seconds).await?;
    progress(format!(
        "Postgres ceiling: pgbench -c 8 for {:?}",
        options.pg_seconds
    ));
    let pgbench = match ceilings::pgbench_tps(&server, 8, options.pg_seconds).await {
        Ok(tps) => Some(tps),
        Err(e) => {
            eprintln!("warning: pgbench could not run: {e:#}");
            None
        }
    };
    report["ceilings"] = json!({
        "postgres_one_row_commits_per_second_8_clients": commits.round(),
        "pgbench_tps_8_clients_scale_10": pgbench.map(f64::round),
    });

    let mut relay = RelayBench::start(&server, &log_dir.join("relay")).await?;
    relay.relay_args = options.relay_args.clone();
    let payload = bench::order_placed_payload();
    progress(format!(
        "broker ceiling: {} records from an idempotent producer, one record per batch",
        options.produce_records
    ));
    let produce_one_per_batch = ceilings::produce_rate(
        &relay.broker.bootstrap,
        &[("batch.num.messages", "1")],
        options.produce_records,
        &payload,
        3,
    )
    .await?;
    // The batched ceiling and the drain, in turns, three times: each one lasts a few seconds
    // and varied by half from run to run on these machines, so the summary compares medians.
    // The ceiling sends as many records as the relay drains.
    let (mut ceilings_batched, mut drains) = (Vec::new(), Vec::new());
    let mut drain_usages = Vec::new();
    for round in 1..=DRAIN_ROUNDS {
        progress(format!(
            "broker ceiling ({round}/{DRAIN_ROUNDS}): {} records batched, with the relay's producer settings",
            options.drain_rows
        ));
        ceilings_batched.push(
            ceilings::produce_rate(
                &relay.broker.bootstrap,
                &[],
                options.drain_rows,
                &payload,
                3,
            )
            .await?,
        );
        let (drain, usage) = relay.drain(options.drain_rows).await?;
        drains.push(drain);
        drain_usages.push(usage);
    }
    let produce_batched = median(ceilings_batched.clone());
    let drain_rates: Vec<f64> = drains
        .iter()
        .map(|d| d["rows_per_second"].as_f64().unwrap_or(0.0))
        .collect();
    let drain_rate = median(drain_rates.clone());
    let drain = json!({
        "rows": options.drain_rows,
        "rows_per_second": drain_rate.round(),
        "rounds": drains,
    });
    report["ceilings"]["produce_records_per_second_one_per_batch"] =
        json!(produce_one_per_batch.round());
    report["ceilings"]["produce_records_per_second_batched"] = json!(produce_batched.round());
    report["ceilings"]["produce_records_per_second_batched_rounds"] = json!(
        ceilings_batched
            .iter()
            .map(|r| r.round())
            .collect::<Vec<_>>()
    );
    let mut latencies = Vec::new();
    for rate in &options.relay_rates {
        progress(format!(
            "relay: commit→ack at {rate} rows/s for {:?}",
            options.window
        ));
        latencies.push(relay.latency_at(*rate, options.window).await?);
    }
    report["relay"] = json!({"drain": drain, "commit_to_ack": latencies});
    drop(relay);

    let part = measure_saga(&options, &server).await?;
    report["saga"] = part.json();
    report["idle"] = part.idle.json();
    report["idle_right_after_load"] = part.idle_after_load.json();
    let SagaPart {
        results,
        sustained,
        idle,
        ..
    } = &part;
    report["monitor_rebuild"] =
        bench::monitor::rebuild(&server, &log_dir.join("monitor"), options.monitor_sagas).await?;

    // The summary: each measure against its ceiling or target.
    let max_rss = |name: &str| {
        results
            .iter()
            .map(|r| r.usage.max_rss(name))
            .chain(drain_usages.iter().map(|u| u.max_rss(name)))
            .fold(0.0, f64::max)
    };
    let process_rss: Vec<(String, f64)> = e2e::Process::ALL
        .map(e2e::Process::program)
        .iter()
        .chain(&["broker"])
        .map(|n| (n.to_string(), max_rss(n)))
        .collect();
    let ceiling_for_sagas = pgbench.unwrap_or(commits);
    let summary = json!({
        "relay_drain_over_batched_produce_ceiling": ratio(drain_rate, produce_batched),
        "saga_p99_ms_at_target_rate": part.at_target_rate().map(|r| bench::stats::round(r.placed_to_terminal.p99())),
        "sustained_sagas_over_pgbench_tps": ratio(*sustained, ceiling_for_sagas),
        "idle_stack_cpu_percent_of_one_core": bench::stats::round(idle.total_cpu_percent()),
        "max_rss_mib": process_rss.iter().map(|(n, r)| (n.clone(), bench::stats::round(*r))).collect::<serde_json::Map<_, _>>(),
    });
    report["summary"] = summary;

    println!("\nsaga-bench on {cores} cores ({})", profile.display());
    println!("ceilings");
    println!("  Postgres one-row commits, 8 clients   {commits:>9.0} /s");
    match pgbench {
        Some(tps) => println!("  pgbench -c 8 (scale 10)               {tps:>9.0} tps"),
        None => println!("  pgbench                                  (not run)"),
    }
    println!("  produce, one record per batch          {produce_one_per_batch:>9.0} records/s");
    println!(
        "  produce, batched (relay's settings)    {produce_batched:>9.0} records/s (median of {})",
        rounded(&ceilings_batched)
    );
    println!("relay");
    println!(
        "  drain of {} rows                   {drain_rate:>9.0} rows/s = {:.2} × the batched produce ceiling (target ≥ 0.6; median of {})",
        drain["rows"],
        drain_rate / produce_batched,
        rounded(&drain_rates)
    );
    for l in &report["relay"]["commit_to_ack"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        println!(
            "  commit→ack at {:>5}/s offered          p50 {} ms, p99 {} ms",
            l["offered_per_second"], l["commit_to_ack_p50_ms"], l["commit_to_ack_p99_ms"]
        );
    }
    part.print(Some(ceiling_for_sagas));
    println!(
        "  largest RSS under load: {} (target ≤ 50 MiB per process)",
        process_rss
            .iter()
            .map(|(n, r)| format!("{n} {r:.0} MiB"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    print_monitor(&report["monitor_rebuild"]);
    write_report(&options, &report)
}

/// The saga part: the open loop at each rate, the search for the highest sustained rate, and
/// the idle stack after the load.
struct SagaPart {
    results: Vec<saga::RateResult>,
    sustained: f64,
    idle: resources::Usage,
    idle_after_load: resources::Usage,
}

impl SagaPart {
    fn json(&self) -> Value {
        json!({
            "open_loop": self.results.iter().map(saga::RateResult::json).collect::<Vec<_>>(),
            "highest_sustained_orders_per_second": self.sustained,
        })
    }

    /// Prints the rates, the sustained one (against `ceiling`, the Postgres ceiling, when it was
    /// measured), the target's rate and each rate's resources.
    fn print(&self, ceiling: Option<f64>) {
        let sustained = self.sustained;
        println!("saga (open loop, placed→terminal)");
        for r in &self.results {
            println!("  {}", r.describe());
        }
        match ceiling {
            Some(ceiling) => println!(
                "  highest sustained                     {sustained:>9.0} orders/s = {:.2} × the Postgres ceiling {ceiling:.0} (target ≥ 0.8)",
                sustained / ceiling
            ),
            None => println!("  highest sustained                     {sustained:>9.0} orders/s"),
        }
        if let Some(r) = self.at_target_rate() {
            println!(
                "  p99 at {TARGET_RATE}/s                          {:>9.1} ms (target ≤ 100)",
                r.placed_to_terminal.p99()
            );
        }
        println!("resources");
        for r in &self.results {
            println!(
                "  at {:>5.0}/s: {}",
                r.offered_per_second,
                r.usage.describe()
            );
            println!("           CPU per saga: {}", r.describe_cpu_per_saga());
        }
        println!(
            "  idle: {:.1}% of one core in all (target ≤ 2): {}",
            self.idle.total_cpu_percent(),
            self.idle.describe()
        );
        println!(
            "  idle right after the load: {:.1}% of one core in all: {}",
            self.idle_after_load.total_cpu_percent(),
            self.idle_after_load.describe()
        );
    }

    /// The result at the rate the latency target is set for (issue 22: p99 ≤ 100 ms at 200/s).
    fn at_target_rate(&self) -> Option<&saga::RateResult> {
        self.results
            .iter()
            .find(|r| r.offered_per_second == TARGET_RATE)
    }
}

/// The offered rate of the saga's latency target.
const TARGET_RATE: f64 = 200.0;

async fn measure_saga(options: &Options, server: &str) -> anyhow::Result<SagaPart> {
    // The saga.
    progress("saga: starting broker, services, relay and saga monitor");
    let mut stack = e2e::Stack::start("saga-bench").await;
    stack.start_monitor().await;
    saga::stock(&stack).await;
    let orders = stack.orders_pool().await;
    let monitor = stack.monitor_pool().await;
    let admin = service_kit::db::connect(&e2e::db_url(server, "postgres"), 2).await?;
    let watched = || async {
        let mut watched = resources::Watched::default();
        for (name, pid) in stack.processes() {
            watched.add(&name, pid);
        }
        watched
            .add_postgres_backends(
                &admin,
                &[
                    &stack.orders_db,
                    &stack.inventory_db,
                    &stack.payments_db,
                    &stack.gateway_db,
                    &stack.monitor_db,
                ],
            )
            .await;
        watched.add_postgres_server(&admin).await;
        watched
    };
    // The warm-up leaves a thousand sagas behind, so that the statistics taken after it (below)
    // describe tables of a size where an index beats a scan.
    progress("saga: warming up (1,000 orders at 100/s)");
    saga::open_loop(
        &stack,
        &orders,
        Some(&monitor),
        100.0,
        Duration::from_secs(10),
        &watched().await,
    )
    .await?;
    // Plans are made from the tables' statistics, and sqlx keeps each connection's prepared
    // statements: a plan made while a table was empty or tiny scans the whole table as it
    // grows, until autovacuum analyzes it again (within a minute or two of a deployment's
    // growth, but not within a benchmark's window). In runs without this the monitor's look-ups
    // of a saga's steps took 1.4 ms each (plans made on empty tables), and after an ANALYZE of a
    // 40-order warm-up the reservation and order-view look-ups took 0.2 ms each (plans made on
    // one-page tables): neither is the steady state the rates are meant to measure.
    progress("saga: analyzing the stack's databases (as autovacuum soon would)");
    for db in [
        &stack.orders_db,
        &stack.inventory_db,
        &stack.payments_db,
        &stack.gateway_db,
        &stack.monitor_db,
    ] {
        let pool = service_kit::db::connect(&e2e::db_url(server, db), 1).await?;
        sqlx::query("ANALYZE").execute(&pool).await?;
        pool.close().await;
    }
    let mut results = Vec::new();
    for rate in &options.saga_rates {
        progress(format!(
            "saga: {rate} orders/s offered for {:?}",
            options.window
        ));
        let result = saga::open_loop(
            &stack,
            &orders,
            Some(&monitor),
            *rate,
            options.window,
            &watched().await,
        )
        .await?;
        progress(result.describe());
        results.push(result);
    }
    // The highest sustained rate: grow past the best sustained rate until one fails, then
    // bisect between the two.
    let best = |results: &[saga::RateResult]| {
        results
            .iter()
            .filter(|r| r.sustained())
            .map(|r| r.offered_per_second)
            .fold(0.0, f64::max)
    };
    let lowest_failed = |results: &[saga::RateResult]| {
        results
            .iter()
            .filter(|r| !r.sustained())
            .map(|r| r.offered_per_second)
            .fold(f64::INFINITY, f64::min)
    };
    for _ in 0..options.search_steps {
        let (ok, failed) = (best(&results), lowest_failed(&results));
        let next = if failed.is_infinite() {
            (ok * 1.5).max(50.0)
        } else {
            ((ok + failed) / 2.0 / 10.0).round() * 10.0
        };
        if next <= ok || next >= failed || (failed - ok) < 20.0 {
            break;
        }
        progress(format!(
            "saga: looking for the highest sustained rate: {next} orders/s"
        ));
        let result = saga::open_loop(
            &stack,
            &orders,
            Some(&monitor),
            next,
            options.window,
            &watched().await,
        )
        .await?;
        progress(result.describe());
        results.push(result);
    }
    let sustained = best(&results);

    progress(format!(
        "idle: measuring the stack doing nothing for {:?}",
        options.idle
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ((), idle_after_load) =
        resources::measure(&watched().await, tokio::time::sleep(options.idle)).await;
    // Right after the load, Postgres is still vacuuming what the load left (the orders, the
    // deleted outbox and inbox rows): measured again once no autovacuum worker has run for
    // five seconds (at most two minutes later), that is the idle stack.
    progress("idle: waiting for Postgres's autovacuum to finish, then measuring again");
    let settle_deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut quiet_since = std::time::Instant::now();
    while std::time::Instant::now() < settle_deadline
        && quiet_since.elapsed() < Duration::from_secs(5)
    {
        let vacuuming: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'",
        )
        .fetch_one(&admin)
        .await
        .unwrap_or(0);
        if vacuuming > 0 {
            quiet_since = std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ((), idle) = resources::measure(&watched().await, tokio::time::sleep(options.idle)).await;
    Ok(SagaPart {
        results,
        sustained,
        idle,
        idle_after_load,
    })
}

fn print_monitor(rebuild: &Value) {
    println!("saga monitor");
    println!(
        "  rebuild of {} sagas ({} records) from the start of the topics: {} s, {} records/s",
        rebuild["sagas"],
        rebuild["records"],
        rebuild["rebuild_seconds"],
        rebuild["records_per_second"]
    );
}

fn write_report(options: &Options, report: &Value) -> anyhow::Result<()> {
    if let Some(dir) = options.report.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&options.report, serde_json::to_string_pretty(report)?)?;
    println!("report: {}", options.report.display());
    Ok(())
}

/// `a / b` to two decimals (null when it is not a number).
/// How many times the batched ceiling and the drain are measured (in turns).
const DRAIN_ROUNDS: usize = 3;

fn rounded(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn ratio(a: f64, b: f64) -> Value {
    let r = a / b;
    if r.is_finite() {
        json!((r * 100.0).round() / 100.0)
    } else {
        Value::Null
    }
}
