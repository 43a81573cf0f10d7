//! Faults only containers make easy, against the Docker Compose stack that
//! scripts/compose-test.sh brings up: while orders flow, each process and the broker cut from the
//! stack's network for longer than the consumers' session timeout (`docker network disconnect`,
//! then `connect` with the same address and name), the broker paused (`docker pause`), and every
//! process killed inside its container from the host (`kill -9` of its process: `docker kill`
//! is a manual stop, which restart policies ignore), each brought back by its restart policy.
//! Then every order of the run is terminal, its stock and its money add up, none of its records
//! was dead-lettered, and no container restarted more often than it was killed. And, last and
//! alone (scripts/compose-test.sh runs it after the rest), the Docker daemon restarted under the
//! stack: every container back and healthy with no manual step, the saga working on.
//!
//! The checks are of the run's own orders, skus and keys: the stack is shared with the rest of the
//! suite, whose tests leave records and orders of their own behind.

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::{Process, Stack, eventually, kafka};
use serde_json::{Value, json};
use uuid::Uuid;

/// The consumers' session timeout is 10 s: a cut longer than that makes the group rebalance.
const CUT: Duration = Duration::from_secs(13);
const PAUSE: Duration = Duration::from_secs(13);
/// Every process: its Compose service is named after its binary.
fn processes() -> [&'static str; 6] {
    Process::ALL.map(Process::program)
}

/// The stack's containers, through Debian's docker CLI (run as root, as the tests here are).
struct Containers {
    project: String,
}

impl Containers {
    fn of_stack() -> Containers {
        Containers {
            project: std::env::var("E2E_COMPOSE_PROJECT")
                .expect("E2E_COMPOSE_PROJECT names the Compose project (scripts/compose-test.sh)"),
        }
    }

    fn docker(&self, args: &[&str]) -> String {
        let out = Command::new("/usr/bin/docker")
            .args(args)
            .output()
            .expect("docker");
        assert!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn id(&self, service: &str) -> String {
        let id = self.docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ]);
        assert!(
            !id.is_empty() && !id.contains('\n'),
            "one {service}: {id:?}"
        );
        id
    }

    fn inspect(&self, service: &str, format: &str) -> String {
        self.docker(&["inspect", "-f", format, &self.id(service)])
    }

    fn network(&self) -> String {
        format!("{}_default", self.project)
    }

    /// Cuts `service` from the stack's network for `how_long`, then connects it again with the
    /// address and the name it had.
    async fn cut(&self, service: &str, how_long: Duration) {
        let network = self.network();
        let ip = self.inspect(
            service,
            &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
        );
        let id = self.id(service);
        self.docker(&["network", "disconnect", &network, &id]);
        tokio::time::sleep(how_long).await;
        self.docker(&[
            "network", "connect", "--ip", &ip, "--alias", service, &network, &id,
        ]);
    }

    async fn pause(&self, service: &str, how_long: Duration) {
        let id = self.id(service);
        self.docker(&["pause", &id]);
        tokio::time::sleep(how_long).await;
        self.docker(&["unpause", &id]);
    }

    fn restarts(&self, service: &str) -> u64 {
        self.inspect(service, "{{.RestartCount}}")
            .parse()
            .expect("a restart count")
    }

    fn healthy(&self, service: &str) -> bool {
        self.inspect(service, "{{.State.Status}} {{.State.Health.Status}}") == "running healthy"
    }

    /// `kill -9` of the container's process from the host, then waits until its restart policy
    /// has started it again and it is healthy.
    async fn kill_inside(&self, service: &str) {
        let restarts = self.restarts(service);
        let pid = self.inspect(service, "{{.State.Pid}}");
        let killed = Command::new("kill").args(["-9", &pid]).status().unwrap();
        assert!(killed.success(), "kill -9 {pid} ({service})");
        eventually(Duration::from_secs(120), || async {
            Ok((self.restarts(service) > restarts && self.healthy(service)).then_some(()))
        })
        .await
        .unwrap_or_else(|_| {
            panic!("{service} was not restarted and healthy within 120 s of its kill")
        });
    }

    /// Whether `service` runs and is healthy; `false` also while the daemon does not answer.
    fn try_healthy(&self, service: &str) -> bool {
        let id = Command::new("/usr/bin/docker")
            .args([
                "ps",
                "-q",
                "--filter",
                &format!("label=com.docker.compose.project={}", self.project),
                "--filter",
                &format!("label=com.docker.compose.service={service}"),
            ])
            .output();
        let Some(id) = id
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|id| !id.is_empty())
        else {
            return false;
        };
        Command::new("/usr/bin/docker")
            .args([
                "inspect",
                "-f",
                "{{.State.Status}} {{.State.Health.Status}}",
                &id,
            ])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "running healthy")
    }

    /// Stops the Docker daemon (SIGTERM: it stops the containers, as on a host's shutdown) and
    /// starts it again, in a session of its own so that it outlives the test, logging to `log`.
    async fn restart_daemon(&self, log: &str) {
        let pid = std::fs::read_to_string("/var/run/docker.pid")
            .expect("the daemon's pid file")
            .trim()
            .to_owned();
        let stopped = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(stopped.success(), "kill -TERM {pid} (dockerd)");
        eventually(Duration::from_secs(60), || async {
            Ok((!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(()))
        })
        .await
        .expect("dockerd stopped within 60 s");
        let out = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
            .expect("the daemon's log");
        // `setsid --fork` returns at once, leaving dockerd in a session of its own.
        let started = Command::new("setsid")
            .args(["--fork", "dockerd"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .status()
            .expect("starting dockerd");
        assert!(started.success(), "setsid --fork dockerd: {started}");
        eventually(Duration::from_secs(60), || async {
            let answers = Command::new("/usr/bin/docker")
                .arg("info")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            Ok(answers.then_some(()))
        })
        .await
        .expect("the restarted dockerd answers within 60 s");
    }

    async fn wait_healthy(&self, service: &str) {
        eventually(Duration::from_secs(120), || async {
            Ok(self.healthy(service).then_some(()))
        })
        .await
        .unwrap_or_else(|_| panic!("{service} is not healthy again within 120 s"));
    }
}

/// An order the load placed and whether a cancel was asked for it.
#[derive(Debug, Clone)]
struct Placed {
    id: Uuid,
    lines: Vec<(String, i64)>,
}

/// Orders offered at a steady pace whatever the faults do: each POST carries an Idempotency-Key
/// and is repeated until it gets an answer (a cut can lose the answer of an order that was
/// accepted); every fifth order is cancelled once accepted, until that is answered too.
struct Load {
    http: reqwest::Client,
    order_url: String,
    skus: Vec<String>,
    placed: Mutex<Vec<Placed>>,
}

impl Load {
    async fn answer(&self, request: impl Fn() -> reqwest::RequestBuilder) -> (u16, Value) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Ok(r) = request().timeout(Duration::from_secs(10)).send().await
                && !r.status().is_server_error()
            {
                let status = r.status().as_u16();
                if let Ok(body) = r.json::<Value>().await {
                    return (status, body);
                }
            }
            assert!(
                Instant::now() < deadline,
                "no answer from order-service in 300 s"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn customer(self: Arc<Self>, n: usize) {
        let lines: Vec<(String, i64)> = if n.is_multiple_of(3) {
            vec![(self.skus[0].clone(), 1), (self.skus[1].clone(), 2)]
        } else {
            vec![(self.skus[n % 2].clone(), 1)]
        };
        let body = json!({
            "customer_id": Uuid::new_v4(),
            "items": lines.iter().map(|(sku, q)| json!({"sku": sku, "quantity": q})).collect::<Vec<_>>(),
        });
        let key = Uuid::new_v4().to_string();
        let (status, order) = self
            .answer(|| {
                self.http
                    .post(format!("{}/orders", self.order_url))
                    .header("Idempotency-Key", &key)
                    .json(&body)
            })
            .await;
        assert_eq!(status, 201, "POST /orders: {order}");
        let id: Uuid = order["order_id"].as_str().unwrap().parse().unwrap();
        self.placed.lock().unwrap().push(Placed {
            id,
            lines: lines.clone(),
        });
        if n % 5 == 4 {
            let (status, answer) = self
                .answer(|| {
                    self.http
                        .post(format!("{}/orders/{id}/cancel", self.order_url))
                })
                .await;
            assert!(
                [200, 202, 409].contains(&status),
                "cancel {id}: {status} {answer}"
            );
        }
    }
}

/// Orders offered every 200 ms until [`Running::stop`], each by a customer of its own.
struct Running {
    load: Arc<Load>,
    running: Arc<AtomicBool>,
    generator: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(stack: &Stack, skus: &[String]) -> Running {
        let load = Arc::new(Load {
            http: stack.http.clone(),
            order_url: stack.order_url.clone(),
            skus: skus.to_vec(),
            placed: Mutex::default(),
        });
        let running = Arc::new(AtomicBool::new(true));
        let generator = {
            let (load, running) = (load.clone(), running.clone());
            tokio::spawn(async move {
                let mut customers = tokio::task::JoinSet::new();
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                let mut n = 0;
                while running.load(Ordering::SeqCst) {
                    tick.tick().await;
                    customers.spawn(load.clone().customer(n));
                    n += 1;
                }
                while let Some(done) = customers.join_next().await {
                    done.expect("a customer failed");
                }
            })
        };
        Running {
            load,
            running,
            generator,
        }
    }

    /// Stops offering, waits for every customer's requests to be answered, returns the orders.
    async fn stop(self) -> Vec<Placed> {
        self.running.store(false, Ordering::SeqCst);
        self.generator.await.expect("the load");
        self.load.placed.lock().unwrap().clone()
    }
}

/// The run's two skus, each with `STOCK` units.
async fn stock_up(stack: &Stack, run: &str) -> [String; 2] {
    let names = [format!("{run}-A"), format!("{run}-B")];
    stack.put_product(&names[0], 250, STOCK).await;
    stack.put_product(&names[1], 400, STOCK).await;
    [stack.sku(&names[0]), stack.sku(&names[1])]
}

const STOCK: i64 = 1_000_000;

/// Waits until every order in `placed` has ended, and checks what a user would: a confirmed
/// order was charged its total once at the processor and any other kept nothing; nothing was
/// rejected (the stock is plenty); each sku's sold stock is what the confirmed orders took,
/// nothing is left reserved and stock is conserved; no group dead-lettered a record of the run.
/// Returns how many orders ended in each status.
async fn every_order_ends_and_adds_up(
    stack: &Stack,
    placed: &[Placed],
    skus: &[String],
) -> HashMap<String, usize> {
    let ids: Vec<Uuid> = placed.iter().map(|p| p.id).collect();
    let statuses = stack
        .wait_for_statuses(
            &ids,
            &["CONFIRMED", "REJECTED", "CANCELLED"],
            Duration::from_secs(300),
        )
        .await;
    let mut sold: HashMap<&str, i64> = HashMap::new();
    for order in placed {
        let status = statuses[&order.id].as_str();
        let view = stack
            .get_json(&format!("{}/orders/{}", stack.order_url, order.id))
            .await;
        let payment = stack.payment_of(order.id).await;
        let (net, charges) = match payment["payment_id"].as_str() {
            Some(payment_id) => stack.ledger_of(payment_id).await,
            None => (0, 0),
        };
        if status == "CONFIRMED" {
            assert_eq!(
                (net, charges),
                (view["total_cents"].as_i64().unwrap(), 1),
                "{}: confirmed, charged {net} in {charges} charges: {view}",
                order.id
            );
            for (sku, quantity) in &order.lines {
                *sold.entry(sku.as_str()).or_default() += quantity;
            }
        } else {
            assert_eq!(net, 0, "{}: {status}, and {net} cents kept", order.id);
            assert_ne!(
                status, "REJECTED",
                "{}: plenty of stock, yet rejected",
                order.id
            );
        }
    }
    for sku in skus {
        let product = stack
            .get_json(&format!("{}/products/{sku}", stack.inventory_url))
            .await;
        let (available, reserved, sold_now) = (
            product["available"].as_i64().unwrap(),
            product["reserved"].as_i64().unwrap(),
            product["sold"].as_i64().unwrap(),
        );
        let expected = sold.get(sku.as_str()).copied().unwrap_or(0);
        assert_eq!(
            (reserved, sold_now, available + reserved + sold_now),
            (0, expected, STOCK),
            "{sku}: {product}"
        );
    }
    let keys: HashSet<String> = ids.iter().map(Uuid::to_string).collect();
    for group in [
        schemas::ORDER_SERVICE,
        schemas::INVENTORY_SERVICE,
        schemas::PAYMENT_SERVICE,
    ] {
        let topic = messaging::kafka::dead_letter_topic(group);
        let dead = kafka::read_topic(&stack.broker.bootstrap, &topic)
            .await
            .unwrap_or_default();
        let ours: Vec<String> = dead
            .iter()
            .map(|d| d.key_text())
            .filter(|k| keys.contains(k))
            .collect();
        assert!(
            ours.is_empty(),
            "{topic} holds records of the run: {ours:?}"
        );
    }
    statuses.values().fold(HashMap::new(), |mut m, s| {
        *m.entry(s.clone()).or_insert(0) += 1;
        m
    })
}

mod compose_stack {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn orders_flowing_through_network_cuts_a_paused_broker_and_killed_processes_all_end_and_add_up()
     {
        e2e::requires_compose("cuts, pauses and kills the stack's containers");
        let stack = Stack::start("compose_faults").await;
        let containers = Containers::of_stack();
        let skus = stock_up(&stack, "FAULTS").await;
        let restarts_before: HashMap<&str, u64> = processes()
            .iter()
            .map(|p| (*p, containers.restarts(p)))
            .collect();

        let load = Running::start(&stack, &skus);
        let mut faults = Vec::new();
        for service in [
            "outbox-relay",
            "order-service",
            "inventory-service",
            "payment-service",
            "kafka",
        ] {
            eprintln!("compose faults: {service} cut from the network for {CUT:?}");
            containers.cut(service, CUT).await;
            containers.wait_healthy(service).await;
            faults.push(format!("{service} cut {CUT:?}"));
        }
        eprintln!("compose faults: the broker paused for {PAUSE:?}");
        containers.pause("kafka", PAUSE).await;
        faults.push(format!("kafka paused {PAUSE:?}"));
        for service in processes() {
            eprintln!("compose faults: kill -9 of {service} inside its container");
            containers.kill_inside(service).await;
            faults.push(format!("kill -9 {service}"));
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let placed = load.stop().await;
        eprintln!(
            "compose faults: {} faults, {} orders placed; waiting for every one to end",
            faults.len(),
            placed.len()
        );
        assert!(placed.len() >= 100, "only {} orders placed", placed.len());
        let by_status = every_order_ends_and_adds_up(&stack, &placed, &skus).await;
        // No process crashed by itself: each restarted exactly once, for its kill.
        for process in processes() {
            assert_eq!(
                containers.restarts(process),
                restarts_before[process] + 1,
                "{process} restarted other than for its kill"
            );
        }
        eprintln!(
            "compose faults: {}; {} orders, {by_status:?}; stock and money add up, no dead letters",
            faults.join(", "),
            placed.len()
        );
    }

    /// The Docker daemon stops (as on a host's shutdown) and starts again: every long-running
    /// container comes back by its restart policy and is healthy, with no manual step, and the
    /// saga works on. The stand-in broker keeps its log in memory (apache/kafka keeps it in the
    /// container, which a restart keeps), so the daemon restarts once the orders before it have
    /// ended; those and the ones after must all add up.
    #[tokio::test(flavor = "multi_thread")]
    async fn after_a_docker_daemon_restart_every_container_comes_back_and_orders_complete() {
        e2e::requires_compose("restarts the Docker daemon under the stack");
        let log = std::env::var("E2E_DOCKERD_LOG").unwrap_or_else(|_| {
            panic!(
                "E2E_DOCKERD_LOG is not set: only a Docker daemon that scripts/compose-test.sh \
                 started itself is restarted (and it runs this test last)"
            )
        });
        let stack = Stack::start("compose_daemon_restart").await;
        let containers = Containers::of_stack();
        let skus = stock_up(&stack, "RESTART").await;

        let load = Running::start(&stack, &skus);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let mut placed = load.stop().await;
        every_order_ends_and_adds_up(&stack, &placed, &skus).await;

        let started = Instant::now();
        eprintln!("compose faults: restarting the Docker daemon");
        containers.restart_daemon(&log).await;
        let services = ["kafka", "postgres", "prometheus"]
            .into_iter()
            .chain(processes());
        for service in services {
            eventually(Duration::from_secs(240), || async {
                Ok(containers.try_healthy(service).then_some(()))
            })
            .await
            .unwrap_or_else(|_| {
                panic!("{service} is not running and healthy within 240 s of the daemon's restart")
            });
        }
        eprintln!(
            "compose faults: every container healthy {:.0} s after the daemon's restart began",
            started.elapsed().as_secs_f64()
        );

        let load = Running::start(&stack, &skus);
        tokio::time::sleep(Duration::from_secs(10)).await;
        placed.extend(load.stop().await);
        let by_status = every_order_ends_and_adds_up(&stack, &placed, &skus).await;
        eprintln!(
            "compose faults: daemon restarted; {} orders before and after it, {by_status:?}; stock and money add up",
            placed.len()
        );
    }
}
