//! `saga audit`: reads both event topics, both dead-letter topics and both services' databases, and
//! reports what breaks the saga's promises (see [`checks`] for the rules):
//! - per consumer group, records of the events it acts on that it never applied (no inbox row)
//!   and did not dead-letter;
//! - accepted orders still not terminal after the grace period;
//! - terminal orders whose reservation disagrees (CONFIRMED ↔ COMMITTED, CANCELLED ↔ RELEASED or
//!   none, REJECTED ↔ none), and reservations of orders order-service does not know;
//! - stock not conserved, or not matching the reservations;
//! - an order's events out of order on its topic;
//! - an order whose OrderPlaced inventory applied without exactly one answer caused by it on
//!   inventory.v1 (StockReserved or StockReservationRejected), or with a release before its
//!   StockReserved;
//! - the money: every terminal order's payment against the order (a CONFIRMED order paid its
//!   total once, a cancelled one kept nothing), and the processor's ledger against both (what it
//!   kept of each payment's charges, no payment charged twice);
//! - outbox rows older than a threshold.
//!
//! What it cannot read is an error (exit status 2) naming what it could not reach: it never
//! reports "no findings" for data it did not see. Findings give exit status 1.

pub mod checks;

use schemas::headers;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, anyhow};
use chrono::Utc;
use clap::Args;
use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use sqlx::types::Json;
use sqlx::{ConnectOptions, Connection, PgConnection};
use uuid::Uuid;

use checks::{
    DeadLetter, Finding, LedgerCharge, OrderRow, PaymentRow, ProductRow, ReservationRow,
    TopicRecord,
};
use messaging::delivery::Delivery;
use messaging::kafka::KafkaSettings;
use messaging::reader::{self, End};

/// Who consumes what: (consumer group, a topic it consumes, the database holding its inbox).
const GROUPS: [(&str, &str, Db); 4] = [
    ("inventory-service", schemas::ORDERS_TOPIC, Db::Inventory),
    ("payment-service", schemas::ORDERS_TOPIC, Db::Payments),
    ("order-service", schemas::INVENTORY_TOPIC, Db::Orders),
    ("order-service", schemas::PAYMENTS_TOPIC, Db::Orders),
];

#[derive(Debug, Clone, Copy)]
enum Db {
    Orders,
    Inventory,
    Payments,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// order-service's database.
    #[arg(
        long,
        env = "ORDERS_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/orders"
    )]
    orders_db: String,
    /// inventory-service's database.
    #[arg(
        long,
        env = "INVENTORY_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/inventory"
    )]
    inventory_db: String,
    /// payment-service's database.
    #[arg(
        long,
        env = "PAYMENTS_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/payments"
    )]
    payments_db: String,
    /// The processor whose ledger (`GET /ledger`, paged) is reconciled against the orders and
    /// payments: the stand-in payment-gateway's API.
    #[arg(long, env = "GATEWAY_URL", default_value = "http://127.0.0.1:8084")]
    gateway_url: String,
    /// Do not read the processor's ledger (a real processor without the stand-in's ledger API:
    /// reconcile with its own reports). The report says the ledger was not checked.
    #[arg(long)]
    skip_ledger: bool,
    /// How long a record or an order may still be in flight: records newer than this are not
    /// required to be applied, orders updated more recently are not required to be terminal or
    /// agree with their reservation. Make it longer than the retry schedule (`ms`, `s`, `m`).
    #[arg(long, default_value = "2m", value_parser = service_kit::duration::parse)]
    grace: Duration,
    /// Outbox rows older than this are reported (the relay is not publishing them).
    #[arg(long, default_value = "1m", value_parser = service_kit::duration::parse)]
    outbox_age: Duration,
    /// Print one JSON document instead of the readable summary.
    #[arg(long)]
    json: bool,
}

/// What was read, and what was found.
struct Report {
    read: serde_json::Map<String, serde_json::Value>,
    dead_letters: serde_json::Map<String, serde_json::Value>,
    findings: Vec<Finding>,
}

/// Runs the audit; returns the exit status (0 no findings, 1 findings). Errors mean something
/// could not be read.
pub async fn run(kafka: &KafkaSettings, args: &AuditArgs) -> anyhow::Result<i32> {
    let started = Utc::now();
    let cutoff = started - chrono::Duration::from_std(args.grace).context("--grace")?;
    let mut orders_db = connect("orders", &args.orders_db).await?;
    let mut inventory_db = connect("inventory", &args.inventory_db).await?;
    let mut payments_db = connect("payments", &args.payments_db).await?;
    let mut report = Report {
        read: Default::default(),
        dead_letters: Default::default(),
        findings: Vec::new(),
    };

    // Each topic once, and each group's inbox and dead letters, kept for the checks across
    // topics.
    let mut topics: HashMap<&str, Vec<TopicRecord>> = HashMap::new();
    for topic in schemas::EVENT_TOPICS {
        let records = topic_records(kafka, topic).await?;
        report.findings.extend(checks::event_order(&records));
        report
            .read
            .insert((*topic).to_owned(), json!(records.len()));
        topics.insert(topic, records);
    }
    let mut dead_by_group: HashMap<&str, Vec<DeadLetter>> = HashMap::new();
    for (group, _, _) in GROUPS {
        if !dead_by_group.contains_key(group) {
            dead_by_group.insert(group, dead_letters(kafka, group).await?);
        }
    }
    let mut read_by_group = HashMap::new();
    for (group, topic, db) in GROUPS {
        let records = &topics[topic];
        let dead = &dead_by_group[group];
        let conn = match db {
            Db::Orders => &mut orders_db,
            Db::Inventory => &mut inventory_db,
            Db::Payments => &mut payments_db,
        };
        let applied = applied_ids(conn, group, records)
            .await
            .with_context(|| format!("reading {group}'s inbox"))?;
        let parked: HashSet<String> =
            sqlx::query_scalar("SELECT message_key FROM parked_keys WHERE consumer_group = $1")
                .bind(group)
                .fetch_all(&mut *conn)
                .await
                .with_context(|| format!("reading {group}'s parked keys"))?
                .into_iter()
                .collect();
        report.findings.extend(checks::unapplied(
            group,
            records,
            &applied,
            dead,
            &parked,
            cutoff.timestamp_millis(),
        ));
        report
            .dead_letters
            .insert(group.to_owned(), json!(dead.len()));
        read_by_group.insert(group, applied);
    }
    report.findings.extend(checks::inventory_answers(
        &topics[schemas::ORDERS_TOPIC],
        &read_by_group["inventory-service"],
        &dead_by_group["inventory-service"],
        &topics[schemas::INVENTORY_TOPIC],
        cutoff.timestamp_millis(),
    ));

    type Row = (Uuid, String, Option<i64>, chrono::DateTime<Utc>);
    let orders: Vec<OrderRow> =
        sqlx::query_as::<_, Row>("SELECT order_id, status, total_cents, updated_at FROM orders")
            .fetch_all(&mut orders_db)
            .await
            .context("reading the orders")?
            .into_iter()
            .map(|(order_id, status, total_cents, updated_at)| OrderRow {
                order_id,
                status,
                total_cents,
                updated_at,
            })
            .collect();
    let payments: Vec<PaymentRow> = sqlx::query_as::<_, (Uuid, Uuid, String, i64, i64)>(
        "SELECT payment_id, order_id, status, amount_cents, refunded_cents FROM payments",
    )
    .fetch_all(&mut payments_db)
    .await
    .context("reading the payments")?
    .into_iter()
    .map(
        |(payment_id, order_id, status, amount_cents, refunded_cents)| PaymentRow {
            payment_id,
            order_id,
            status,
            amount_cents,
            refunded_cents,
        },
    )
    .collect();
    report
        .findings
        .extend(checks::payments(&orders, &payments, cutoff));
    report.read.insert("payments".into(), json!(payments.len()));
    if args.skip_ledger {
        report
            .read
            .insert("ledger".into(), json!("not checked (--skip-ledger)"));
    } else {
        // Read after the payments: a charge is always made after its payment.
        let charges = ledger(&args.gateway_url).await?;
        report
            .findings
            .extend(checks::ledger(&orders, &payments, &charges, cutoff));
        report
            .read
            .insert("ledger_charges".into(), json!(charges.len()));
    }
    let (products, reservations) = inventory_snapshot(&mut inventory_db).await?;
    report
        .findings
        .extend(checks::orders(&orders, &reservations, cutoff));
    report
        .findings
        .extend(checks::stock(&products, &reservations));
    report.read.insert("orders".into(), json!(orders.len()));
    report
        .read
        .insert("reservations".into(), json!(reservations.len()));
    report.read.insert("products".into(), json!(products.len()));
    for (source, conn) in [
        ("orders", &mut orders_db),
        ("inventory", &mut inventory_db),
        ("payments", &mut payments_db),
    ] {
        report
            .findings
            .extend(old_outbox_rows(conn, source, args.outbox_age).await?);
    }
    print(&report, args, started);
    Ok(if report.findings.is_empty() { 0 } else { 1 })
}

fn print(report: &Report, args: &AuditArgs, started: chrono::DateTime<Utc>) {
    if args.json {
        let out = json!({
            "ok": report.findings.is_empty(),
            "audited_at": started,
            "grace_seconds": args.grace.as_secs_f64(),
            "read": report.read,
            "dead_letters": report.dead_letters,
            "findings": report.findings,
        });
        println!("{out}");
        return;
    }
    let read: Vec<String> = report
        .read
        .iter()
        .map(|(what, n)| format!("{n} {what}"))
        .collect();
    let dead: Vec<String> = report
        .dead_letters
        .iter()
        .map(|(group, n)| format!("{n} in {group}.dlq"))
        .collect();
    println!("saga audit: read {}", read.join(", "));
    println!("dead letters: {}", dead.join(", "));
    if report.findings.is_empty() {
        println!(
            "0 findings: every record applied or dead-lettered, every order older than {:?} terminal and agreeing with its reservation and its payment, stock conserved, money conserved, events in order, every applied OrderPlaced answered once, no old outbox rows",
            args.grace
        );
    } else {
        println!("{} findings:", report.findings.len());
        for f in &report.findings {
            println!("  {f}");
        }
    }
}

/// Connects to a service's database, or says which one could not be reached.
async fn connect(name: &str, url: &str) -> anyhow::Result<PgConnection> {
    let options = PgConnectOptions::from_str(url)
        .with_context(|| format!("the {name} database URL is not valid"))?;
    let place = format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("")
    );
    match tokio::time::timeout(Duration::from_secs(10), options.connect()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => {
            Err(anyhow!(e)).context(format!("cannot reach the {name} database at {place}"))
        }
        Err(_) => Err(anyhow!("no answer within 10 s"))
            .context(format!("cannot reach the {name} database at {place}")),
    }
}

/// Every charge of the processor's ledger, read in pages.
async fn ledger(gateway_url: &str) -> anyhow::Result<Vec<LedgerCharge>> {
    #[derive(serde::Deserialize)]
    struct Entry {
        charge_id: Uuid,
        payment_id: Uuid,
        amount_cents: i64,
        status: String,
        refunded_cents: i64,
        created_at: chrono::DateTime<Utc>,
    }
    // A charge with its refund is about 450 bytes of JSON: a page of 100 stays well inside the
    // outbound client's cap on an answer (service_kit::outbound::MAX_ANSWER_BYTES, 64 KiB).
    const PAGE: usize = 100;
    let timeouts = service_kit::outbound::Timeouts {
        connect: Duration::from_secs(5),
        request: Duration::from_secs(30),
    };
    let client = service_kit::outbound::Client::new("payment-gateway", gateway_url, timeouts)?;
    let mut charges: Vec<LedgerCharge> = Vec::new();
    loop {
        let after = charges
            .last()
            .map_or(String::new(), |c| format!("&after={}", c.charge_id));
        let page: Vec<Entry> = client
            .get("/ledger", &format!("/ledger?limit={PAGE}{after}"))
            .await
            .with_context(|| {
                format!(
                    "cannot read the processor's ledger at {}",
                    client.shown_url()
                )
            })?;
        let full = page.len() == PAGE;
        for entry in page {
            anyhow::ensure!(
                charges.last().is_none_or(|c| c.charge_id < entry.charge_id),
                "the processor's ledger at {} answered charges out of order",
                client.shown_url()
            );
            // What the ledger says is checked, not trusted: a status it cannot have or refunds
            // outside the charge would make the sums wrong in silence.
            let succeeded = match entry.status.as_str() {
                "succeeded" => true,
                "declined" => false,
                other => anyhow::bail!(
                    "the processor's ledger at {} gives charge {} the unknown status {:?}",
                    client.shown_url(),
                    entry.charge_id,
                    schemas::limits::truncate_chars(other, 32)
                ),
            };
            anyhow::ensure!(
                entry.amount_cents > 0
                    && (0..=entry.amount_cents).contains(&entry.refunded_cents)
                    && (succeeded || entry.refunded_cents == 0),
                "the processor's ledger at {} gives charge {} {} cents charged and {} refunded",
                client.shown_url(),
                entry.charge_id,
                entry.amount_cents,
                entry.refunded_cents
            );
            charges.push(LedgerCharge {
                charge_id: entry.charge_id,
                payment_id: entry.payment_id,
                amount_cents: entry.amount_cents,
                succeeded,
                refunded_cents: entry.refunded_cents,
                created_at: entry.created_at,
            });
        }
        if !full {
            return Ok(charges);
        }
    }
}

/// Every record of `topic`, as the checks need it.
async fn topic_records(kafka: &KafkaSettings, topic: &str) -> anyhow::Result<Vec<TopicRecord>> {
    Ok(read_all(kafka, topic)
        .await?
        .into_iter()
        .map(|r| TopicRecord {
            message_id: r.header(headers::MESSAGE_ID).and_then(|m| m.parse().ok()),
            event_type: r.header(headers::EVENT_TYPE).map(str::to_owned),
            causation_id: r.header(headers::CAUSATION_ID).and_then(|m| m.parse().ok()),
            key: crate::key_text(&r),
            topic: r.topic,
            partition: r.partition,
            offset: r.offset,
            timestamp_ms: r.timestamp,
        })
        .collect())
}

async fn dead_letters(kafka: &KafkaSettings, group: &str) -> anyhow::Result<Vec<DeadLetter>> {
    let topic = messaging::kafka::dead_letter_topic(group);
    Ok(read_all(kafka, &topic)
        .await?
        .into_iter()
        .map(|r| {
            let original = (|| {
                Some((
                    r.header(headers::DLQ_ORIGINAL_TOPIC)?.to_owned(),
                    r.header(headers::DLQ_ORIGINAL_PARTITION)?.parse().ok()?,
                    r.header(headers::DLQ_ORIGINAL_OFFSET)?.parse().ok()?,
                ))
            })();
            DeadLetter {
                message_id: r.header(headers::MESSAGE_ID).and_then(|m| m.parse().ok()),
                original,
            }
        })
        .collect())
}

/// Every record of `topic`, or an error naming the topic and the broker.
async fn read_all(kafka: &KafkaSettings, topic: &str) -> anyhow::Result<Vec<Delivery>> {
    let (settings, name) = (kafka.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        reader::read_all(&settings, crate::GROUP, &name, End::QUIET)
    })
    .await?
    .with_context(|| {
        format!(
            "cannot read topic {topic} from the Kafka broker at {}",
            kafka.kafka_bootstrap_servers
        )
    })
}

/// The message ids of `records` that `group` has an inbox row for.
async fn applied_ids(
    conn: &mut PgConnection,
    group: &str,
    records: &[TopicRecord],
) -> sqlx::Result<HashSet<Uuid>> {
    let ids: Vec<Uuid> = records.iter().filter_map(|r| r.message_id).collect();
    let mut applied = HashSet::new();
    for chunk in ids.chunks(10_000) {
        let found: Vec<Uuid> = sqlx::query_scalar(
            "SELECT message_id FROM inbox WHERE consumer_group = $1 AND message_id = ANY($2)",
        )
        .bind(group)
        .bind(chunk)
        .fetch_all(&mut *conn)
        .await?;
        applied.extend(found);
    }
    Ok(applied)
}

#[derive(serde::Deserialize)]
struct Line {
    sku: String,
    quantity: i64,
}

/// Products and reservations from one snapshot, so that stock and reservations agree unless
/// something is wrong.
async fn inventory_snapshot(
    conn: &mut PgConnection,
) -> anyhow::Result<(Vec<ProductRow>, Vec<ReservationRow>)> {
    let mut tx = conn.begin().await.context("reading the inventory")?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let products = sqlx::query_as::<_, (String, i64, i64, i64, i64)>(
        "SELECT sku, available, reserved, sold, stock_added FROM products",
    )
    .fetch_all(&mut *tx)
    .await
    .context("reading the products")?
    .into_iter()
    .map(|(sku, available, reserved, sold, stock_added)| ProductRow {
        sku,
        available,
        reserved,
        sold,
        stock_added,
    })
    .collect();
    let reservations = sqlx::query_as::<_, (Uuid, String, Json<Vec<Line>>)>(
        "SELECT order_id, status, lines FROM reservations",
    )
    .fetch_all(&mut *tx)
    .await
    .context("reading the reservations")?
    .into_iter()
    .map(|(order_id, status, lines)| ReservationRow {
        order_id,
        status,
        lines: lines.0.into_iter().map(|l| (l.sku, l.quantity)).collect(),
    })
    .collect();
    tx.rollback().await.ok();
    Ok((products, reservations))
}

async fn old_outbox_rows(
    conn: &mut PgConnection,
    source: &str,
    older_than: Duration,
) -> anyhow::Result<Vec<Finding>> {
    let rows: Vec<(Uuid, f64)> = sqlx::query_as(
        "SELECT message_id, EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8 FROM outbox \
         WHERE created_at < clock_timestamp() - make_interval(secs => $1) ORDER BY id",
    )
    .bind(older_than.as_secs_f64())
    .fetch_all(conn)
    .await
    .with_context(|| format!("reading the {source} outbox"))?;
    Ok(rows
        .into_iter()
        .map(|(message_id, age)| Finding::OldOutbox {
            source: source.to_owned(),
            message_id,
            age_seconds: age.max(0.0) as u64,
        })
        .collect())
}
