//! The stand-in processor over real HTTP against a real Postgres: the same key never charges
//! twice (also under 50 concurrent requests, and after a restart), refunds never exceed the
//! charge (also concurrently), declines follow the rules, and the fault knobs fail calls
//! before anything is charged, or answer late after the charge was recorded.

use std::time::Duration;

use payment_gateway::faults::Knobs;
use payment_gateway::http::{AppState, routes};
use payment_gateway::ledger::DeclineRules;
use serde_json::{Value, json};
use service_kit::http::AdminToken;
use sqlx::PgPool;
use uuid::Uuid;

const LIMIT_CENTS: i64 = 100_000;

fn listed_customer() -> Uuid {
    Uuid::from_u128(0xdec1)
}

/// A database of its own, migrated as the process migrates it.
async fn database(name: &str) -> PgPool {
    service_kit::testing::database(&format!("gateway_{name}"), &[&payment_gateway::MIGRATIONS])
        .await
}

/// The processor's routes served on a port of their own; returns its base URL and knobs.
async fn serve(pool: &PgPool) -> (String, Knobs) {
    let knobs = Knobs::default();
    let app = routes(AppState {
        pool: pool.clone(),
        rules: std::sync::Arc::new(DeclineRules {
            above_cents: LIMIT_CENTS,
            customers: vec![listed_customer()],
        }),
        knobs: knobs.clone(),
        admin_token: AdminToken::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, knobs)
}

struct Client {
    url: String,
    http: reqwest::Client,
}

impl Client {
    fn new(url: &str) -> Client {
        Client {
            url: url.to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    async fn post(&self, path: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
        let mut request = self.http.post(format!("{}{path}", self.url)).json(body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        answer(request.send().await.expect("an answer")).await
    }

    async fn put_faults(&self, faults: &Value) -> (u16, Value) {
        let request = self.http.put(format!("{}/faults", self.url)).json(faults);
        answer(request.send().await.unwrap()).await
    }

    async fn ledger(&self, payment_id: Uuid) -> Vec<Value> {
        let r = self
            .http
            .get(format!("{}/ledger?payment_id={payment_id}", self.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }
}

async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn charge_body(payment_id: Uuid, amount_cents: i64) -> Value {
    json!({"payment_id": payment_id, "customer_id": Uuid::new_v4(), "amount_cents": amount_cents})
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_key_gets_the_same_answer_and_never_a_second_charge() {
    let pool = database("same_key").await;
    let (url, _) = serve(&pool).await;
    let client = Client::new(&url);
    let payment = Uuid::new_v4();
    let body = charge_body(payment, 2_500);
    let key = payment.to_string();
    let (status, first) = client.post("/charges", Some(&key), &body).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["status"], "succeeded");
    assert_eq!(first["amount_cents"], 2_500);
    assert_eq!(first["decline_code"], Value::Null);
    let (status, again) = client.post("/charges", Some(&key), &body).await;
    assert_eq!(
        (status, &again),
        (200, &first),
        "a replay is the same answer"
    );

    let mut other = body.clone();
    other["amount_cents"] = json!(2_501);
    let (status, refused) = client.post("/charges", Some(&key), &other).await;
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .contains("different request")
    );

    // A restart: another process on the same database answers the same.
    let (restarted, _) = serve(&pool).await;
    let (status, after) = Client::new(&restarted)
        .post("/charges", Some(&key), &body)
        .await;
    assert_eq!((status, &after), (200, &first));

    let ledger = client.ledger(payment).await;
    assert_eq!(ledger.len(), 1, "one charge: {ledger:?}");
    assert_eq!(ledger[0]["charge_id"], first["charge_id"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_requests_with_one_key_make_one_charge() {
    let pool = database("concurrent_key").await;
    let (url, _) = serve(&pool).await;
    let payment = Uuid::new_v4();
    let body = charge_body(payment, 999);
    let answers = futures_join(50, |_| {
        let (url, body) = (url.clone(), body.clone());
        async move {
            Client::new(&url)
                .post("/charges", Some(&payment.to_string()), &body)
                .await
        }
    })
    .await;
    let first = &answers[0];
    assert_eq!(first.0, 200, "{}", first.1);
    assert!(answers.iter().all(|a| a == first), "every answer the same");
    assert_eq!(Client::new(&url).ledger(payment).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn declines_follow_the_rules_and_are_answered_the_same_again() {
    let pool = database("declines").await;
    let (url, _) = serve(&pool).await;
    let client = Client::new(&url);
    let payment = Uuid::new_v4();
    let over = charge_body(payment, LIMIT_CENTS + 1);
    let (status, declined) = client.post("/charges", Some("over"), &over).await;
    assert_eq!(
        status, 200,
        "a decline is an answer, not an error: {declined}"
    );
    assert_eq!(declined["status"], "declined");
    assert_eq!(declined["decline_code"], "over_limit");
    assert_eq!(
        client.post("/charges", Some("over"), &over).await.1,
        declined
    );
    let listed =
        json!({"payment_id": Uuid::new_v4(), "customer_id": listed_customer(), "amount_cents": 1});
    let (_, declined) = client.post("/charges", Some("listed"), &listed).await;
    assert_eq!(declined["decline_code"], "do_not_honor");
    let at_limit = charge_body(Uuid::new_v4(), LIMIT_CENTS);
    assert_eq!(
        client.post("/charges", Some("at"), &at_limit).await.1["status"],
        "succeeded"
    );
    // Nothing was charged by a decline, so nothing can be refunded.
    let refund =
        json!({"charge_id": client.ledger(payment).await[0]["charge_id"], "amount_cents": 1});
    let (status, refused) = client.post("/refunds", Some("r"), &refund).await;
    assert_eq!(status, 422, "{refused}");
}

#[tokio::test(flavor = "multi_thread")]
async fn refunds_never_return_more_than_was_charged_even_concurrently() {
    let pool = database("refunds").await;
    let (url, _) = serve(&pool).await;
    let client = Client::new(&url);
    let payment = Uuid::new_v4();
    let (_, charge) = client
        .post("/charges", Some("c"), &charge_body(payment, 1_000))
        .await;
    let charge_id = charge["charge_id"].clone();
    // 20 refunds of 100 at once, each under its own key: exactly 10 fit.
    let answers = futures_join(20, |n| {
        let (url, charge_id) = (url.clone(), charge_id.clone());
        async move {
            Client::new(&url)
                .post(
                    "/refunds",
                    Some(&format!("refund-{n}")),
                    &json!({"charge_id": charge_id, "amount_cents": 100}),
                )
                .await
        }
    })
    .await;
    let made = answers.iter().filter(|(s, _)| *s == 200).count();
    let refused = answers.iter().filter(|(s, _)| *s == 422).count();
    assert_eq!((made, refused), (10, 10), "{answers:?}");
    let ledger = client.ledger(payment).await;
    assert_eq!(ledger[0]["refunded_cents"], 1_000);
    assert_eq!(ledger[0]["refunds"].as_array().unwrap().len(), 10);

    // A replay of a made refund is answered as before, even now that nothing is left.
    let (key, made) = answers
        .iter()
        .enumerate()
        .find(|(_, (s, _))| *s == 200)
        .map(|(n, (_, body))| (format!("refund-{n}"), body.clone()))
        .unwrap();
    let again = client
        .post(
            "/refunds",
            Some(&key),
            &json!({"charge_id": charge_id, "amount_cents": 100}),
        )
        .await;
    assert_eq!(again, (200, made));
    let (status, _) = client
        .post(
            "/refunds",
            Some("unknown"),
            &json!({"charge_id": Uuid::new_v4(), "amount_cents": 1}),
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_a_problem_and_change_nothing() {
    let pool = database("bad").await;
    let (url, _) = serve(&pool).await;
    let client = Client::new(&url);
    let payment = Uuid::new_v4();
    let cases = [
        (None, charge_body(payment, 1), 400),
        (Some("k"), charge_body(payment, 0), 422),
        (Some("k"), charge_body(payment, -5), 422),
        (Some("k"), charge_body(payment, i64::MAX), 422),
        (
            Some("k"),
            json!({"payment_id": payment, "amount_cents": 1}),
            422,
        ),
        (
            Some("k"),
            json!({"payment_id": "nope", "customer_id": payment, "amount_cents": 1}),
            422,
        ),
        (Some(""), charge_body(payment, 1), 400),
    ];
    for (key, body, expected) in cases {
        let (status, problem) = client.post("/charges", key, &body).await;
        assert_eq!(status, expected, "{key:?} {body}: {problem}");
        assert!(
            problem["detail"].is_string(),
            "a problem document: {problem}"
        );
    }
    assert!(client.ledger(payment).await.is_empty());
    for faults in [
        json!({"mode": "ok", "error_rate": 1.5}),
        json!({"mode": "ok", "latency_ms": 600_000}),
        json!({"mode": "sometimes"}),
    ] {
        let (status, _) = client.put_faults(&faults).await;
        assert!(status == 422 || status == 400, "{faults} got {status}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_whole_ledger_reads_in_pages_each_charge_once_with_its_refunds() {
    let pool = database("pages").await;
    let (url, _) = serve(&pool).await;
    let client = Client::new(&url);
    let mut charged = std::collections::HashMap::new();
    for n in 0..7 {
        let payment = Uuid::new_v4();
        let amount = 1_000 + n;
        let (status, charge) = client
            .post(
                "/charges",
                Some(&payment.to_string()),
                &charge_body(payment, amount),
            )
            .await;
        assert_eq!(status, 200, "{charge}");
        if n % 2 == 0 {
            let body = json!({"charge_id": charge["charge_id"], "amount_cents": 10});
            let (status, refund) = client.post("/refunds", Some(&format!("r{n}")), &body).await;
            assert_eq!(status, 200, "{refund}");
        }
        charged.insert(charge["charge_id"].as_str().unwrap().to_owned(), n);
    }
    // Pages of 3: 3, 3, 1, each after the last id of the one before.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let query = after
            .as_ref()
            .map_or(String::new(), |a| format!("&after={a}"));
        let r = client
            .http
            .get(format!("{}/ledger?limit=3{query}", client.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let page: Vec<Value> = r.json().await.unwrap();
        seen.extend(page.iter().cloned());
        if page.len() < 3 {
            break;
        }
        after = page
            .last()
            .map(|e| e["charge_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen.len(), 7, "every charge once: {seen:?}");
    for entry in &seen {
        let n = charged[entry["charge_id"].as_str().unwrap()];
        let refunds = entry["refunds"].as_array().unwrap();
        assert_eq!(refunds.len(), usize::from(n % 2 == 0), "{entry}");
        assert_eq!(entry["refunded_cents"], if n % 2 == 0 { 10 } else { 0 });
    }
    for bad in [
        "limit=0",
        "limit=1001",
        "after=nope",
        "payment_id=00000000-0000-0000-0000-000000000001&limit=2",
        "colour=red",
    ] {
        let r = client
            .http
            .get(format!("{}/ledger?{bad}", client.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_or_a_hang_charges_nothing_and_latency_answers_late_what_was_recorded() {
    let pool = database("faults").await;
    let (url, _) = serve(&pool).await;
    let client = Client::new(&url);
    let payment = Uuid::new_v4();
    let body = charge_body(payment, 700);
    let key = payment.to_string();

    client.put_faults(&json!({"mode": "error"})).await;
    let (status, problem) = client.post("/charges", Some(&key), &body).await;
    assert_eq!(status, 503, "{problem}");
    client
        .put_faults(&json!({"mode": "ok", "error_rate": 1.0}))
        .await;
    assert_eq!(client.post("/charges", Some(&key), &body).await.0, 503);

    client.put_faults(&json!({"mode": "hang"})).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let hung = impatient
        .post(format!("{url}/charges"))
        .header("idempotency-key", &key)
        .json(&body)
        .send()
        .await;
    assert!(hung.is_err_and(|e| e.is_timeout()), "no answer in a hang");
    assert!(client.ledger(payment).await.is_empty(), "nothing charged");

    // Latency: the charge is recorded, the answer comes after the client gave up; asking again
    // with the same key gets the charge that was made.
    client
        .put_faults(&json!({"mode": "ok", "latency_ms": 2_000}))
        .await;
    let late = impatient
        .post(format!("{url}/charges"))
        .header("idempotency-key", &key)
        .json(&body)
        .send()
        .await;
    assert!(late.is_err_and(|e| e.is_timeout()));
    let recorded = client.ledger(payment).await;
    assert_eq!(recorded.len(), 1, "charged although the answer was lost");
    client.put_faults(&json!({"mode": "ok"})).await;
    let (status, again) = client.post("/charges", Some(&key), &body).await;
    assert_eq!(status, 200);
    assert_eq!(again["charge_id"], recorded[0]["charge_id"]);
    assert_eq!(client.ledger(payment).await.len(), 1, "no second charge");
}

/// Runs `n` futures made by `make` at once and returns their outputs in order.
async fn futures_join<T, F, Fut>(n: usize, make: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(make(i))).collect();
    let mut out = Vec::with_capacity(n);
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}
