//! `saga audit` against a real stack: silent on a healthy one, and naming what is wrong when
//! records were not applied, stock does not add up, an order is stuck or the processor charged a
//! payment twice; an error, never "0 findings", when it cannot read a database, the broker or
//! the processor's ledger.

use std::time::Duration;

use e2e::{Stack, eventually};
use serde_json::Value;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(60);

fn kinds(report: &Value) -> Vec<String> {
    let mut kinds: Vec<String> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| f["kind"].as_str().expect("kind").to_owned())
        .collect();
    kinds.sort();
    kinds.dedup();
    kinds
}

/// Tests that need a stack of their own (left out against a running stack: see
/// `e2e::requires_own_stack`).
mod own_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn the_audit_finds_nothing_on_a_healthy_stack_and_names_what_was_broken() {
        e2e::requires_own_stack("breaks the stack's data on purpose");
        let stack = Stack::start("audit").await;
        stack.put_product("A", 100, 10).await;
        stack.one_saga_of_each_outcome().await;
        let confirmed = stack.place_order(&[("A", 2)]).await;
        stack
            .wait_for_statuses(&[confirmed], &["CONFIRMED"], TIMEOUT)
            .await;

        // Healthy: with no grace at all, once the last events are applied, nothing is found.
        let report = eventually(TIMEOUT, || async {
            let (status, report, stderr) = stack.audit("0s", &[]);
            anyhow::ensure!(status != 2, "the audit could not read: {stderr}");
            Ok((status == 0).then_some(report))
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the audit of a healthy stack: {e}; {:?}",
                stack.audit("0s", &[])
            )
        });
        assert_eq!(report["ok"], true);
        assert_eq!(report["read"]["orders"], 3);
        assert!(
            report["read"]["orders.v1"].as_u64().unwrap() >= 6,
            "{report}"
        );
        assert_eq!(report["dead_letters"]["inventory-service"], 0);
        assert!(
            report["read"]["ledger_charges"].as_u64().unwrap() >= 2,
            "the processor's ledger is read: {report}"
        );

        // Broken on purpose: an applied OrderPlaced loses its inbox row, a unit of stock moves from
        // available to reserved behind the reservations' back, and an order is stuck PENDING.
        let inventory = stack.inventory_pool().await;
        let forgotten: Uuid = sqlx::query_scalar(
            "DELETE FROM inbox WHERE message_id = (SELECT message_id FROM inbox \
             WHERE event_type = 'OrderPlaced' LIMIT 1) RETURNING message_id",
        )
        .fetch_one(&inventory)
        .await
        .unwrap();
        sqlx::query("UPDATE products SET available = available - 1, reserved = reserved + 1")
            .execute(&inventory)
            .await
            .unwrap();
        let stuck = Uuid::new_v4();
        stack.create_order_quietly(stuck).await;
        let orders = stack.orders_pool().await;
        sqlx::query("UPDATE orders SET updated_at = now() - interval '1 hour' WHERE order_id = $1")
            .bind(stuck)
            .execute(&orders)
            .await
            .unwrap();

        // And the confirmed order's payment is charged a second time at the processor, under
        // another key (what a client without idempotency keys would do).
        let payment = stack.payment_of(confirmed).await;
        let again = stack
            .http
            .post(format!("{}/charges", stack.gateway_url))
            .header("idempotency-key", "charged-again")
            .json(&serde_json::json!({
                "payment_id": payment["payment_id"],
                "customer_id": payment["customer_id"],
                "amount_cents": payment["amount_cents"],
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 200);

        let (status, report, stderr) = stack.audit("0s", &[]);
        assert_eq!(status, 1, "findings give exit status 1: {report} {stderr}");
        assert_eq!(report["ok"], false);
        assert_eq!(
            kinds(&report),
            ["ledger", "not_terminal", "stock", "unapplied"],
            "{report}"
        );
        let ledger: Vec<&Value> = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["kind"] == "ledger")
            .collect();
        assert_eq!(
            ledger.len(),
            2,
            "charged twice, and twice its total kept: {ledger:?}"
        );
        assert!(
            ledger.iter().all(|f| f["order_id"] == confirmed.to_string()
                && f["payment_id"] == payment["payment_id"]),
            "{ledger:?}"
        );
        let findings = report["findings"].as_array().unwrap();
        assert!(
            findings.iter().any(|f| f["kind"] == "unapplied"
                && f["message_id"] == forgotten.to_string()
                && f["group"] == "inventory-service"),
            "{report}"
        );
        assert!(
            findings
                .iter()
                .any(|f| f["kind"] == "not_terminal" && f["order_id"] == stuck.to_string()),
            "{report}"
        );

        // A grace period longer than the records' age hides what may still be in flight, but not
        // the order stuck for an hour, the stock, or a payment charged twice.
        let (_, report, _) = stack.audit("10m", &[]);
        assert_eq!(
            kinds(&report),
            ["ledger", "not_terminal", "stock"],
            "{report}"
        );

        // Without the ledger, the double charge goes unseen, and the report says so.
        let (_, report, _) = stack.audit("10m", &["--skip-ledger"]);
        assert_eq!(kinds(&report), ["not_terminal", "stock"], "{report}");
        assert_eq!(report["read"]["ledger"], "not checked (--skip-ledger)");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_audit_fails_naming_what_it_could_not_reach() {
        e2e::requires_own_stack("points the audit at addresses where nothing answers");
        let stack = Stack::start("audit_unreachable").await;
        // Port 1 (tcpmux): privileged, and nothing here listens on it; a free port picked now
        // could be another test's by the time the audit connects.
        let closed = 1;
        let here = |db: &str| format!("{}/{db}", e2e::postgres_url());
        let nowhere = |db: &str| format!("postgres://postgres@127.0.0.1:{closed}/{db}");
        let audit = |bootstrap: &str, orders_db: &str, inventory_db: &str| {
            let output = std::process::Command::new(e2e::binary("saga"))
                .args(["-b", bootstrap, "audit", "--json"])
                .args(["--orders-db", orders_db, "--inventory-db", inventory_db])
                // The stack's own payments database and processor: what is unreachable is only
                // what each case names.
                .args(["--payments-db", &here(&stack.payments_db)])
                .args(["--gateway-url", &stack.gateway_url])
                .output()
                .unwrap();
            (
                output.status.code(),
                output.stdout,
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        };
        let broker = stack.broker.bootstrap.clone();

        let (status, stdout, stderr) =
            audit(&broker, &nowhere("orders"), &here(&stack.inventory_db));
        assert_eq!(status, Some(2), "{stderr}");
        assert!(stdout.is_empty(), "no report on data it could not read");
        assert!(
            stderr.contains(&format!(
                "cannot reach the orders database at 127.0.0.1:{closed}/orders"
            )),
            "{stderr}"
        );

        let (status, stdout, stderr) =
            audit(&broker, &here(&stack.orders_db), &nowhere("inventory"));
        assert_eq!(status, Some(2), "{stderr}");
        assert!(stdout.is_empty());
        assert!(
            stderr.contains("cannot reach the inventory database"),
            "{stderr}"
        );

        let nowhere_broker = format!("127.0.0.1:{closed}");
        let (status, stdout, stderr) = audit(
            &nowhere_broker,
            &here(&stack.orders_db),
            &here(&stack.inventory_db),
        );
        assert_eq!(status, Some(2), "{stderr}");
        assert!(stdout.is_empty());
        assert!(
            stderr.contains(&format!("from the Kafka broker at 127.0.0.1:{closed}")),
            "{stderr}"
        );

        // The processor's ledger, where nothing answers.
        let (status, report, stderr) = stack.audit(
            "2m",
            &["--gateway-url", &format!("http://127.0.0.1:{closed}")],
        );
        assert_eq!(status, 2, "{stderr}");
        assert_eq!(
            report,
            serde_json::Value::Null,
            "no report on data it could not read"
        );
        assert!(
            stderr.contains(&format!(
                "cannot read the processor's ledger at http://127.0.0.1:{closed}"
            )),
            "{stderr}"
        );
    }
}
