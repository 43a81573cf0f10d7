//! What a process says when it cannot start, stops on a fatal error, or cannot export its spans:
//! under `LOG_FORMAT=json` every line it writes is one JSON object, so that a log collector can
//! read the one that says why (DESIGN.md's logs; issue 24 found fatal errors printed as plain
//! multi-line text and spans dropped without a word).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use e2e::{Proc, Process, binary, db_url, eventually, postgres_url};
use serde_json::Value;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `program` with `args` under `LOG_FORMAT=json` to its end (within [`TIMEOUT`]); returns
/// its exit code and every line it wrote, on stdout and stderr.
async fn run_json(program: &str, args: &[&str]) -> (Option<i32>, Vec<String>) {
    let run = tokio::process::Command::new(binary(program))
        .args(args)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env_remove("DATABASE_URL")
        .env_remove("RELAY_SOURCES")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not exit within {TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    let lines = [output.stdout, output.stderr]
        .iter()
        .flat_map(|out| {
            String::from_utf8_lossy(out)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    (output.status.code(), lines)
}

/// Every line is a JSON object; returns the one error line among them and its `error` field.
fn the_error_line(program: &str, lines: &[String]) -> (Value, String) {
    let objects: Vec<Value> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(Value::is_object)
                .unwrap_or_else(|| panic!("{program} wrote a line that is no JSON object: {l}"))
        })
        .collect();
    let errors: Vec<&Value> = objects.iter().filter(|o| o["level"] == "ERROR").collect();
    assert_eq!(errors.len(), 1, "{program}: one error line in {lines:#?}");
    let error = errors[0]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{program}: the error line names no error: {}", errors[0]))
        .to_owned();
    (errors[0].clone(), error)
}

/// A setting that does not parse: every process exits with 2 and says which in one JSON line.
#[tokio::test]
async fn a_bad_setting_is_one_json_line_and_exit_status_2_in_every_process() {
    for process in Process::ALL {
        let program = process.program();
        let (code, lines) = run_json(program, &[process.port_flag(), "not-an-address"]).await;
        assert_eq!(code, Some(2), "{program}: {lines:#?}");
        let (line, error) = the_error_line(program, &lines);
        assert!(
            error.contains("not-an-address"),
            "{program}: the error names the bad value: {line}"
        );
    }
}

/// A fatal error once running (its port is taken): every process exits with 1 and says why in
/// one JSON line, the causes included.
#[tokio::test]
async fn a_fatal_error_is_one_json_line_and_exit_status_1_in_every_process() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    for process in Process::ALL {
        let program = process.program();
        let (code, lines) = run_json(program, &[process.port_flag(), &address]).await;
        assert_eq!(code, Some(1), "{program}: {lines:#?}");
        let (line, error) = the_error_line(program, &lines);
        assert!(
            error.contains(&address) && error.to_lowercase().contains("in use"),
            "{program}: the error names the address and why: {line}"
        );
    }
}

/// Spans that cannot be exported (nothing listens at the OTLP endpoint) are said to be dropped,
/// once; when a receiver comes up there, the process says they are exported again and how many
/// were dropped meanwhile, and the receiver gets spans.
#[tokio::test(flavor = "multi_thread")]
async fn spans_that_cannot_be_exported_are_logged_and_so_is_the_recovery() {
    // A port nothing listens on (for now).
    let endpoint = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let db = format!("e2e_spans_{}", Uuid::new_v4().simple());
    let listener = e2e::listener();
    let url = e2e::url_of(&listener);
    let log_dir = e2e::target_dir()
        .join("e2e-logs")
        .join(format!("spans-{}", Uuid::new_v4().simple()));
    let env = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    let _gateway = Proc::spawn_serving(
        "payment-gateway",
        &binary("payment-gateway"),
        &[
            "--listen-addr".into(),
            "stdin".into(),
            "--database-url".into(),
            db_url(&postgres_url(), &db),
        ],
        &log_dir,
        &[
            env("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{endpoint}")),
            env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            env("OTEL_BSP_SCHEDULE_DELAY", "100"),
            env("LOG_FORMAT", "json"),
        ],
        &listener,
    );
    let http = reqwest::Client::new();
    let log = log_dir.join("payment-gateway.log");
    // Requests make spans; the log is read until it says what became of them.
    let logged = |what: &'static str| {
        let (http, url, log) = (http.clone(), url.clone(), log.clone());
        async move {
            eventually(TIMEOUT, || async {
                let _ = http.get(format!("{url}/ledger")).send().await;
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                Ok(text
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .find(|l| l["message"].as_str().is_some_and(|m| m.contains(what))))
            })
            .await
            .unwrap_or_else(|e| panic!("the log says {what:?}: {e}; {}", log.display()))
        }
    };
    let dropped = logged("spans could not be exported").await;
    assert_eq!(dropped["level"], "WARN", "{dropped}");

    let received: Arc<Mutex<usize>> = Arc::default();
    let app = Router::new().route(
        "/v1/traces",
        post({
            let received = received.clone();
            move |_body: String| async move {
                *received.lock().unwrap() += 1;
                "{}"
            }
        }),
    );
    let receiver = tokio::net::TcpListener::bind(endpoint)
        .await
        .expect("the endpoint's port is free again");
    tokio::spawn(async move { axum::serve(receiver, app).await });
    let again = logged("spans are exported again").await;
    assert!(
        again["dropped"].as_u64().is_some_and(|n| n > 0),
        "it says how many were dropped: {again}"
    );
    assert!(*received.lock().unwrap() > 0, "the receiver got spans");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("spans could not be exported").count(),
        1,
        "said once while failing, not for every batch"
    );
    e2e::drop_databases(&postgres_url(), vec![db]);
}
