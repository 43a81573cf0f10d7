//! The card processor's API as payment-service uses it (DESIGN.md, payment-gateway): a charge, a
//! refund and the ledger of a payment, each through one circuit breaker and the kit's outbound
//! client (timeouts, failure classes, `Idempotency-Key`, `traceparent`, metrics).
//!
//! Every answer is checked against the request it answers: a charge for another payment, another
//! customer or another amount, a refund of another charge or amount, a status this API does not
//! give, or a ledger that holds a charge of another payment is not an answer. It is treated as a
//! failure of the call (transient, outcome unknown: the same request is sent again with the same
//! key), logged, and never taken for a success.
//!
//! To point payment-service at a real processor, its API must offer the same three calls with
//! idempotency keys (most do: a payment intent, a refund, a lookup by the merchant's reference);
//! this module is the one place that speaks it.

use serde::{Deserialize, Serialize};
use service_kit::breaker::{Breaker, Outcome, Permit, Rejected};
use service_kit::jobs::JobError;
use service_kit::outbound::{CallError, Client};
use uuid::Uuid;

use crate::domain::LedgerFinding;

/// The breaker's name (the `breaker` label of its metrics) and the calls' `service` label.
pub const NAME: &str = "payment-gateway";

/// The processor, behind its circuit breaker.
#[derive(Clone)]
pub struct Gateway {
    client: Client,
    breaker: Breaker,
}

/// What a charge came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Charged {
    Succeeded { charge_id: Uuid },
    Declined { decline_code: String },
}

/// Why a call to the processor gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The breaker is open: nothing was sent.
    #[error(transparent)]
    Rejected(#[from] Rejected),
    #[error("{0}")]
    Call(#[from] CallError),
}

/// An open breaker is "not now" (no attempt spent, wait at least its retry-after); a failed
/// call is what its class says ([`CallError`]'s conversion).
impl From<GatewayError> for JobError {
    fn from(e: GatewayError) -> Self {
        match e {
            GatewayError::Rejected(rejected) => JobError::Later {
                after: rejected.retry_after,
                why: rejected.to_string(),
            },
            GatewayError::Call(e) => e.into(),
        }
    }
}

#[derive(Debug, Serialize)]
struct ChargeRequest {
    payment_id: Uuid,
    customer_id: Uuid,
    amount_cents: i64,
}

#[derive(Debug, Deserialize)]
struct ChargeAnswer {
    charge_id: Uuid,
    payment_id: Uuid,
    customer_id: Uuid,
    amount_cents: i64,
    status: String,
    decline_code: Option<String>,
}

#[derive(Debug, Serialize)]
struct RefundRequest {
    charge_id: Uuid,
    amount_cents: i64,
}

#[derive(Debug, Deserialize)]
struct RefundAnswer {
    refund_id: Uuid,
    charge_id: Uuid,
    amount_cents: i64,
    status: String,
}

#[derive(Debug, Deserialize)]
struct LedgerEntry {
    charge_id: Uuid,
    payment_id: Uuid,
    amount_cents: i64,
    status: String,
}

/// The key of a payment's refund: one refund per payment, in full.
fn refund_key(payment_id: Uuid) -> String {
    format!("refund-{payment_id}")
}

/// An answer that contradicts its request: a failure whose outcome is unknown.
fn contradiction(what: String) -> CallError {
    tracing::error!(service = NAME, answer = %what, "the processor's answer contradicts the request; treated as a failed call");
    CallError::Transient {
        reason: format!("{NAME}: {what}"),
        outcome_unknown: true,
    }
}

impl Gateway {
    pub fn new(client: Client, breaker: Breaker) -> Gateway {
        Gateway { client, breaker }
    }

    /// Asks the breaker to let one call through. Taken before anything is marked as sent, so
    /// that a call it rejects leaves no trace; each call below spends one.
    pub fn permit(&self) -> Result<Permit, Rejected> {
        self.breaker.try_acquire()
    }

    /// Charges the payment (`Idempotency-Key` = the payment id: a repeat gets the first answer).
    pub async fn charge(
        &self,
        permit: Permit,
        payment_id: Uuid,
        customer_id: Uuid,
        amount_cents: i64,
    ) -> Result<Charged, GatewayError> {
        let request = ChargeRequest {
            payment_id,
            customer_id,
            amount_cents,
        };
        let key = payment_id.to_string();
        self.through_breaker(permit, async {
            let answer: ChargeAnswer = self
                .client
                .post("/charges", "/charges", &request, &key)
                .await?;
            if (answer.payment_id, answer.customer_id, answer.amount_cents)
                != (payment_id, customer_id, amount_cents)
            {
                return Err(contradiction(format!(
                    "a charge of payment {payment_id} ({amount_cents} cents, customer {customer_id}) was answered for payment {} ({} cents, customer {})",
                    answer.payment_id, answer.amount_cents, answer.customer_id
                )));
            }
            match (answer.status.as_str(), answer.decline_code) {
                ("succeeded", _) => Ok(Charged::Succeeded {
                    charge_id: answer.charge_id,
                }),
                ("declined", Some(code)) if !code.is_empty() => Ok(Charged::Declined {
                    decline_code: schemas::limits::truncate_chars(&code, schemas::limits::MAX_CODE_CHARS),
                }),
                (status, code) => Err(contradiction(format!(
                    "a charge was answered with status {:?} and decline code {code:?}",
                    schemas::limits::truncate_chars(status, 32)
                ))),
            }
        })
        .await
    }

    /// Refunds `amount_cents` of the charge (`Idempotency-Key` = `refund-{payment id}`); the
    /// refund's id.
    pub async fn refund(
        &self,
        permit: Permit,
        payment_id: Uuid,
        charge_id: Uuid,
        amount_cents: i64,
    ) -> Result<Uuid, GatewayError> {
        let request = RefundRequest {
            charge_id,
            amount_cents,
        };
        let key = refund_key(payment_id);
        self.through_breaker(permit, async {
            let answer: RefundAnswer = self
                .client
                .post("/refunds", "/refunds", &request, &key)
                .await?;
            if answer.status != "succeeded"
                || (answer.charge_id, answer.amount_cents) != (charge_id, amount_cents)
            {
                return Err(contradiction(format!(
                    "a refund of {amount_cents} cents of charge {charge_id} was answered as {:?} of {} cents of charge {}",
                    schemas::limits::truncate_chars(&answer.status, 32),
                    answer.amount_cents,
                    answer.charge_id
                )));
            }
            Ok(answer.refund_id)
        })
        .await
    }

    /// Asks the ledger whether the payment was charged (its charge's answer never came).
    pub async fn find_charge(
        &self,
        permit: Permit,
        payment_id: Uuid,
        amount_cents: i64,
    ) -> Result<LedgerFinding, GatewayError> {
        let path = format!("/ledger?payment_id={payment_id}");
        self.through_breaker(permit, async {
            let entries: Vec<LedgerEntry> = self.client.get("/ledger", &path).await?;
            let mut charged = None;
            for entry in entries {
                if entry.payment_id != payment_id {
                    return Err(contradiction(format!(
                        "the ledger of payment {payment_id} holds charge {} of payment {}",
                        entry.charge_id, entry.payment_id
                    )));
                }
                match entry.status.as_str() {
                    "declined" => {}
                    "succeeded" if entry.amount_cents == amount_cents && charged.is_none() => {
                        charged = Some(entry.charge_id);
                    }
                    _ => {
                        return Err(contradiction(format!(
                            "the ledger of payment {payment_id} ({amount_cents} cents) holds charge {} of {} cents with status {:?}, besides {charged:?}",
                            entry.charge_id,
                            entry.amount_cents,
                            schemas::limits::truncate_chars(&entry.status, 32)
                        )));
                    }
                }
            }
            Ok(match charged {
                Some(charge_id) => LedgerFinding::Charged { charge_id },
                None => LedgerFinding::NothingCharged,
            })
        })
        .await
    }

    /// Runs `call` under the breaker's `permit` and records its outcome there: no answer, a
    /// timeout, a 5xx, a 429 or a contradicting answer count against the processor; a refusal
    /// (another 4xx) and a declined card do not.
    async fn through_breaker<T>(
        &self,
        permit: Permit,
        call: impl Future<Output = Result<T, CallError>>,
    ) -> Result<T, GatewayError> {
        let result = call.await;
        permit.record(Outcome::of_call(&result));
        Ok(result?)
    }
}
