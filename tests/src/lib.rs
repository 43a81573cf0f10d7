//! The end-to-end harness: starts a Tansu broker, the two services and the relay as real processes,
//! each test with its own databases and its own broker, and gives tests the handles a user has:
//! HTTP, the topics, `/metrics`, and the databases.
//!
//! The binaries must be built first (`cargo build --bins`; the test script does it). Settings:
//! `E2E_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432`), `TANSU_BIN` (default: the
//! project's cached build, then `tansu` on PATH). Process logs go to `target/e2e-logs/<test>/`.
//!
//! With `E2E_STACK` set the same tests run against a stack that is already running instead (see
//! [`external_stack`]): `compose` (`docker compose up --wait`) or `local` (`scripts/run.sh`).
//! There every test uses its own skus (prefixed, see [`Stack::sku`]) and its own order ids, reads
//! counters as increases since it started (so run the tests one at a time: `--test-threads 1`),
//! and tests that must stop processes, restart them or start them with other settings are left
//! out by the runner (they live in `own_stack` modules; see [`requires_own_stack`]).

pub mod bench;
pub mod browser;
pub mod chaos;
pub mod kafka;
pub mod pg_cluster;
pub mod proxy;
pub mod tls;
pub mod wire;

use std::collections::HashMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

pub fn postgres_url() -> String {
    match external_stack() {
        Some(stack) => stack.postgres_url.clone(),
        None => std::env::var("E2E_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into()),
    }
}

/// A stack that is already running, which the tests are pointed at with `E2E_STACK`.
#[derive(Debug, Clone)]
pub struct ExternalStack {
    /// `E2E_STACK`: `compose` or `local`.
    pub name: String,
    pub order_url: String,
    pub inventory_url: String,
    pub payment_url: String,
    /// The stand-in card processor.
    pub gateway_url: String,
    pub relay_url: String,
    pub monitor_url: String,
    pub bootstrap: String,
    /// Server URL without a database, like [`postgres_url`].
    pub postgres_url: String,
    pub orders_db: String,
    pub inventory_db: String,
    pub payments_db: String,
    /// The bearer token of `PUT /products` and `PUT /faults` (`E2E_ADMIN_TOKEN`), when the
    /// stack has one.
    pub admin_token: Option<String>,
}

impl ExternalStack {
    /// Where the stack called `name` is without overrides: `compose` is what
    /// `docker compose up --wait` publishes on the host (services on 8080-8084, Kafka's host
    /// listener on localhost:9094, Postgres on 5433), `local` is `scripts/run.sh` (the same
    /// service ports, Tansu on 9092, Postgres on 5432). `None` for another name.
    pub fn defaults(name: &str) -> Option<ExternalStack> {
        let (bootstrap, postgres_url) = match name {
            // Compose's Postgres has a password (POSTGRES_PASSWORD, `saga-local-dev` unless set).
            "compose" => (
                "localhost:9094",
                "postgres://postgres:saga-local-dev@127.0.0.1:5433",
            ),
            "local" => ("127.0.0.1:9092", "postgres://postgres@127.0.0.1:5432"),
            _ => return None,
        };
        Some(ExternalStack {
            name: name.to_owned(),
            order_url: "http://127.0.0.1:8080".into(),
            inventory_url: "http://127.0.0.1:8081".into(),
            payment_url: "http://127.0.0.1:8083".into(),
            gateway_url: "http://127.0.0.1:8084".into(),
            relay_url: "http://127.0.0.1:8082".into(),
            monitor_url: "http://127.0.0.1:8085".into(),
            bootstrap: bootstrap.into(),
            postgres_url: postgres_url.into(),
            orders_db: "orders".into(),
            inventory_db: "inventory".into(),
            payments_db: "payments".into(),
            // Compose's default (ADMIN_TOKEN unset); the local stack has none.
            admin_token: (name == "compose").then(|| "saga-local-dev-admin".to_owned()),
        })
    }
}

/// The running stack named by `E2E_STACK` ([`ExternalStack::defaults`]), or `None` when each test
/// starts its own. Each address can be overridden: `E2E_ORDER_URL`, `E2E_INVENTORY_URL`,
/// `E2E_PAYMENT_URL`, `E2E_GATEWAY_URL`, `E2E_RELAY_URL`, `E2E_MONITOR_URL`, `E2E_KAFKA_BOOTSTRAP`,
/// `E2E_POSTGRES_URL`, `E2E_ORDERS_DB`, `E2E_INVENTORY_DB`, `E2E_PAYMENTS_DB`; and
/// `E2E_ADMIN_TOKEN` is the stack's admin token, if it has one.
pub fn external_stack() -> Option<&'static ExternalStack> {
    static STACK: OnceLock<Option<ExternalStack>> = OnceLock::new();
    STACK
        .get_or_init(|| {
            let name = std::env::var("E2E_STACK").ok().filter(|s| !s.is_empty())?;
            let mut stack = ExternalStack::defaults(&name).unwrap_or_else(|| {
                panic!(
                    "E2E_STACK={name:?}: expected `compose` (docker compose up --wait) or \
                     `local` (scripts/run.sh), or unset to let each test start its own"
                )
            });
            for (variable, field) in [
                ("E2E_ORDER_URL", &mut stack.order_url),
                ("E2E_INVENTORY_URL", &mut stack.inventory_url),
                ("E2E_PAYMENT_URL", &mut stack.payment_url),
                ("E2E_GATEWAY_URL", &mut stack.gateway_url),
                ("E2E_RELAY_URL", &mut stack.relay_url),
                ("E2E_MONITOR_URL", &mut stack.monitor_url),
                ("E2E_KAFKA_BOOTSTRAP", &mut stack.bootstrap),
                ("E2E_POSTGRES_URL", &mut stack.postgres_url),
                ("E2E_ORDERS_DB", &mut stack.orders_db),
                ("E2E_INVENTORY_DB", &mut stack.inventory_db),
                ("E2E_PAYMENTS_DB", &mut stack.payments_db),
            ] {
                if let Some(value) = std::env::var(variable).ok().filter(|v| !v.is_empty()) {
                    *field = value;
                }
            }
            if let Some(token) = std::env::var("E2E_ADMIN_TOKEN")
                .ok()
                .filter(|v| !v.is_empty())
            {
                stack.admin_token = Some(token);
            }
            Some(stack)
        })
        .as_ref()
}

/// The module that holds, in every test file, the tests that need a stack of their own (they
/// stop, restart or reconfigure processes, or break data on purpose): `own_stack::<test>`.
/// Against a running stack they are left out by name, so that the runner reports them as
/// skipped: `cargo nextest run -p e2e -- --skip own_stack::` (scripts/test.sh does).
pub const OWN_STACK_MODULE: &str = "own_stack::";

/// First line of every test in an `own_stack` module: panics, saying why, when the tests run
/// against a stack they do not control (a test that cannot do what it is for must fail or be
/// skipped by the runner, never pass).
pub fn requires_own_stack(what_it_does: &str) {
    if let Some(stack) = external_stack() {
        panic!(
            "this test {what_it_does}, so it cannot run against E2E_STACK={}: leave out the \
             tests named {OWN_STACK_MODULE}* (`cargo nextest run -p e2e -- --skip {OWN_STACK_MODULE}`, \
             as scripts/test.sh does)",
            stack.name
        );
    }
}

/// The module that holds the tests that need the Docker Compose stack itself (they cut, pause
/// and kill its containers): `compose_stack::<test>`. Everywhere else they are left out by name,
/// so that the runner reports them as skipped; scripts/compose-test.sh runs them.
pub const COMPOSE_STACK_MODULE: &str = "compose_stack::";

/// First line of every test in a `compose_stack` module: panics, saying why, unless the tests
/// run against the Compose stack that scripts/compose-test.sh brought up.
pub fn requires_compose(what_it_does: &str) {
    let on_compose = external_stack().is_some_and(|s| s.name == "compose");
    if !on_compose || std::env::var_os("E2E_COMPOSE_PROJECT").is_none() {
        panic!(
            "this test {what_it_does}, so it runs only against the Compose stack of \
             scripts/compose-test.sh (E2E_STACK=compose and E2E_COMPOSE_PROJECT set): leave out \
             the tests named {COMPOSE_STACK_MODULE}* elsewhere (`-- --skip {COMPOSE_STACK_MODULE}`, \
             as scripts/test.sh does)"
        );
    }
}

/// The URL of database `db` on `server` (a URL without a database, perhaps with query
/// parameters such as `?sslmode=verify-full&sslrootcert=…`, which stay at the end).
pub fn db_url(server: &str, db: &str) -> String {
    match server.split_once('?') {
        Some((base, query)) => format!("{base}/{db}?{query}"),
        None => format!("{server}/{db}"),
    }
}

/// `host:port` of [`postgres_url`].
pub fn postgres_host_port() -> String {
    host_port_of(&postgres_url())
}

/// `host:port` of a `postgres://user@host:port[/db]` URL.
pub fn host_port_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
}

/// `target/debug` or `target/release`: where the running test (in `deps/`) or benchmark was built.
/// An empty directory for a test's logs: `target/e2e-logs/<test>`.
pub fn test_log_dir(test: &str) -> PathBuf {
    let dir = target_dir().join("e2e-logs").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("log dir");
    dir
}

pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn binary(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The patched Tansu broker that scripts/lib.sh builds and names in `TANSU_BIN` (its path
/// carries the patch level, so a stale build is never picked up by a guess).
pub fn tansu_binary() -> PathBuf {
    match std::env::var_os("TANSU_BIN") {
        Some(path) => PathBuf::from(path),
        None => panic!(
            "TANSU_BIN is not set: run the tests with scripts/test.sh, or `source scripts/lib.sh && \
             ensure_tansu` first (it builds the patched broker and exports TANSU_BIN)"
        ),
    }
}

/// A port free on 127.0.0.1 now, below Linux's ephemeral range (32768-60999 by default), for a
/// program that binds its own port (the broker, its TLS proxy, Postgres, Prometheus). Another test
/// can take it before the program binds it: check with [`listens_on`] and try another. The
/// project's own processes never get one: they are given a listener ([`listener`]).
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = rand::random_range(20_000..32_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000-32000 after 1000 tries")
}

/// A listening socket on a port of 127.0.0.1 the kernel picks, for a process of the project to
/// serve on (`--listen-addr stdin`, see [`Proc::spawn_serving`]). The test keeps it for as long as
/// the stack lives, so a process restarted on it finds its port, and no other test can take it.
pub fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0")
}

/// `http://` and the address of `listener`.
pub fn url_of(listener: &TcpListener) -> String {
    format!("http://{}", listener.local_addr().expect("local address"))
}

/// Whether process `pid` holds the socket listening on `port` of 127.0.0.1 (from /proc): a program
/// started on a port that another test took first exits, but until it does a client reaches the
/// other test's process there.
pub fn listens_on(pid: u32, port: u16) -> bool {
    let tables: String = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|t| std::fs::read_to_string(t).ok())
        .collect();
    let sockets: Vec<String> = tables
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (_, local_port) = fields.get(1)?.split_once(':')?;
            let listening = *fields.get(3)? == "0A";
            let inode = fields.get(9)?;
            (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| format!("socket:[{inode}]"))
        })
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| sockets.iter().any(|s| target.as_os_str() == s.as_str()))
}

/// The log level of the project's processes: `E2E_RUST_LOG`, `info` by default.
fn project_log_level() -> String {
    std::env::var("E2E_RUST_LOG").unwrap_or_else(|_| "info".into())
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
}

impl Proc {
    /// Starts one of the project's processes, logging at `E2E_RUST_LOG` (default `info`).
    pub fn spawn(name: &str, program: &Path, args: &[String], log_dir: &Path) -> Proc {
        Self::spawn_env(name, program, args, log_dir, &[])
    }

    /// [`Proc::spawn`] with extra environment variables.
    pub fn spawn_env(
        name: &str,
        program: &Path,
        args: &[String],
        log_dir: &Path,
        env: &[(String, String)],
    ) -> Proc {
        Self::spawn_logging(name, program, args, log_dir, &project_log_level(), env)
    }

    /// [`Proc::spawn_env`] for a process that serves HTTP on `listener`, given to it as its
    /// standard input (its `--listen-addr` or `--metrics-addr` must be `stdin`).
    pub fn spawn_serving(
        name: &str,
        program: &Path,
        args: &[String],
        log_dir: &Path,
        env: &[(String, String)],
        listener: &TcpListener,
    ) -> Proc {
        let socket = std::os::fd::OwnedFd::from(listener.try_clone().expect("the listener"));
        let log_level = project_log_level();
        Self::spawn_with_stdin(name, program, args, log_dir, &log_level, env, socket.into())
    }

    /// Starts `program` with `RUST_LOG=log_level`, its output appended to `<log_dir>/<name>.log`.
    pub fn spawn_logging(
        name: &str,
        program: &Path,
        args: &[String],
        log_dir: &Path,
        log_level: &str,
        env: &[(String, String)],
    ) -> Proc {
        Self::spawn_with_stdin(name, program, args, log_dir, log_level, env, Stdio::null())
    }

    fn spawn_with_stdin(
        name: &str,
        program: &Path,
        args: &[String],
        log_dir: &Path,
        log_level: &str,
        env: &[(String, String)],
        stdin: Stdio,
    ) -> Proc {
        std::fs::create_dir_all(log_dir).expect("log dir");
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_dir.join(format!("{name}.log")))
            .expect("log file");
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", log_level)
            .env_remove("DATABASE_URL")
            .env_remove("RELAY_SOURCES")
            .env_remove("KAFKA_CONFIG")
            .env_remove("LOG_FORMAT")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(stdin)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        Proc {
            name: name.to_owned(),
            child: Some(child),
        }
    }

    /// `kill -9`: no clean shutdown, no last words.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits up to `within` for the process to exit by itself; `true` if it did.
    /// It is killed (SIGKILL) if it did not.
    pub fn stop_within(&mut self, within: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill").arg(child.id().to_string()).status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`, ...) with `kill -<signal>`; nothing when the
    /// process was already killed.
    pub fn signal(&mut self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status();
        }
    }

    /// The process id, while the process has not been stopped or killed.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A Tansu broker on a free port, in memory (or the bootstrap address of an external stack's).
pub struct Broker {
    pub bootstrap: String,
    proc: Option<Proc>,
    /// The librdkafka properties a client needs to talk to it (TLS: `security.protocol=ssl`
    /// and the CA), as `KEY=VALUE`.
    pub client_config: Vec<String>,
    /// The TLS-terminating proxy in front of it ([`Broker::start_tls`]).
    _tls_proxy: Option<Proc>,
}

impl Broker {
    /// The `--kafka-config` arguments of every process talking to this broker.
    fn kafka_config_args(&self) -> Vec<String> {
        self.client_config
            .iter()
            .flat_map(|p| ["--kafka-config".to_owned(), p.clone()])
            .collect()
    }

    /// SIGSTOP: the broker holds every connection open and answers nothing, as a hung or
    /// partitioned broker does.
    pub fn pause(&mut self) {
        self.proc.as_mut().expect("own broker").signal("STOP");
    }

    /// The broker's process id (none for an external stack's broker).
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// SIGCONT after [`Broker::pause`].
    pub fn resume(&mut self) {
        self.proc.as_mut().expect("own broker").signal("CONT");
    }

    pub async fn start(log_dir: &Path) -> Broker {
        Broker::start_with(log_dir, &[]).await
    }

    /// The external stack's broker, or one of the test's own ([`Broker::start`]).
    pub async fn for_test(log_dir: &Path) -> Broker {
        match external_stack() {
            Some(external) => Broker::of(external),
            None => Broker::start(log_dir).await,
        }
    }

    /// The broker of an external stack (nothing to start or stop).
    fn of(external: &ExternalStack) -> Broker {
        Broker {
            bootstrap: external.bootstrap.clone(),
            proc: None,
            client_config: Vec::new(),
            _tls_proxy: None,
        }
    }

    /// [`Broker::start`] with these environment variables (a fault to inject).
    pub async fn start_with(log_dir: &Path, env: &[(&str, &str)]) -> Broker {
        for _ in 0..5 {
            let port = free_port();
            let url = format!("tcp://127.0.0.1:{port}");
            let mut proc = spawn_tansu(log_dir, &url, &url, env);
            // Another test may have taken the port first: then the broker exits.
            if !owns_port(&mut proc, port).await {
                continue;
            }
            let bootstrap = format!("127.0.0.1:{port}");
            kafka::wait_for_broker(&bootstrap, Duration::from_secs(30))
                .await
                .expect("broker did not come up");
            return Broker {
                bootstrap,
                proc: Some(proc),
                client_config: Vec::new(),
                _tls_proxy: None,
            };
        }
        panic!("5 ports were taken by the time the broker started on them")
    }

    /// A broker reachable over TLS only, the way a secured Kafka is: Tansu on a plaintext port
    /// of its own (its own TLS is not usable), advertising `localhost:<tls port>`, where socat
    /// terminates TLS with a certificate for `localhost` signed by a CA made here (in
    /// `<log_dir>/kafka-tls/ca.crt`). Clients need [`Broker::client_config`].
    pub async fn start_tls(log_dir: &Path) -> Broker {
        let tls_dir = log_dir.join("kafka-tls");
        std::fs::create_dir_all(&tls_dir).expect("tls dir");
        tls::make_ca_and_server_cert(&tls_dir, "ca", Some("server")).expect("certificates");
        for _ in 0..5 {
            let (plain, tls_port) = (free_port(), free_port());
            if let Some(broker) = Self::start_tls_on(log_dir, &tls_dir, plain, tls_port).await {
                return broker;
            }
        }
        panic!("5 pairs of ports were taken by the time the broker and its proxy started")
    }

    /// [`Broker::start_tls`] on these ports; `None` when another test had taken one of them.
    async fn start_tls_on(
        log_dir: &Path,
        tls_dir: &Path,
        plain: u16,
        tls_port: u16,
    ) -> Option<Broker> {
        let listener = format!("tcp://127.0.0.1:{plain}");
        let advertised = format!("tcp://localhost:{tls_port}");
        let mut proc = spawn_tansu(log_dir, &listener, &advertised, &[]);
        if !owns_port(&mut proc, plain).await {
            return None;
        }
        let socat = which("socat").expect("socat (Debian's package; scripts/test.sh installs it)");
        let mut proxy = Proc::spawn_logging(
            "kafka-tls-proxy",
            &socat,
            &[
                format!(
                    "openssl-listen:{tls_port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
                    tls_dir.join("server.crt").display(),
                    tls_dir.join("server.key").display()
                ),
                format!("tcp:127.0.0.1:{plain}"),
            ],
            log_dir,
            "warn",
            &[],
        );
        if !owns_port(&mut proxy, tls_port).await {
            return None;
        }
        let client_config = vec![
            "security.protocol=ssl".to_owned(),
            format!("ssl.ca.location={}", tls_dir.join("ca.crt").display()),
        ];
        let bootstrap = format!("localhost:{tls_port}");
        kafka::wait_for_broker_with(&bootstrap, &client_config, Duration::from_secs(30))
            .await
            .expect("broker did not come up behind its TLS proxy");
        Some(Broker {
            bootstrap,
            proc: Some(proc),
            client_config,
            _tls_proxy: Some(proxy),
        })
    }
}

/// Waits (at most 30 s) until `proc` listens on `port` of 127.0.0.1; `false` when it exited first
/// (another test had taken the port) or never did.
pub async fn owns_port(proc: &mut Proc, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && proc.is_running() {
        if proc.pid().is_some_and(|pid| listens_on(pid, port)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Tansu with memory storage, listening on `listener` and advertising `advertised`.
fn spawn_tansu(log_dir: &Path, listener: &str, advertised: &str, env: &[(&str, &str)]) -> Proc {
    let args: Vec<String> = [
        "broker",
        "--listener-url",
        listener,
        "--advertised-listener-url",
        advertised,
        "--storage-engine",
        "memory://tansu/",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Tansu logs every request's spans at info: millions of lines per test, and CPU with them.
    let log_level = std::env::var("E2E_BROKER_LOG").unwrap_or_else(|_| "warn".into());
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    Proc::spawn_logging("broker", &tansu_binary(), &args, log_dir, &log_level, &env)
}

/// The path of `program` on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

#[derive(Debug, Clone, PartialEq)]
pub struct StackOptions {
    /// Start the relay with the stack (otherwise call [`Stack::start_relay`]).
    pub relay: bool,
    pub relay_batch_size: u32,
    /// Route inventory-service's (and the relay's) connections to the inventory database through
    /// a [`proxy::Proxy`] the test can take down.
    pub inventory_db_proxy: bool,
    /// `--retry-delays` of both services (their default when `None`).
    pub retry_delays: Option<String>,
    /// order-service's `--reservation-timeout` (its default, 30 s, when `None`). Ten minutes
    /// unless a test says otherwise: a test that is not about timeouts must not see its orders
    /// cancelled because a loaded machine made a saga, a restart or a rebalance take half a
    /// minute.
    pub saga_deadline: Option<String>,
    /// order-service's `--payment-timeout` (its default, 30 s, when `None`); ten minutes unless a
    /// test says otherwise, as above.
    pub payment_timeout: Option<String>,
    /// Extra environment variables for the services and the relay (for example OTLP export).
    pub env: Vec<(String, String)>,
    /// Start the broker with a fault: a fetch from inside a record batch answers with the next
    /// batch, as unpatched Tansu 0.6.0 did (`TANSU_FAULT_FETCH_SKIPS_MID_BATCH`), so that consumers
    /// skip records; for the test of their gap detection.
    pub broker_skips_mid_batch: bool,
    /// Put the broker behind a TLS-terminating proxy ([`Broker::start_tls`]): every process
    /// talks to it over TLS only.
    pub kafka_tls: bool,
    /// Start inventory-service with the stack (otherwise call [`Stack::start_inventory`]).
    pub inventory: bool,
    /// The Postgres server of the stack's databases (a URL without a database), when not the
    /// shared [`postgres_url`]: a test that restarts Postgres brings its own.
    pub postgres_url: Option<String>,
    /// Start payment-service and the stand-in processor (payment-gateway) with the stack, and
    /// have the relay tail the payments outbox (the default: orders are paid for before they are
    /// confirmed).
    pub payments: bool,
    /// Extra arguments for saga-monitor ([`Stack::start_monitor`]), such as its allowances.
    pub monitor_args: Vec<String>,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            relay: true,
            relay_batch_size: 2000,
            inventory_db_proxy: false,
            retry_delays: None,
            saga_deadline: Some("10m".into()),
            payment_timeout: Some("10m".into()),
            env: Vec::new(),
            broker_skips_mid_batch: false,
            inventory: true,
            postgres_url: None,
            kafka_tls: false,
            payments: true,
            monitor_args: Vec::new(),
        }
    }
}

/// The tests' HTTP client. Every request is bounded: a process of the test's own stack serves on a
/// listener the test holds, so while it is down (or dead) connections are accepted by the kernel
/// and wait, where they used to be refused.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

/// [`http_client`] for a running stack: when it has an admin token, every request carries it,
/// so that the tests that change products or the processor's knobs act as its operator would.
fn external_http_client(stack: &ExternalStack) -> reqwest::Client {
    let Some(token) = &stack.admin_token else {
        return http_client();
    };
    let mut headers = reqwest::header::HeaderMap::new();
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
        .expect("E2E_ADMIN_TOKEN is a header value");
    value.set_sensitive(true);
    headers.insert(reqwest::header::AUTHORIZATION, value);
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .default_headers(headers)
        .build()
        .expect("HTTP client")
}

/// A process of the stack the harness starts and controls; a new one is an entry here and an
/// arm in [`Process::program`], [`Process::port_flag`] and [`Stack::args_of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Process {
    OrderService,
    InventoryService,
    PaymentService,
    /// The stand-in card processor.
    Gateway,
    Relay,
    /// The read side: started by [`Stack::start_monitor`], not with the stack.
    Monitor,
}

impl Process {
    /// Every process, in the order a stack starts them.
    pub const ALL: [Process; 6] = [
        Process::OrderService,
        Process::InventoryService,
        Process::PaymentService,
        Process::Gateway,
        Process::Relay,
        Process::Monitor,
    ];

    /// Its binary, and the name of its log.
    pub fn program(self) -> &'static str {
        match self {
            Process::OrderService => "order-service",
            Process::InventoryService => "inventory-service",
            Process::PaymentService => "payment-service",
            Process::Gateway => "payment-gateway",
            Process::Relay => "outbox-relay",
            Process::Monitor => "saga-monitor",
        }
    }

    /// The flag that says where it serves HTTP (set to `stdin`: the listener is handed to it).
    pub fn port_flag(self) -> &'static str {
        match self {
            Process::OrderService
            | Process::InventoryService
            | Process::PaymentService
            | Process::Gateway
            | Process::Monitor => "--listen-addr",
            Process::Relay => "--metrics-addr",
        }
    }
}

/// The whole system for one test: broker, order-service, inventory-service, outbox-relay, and two
/// fresh databases (with [`StackOptions::payments`], payment-service and the stand-in processor
/// too, with a database each). Everything is killed and the databases dropped when it goes out of scope.
/// Against an [`external_stack`] it holds only the addresses, and nothing is stopped or dropped.
pub struct Stack {
    pub broker: Broker,
    pub orders_db: String,
    pub inventory_db: String,
    pub payments_db: String,
    /// The stand-in processor's ledger.
    pub gateway_db: String,
    /// saga-monitor's projection.
    pub monitor_db: String,
    pub order_url: String,
    pub inventory_url: String,
    pub payment_url: String,
    pub gateway_url: String,
    pub relay_metrics_url: String,
    pub monitor_url: String,
    /// Where the stack's own processes serve, held for the stack's lifetime ([`listener`]).
    listeners: HashMap<Process, TcpListener>,
    /// The stack's own processes that it started (and has not been told to kill).
    procs: HashMap<Process, Proc>,
    /// The arguments each process is started with.
    args: HashMap<Process, Vec<String>>,
    /// More monitors, each with a database of its own ([`Stack::spawn_monitor`]): killed and
    /// dropped with the stack.
    monitors: Vec<(Proc, TcpListener, String)>,
    /// The Postgres server of the stack's databases, without a database.
    pub pg: String,
    /// The inventory database's proxy, when [`StackOptions::inventory_db_proxy`] asked for one.
    pub inventory_proxy: Option<proxy::Proxy>,
    pub http: reqwest::Client,
    options: StackOptions,
    log_dir: PathBuf,
    /// Prepended to every sku the test names (empty on the test's own stack).
    sku_prefix: String,
    /// Against an external stack: each process's `/metrics` when the test started.
    metrics_at_start: HashMap<String, String>,
    external: Option<&'static ExternalStack>,
}

impl Stack {
    pub async fn start(test: &str) -> Stack {
        Stack::start_with(test, StackOptions::default()).await
    }

    pub async fn start_with(test: &str, options: StackOptions) -> Stack {
        let log_dir = target_dir().join("e2e-logs").join(test);
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir).expect("log dir");
        if let Some(external) = external_stack() {
            return Stack::on_external(external, options, log_dir).await;
        }
        let broker = if options.kafka_tls {
            Broker::start_tls(&log_dir).await
        } else if options.broker_skips_mid_batch {
            Broker::start_with(&log_dir, &[("TANSU_FAULT_FETCH_SKIPS_MID_BATCH", "1")]).await
        } else {
            Broker::start(&log_dir).await
        };
        let pg = options.postgres_url.clone().unwrap_or_else(postgres_url);
        let suffix = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let orders_db = format!("e2e_orders_{suffix}");
        let inventory_db = format!("e2e_inventory_{suffix}");
        let payments_db = format!("e2e_payments_{suffix}");
        let gateway_db = format!("e2e_gateway_{suffix}");
        let monitor_db = format!("e2e_monitor_{suffix}");
        let listeners: HashMap<Process, TcpListener> =
            Process::ALL.iter().map(|p| (*p, listener())).collect();
        let inventory_proxy = if options.inventory_db_proxy {
            Some(proxy::Proxy::start(host_port_of(&pg)).await)
        } else {
            None
        };
        let mut stack = Stack {
            broker,
            orders_db,
            inventory_db,
            payments_db,
            gateway_db,
            monitor_db,
            order_url: url_of(&listeners[&Process::OrderService]),
            inventory_url: url_of(&listeners[&Process::InventoryService]),
            payment_url: url_of(&listeners[&Process::PaymentService]),
            gateway_url: url_of(&listeners[&Process::Gateway]),
            relay_metrics_url: url_of(&listeners[&Process::Relay]),
            monitor_url: url_of(&listeners[&Process::Monitor]),
            listeners,
            procs: HashMap::new(),
            args: HashMap::new(),
            monitors: Vec::new(),
            pg,
            inventory_proxy,
            http: http_client(),
            options: options.clone(),
            log_dir,
            sku_prefix: String::new(),
            metrics_at_start: HashMap::new(),
            external: None,
        };
        stack.args = Process::ALL
            .iter()
            .map(|p| (*p, stack.args_of(*p)))
            .collect();
        // The services first, then the relay once they are ready.
        let services = [
            (Process::OrderService, true),
            (Process::InventoryService, options.inventory),
            (Process::Gateway, options.payments),
            (Process::PaymentService, options.payments),
        ];
        for (process, start) in services {
            if start {
                stack.launch(process);
            }
        }
        for (process, start) in services {
            if start {
                stack.wait_ready(&stack.url_of(process)).await;
            }
        }
        if options.relay {
            stack.start_process(Process::Relay).await;
        }
        stack
    }

    /// The arguments `process` starts with: where it serves, its database(s) (inventory's through
    /// the proxy when there is one), the broker, and the options that concern it.
    fn args_of(&self, process: Process) -> Vec<String> {
        let inventory_pg = match &self.inventory_proxy {
            Some(p) => format!("postgres://postgres@127.0.0.1:{}", p.port),
            None => self.pg.clone(),
        };
        let mut args: Vec<String> = match process {
            Process::OrderService | Process::InventoryService | Process::PaymentService => {
                let (pg, db) = match process {
                    Process::OrderService => (&self.pg, &self.orders_db),
                    Process::PaymentService => (&self.pg, &self.payments_db),
                    _ => (&inventory_pg, &self.inventory_db),
                };
                let mut args: Vec<String> = self
                    .options
                    .retry_delays
                    .iter()
                    .flat_map(|d| ["--retry-delays".to_owned(), d.clone()])
                    .collect();
                args.extend(["--database-url".into(), db_url(pg, db)]);
                if process == Process::OrderService
                    && let Some(deadline) = &self.options.saga_deadline
                {
                    args.extend(["--reservation-timeout".to_owned(), deadline.clone()]);
                }
                if process == Process::OrderService
                    && let Some(timeout) = &self.options.payment_timeout
                {
                    args.extend(["--payment-timeout".to_owned(), timeout.clone()]);
                }
                if process == Process::PaymentService {
                    args.extend(["--gateway-url".to_owned(), self.gateway_url.clone()]);
                    // A void's recheck of the ledger within a test's time (every payment job
                    // ends soon after its order does).
                    args.extend(["--late-charge-recheck".to_owned(), "3s".to_owned()]);
                }
                args
            }
            // The stand-in processor knows nothing of Kafka.
            Process::Gateway => {
                return vec![
                    "--database-url".into(),
                    db_url(&self.pg, &self.gateway_db),
                    process.port_flag().to_owned(),
                    "stdin".into(),
                ];
            }
            Process::Monitor => {
                let mut args = vec!["--database-url".into(), db_url(&self.pg, &self.monitor_db)];
                args.extend(self.options.monitor_args.iter().cloned());
                args
            }
            Process::Relay => {
                let mut args = vec![
                    "--source".into(),
                    format!("orders={}", db_url(&self.pg, &self.orders_db)),
                    "--source".into(),
                    format!("inventory={}", db_url(&inventory_pg, &self.inventory_db)),
                    "--batch-size".into(),
                    self.options.relay_batch_size.to_string(),
                ];
                if self.options.payments {
                    args.extend([
                        "--source".into(),
                        format!("payments={}", db_url(&self.pg, &self.payments_db)),
                    ]);
                }
                args
            }
        };
        args.extend([process.port_flag().to_owned(), "stdin".into()]);
        args.extend([
            "--kafka-bootstrap-servers".into(),
            self.broker.bootstrap.clone(),
        ]);
        args.extend(self.broker.kafka_config_args());
        args
    }

    /// Where `process` serves (its `/readyz` and `/metrics`).
    pub fn url_of(&self, process: Process) -> String {
        match process {
            Process::OrderService => self.order_url.clone(),
            Process::InventoryService => self.inventory_url.clone(),
            Process::PaymentService => self.payment_url.clone(),
            Process::Gateway => self.gateway_url.clone(),
            Process::Relay => self.relay_metrics_url.clone(),
            Process::Monitor => self.monitor_url.clone(),
        }
    }

    /// The stack for a test against `external`: its addresses, skus of the test's own, and each
    /// process's counters as they were at the start.
    async fn on_external(
        external: &'static ExternalStack,
        options: StackOptions,
        log_dir: PathBuf,
    ) -> Stack {
        assert!(
            options == StackOptions::default(),
            "this test needs a stack started with {options:?}; it belongs in an \
             `own_stack` module (see `requires_own_stack`)"
        );
        let suffix = Uuid::new_v4().simple().to_string()[..10].to_owned();
        let mut stack = Stack {
            broker: Broker::of(external),
            orders_db: external.orders_db.clone(),
            inventory_db: external.inventory_db.clone(),
            payments_db: external.payments_db.clone(),
            // The processor's ledger is the processor's: not read on an external stack.
            gateway_db: String::new(),
            // The monitor's projection is read through its API only.
            monitor_db: String::new(),
            order_url: external.order_url.clone(),
            inventory_url: external.inventory_url.clone(),
            payment_url: external.payment_url.clone(),
            gateway_url: external.gateway_url.clone(),
            relay_metrics_url: external.relay_url.clone(),
            monitor_url: external.monitor_url.clone(),
            listeners: HashMap::new(),
            procs: HashMap::new(),
            args: HashMap::new(),
            monitors: Vec::new(),
            pg: postgres_url(),
            inventory_proxy: None,
            http: external_http_client(external),
            options,
            log_dir,
            sku_prefix: format!("e2e-{suffix}-"),
            metrics_at_start: HashMap::new(),
            external: Some(external),
        };
        for url in [
            stack.order_url.clone(),
            stack.inventory_url.clone(),
            stack.payment_url.clone(),
            stack.relay_metrics_url.clone(),
        ] {
            stack.wait_ready(&url).await;
            let text = stack.metrics_text(&url).await;
            stack.metrics_at_start.insert(url, text);
        }
        stack
    }

    /// The name and process id of each process the stack started and still runs: the broker,
    /// both services and the relay.
    pub fn processes(&self) -> Vec<(String, u32)> {
        let mut all = Vec::new();
        if let Some(pid) = self.broker.pid() {
            all.push(("broker".to_owned(), pid));
        }
        for process in Process::ALL {
            if let Some(proc) = self.procs.get(&process)
                && let Some(pid) = proc.pid()
            {
                all.push((proc.name.clone(), pid));
            }
        }
        all
    }

    /// Whether this stack is an [`external_stack`] (shared, not started by the test).
    pub fn is_external(&self) -> bool {
        self.external.is_some()
    }

    /// The sku the test calls `name`, as the system knows it: `name` itself on the test's own
    /// stack, `e2e-<random>-name` on an external one, so that tests never share stock. The
    /// helpers that take skus ([`Stack::put_product`], [`Stack::place_order`], ...) apply it.
    pub fn sku(&self, name: &str) -> String {
        format!("{}{name}", self.sku_prefix)
    }

    /// `kill -9` of `process`, down for `down`, then started again and ready.
    pub async fn restart(&mut self, process: Process, down: Duration) {
        self.kill(process);
        tokio::time::sleep(down).await;
        self.start_process(process).await;
    }

    /// `kill -9` of `process`: no graceful shutdown, no leaving the consumer group.
    pub fn kill(&mut self, process: Process) {
        self.own_proc(process).kill9();
    }

    /// SIGTERM to `process`: whether it exited by itself within `within`.
    pub fn stop_within(&mut self, process: Process, within: Duration) -> bool {
        self.own_proc(process).stop_within(within)
    }

    /// The stack's own running `process`.
    pub fn own_proc(&mut self, process: Process) -> &mut Proc {
        self.procs.get_mut(&process).unwrap_or_else(|| {
            panic!(
                "{} is not running in the test's own stack",
                process.program()
            )
        })
    }

    /// Starts `process` (again, after [`Stack::kill`]) and waits until it is ready.
    pub async fn start_process(&mut self, process: Process) {
        self.launch(process);
        self.wait_ready(&self.url_of(process)).await;
    }

    /// Starts saga-monitor (on an external stack: waits until the stack's monitor is ready).
    pub async fn start_monitor(&mut self) {
        if self.is_external() {
            self.wait_ready(&self.monitor_url).await;
        } else {
            self.start_process(Process::Monitor).await;
        }
    }

    /// The database of the monitor [`Stack::spawn_monitor`] starts as `name`.
    pub fn monitor_db_of(&self, name: &str) -> String {
        format!("{}_{name}", self.monitor_db)
    }

    /// Starts another saga-monitor, `name`, with a database of its own (the stack's monitor's
    /// with `_<name>` appended) and the same broker, waits until it is ready, and returns where it
    /// serves. It is killed and its database dropped with the stack.
    pub async fn spawn_monitor(&mut self, name: &str) -> String {
        assert!(
            !self.is_external(),
            "only a test's own stack can be started"
        );
        let db = self.monitor_db_of(name);
        let mut args = self.args[&Process::Monitor].clone();
        let at = args
            .iter()
            .position(|a| a == "--database-url")
            .expect("the monitor's --database-url");
        args[at + 1] = db_url(&self.pg, &db);
        let (proc, listener) = self.spawn_with(Process::Monitor, name, &args).await;
        let url = url_of(&listener);
        self.monitors.push((proc, listener, db));
        url
    }

    /// Runs `saga-monitor <command>` (`rebuild`, `snapshot`) against the stack's monitor
    /// database and broker to its end; returns its exit code and its output (also written to
    /// `<command>.log` in the test's log directory). Killed if the returned future is dropped
    /// (a test that gave up on it).
    pub async fn monitor_command(&self, command: &str) -> (Option<i32>, String) {
        let mut args = self.args[&Process::Monitor].clone();
        args.push(command.to_owned());
        let output = tokio::process::Command::new(binary(Process::Monitor.program()))
            .args(&args)
            .env("RUST_LOG", project_log_level())
            .envs(self.options.env.iter().cloned())
            .kill_on_drop(true)
            .output()
            .await
            .expect("running saga-monitor");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let _ = std::fs::write(self.log_dir.join(format!("{command}.log")), &text);
        (output.status.code(), text)
    }

    /// Starts `saga-monitor <command>` in the background, logging to `<name>.log`.
    pub fn spawn_monitor_command(&self, command: &str, name: &str) -> Proc {
        let mut args = self.args[&Process::Monitor].clone();
        args.push(command.to_owned());
        Proc::spawn_env(
            name,
            &binary(Process::Monitor.program()),
            &args,
            &self.log_dir,
            &self.options.env,
        )
    }

    /// A saga as saga-monitor shows it (`GET /sagas/{order_id}`), once it has `steps` steps of
    /// kind `event` and its outcome is `outcome`; fails after `timeout` saying what it showed.
    pub async fn monitored_saga(
        &self,
        order_id: Uuid,
        outcome: &str,
        steps: usize,
        timeout: Duration,
    ) -> Value {
        let url = format!("{}/sagas/{order_id}", self.monitor_url);
        let mut last = Value::Null;
        let deadline = Instant::now() + timeout;
        loop {
            let r = self
                .http
                .get(&url)
                .send()
                .await
                .expect("GET /sagas/{order_id}");
            if r.status().is_success() {
                last = r.json().await.expect("saga json");
                let events = last["steps"]
                    .as_array()
                    .map_or(0, |s| s.iter().filter(|s| s["kind"] == "event").count());
                if last["outcome"] == outcome && events >= steps {
                    return last;
                }
            }
            assert!(
                Instant::now() < deadline,
                "saga {order_id} did not show {outcome} with {steps} events within {timeout:?}; it showed {last:#}; {}",
                self.where_logs_are()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts `process` without waiting for it.
    pub fn launch(&mut self, process: Process) {
        assert!(
            !self.is_external(),
            "only a test's own stack can be started"
        );
        let proc = Proc::spawn_serving(
            process.program(),
            &binary(process.program()),
            &self.args[&process],
            &self.log_dir,
            &self.options.env,
            &self.listeners[&process],
        );
        self.procs.insert(process, proc);
    }

    /// Starts another instance of `process` (same databases, broker and consumer group; a relay
    /// for the same sources, a standby while the first one publishes), serving on a listener of
    /// its own and logging to `<name>.log`, and waits until it is ready; returns it and its
    /// listener ([`url_of`]; for [`Stack::replace`]).
    pub async fn spawn_instance(&self, process: Process, name: &str) -> (Proc, TcpListener) {
        self.spawn_with(process, name, &self.args[&process]).await
    }

    /// Starts `process` as `name` with `args`, serving on a listener of its own, and waits until
    /// it is ready.
    async fn spawn_with(
        &self,
        process: Process,
        name: &str,
        args: &[String],
    ) -> (Proc, TcpListener) {
        assert!(
            !self.is_external(),
            "only a test's own stack can be started"
        );
        let listener = listener();
        let proc = Proc::spawn_serving(
            name,
            &binary(process.program()),
            args,
            &self.log_dir,
            &self.options.env,
            &listener,
        );
        self.wait_ready(&url_of(&listener)).await;
        (proc, listener)
    }

    /// Kills `process` (`kill -9`) and makes `instance`, started by [`Stack::spawn_instance`] on
    /// `listener`, the stack's: it serves at the process's URL from now on, and restarts serve
    /// there.
    pub fn replace(&mut self, process: Process, instance: Proc, listener: TcpListener) {
        assert!(
            !self.is_external(),
            "only a test's own stack can be changed"
        );
        if let Some(old) = self.procs.get_mut(&process) {
            old.kill9();
        }
        self.procs.insert(process, instance);
        let url = url_of(&listener);
        match process {
            Process::OrderService => self.order_url = url,
            Process::InventoryService => self.inventory_url = url,
            Process::PaymentService => self.payment_url = url,
            Process::Gateway => self.gateway_url = url,
            Process::Relay => self.relay_metrics_url = url,
            Process::Monitor => self.monitor_url = url,
        }
        self.listeners.insert(process, listener);
    }

    /// The stack's own processes that have exited, the broker included (none to check on an
    /// external stack).
    pub fn exited(&mut self) -> Vec<&'static str> {
        let mut exited = Vec::new();
        if self.broker.proc.as_mut().is_some_and(|p| !p.is_running()) {
            exited.push("broker");
        }
        for process in Process::ALL {
            if self
                .procs
                .get_mut(&process)
                .is_some_and(|p| !p.is_running())
            {
                exited.push(process.program());
            }
        }
        exited
    }

    /// The stack's processes that exited or started again since the test began: on its own stack
    /// those that have exited ([`Stack::exited`]); on an external one those whose
    /// `process_start_time_seconds` changed (a restart policy would hide a crash) or that no
    /// longer answer.
    pub async fn exited_or_restarted(&mut self) -> Vec<String> {
        if !self.is_external() {
            return self.exited().into_iter().map(str::to_owned).collect();
        }
        let mut changed = Vec::new();
        for (url, at_start) in &self.metrics_at_start {
            let started = |text: &str| sum_metric(text, "process_start_time_seconds", &[]);
            assert!(
                started(at_start) > 0.0,
                "{url}/metrics has no process_start_time_seconds"
            );
            let now = match self.http.get(format!("{url}/metrics")).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if started(&now) != started(at_start) {
                changed.push(url.clone());
            }
        }
        changed
    }

    /// Waits until `<base>/readyz` answers 200 (at most 60 s).
    pub async fn wait_ready(&self, base: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // Each ask bounded: behind a held listener a dead process answers nothing at all.
            let ask = self
                .http
                .get(format!("{base}/readyz"))
                .timeout(Duration::from_secs(2))
                .send();
            if let Ok(r) = ask.await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{base} not ready after 60 s; {}",
                self.where_logs_are()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn orders_pool(&self) -> PgPool {
        self.pool_of(&self.orders_db).await
    }

    pub async fn inventory_pool(&self) -> PgPool {
        self.pool_of(&self.inventory_db).await
    }

    /// The saga monitor's database (its projection is in schema `projection`).
    pub async fn monitor_pool(&self) -> PgPool {
        self.pool_of(&self.monitor_db).await
    }

    /// A pool on the stack's database `db`.
    pub async fn pool_of(&self, db: &str) -> PgPool {
        PgPool::connect(&db_url(&self.pg, db))
            .await
            .unwrap_or_else(|e| panic!("connecting to {db}: {e}"))
    }

    /// The order's payment as payment-service shows it (`Null` when it has none).
    pub async fn payment_of(&self, order_id: Uuid) -> Value {
        self.get_json(&format!(
            "{}/payments?order_id={order_id}",
            self.payment_url
        ))
        .await[0]
            .clone()
    }

    /// What the stand-in processor holds for a payment: cents charged minus refunded, and how
    /// many of its charges succeeded.
    pub async fn ledger_of(&self, payment_id: &str) -> (i64, usize) {
        let entries = self
            .get_json(&format!(
                "{}/ledger?payment_id={payment_id}",
                self.gateway_url
            ))
            .await;
        let mut net = 0;
        let mut charges = 0;
        for entry in entries.as_array().expect("the ledger is a list") {
            if entry["status"] == "succeeded" {
                charges += 1;
                net += entry["amount_cents"].as_i64().unwrap_or_default();
                for refund in entry["refunds"].as_array().into_iter().flatten() {
                    net -= refund["amount_cents"].as_i64().unwrap_or_default();
                }
            }
        }
        (net, charges)
    }

    /// Sets the stand-in processor's fault knobs (`PUT /faults`), e.g. `{"mode": "hang"}`.
    pub async fn set_gateway_faults(&self, faults: Value) {
        let mut request = self
            .http
            .put(format!("{}/faults", self.gateway_url))
            .json(&faults);
        if let Some(token) = self.admin_token() {
            request = request.bearer_auth(token);
        }
        let answer = request.send().await.expect("PUT /faults");
        assert!(
            answer.status().is_success(),
            "PUT /faults: {}",
            answer.status()
        );
    }

    pub async fn payments_pool(&self) -> PgPool {
        PgPool::connect(&db_url(&self.pg, &self.payments_db))
            .await
            .expect("payments db")
    }

    /// Waits until the outbox of `db` (a pool of one of the stack's databases) is empty: every row
    /// published and deleted by the relay.
    pub async fn wait_for_empty_outbox(&self, db: &PgPool, timeout: Duration) {
        eventually(timeout, || async {
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(db)
                .await?;
            anyhow::ensure!(left == 0, "{left} outbox rows not published yet");
            Ok(Some(()))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; {}", self.where_logs_are()));
    }

    /// Rows still in the orders and the inventory outbox whose message is already on its topic:
    /// rows a killed relay published and had not deleted yet, which the next relay publishes
    /// again (and the inboxes then skip).
    pub async fn published_outbox_rows(&self) -> (usize, usize) {
        let mut counts = Vec::new();
        for (pool, topic) in [
            (self.orders_pool().await, schemas::ORDERS_TOPIC),
            (self.inventory_pool().await, schemas::INVENTORY_TOPIC),
        ] {
            let waiting: std::collections::HashSet<Uuid> =
                sqlx::query_scalar("SELECT message_id FROM outbox")
                    .fetch_all(&pool)
                    .await
                    .expect("reading an outbox")
                    .into_iter()
                    .collect();
            pool.close().await;
            let records = kafka::read_topic(&self.broker.bootstrap, topic)
                .await
                .expect("reading an event topic");
            counts.push(
                records
                    .iter()
                    .filter_map(|r| r.header("message-id")?.parse::<Uuid>().ok())
                    .filter(|id| waiting.contains(id))
                    .count(),
            );
        }
        (counts[0], counts[1])
    }

    /// `PUT /products/{sku}` (the sku as the test names it; see [`Stack::sku`]).
    pub async fn put_product(&self, sku: &str, price_cents: i64, available: i64) {
        let sku = self.sku(sku);
        let mut request = self
            .http
            .put(format!("{}/products/{sku}", self.inventory_url))
            .json(&json!({"name": format!("product {sku}"), "price_cents": price_cents, "available": available}));
        if let Some(token) = self.admin_token() {
            request = request.bearer_auth(token);
        }
        let r = request.send().await.expect("PUT product");
        assert!(
            r.status().is_success(),
            "PUT /products/{sku}: {}",
            r.status()
        );
    }

    /// The admin token the stack's services were started with (`ADMIN_TOKEN` in
    /// [`StackOptions::env`], or a running stack's `E2E_ADMIN_TOKEN`), if any.
    pub fn admin_token(&self) -> Option<&str> {
        if let Some(stack) = external_stack() {
            return stack.admin_token.as_deref();
        }
        self.options
            .env
            .iter()
            .find(|(k, _)| k == "ADMIN_TOKEN")
            .map(|(_, v)| v.as_str())
    }

    /// `GET /products/{sku}` (the sku as the test names it; see [`Stack::sku`]).
    pub async fn product(&self, sku: &str) -> Value {
        self.get_json(&format!(
            "{}/products/{}",
            self.inventory_url,
            self.sku(sku)
        ))
        .await
    }

    /// Places an order (skus as the test names them; see [`Stack::sku`]) and returns its id.
    pub async fn place_order(&self, items: &[(&str, i64)]) -> Uuid {
        let items: Vec<Value> = items
            .iter()
            .map(|(sku, quantity)| json!({"sku": self.sku(sku), "quantity": quantity}))
            .collect();
        let r = self
            .http
            .post(format!("{}/orders", self.order_url))
            .json(&json!({"customer_id": Uuid::new_v4(), "items": items}))
            .send()
            .await
            .expect("POST /orders");
        assert_eq!(r.status(), 201, "POST /orders: {:?}", r.text().await);
        let body: Value = r.json().await.expect("order json");
        body["order_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("order_id")
    }

    /// With product A stocked (at least 1, fewer than 50): one order confirmed and then
    /// cancelled, and one rejected (50 of A), each waited for; returns (cancelled, rejected).
    /// Every saga outcome then has happened once.
    pub async fn one_saga_of_each_outcome(&self) -> (Uuid, Uuid) {
        const TIMEOUT: Duration = Duration::from_secs(60);
        let confirmed = self.place_order(&[("A", 1)]).await;
        let rejected = self.place_order(&[("A", 50)]).await;
        self.wait_for_statuses(&[confirmed, rejected], &["CONFIRMED", "REJECTED"], TIMEOUT)
            .await;
        self.cancel(confirmed).await;
        self.wait_for_statuses(&[confirmed], &["CANCELLED"], TIMEOUT)
            .await;
        (confirmed, rejected)
    }

    /// `POST /orders/{id}/cancel`: the status code and the body.
    pub async fn cancel(&self, id: Uuid) -> (reqwest::StatusCode, Value) {
        let r = self
            .http
            .post(format!("{}/orders/{id}/cancel", self.order_url))
            .send()
            .await
            .expect("POST /orders/{id}/cancel");
        let status = r.status();
        (status, r.json().await.expect("cancel answer json"))
    }

    pub async fn order(&self, id: Uuid) -> Value {
        self.get_json(&format!("{}/orders/{id}", self.order_url))
            .await
    }

    pub async fn get_json(&self, url: &str) -> Value {
        let r = self.http.get(url).send().await.expect("GET");
        assert!(r.status().is_success(), "GET {url}: {}", r.status());
        r.json().await.expect("json")
    }

    /// Waits until every order has one of `statuses`; returns id → status.
    pub async fn wait_for_statuses(
        &self,
        ids: &[Uuid],
        statuses: &[&str],
        timeout: Duration,
    ) -> HashMap<Uuid, String> {
        let pool = self.orders_pool().await;
        let deadline = Instant::now() + timeout;
        loop {
            let rows: Vec<(Uuid, String)> = sqlx::query_as(
                "SELECT order_id, status FROM order_status_view WHERE order_id = ANY($1)",
            )
            .bind(ids)
            .fetch_all(&pool)
            .await
            .expect("statuses");
            let (done, waiting): (Vec<_>, Vec<_>) = rows
                .into_iter()
                .partition(|(_, s)| statuses.contains(&s.as_str()));
            let done: HashMap<Uuid, String> = done.into_iter().collect();
            if done.len() == ids.len() {
                pool.close().await;
                return done;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {} orders reached {statuses:?} within {timeout:?} (still waiting: {:?}); {}",
                done.len(),
                ids.len(),
                &waiting[..waiting.len().min(5)],
                self.where_logs_are()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The value of a Prometheus sample of `base_url/metrics` whose name is `name` and whose labels
    /// include every pair in `labels`, summed over the matches (0 when none). Against an external
    /// stack a counter (or a histogram's count, sum or bucket) is its increase since the test
    /// started.
    pub async fn metric(&self, base_url: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        let now = sum_metric(&self.metrics_text(base_url).await, name, labels);
        let cumulative = ["_total", "_count", "_sum", "_bucket"]
            .iter()
            .any(|suffix| name.ends_with(suffix));
        match self.metrics_at_start.get(base_url) {
            Some(start) if cumulative => now - sum_metric(start, name, labels),
            _ => now,
        }
    }

    /// The Prometheus text of `<base_url>/metrics`.
    pub async fn metrics_text(&self, base_url: &str) -> String {
        self.http
            .get(format!("{base_url}/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Checks stock conservation per sku: stock ever put = available + reserved + sold, none
    /// negative. `initial` is sku → stock put.
    pub async fn assert_stock_conserved(&self, initial: &[(&str, i64)]) {
        for (sku, put) in initial {
            let p = self.product(sku).await;
            let (a, r, s) = (
                p["available"].as_i64().expect("available"),
                p["reserved"].as_i64().expect("reserved"),
                p["sold"].as_i64().expect("sold"),
            );
            assert!(a >= 0 && r >= 0 && s >= 0, "negative stock for {sku}: {p}");
            assert_eq!(a + r + s, *put, "stock of {sku} not conserved: {p}");
        }
    }

    /// Creates order `id` (PENDING, one item of sku A) directly in the orders database without
    /// publishing its OrderPlaced, so that only the test's own events touch it: a late arrival.
    pub async fn create_order_quietly(&self, id: Uuid) {
        use messaging::outbox::Cause;
        use order_service::store::{self, Item, NewOrder};
        let pool = self.orders_pool().await;
        let mut tx = pool.begin().await.expect("begin");
        let order = NewOrder {
            customer_id: Uuid::new_v4(),
            items: vec![Item {
                sku: self.sku("A"),
                quantity: 1,
            }],
        };
        // Its step timeouts are the defaults (the tests that need one due make it so).
        let steps = order_service::transition::Steps::default();
        store::insert_order_with_id(&mut tx, id, &order, &steps, &Cause::default())
            .await
            .expect("insert order");
        sqlx::query("DELETE FROM outbox WHERE aggregate_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .expect("drop its OrderPlaced");
        tx.commit().await.expect("commit");
        pool.close().await;
    }

    /// Runs `saga audit --json` against this stack with `grace` (`2m`, `0s`, ...) and extra
    /// `args`: the exit status, the JSON report (`Null` when there is none) and stderr.
    pub fn audit(&self, grace: &str, args: &[&str]) -> (i32, Value, String) {
        let output = Command::new(binary("saga"))
            .args(["-b", &self.broker.bootstrap])
            .args(
                self.broker
                    .client_config
                    .iter()
                    .flat_map(|p| ["--kafka-config", p.as_str()]),
            )
            .args(["audit", "--json", "--grace", grace])
            .args([
                "--orders-db".to_owned(),
                db_url(&self.pg, &self.orders_db),
                "--inventory-db".to_owned(),
                db_url(&self.pg, &self.inventory_db),
                "--payments-db".to_owned(),
                db_url(&self.pg, &self.payments_db),
            ])
            // The stack's processor, unless `args` name another; without the payment processes
            // there is no ledger to read.
            .args(
                if args
                    .iter()
                    .any(|a| *a == "--gateway-url" || *a == "--skip-ledger")
                {
                    vec![]
                } else if self.options.payments {
                    vec!["--gateway-url", self.gateway_url.as_str()]
                } else {
                    vec!["--skip-ledger"]
                },
            )
            .args(args)
            .env_remove("KAFKA_CONFIG")
            .stdin(Stdio::null())
            .output()
            .expect("running saga audit");
        let report = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        (
            output.status.code().unwrap_or(-1),
            report,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Whether one line of `<process>.log` (a process of the test's own stack) holds every one of
    /// `needles`. A log that cannot be read fails the test: it is not a log without the line.
    pub fn log_has(&self, process: &str, needles: &[&str]) -> bool {
        assert!(!self.is_external(), "only a test's own stack logs to files");
        let path = self.log_dir.join(format!("{process}.log"));
        let text =
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        String::from_utf8_lossy(&text)
            .lines()
            .any(|line| needles.iter().all(|n| line.contains(n)))
    }

    /// The test's own directory (process logs on its own stack, files it writes).
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Where the processes' logs are, for failure messages.
    pub fn where_logs_are(&self) -> String {
        match self.external {
            Some(external) if external.name == "compose" => "logs: docker compose logs".into(),
            Some(_) => "logs in .run/logs/".into(),
            None => format!("logs in {}", self.log_dir.display()),
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if self.is_external() {
            return;
        }
        for proc in self.procs.values_mut() {
            proc.kill9();
        }
        let mut databases = vec![
            self.orders_db.clone(),
            self.inventory_db.clone(),
            self.payments_db.clone(),
            self.gateway_db.clone(),
            self.monitor_db.clone(),
        ];
        for (proc, _, db) in &mut self.monitors {
            proc.kill9();
            databases.push(db.clone());
        }
        drop_databases(&self.pg, databases);
    }
}

/// Drops `databases` of `server` (a URL without a database), from a thread with its own runtime:
/// for `Drop`, which cannot await (and may run while the test's runtime is busy).
pub fn drop_databases(server: &str, databases: Vec<String>) {
    let server = server.to_owned();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            if let Ok(mut conn) = PgConnection::connect(&db_url(&server, "postgres")).await {
                for db in databases {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            }
        });
    })
    .join();
}

/// Sums the samples of `name` (exact metric name) whose labels include `labels`.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The statuses of an order's `history` (as `GET /orders/{id}` shows it), oldest first.
pub fn status_history(order: &Value) -> Vec<String> {
    order["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["status"].as_str().map(str::to_owned))
        .collect()
}

/// Polls `check` until it returns `Ok(Some(v))`, or fails after `timeout` with the last message.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Connects to a database of the stack's server by name.
pub async fn connect(db: &str) -> anyhow::Result<PgConnection> {
    PgConnection::connect(&db_url(&postgres_url(), db))
        .await
        .with_context(|| format!("connecting to {db}"))
}

/// Runs `kcat` (Debian's, with the newer librdkafka that `scripts/test.sh` builds and names in
/// `KCAT_LIB_DIR`) with `args` against `bootstrap`; returns its stdout.
pub fn kcat(bootstrap: &str, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let lib_dir = std::env::var("KCAT_LIB_DIR").context(
        "KCAT_LIB_DIR is not set: run the tests through scripts/test.sh, which builds kcat's librdkafka",
    )?;
    let output = Command::new("kcat")
        .arg("-b")
        .arg(bootstrap)
        .args(args)
        .env("LD_LIBRARY_PATH", lib_dir)
        .stdin(Stdio::null())
        .output()
        .context("running kcat")?;
    if !output.status.success() {
        bail!(
            "kcat {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output.stdout)
}
