//! saga-monitor against the whole system: every saga seen whole, step by step across services,
//! in causal order, from what is on the topics; records that do not decode still shown in their
//! saga; a monitor killed while it projects ends up with exactly what one that never died shows;
//! a saga held at a step past its allowance shows as stuck.

use std::time::Duration;

use e2e::browser::Browser;
use e2e::kafka::{self, Outgoing};
use e2e::{Process, Stack, StackOptions, eventually};
use serde_json::Value;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(120);

/// (service, event type) of each event step, in the order the monitor shows them.
fn events(saga: &Value) -> Vec<(String, String)> {
    steps_of_kind(saga, "event")
        .iter()
        .map(|s| {
            (
                s["service"].as_str().unwrap_or("?").to_owned(),
                s["event_type"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect()
}

fn steps_of_kind<'a>(saga: &'a Value, kind: &str) -> Vec<&'a Value> {
    saga["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter(|s| s["kind"] == kind)
        .collect()
}

/// The steps are numbered 1..n, each comes after the step that caused it, and each event but
/// the `roots` (the events an HTTP request caused) was caused by the event just before it: in
/// these flows every service reacts to the event before.
fn assert_causal_chain(saga: &Value, roots: &[&str]) {
    let steps = saga["steps"].as_array().expect("steps");
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["seq"], i + 1, "{saga:#}");
        if let Some(cause) = s["causation_id"].as_str()
            && let Some(at) = steps
                .iter()
                .position(|c| c["kind"] == "event" && c["message_id"] == cause)
        {
            assert!(at < i, "step {} comes before its cause: {saga:#}", i + 1);
        }
    }
    let events = steps_of_kind(saga, "event");
    for pair in events.windows(2) {
        let (before, step) = (pair[0], pair[1]);
        if roots.contains(&step["event_type"].as_str().unwrap_or("")) {
            assert!(step["causation_id"].is_null(), "{step:#}");
        } else {
            assert_eq!(
                step["causation_id"], before["message_id"],
                "{} is caused by {}: {saga:#}",
                step["event_type"], before["event_type"]
            );
        }
    }
}

/// The trace ids of the event steps, each run of equal ids once, in order.
fn traces(saga: &Value) -> Vec<String> {
    let mut runs: Vec<String> = Vec::new();
    for s in steps_of_kind(saga, "event") {
        let trace = s["trace_id"].as_str().expect("every event has a trace id");
        if runs.last().map(String::as_str) != Some(trace) {
            runs.push(trace.to_owned());
        }
    }
    runs
}

fn flow(steps: &[(&str, &str)]) -> Vec<(String, String)> {
    steps
        .iter()
        .map(|(s, e)| ((*s).to_owned(), (*e).to_owned()))
        .collect()
}

const O: &str = "order-service";
const I: &str = "inventory-service";
const P: &str = "payment-service";

/// One saga of each outcome the shared stack can make: confirmed, rejected (no stock), declined
/// (above the processor's limit: cancelled with its stock back), and confirmed then cancelled by
/// the customer (refunded, then the stock returned). Each shows every event of its flow, by the
/// service that emitted it, in causal order, in the trace its request started (a cancel is a
/// request of its own, so a trace of its own), and its summary says how it ended.
#[tokio::test(flavor = "multi_thread")]
async fn sagas_of_every_outcome_show_every_step_in_causal_order_in_their_traces() {
    let mut stack = Stack::start("monitor_outcomes").await;
    stack.start_monitor().await;
    stack.put_product("A", 250, 10).await;
    // Two of B are 1,200.00: above the stand-in processor's limit of 1,000.00, so declined.
    stack.put_product("B", 60_000, 10).await;
    let confirmed = stack.place_order(&[("A", 1)]).await;
    let rejected = stack.place_order(&[("A", 50)]).await;
    let declined = stack.place_order(&[("B", 2)]).await;
    let refunded = stack.place_order(&[("A", 2)]).await;
    stack
        .wait_for_statuses(&[confirmed, refunded], &["CONFIRMED"], TIMEOUT)
        .await;
    stack.cancel(refunded).await;
    stack
        .wait_for_statuses(&[declined, refunded], &["CANCELLED"], TIMEOUT)
        .await;

    let paid = [
        (O, "OrderPlaced"),
        (I, "StockReserved"),
        (O, "OrderAwaitingPayment"),
    ];
    let cases = [
        (
            confirmed,
            "confirmed",
            "CONFIRMED",
            flow(
                &[
                    paid.as_slice(),
                    &[(P, "PaymentConfirmed"), (O, "OrderConfirmed")],
                ]
                .concat(),
            ),
            0,
        ),
        (
            rejected,
            "rejected",
            "REJECTED",
            flow(&[
                (O, "OrderPlaced"),
                (I, "StockReservationRejected"),
                (O, "OrderRejected"),
            ]),
            0,
        ),
        (
            declined,
            "cancelled",
            "CANCELLED",
            flow(
                &[
                    paid.as_slice(),
                    &[
                        (P, "PaymentDeclined"),
                        (O, "OrderCancelled"),
                        (I, "StockReleased"),
                    ],
                ]
                .concat(),
            ),
            1,
        ),
        (
            refunded,
            "cancelled",
            "CANCELLED",
            flow(
                &[
                    paid.as_slice(),
                    &[
                        (P, "PaymentConfirmed"),
                        (O, "OrderConfirmed"),
                        (O, "OrderRefundRequested"),
                        (P, "PaymentRefunded"),
                        (O, "OrderCancelled"),
                        (I, "StockReleased"),
                    ],
                ]
                .concat(),
            ),
            2,
        ),
    ];
    for (id, outcome, status, expected, compensations) in cases {
        let saga = stack
            .monitored_saga(id, outcome, expected.len(), TIMEOUT)
            .await;
        assert_eq!(events(&saga), expected, "{saga:#}");
        assert_eq!(saga["order_id"], id.to_string());
        assert_eq!(saga["status"], status, "{saga:#}");
        assert_eq!(saga["compensations"], compensations, "{saga:#}");
        assert_eq!(saga["dead_letters"], 0, "{saga:#}");
        assert_eq!(saga["waiting_for"], Value::Null, "{saga:#}");
        assert_eq!(saga["stuck"], false, "{saga:#}");
        assert!(saga["ended_at"].is_string(), "{saga:#}");
        assert!(
            saga["duration_ms"].as_i64().is_some_and(|d| d >= 0),
            "{saga:#}"
        );
        assert_causal_chain(&saga, &["OrderRefundRequested"]);
        let traces = traces(&saga);
        let expected_traces = if id == refunded { 2 } else { 1 };
        assert_eq!(traces.len(), expected_traces, "{saga:#}");
        assert_eq!(
            saga["trace_id"], traces[0],
            "the saga's trace is its first step's"
        );
        for s in steps_of_kind(&saga, "event") {
            assert!(s["topic"].as_str().unwrap().ends_with(".v1"), "{s:#}");
            assert!(Uuid::parse_str(s["message_id"].as_str().unwrap()).is_ok());
            assert_eq!(s["decoded"], true);
            let compensation = [
                "OrderRefundRequested",
                "PaymentRefunded",
                "OrderCancelled",
                "StockReleased",
            ]
            .contains(&s["event_type"].as_str().unwrap());
            assert_eq!(s["compensation"], compensation, "{s:#}");
        }
    }

    // The list filters by outcome, newest first.
    let list = stack
        .get_json(&format!(
            "{}/sagas?outcome=cancelled&limit=500",
            stack.monitor_url
        ))
        .await;
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["order_id"].as_str().unwrap())
        .collect();
    for id in [declined, refunded] {
        assert!(ids.contains(&id.to_string().as_str()), "{list:#}");
    }
    for id in [confirmed, rejected] {
        assert!(!ids.contains(&id.to_string().as_str()), "{list:#}");
    }
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|s| s["outcome"] == "cancelled")
    );

    // The refunded saga's page in a real browser: a lane per service, each step in its lane in
    // the API's order, an arrow per cause inside the saga, the compensations marked, drawn.
    let saga = stack
        .get_json(&format!("{}/sagas/{refunded}", stack.monitor_url))
        .await;
    let browser = Browser::start(stack.log_dir()).await.expect("a browser");
    browser
        .goto(&format!("{}/ui/sagas/{refunded}", stack.monitor_url))
        .await
        .unwrap();
    let mut lanes = Vec::new();
    for lane in browser.find_all("g.lane-group").await.unwrap() {
        lanes.push(
            browser
                .attribute(&lane, "data-service")
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(lanes, [O, I, P]);
    let api_steps = saga["steps"].as_array().unwrap();
    let shown = browser.find_all("g.step").await.unwrap();
    assert_eq!(shown.len(), api_steps.len(), "{saga:#}");
    for (element, step) in shown.iter().zip(api_steps) {
        for (attribute, field) in [
            ("data-seq", "seq"),
            ("data-service", "service"),
            ("data-kind", "kind"),
            ("data-compensation", "compensation"),
        ] {
            let value = browser
                .attribute(element, attribute)
                .await
                .unwrap()
                .unwrap();
            let expected = match &step[field] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            assert_eq!(value, expected, "{attribute} of {step:#}");
        }
        let text = browser.text(element).await.unwrap();
        assert!(
            text.contains(step["event_type"].as_str().unwrap()),
            "{text:?} for {step:#}"
        );
    }
    let caused_inside = api_steps
        .iter()
        .filter(|s| {
            s["causation_id"].as_str().is_some_and(|c| {
                api_steps
                    .iter()
                    .any(|e| e["kind"] == "event" && e["message_id"] == c)
            })
        })
        .count();
    assert_eq!(
        browser.find_all("path.arrow").await.unwrap().len(),
        caused_inside
    );
    assert_eq!(
        browser.find_all("g.step.compensation").await.unwrap().len(),
        4
    );
    assert_eq!(
        browser
            .text(&browser.find("#outcome").await.unwrap())
            .await
            .unwrap(),
        "cancelled"
    );
    let drawn = browser
        .script(
            "const t = document.querySelector('#timeline').getBoundingClientRect(); \
             const b = document.querySelector('g.step rect').getBoundingClientRect(); \
             return [t.width, t.height, b.width, b.height];",
        )
        .await
        .unwrap();
    assert!(
        drawn
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v.as_f64().unwrap() > 10.0),
        "the diagram is drawn: {drawn}"
    );
    let screenshot = stack.log_dir().join("monitor-saga-page.png");
    browser.screenshot(&screenshot).await.unwrap();
    let size = std::fs::metadata(&screenshot).unwrap().len();
    assert!(
        size > 10_000,
        "a screenshot of a drawn page, not a blank one: {size} bytes"
    );
    // An order the monitor has not seen: a page that says so, answered 404.
    let unknown = Uuid::new_v4();
    browser
        .goto(&format!("{}/ui/sagas/{unknown}", stack.monitor_url))
        .await
        .unwrap();
    let problem = browser
        .text(&browser.find("#problem").await.unwrap())
        .await
        .unwrap();
    assert!(problem.contains(&unknown.to_string()), "{problem}");
    assert_eq!(
        browser
            .text(&browser.find("h1").await.unwrap())
            .await
            .unwrap(),
        "404"
    );
    browser.close().await.unwrap();
}

/// What the API refuses, and how: bad filters and order ids are 400, an order the monitor has
/// not seen is 404, each a problem saying what is wrong.
#[tokio::test(flavor = "multi_thread")]
async fn bad_queries_get_a_problem_and_an_unknown_order_is_not_found() {
    let mut stack = Stack::start("monitor_bad_queries").await;
    stack.start_monitor().await;
    for (query, needle) in [
        ("/sagas?outcome=finished", "outcome must be one of"),
        ("/sagas?stuck=yes", "stuck must be true or false"),
        ("/sagas?limit=0", "limit must be between 1 and 500"),
        ("/sagas?limit=501", "limit must be between 1 and 500"),
        ("/sagas/not-an-order", "is not a UUID"),
        ("/sagas/%3Cscript%3E", "is not a UUID"),
    ] {
        let r = stack
            .http
            .get(format!("{}{query}", stack.monitor_url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{query}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let body: Value = r.json().await.unwrap();
        assert!(
            body["detail"].as_str().unwrap().contains(needle),
            "{query}: {body}"
        );
    }
    let unknown = Uuid::new_v4();
    let r = stack
        .http
        .get(format!("{}/sagas/{unknown}", stack.monitor_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains(&unknown.to_string()),
        "{body}"
    );
}

/// Records that do not decode show in the saga their key (or correlation id) names, marked with
/// why, next to the dead letters the services made of them; a record that names no order is
/// counted and skipped; the projection goes on with the next order.
#[tokio::test(flavor = "multi_thread")]
async fn records_that_do_not_decode_show_in_their_saga_and_the_projection_goes_on() {
    let mut stack = Stack::start("monitor_undecodable").await;
    stack.start_monitor().await;
    stack.put_product("A", 250, 10).await;
    let unattributed = || async {
        stack
            .metric(
                &stack.monitor_url,
                "monitor_records_unattributed_total",
                &[("topic", "orders.v1")],
            )
            .await
    };
    let unattributed_before = unattributed().await;
    let by_key = Uuid::new_v4();
    let by_correlation = Uuid::new_v4();
    let header = |k: &str, v: String| (k.to_owned(), v.into_bytes());
    let records = vec![
        Outgoing {
            topic: "orders.v1".into(),
            key: Some(by_key.to_string().into_bytes()),
            headers: vec![
                header("message-id", Uuid::new_v4().to_string()),
                header("event-type", "OrderPlaced".into()),
                header("content-type", "application/json".into()),
            ],
            payload: Some(b"{not json".to_vec()),
        },
        Outgoing {
            topic: "orders.v1".into(),
            key: None,
            headers: vec![
                header("correlation-id", by_correlation.to_string()),
                header("event-type", "<script>alert(1)</script>".into()),
            ],
            payload: Some(vec![0xff; 100]),
        },
        // Names no order at all.
        Outgoing {
            topic: "orders.v1".into(),
            key: Some(b"nobody".to_vec()),
            headers: vec![],
            payload: Some(b"{}".to_vec()),
        },
    ];
    kafka::produce_many(&stack.broker.bootstrap, &records)
        .await
        .expect("produce");
    // inventory-service and payment-service consume orders.v1: each dead-letters the record.
    for id in [by_key, by_correlation] {
        let url = format!("{}/sagas/{id}", stack.monitor_url);
        let saga = eventually(TIMEOUT, || async {
            let r = stack.http.get(&url).send().await?;
            if !r.status().is_success() {
                return Ok(None);
            }
            let saga: Value = r.json().await?;
            Ok((saga["dead_letters"] == 2).then_some(saga))
        })
        .await
        .expect("the saga shows the record and both dead letters");
        let event = steps_of_kind(&saga, "event");
        assert_eq!(event.len(), 1, "{saga:#}");
        assert_eq!(event[0]["decoded"], false);
        assert!(
            event[0]["note"]
                .as_str()
                .unwrap()
                .starts_with("cannot be decoded: "),
            "{saga:#}"
        );
        let mut groups: Vec<&str> = steps_of_kind(&saga, "dead_letter")
            .iter()
            .map(|s| s["service"].as_str().unwrap())
            .collect();
        groups.sort();
        assert_eq!(groups, ["inventory-service", "payment-service"], "{saga:#}");
        for dead in steps_of_kind(&saga, "dead_letter") {
            assert!(
                dead["note"].as_str().is_some_and(|n| !n.is_empty()),
                "{dead:#}"
            );
            assert_eq!(dead["decoded"], false);
        }
        assert_eq!(saga["status"], Value::Null);
        assert_eq!(saga["outcome"], "in_progress");
        assert_eq!(saga["waiting_for"], Value::Null, "nothing is waited for");
    }
    eventually(TIMEOUT, || async {
        Ok((unattributed().await > unattributed_before).then_some(()))
    })
    .await
    .expect("the record that names no order is counted");
    let next = stack.place_order(&[("A", 1)]).await;
    stack.monitored_saga(next, "confirmed", 5, TIMEOUT).await;
}

/// A flood of records under one order id (on a topic of its own, which no service reads): the
/// saga keeps the most steps a saga keeps, the rest are counted and left out, its page still
/// renders, and the projection goes on with the next order.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_under_one_order_id_is_capped_and_the_projection_goes_on() {
    const KEPT: usize = saga_monitor::store::MAX_STEPS_PER_SAGA as usize;
    const FLOOD: usize = KEPT + 200;
    let mut stack = Stack::start("monitor_flood").await;
    stack.start_monitor().await;
    stack.put_product("A", 250, 10).await;
    let left_out = || async {
        stack
            .metric(&stack.monitor_url, "monitor_steps_left_out_total", &[])
            .await
    };
    let left_out_before = left_out().await;
    let flooded = Uuid::new_v4();
    let topic = format!("flood{}.v1", Uuid::new_v4().simple());
    messaging::kafka::ensure_topics(
        &messaging::kafka::KafkaSettings::new(&stack.broker.bootstrap),
        &[messaging::kafka::TopicSpec::new(
            &topic,
            Duration::from_secs(3_600),
        )],
        1,
    )
    .await
    .expect("the flood's topic");
    let records: Vec<Outgoing> = (0..FLOOD)
        .map(|i| Outgoing {
            topic: topic.clone(),
            key: Some(flooded.to_string().into_bytes()),
            headers: vec![
                ("message-id".into(), Uuid::new_v4().to_string().into_bytes()),
                ("event-type".into(), format!("Flood{i}").into_bytes()),
            ],
            payload: Some(vec![0xfe; 64]),
        })
        .collect();
    kafka::produce_many(&stack.broker.bootstrap, &records)
        .await
        .expect("produce");
    eventually(TIMEOUT, || async {
        Ok((left_out().await - left_out_before >= (FLOOD - KEPT) as f64).then_some(()))
    })
    .await
    .expect("the steps past the cap are counted as left out");
    let saga = saga_of(&stack, &stack.monitor_url, flooded).await.unwrap();
    assert_eq!(
        saga["steps"].as_array().map(Vec::len),
        Some(KEPT),
        "the flooded saga keeps {KEPT} steps"
    );
    assert_eq!(left_out().await - left_out_before, (FLOOD - KEPT) as f64);
    let page = stack
        .http
        .get(format!("{}/ui/sagas/{flooded}", stack.monitor_url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains(&flooded.to_string()));
    let next = stack.place_order(&[("A", 1)]).await;
    stack.monitored_saga(next, "confirmed", 5, TIMEOUT).await;
}

async fn saga_of(stack: &Stack, base: &str, id: Uuid) -> anyhow::Result<Value> {
    let r = stack.http.get(format!("{base}/sagas/{id}")).send().await?;
    anyhow::ensure!(r.status().is_success(), "{base}/sagas/{id}: {}", r.status());
    Ok(r.json().await?)
}

/// Waits until the monitor at `base` shows every one of `ids` ended.
async fn wait_until_every_saga_ended(stack: &Stack, base: &str, ids: &[Uuid]) {
    eventually(TIMEOUT, || async {
        let mut ended = 0;
        for id in ids {
            if let Ok(saga) = saga_of(stack, base, *id).await
                && saga["outcome"] != "in_progress"
            {
                ended += 1;
            }
        }
        Ok((ended == ids.len()).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("every saga ends in {base}: {e}"));
}

/// The monitors at `a` and `b` show the same sagas, step for step: every one of `ids` equal in
/// both, and (with `lists`) the same newest sagas listed (within 30 s, for both to read what is
/// left: retries, late dead letters).
async fn assert_same_sagas(stack: &Stack, a: &str, b: &str, ids: &[Uuid], lists: bool) {
    let compare = || async {
        let mut differing = Vec::new();
        for id in ids {
            let (x, y) = (saga_of(stack, a, *id).await?, saga_of(stack, b, *id).await?);
            if x != y {
                differing.push((x, y));
            }
        }
        let (x, y) = (
            stack.get_json(&format!("{a}/sagas?limit=500")).await,
            stack.get_json(&format!("{b}/sagas?limit=500")).await,
        );
        if lists && x != y {
            differing.push((x, y));
        }
        Ok::<_, anyhow::Error>(differing)
    };
    if eventually(Duration::from_secs(30), || async {
        Ok(compare().await?.is_empty().then_some(()))
    })
    .await
    .is_err()
    {
        let d = compare().await.unwrap();
        panic!(
            "{} sagas differ between {a} and {b}; the first: {:#} vs {:#}",
            d.len(),
            d[0].0,
            d[0].1
        );
    }
}

/// Once every order of `ids` is terminal and both the stack's monitor and the `witness` show
/// every saga ended, both show the same sagas and list.
async fn assert_witness_agrees_once_all_ended(stack: &Stack, witness: &str, ids: &[Uuid]) {
    stack
        .wait_for_statuses(ids, &["CONFIRMED", "CANCELLED", "REJECTED"], TIMEOUT)
        .await;
    for base in [stack.monitor_url.as_str(), witness] {
        wait_until_every_saga_ended(stack, base, ids).await;
    }
    assert_same_sagas(stack, &stack.monitor_url, witness, ids, true).await;
}

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    /// A burst of orders while the monitor is killed (`kill -9`) in the middle of projecting
    /// them and started again: afterwards every saga it shows equals what a second monitor, with
    /// a database of its own and never killed, shows: no step lost, none doubled.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_monitor_killed_while_it_projects_shows_what_one_that_never_died_shows() {
        e2e::requires_own_stack("kills the monitor and starts a second one");
        let (mut stack, witness) = two_monitors("monitor_kill", 1_000).await;
        let mut ids = Vec::new();
        for i in 0..120 {
            let items: &[(&str, i64)] = match i % 4 {
                0 => &[("B", 2)],
                _ => &[("A", 1)],
            };
            ids.push(stack.place_order(items).await);
            if i % 40 == 20 {
                // Wait until it has projected something, then kill it mid-stream.
                eventually(TIMEOUT, || async {
                    let n = stack
                        .metric(&stack.monitor_url, "monitor_steps_projected_total", &[])
                        .await;
                    Ok((n > 0.0).then_some(()))
                })
                .await
                .unwrap();
                stack.kill(Process::Monitor);
                tokio::time::sleep(Duration::from_millis(300)).await;
                stack.start_process(Process::Monitor).await;
            }
        }
        // A third of them cancelled by their customer, whatever step they are at.
        for id in ids.iter().step_by(3) {
            stack.cancel(*id).await;
        }
        assert_witness_agrees_once_all_ended(&stack, &witness, &ids).await;
        // Each step once: as many event steps as the event topics hold distinct messages of
        // these orders (the relay publishes at least once).
        let mut records = std::collections::HashSet::new();
        for topic in ["orders.v1", "inventory.v1", "payments.v1"] {
            let all = kafka::read_topic(&stack.broker.bootstrap, topic)
                .await
                .unwrap();
            records.extend(
                all.iter()
                    .filter(|d| {
                        d.key_str()
                            .and_then(|k| Uuid::parse_str(k).ok())
                            .is_some_and(|k| ids.contains(&k))
                    })
                    .map(|d| (topic, d.header("message-id").unwrap_or("").to_owned())),
            );
        }
        let records = records.len();
        let mut steps = 0;
        for id in &ids {
            let saga = saga_of(&stack, &stack.monitor_url, *id).await.unwrap();
            steps += steps_of_kind(&saga, "event").len();
        }
        assert_eq!(
            steps, records,
            "one event step per record on the event topics"
        );
    }

    /// Orders placed by a customer, one every few milliseconds, of every outcome (a quarter
    /// declined, some cancelled): the traffic a rebuild runs under.
    async fn traffic(stack: &Stack, orders: usize) -> Vec<Uuid> {
        let mut ids = Vec::new();
        for i in 0..orders {
            let items: &[(&str, i64)] = match i % 4 {
                0 => &[("B", 2)],
                _ => &[("A", 1)],
            };
            let id = stack.place_order(items).await;
            if i % 5 == 1 {
                stack.cancel(id).await;
            }
            ids.push(id);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ids
    }

    /// A stack with its monitor and a second one (the witness, with a database of its own: where
    /// it serves), and `stock` of products A (1.00) and B (600.00: two are declined).
    async fn two_monitors(test: &str, stock: i64) -> (Stack, String) {
        let mut stack = Stack::start(test).await;
        stack.start_monitor().await;
        let witness = stack.spawn_monitor("witness").await;
        stack.put_product("A", 100, stock).await;
        stack.put_product("B", 60_000, stock).await;
        (stack, witness)
    }

    /// A stack with its monitor, a second monitor (the witness), and 20 sagas ended and projected.
    async fn projected_sagas(test: &str) -> (Stack, String, Vec<Uuid>) {
        let (stack, witness) = two_monitors(test, 100).await;
        let ids = traffic(&stack, 20).await;
        stack
            .wait_for_statuses(&ids, &["CONFIRMED", "CANCELLED"], TIMEOUT)
            .await;
        wait_until_every_saga_ended(&stack, &stack.monitor_url, &ids).await;
        (stack, witness, ids)
    }

    /// A rebuild under traffic that never pauses (orders keep coming until the rebuild is done:
    /// it must swap while records arrive), twice in a row: afterwards the rebuilt projection
    /// equals, saga for saga and in the list, what a second monitor that never rebuilt shows, so
    /// the swap lost no step that arrived during the rebuild, and the rebuild left out none.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_rebuild_under_traffic_equals_a_monitor_that_never_rebuilt_twice_in_a_row() {
        e2e::requires_own_stack("runs rebuilds and a second monitor");
        let (stack, witness) = two_monitors("monitor_rebuild", 10_000).await;
        let mut ids = traffic(&stack, 40).await;
        for round in 1..=2 {
            let rebuilt = std::sync::atomic::AtomicBool::new(false);
            let (placed, rebuild) = tokio::join!(
                async {
                    let mut placed = Vec::new();
                    while !rebuilt.load(std::sync::atomic::Ordering::SeqCst) {
                        placed.extend(traffic(&stack, 5).await);
                    }
                    placed
                },
                async {
                    let done =
                        tokio::time::timeout(TIMEOUT, stack.monitor_command("rebuild")).await;
                    rebuilt.store(true, std::sync::atomic::Ordering::SeqCst);
                    done
                }
            );
            let (code, log) = rebuild.unwrap_or_else(|_| {
                panic!("rebuild {round} did not swap within {TIMEOUT:?} while orders kept coming")
            });
            assert_eq!(code, Some(0), "rebuild {round}: {log}");
            assert!(
                log.contains("the rebuilt projection is swapped in"),
                "{log}"
            );
            ids.extend(placed);
        }
        assert_witness_agrees_once_all_ended(&stack, &witness, &ids).await;
    }

    /// While a rebuild runs (held: the broker is paused), a second one is refused; the first,
    /// killed, resumes from its own tables when started again, and then equals the live one.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_second_rebuild_is_refused_and_a_killed_one_resumes() {
        e2e::requires_own_stack("pauses the broker and kills a rebuild");
        let (mut stack, witness, ids) = projected_sagas("monitor_rebuild_once").await;
        stack.broker.pause();
        let mut first = stack.spawn_monitor_command("rebuild", "rebuild-first");
        eventually(TIMEOUT, || async {
            Ok(stack
                .log_has(
                    "rebuild-first",
                    &["rebuilding from the start of the topics"],
                )
                .then_some(()))
        })
        .await
        .expect("the first rebuild made its tables");
        let (code, log) = stack.monitor_command("rebuild").await;
        assert_ne!(code, Some(0), "{log}");
        assert!(
            log.contains("another rebuild of this monitor's projection is running"),
            "{log}"
        );
        first.kill9();
        stack.broker.resume();
        let (code, log) = stack.monitor_command("rebuild").await;
        assert_eq!(code, Some(0), "{log}");
        assert!(
            log.contains("resuming the rebuild from its own checkpoints"),
            "{log}"
        );
        assert_same_sagas(&stack, &stack.monitor_url, &witness, &ids, true).await;
    }

    /// A rebuild starts from the newest snapshot of its own version (a saga only that snapshot
    /// holds is there after it) and ignores a newer snapshot of another version (its saga is
    /// not); what it builds equals what a monitor that never rebuilt shows. It produced no
    /// record and wrote no other database.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_rebuild_starts_from_the_snapshot_of_its_version_and_changes_nothing_else() {
        e2e::requires_own_stack("edits the monitor's snapshots and runs rebuilds");
        let (mut stack, witness, ids) = projected_sagas("monitor_snapshot").await;
        let (code, log) = stack.monitor_command("snapshot").await;
        assert_eq!(code, Some(0), "{log}");
        assert!(log.contains("took a snapshot of the projection"), "{log}");

        // A saga only this snapshot knows, and a newer snapshot of another version with another.
        let monitor = e2e::connect(&stack.monitor_db).await.unwrap();
        let mut monitor = monitor;
        let (only_in_snapshot, other_version) = (Uuid::new_v4(), Uuid::new_v4());
        let insert_step = "INSERT INTO snapshot_steps (snapshot_id, topic, partition, \"offset\", order_id, at, \
                           service, event_type, kind, decoded) VALUES ($1, 'orders.v1', 0, $2, $3, now(), \
                           'order-service', 'OrderPlaced', 'event', true)";
        let snapshot: i64 = sqlx::query_scalar("SELECT max(snapshot_id) FROM snapshots")
            .fetch_one(&mut monitor)
            .await
            .unwrap();
        sqlx::query(insert_step)
            .bind(snapshot)
            .bind(1_000_000_i64)
            .bind(only_in_snapshot)
            .execute(&mut monitor)
            .await
            .unwrap();
        let newer: i64 = sqlx::query_scalar(
            "INSERT INTO snapshots (version, checkpoints, steps) VALUES (999, '[]', 1) RETURNING snapshot_id",
        )
        .fetch_one(&mut monitor)
        .await
        .unwrap();
        sqlx::query(insert_step)
            .bind(newer)
            .bind(1_000_001_i64)
            .bind(other_version)
            .execute(&mut monitor)
            .await
            .unwrap();

        // Every other writer of the services' databases stopped: whatever changes them now is
        // the rebuild's doing.
        for process in [
            Process::Relay,
            Process::OrderService,
            Process::InventoryService,
            Process::PaymentService,
            Process::Gateway,
        ] {
            stack.kill(process);
        }
        let topics_before = kafka::high_watermarks(&stack.broker.bootstrap)
            .await
            .unwrap();
        let writes = || async {
            let mut conn = e2e::connect("postgres").await.unwrap();
            let dbs = [
                &stack.orders_db,
                &stack.inventory_db,
                &stack.payments_db,
                &stack.gateway_db,
            ];
            let n: i64 = sqlx::query_scalar(
                "SELECT sum(tup_inserted + tup_updated + tup_deleted)::bigint FROM pg_stat_database WHERE datname = ANY($1)",
            )
            .bind(dbs.iter().map(|d| d.as_str()).collect::<Vec<_>>())
            .fetch_one(&mut conn)
            .await
            .unwrap();
            n
        };
        // Their statistics settle first (a backend reports its writes when it ends).
        let quiet = eventually(TIMEOUT, || async {
            let a = writes().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok((writes().await == a).then_some(a))
        })
        .await
        .expect("the services' databases go quiet");
        let (code, log) = stack.monitor_command("rebuild").await;
        assert_eq!(code, Some(0), "{log}");
        assert!(
            log.contains("rebuilding from the newest snapshot of this projection version"),
            "{log}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(writes().await, quiet, "the rebuild wrote no other database");
        assert_eq!(
            kafka::high_watermarks(&stack.broker.bootstrap)
                .await
                .unwrap(),
            topics_before,
            "the rebuild produced no record"
        );
        let status = |id: Uuid| {
            let http = stack.http.clone();
            let url = format!("{}/sagas/{id}", stack.monitor_url);
            async move { http.get(url).send().await.unwrap().status() }
        };
        assert_eq!(
            status(only_in_snapshot).await,
            200,
            "the snapshot of this version was the start"
        );
        assert_eq!(
            status(other_version).await,
            404,
            "the snapshot of another version was ignored"
        );
        // The saga only the snapshot held is the one difference, by design.
        assert_same_sagas(&stack, &stack.monitor_url, &witness, &ids, false).await;
    }

    /// A processor that hangs holds a saga at the payment step: past the payment allowance it
    /// shows stuck on `payment` (in the list of stuck sagas and the gauge); when its payment step
    /// times out it is cancelled (a void, its stock back) and is stuck no more.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_saga_held_at_the_payment_step_shows_stuck_then_ends_when_its_step_times_out() {
        e2e::requires_own_stack("hangs the processor, with a short payment timeout and allowance");
        let mut stack = Stack::start_with(
            "monitor_stuck",
            StackOptions {
                payment_timeout: Some("30s".into()),
                monitor_args: vec!["--payment-allowance".into(), "1s".into()],
                ..StackOptions::default()
            },
        )
        .await;
        stack.start_monitor().await;
        stack.put_product("A", 250, 10).await;
        stack
            .set_gateway_faults(serde_json::json!({"mode": "hang"}))
            .await;
        let held = stack.place_order(&[("A", 1)]).await;
        let stuck_url = format!("{}/sagas?stuck=true", stack.monitor_url);
        let listed = eventually(TIMEOUT, || async {
            let list = stack.get_json(&stuck_url).await;
            Ok(list.as_array().and_then(|l| {
                l.iter()
                    .find(|s| s["order_id"] == held.to_string())
                    .cloned()
            }))
        })
        .await
        .expect("the held saga is listed as stuck");
        assert_eq!(listed["waiting_for"], "payment", "{listed:#}");
        assert_eq!(listed["stuck"], true);
        assert_eq!(listed["status"], "AWAITING_PAYMENT");
        // The list page in a real browser, filtered to the stuck sagas by its own form.
        let browser = Browser::start(stack.log_dir()).await.expect("a browser");
        browser
            .goto(&format!("{}/ui", stack.monitor_url))
            .await
            .unwrap();
        browser
            .click(&browser.find("input[name=stuck]").await.unwrap())
            .await
            .unwrap();
        browser
            .click(&browser.find("button[type=submit]").await.unwrap())
            .await
            .unwrap();
        browser
            .wait_for_page("stuck=true", TIMEOUT)
            .await
            .expect("the form's filter loads the stuck sagas' page");
        let rows = browser.find_all("tr.saga").await.unwrap();
        let mut held_shown = false;
        for row in &rows {
            assert_eq!(
                browser
                    .attribute(row, "data-stuck")
                    .await
                    .unwrap()
                    .as_deref(),
                Some("true")
            );
            held_shown |=
                browser.attribute(row, "data-order-id").await.unwrap() == Some(held.to_string());
        }
        assert!(
            held_shown,
            "the held saga is listed among {} stuck ones",
            rows.len()
        );
        let card = browser.find("[data-step=payment] b").await.unwrap();
        let stuck_on_payment: i64 = browser.text(&card).await.unwrap().parse().unwrap();
        assert!(stuck_on_payment >= 1);
        browser
            .screenshot(&stack.log_dir().join("monitor-stuck-list.png"))
            .await
            .unwrap();
        browser.close().await.unwrap();
        eventually(Duration::from_secs(30), || async {
            let n = stack
                .metric(
                    &stack.monitor_url,
                    "monitor_stuck_sagas",
                    &[("step", "payment")],
                )
                .await;
            Ok((n >= 1.0).then_some(()))
        })
        .await
        .expect("the gauge counts it");
        // The payment step's timeout asks for the refund: nothing was charged, so a void.
        let saga = stack.monitored_saga(held, "cancelled", 7, TIMEOUT).await;
        assert_eq!(
            events(&saga),
            flow(&[
                (O, "OrderPlaced"),
                (I, "StockReserved"),
                (O, "OrderAwaitingPayment"),
                (O, "OrderRefundRequested"),
                (P, "PaymentRefunded"),
                (O, "OrderCancelled"),
                (I, "StockReleased"),
            ]),
            "{saga:#}"
        );
        assert_causal_chain(&saga, &["OrderRefundRequested"]);
        assert_eq!(
            traces(&saga).len(),
            2,
            "the timeout starts a trace of its own"
        );
        assert_eq!(saga["stuck"], false);
        let list = stack.get_json(&stuck_url).await;
        assert!(
            !list
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["order_id"] == held.to_string()),
            "{list:#}"
        );
        let not_stuck = stack
            .get_json(&format!("{}/sagas?stuck=false", stack.monitor_url))
            .await;
        assert!(
            not_stuck
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["order_id"] == held.to_string()),
            "{not_stuck:#}"
        );
    }
}
