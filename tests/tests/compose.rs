//! The Compose stack agrees with the code. No Docker engine runs here, so this checks what can be
//! checked without one: `docker-compose config` (Debian's docker-compose) accepts the file; every
//! environment variable it sets on a process is one that process reads (from the binary's own
//! `--help`); every port agrees across the process's address, the published port, the
//! healthcheck and Prometheus's target; every topic the code uses is created; the databases the
//! services use are the ones Postgres creates; `E2E_STACK=compose` points the end-to-end suite at
//! the ports the file publishes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The compose file as `docker-compose config` normalises it.
fn compose() -> Value {
    compose_of(&["docker-compose.yml"])
}

/// The compose files, layered in this order, as `docker-compose config` merges them.
fn compose_of(files: &[&str]) -> Value {
    let mut command = Command::new("docker-compose");
    for file in files {
        command.arg("-f").arg(root().join(file));
    }
    let out = command
        .arg("config")
        .output()
        .expect("docker-compose (Debian's package; scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml::from_slice(&out.stdout).expect("compose config yaml")
}

/// The variables a binary reads, from the `[env: NAME=…]` of its `--help`, plus the logging and
/// tracing ones every process reads (`service_kit::telemetry::ENV_VARS`).
fn variables_read_by(binary: &str) -> (BTreeSet<String>, String) {
    let out = Command::new(e2e::binary(binary))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut names: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_owned)
        .collect();
    names.extend(
        service_kit::telemetry::ENV_VARS
            .iter()
            .map(|v| v.to_string()),
    );
    // The admin token is read from the environment beside its file's flag (`AdminToken`), and
    // the flag's help names it.
    if help.contains("set ADMIN_TOKEN") || help.contains("the ADMIN_TOKEN environment variable") {
        names.insert("ADMIN_TOKEN".to_owned());
    }
    (names, help)
}

fn env<'a>(service: &'a Value, name: &str) -> Option<&'a str> {
    service["environment"][name].as_str()
}

/// A published port as `docker-compose config` writes it, in either form: the long one
/// (`{target, published, host_ip}`), or the short string `IP:PUBLISHED:TARGET/PROTO` that
/// docker-compose 1.x writes when a host IP is given. Returns (host IP, published, target).
fn port_parts(port: &Value) -> (Option<String>, Option<u64>, Option<u64>) {
    if let Some(short) = port.as_str() {
        let short = short.split('/').next().unwrap_or(short);
        let parts: Vec<&str> = short.split(':').collect();
        let (ip, published, target) = match parts.as_slice() {
            [ip, published, target] => (Some((*ip).to_owned()), *published, *target),
            [published, target] => (None, *published, *target),
            [target] => (None, "", *target),
            _ => return (None, None, None),
        };
        return (ip, published.parse().ok(), target.parse().ok());
    }
    let published = &port["published"];
    (
        port["host_ip"].as_str().map(str::to_owned),
        published
            .as_u64()
            .or_else(|| published.as_str()?.parse().ok()),
        port["target"].as_u64(),
    )
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn the_compose_file_agrees_with_the_binaries_ports_and_topics() {
    let compose = compose();
    let services = &compose["services"];
    let prometheus =
        std::fs::read_to_string(root().join("deploy/prometheus/prometheus.yml")).unwrap();

    for (service, address_variable) in [
        ("order-service", "LISTEN_ADDR"),
        ("inventory-service", "LISTEN_ADDR"),
        ("payment-service", "LISTEN_ADDR"),
        ("payment-gateway", "LISTEN_ADDR"),
        ("outbox-relay", "METRICS_ADDR"),
        ("saga-monitor", "LISTEN_ADDR"),
    ] {
        let spec = &services[service];
        assert_eq!(
            spec["build"]["args"]["BIN"].as_str(),
            Some(service),
            "{service} builds another binary"
        );
        let (read, help) = variables_read_by(service);
        let set: Vec<&str> = spec["environment"]
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap())
            .collect();
        for name in &set {
            assert!(
                read.contains(*name),
                "compose sets {name} on {service}, which reads only {read:?}"
            );
        }
        assert!(
            help.contains(&format!("[env: {address_variable}")),
            "{service} has no {address_variable}"
        );
        let port = port_of(env(spec, address_variable).expect("address set"));
        let published: Vec<u64> = spec["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|p| port_parts(p).2)
            .collect();
        assert_eq!(published, [u64::from(port)], "{service}: published ports");
        let health = serde_yaml::to_string(&spec["healthcheck"]["test"]).unwrap();
        assert!(
            health.contains(&format!("/dev/tcp/127.0.0.1/{port}")),
            "{service}: healthcheck does not probe port {port}: {health}"
        );
        assert!(
            prometheus.contains(&format!("\"{service}:{port}\"")),
            "deploy/prometheus/prometheus.yml does not scrape {service}:{port}"
        );
        // Everything that talks to Kafka (all but the stand-in processor) talks to the
        // in-network listener the broker advertises.
        if !read.contains("KAFKA_BOOTSTRAP_SERVERS") {
            continue;
        }
        let advertised = env(&services["kafka"], "KAFKA_ADVERTISED_LISTENERS").unwrap();
        let bootstrap = env(spec, "KAFKA_BOOTSTRAP_SERVERS").expect("bootstrap set");
        assert!(
            advertised.contains(&format!("PLAINTEXT://{bootstrap}")),
            "{service} uses {bootstrap}; the broker advertises {advertised}"
        );
    }

    // Databases: the ones the services and the relay use are the ones Postgres creates.
    let init = std::fs::read_to_string(root().join("deploy/postgres/init.sql")).unwrap();
    let mut urls: Vec<String> = [
        "order-service",
        "inventory-service",
        "payment-service",
        "payment-gateway",
        "saga-monitor",
    ]
    .iter()
    .map(|service| env(&services[*service], "DATABASE_URL").unwrap().to_owned())
    .collect();
    // The relay tails every service's outbox.
    let sources: Vec<&str> = env(&services["outbox-relay"], "RELAY_SOURCES")
        .unwrap()
        .split(',')
        .map(|s| s.split_once('=').unwrap().0)
        .collect();
    assert_eq!(
        sources,
        ["orders", "inventory", "payments"],
        "RELAY_SOURCES"
    );
    urls.extend(
        env(&services["outbox-relay"], "RELAY_SOURCES")
            .unwrap()
            .split(',')
            .map(|s| s.split_once('=').unwrap().1.to_owned()),
    );
    for url in urls {
        let db = url.rsplit('/').next().unwrap();
        assert!(
            init.contains(&format!("CREATE DATABASE {db};")),
            "{url}: deploy/postgres/init.sql does not create {db}"
        );
    }

    // Topics: the event topics and each group's dead-letter and retry topics (as many retry
    // topics as the default --retry-delays has delays).
    let (_, help) = variables_read_by("order-service");
    let delays = help
        .split("--retry-delays")
        .nth(1)
        .and_then(|rest| rest.split("[default: ").nth(1))
        .and_then(|rest| rest.split(']').next())
        .expect("default retry delays in --help");
    let retries = delays.split(',').count();
    let command = serde_yaml::to_string(&services["topics"]["command"]).unwrap();
    let mut topics: Vec<String> = schemas::EVENT_TOPICS
        .iter()
        .map(|t| (*t).to_owned())
        .collect();
    for group in [
        order_service::consumer::GROUP,
        "inventory-service",
        payment_service::consumer::GROUP,
    ] {
        topics.push(messaging::kafka::dead_letter_topic(group));
        topics.extend((1..=retries).map(|n| messaging::retry::retry_topic(group, n)));
    }
    for topic in topics {
        assert!(
            command
                .split_whitespace()
                .any(|w| w.trim_matches([';', '\\']) == topic),
            "the topics service does not create {topic}"
        );
    }

    // `E2E_STACK=compose` points the end-to-end suite at the ports published here.
    let pointed = e2e::ExternalStack::defaults("compose").unwrap();
    let published_on_host = |service: &str| -> Vec<u64> {
        services[service]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|p| port_parts(p).1)
            .collect()
    };
    for (service, address) in [
        ("order-service", &pointed.order_url),
        ("inventory-service", &pointed.inventory_url),
        ("outbox-relay", &pointed.relay_url),
        ("postgres", &pointed.postgres_url),
        ("kafka", &pointed.bootstrap),
    ] {
        let port = u64::from(port_of(address));
        assert!(
            published_on_host(service).contains(&port),
            "E2E_STACK=compose expects {service} on {address}; compose publishes {:?}",
            published_on_host(service)
        );
    }
    let kafka_listeners = env(&services["kafka"], "KAFKA_ADVERTISED_LISTENERS").unwrap();
    assert!(
        kafka_listeners.contains(&format!("://{}", pointed.bootstrap)),
        "E2E_STACK=compose uses Kafka at {}; the broker advertises {kafka_listeners}",
        pointed.bootstrap
    );
    assert_eq!(
        pointed.admin_token.as_deref(),
        env(&services["inventory-service"], "ADMIN_TOKEN"),
        "E2E_STACK=compose uses another admin token than the file's default"
    );
    for db in [&pointed.orders_db, &pointed.inventory_db] {
        assert!(init.contains(&format!("CREATE DATABASE {db};")));
    }

    // A posture a team could deploy: nothing published beyond the host's loopback, Postgres
    // with a password, Grafana's anonymous visitors only viewers, the processes restarted.
    for (name, spec) in services.as_mapping().unwrap() {
        for port in spec["ports"].as_sequence().into_iter().flatten() {
            assert_eq!(
                port_parts(port).0.as_deref(),
                Some("127.0.0.1"),
                "{name:?} publishes {port:?} beyond 127.0.0.1"
            );
        }
    }
    let postgres = &services["postgres"];
    assert!(
        env(postgres, "POSTGRES_HOST_AUTH_METHOD").is_none(),
        "Postgres trusts every connection"
    );
    assert!(env(postgres, "POSTGRES_PASSWORD").is_some_and(|p| !p.is_empty()));
    assert_ne!(
        env(&services["grafana"], "GF_AUTH_ANONYMOUS_ORG_ROLE"),
        Some("Admin"),
        "anonymous Grafana visitors are admins"
    );
    // Everything that runs for good comes back by itself after a crash or a Docker daemon
    // restart (a host reboot), the one-shot topics job aside.
    for (name, spec) in services.as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        if name == "topics" {
            continue;
        }
        assert_eq!(
            spec["restart"].as_str(),
            Some("unless-stopped"),
            "{name} does not come back by itself after a crash or a daemon restart"
        );
    }
    // The routes that change prices, stock and the processor's behaviour need a token, taken
    // from the environment like the passwords.
    for service in ["inventory-service", "payment-gateway"] {
        assert_eq!(
            env(&services[service], "ADMIN_TOKEN"),
            Some("saga-local-dev-admin"),
            "{service}: ADMIN_TOKEN is not set from the environment (default saga-local-dev-admin)"
        );
    }
    assert!(
        std::fs::read_to_string(root().join("docker-compose.yml"))
            .unwrap()
            .contains("ADMIN_TOKEN: ${ADMIN_TOKEN:-saga-local-dev-admin}"),
        "ADMIN_TOKEN is not taken from the environment"
    );
    // Light, true healthchecks: the broker answers a Kafka request (no JVM tool every 2 s), and
    // Postgres answers over TCP in a database init.sql makes (its socket answers while the
    // official image is still initializing).
    let kafka_health = serde_yaml::to_string(&services["kafka"]["healthcheck"]["test"]).unwrap();
    assert!(
        kafka_health.contains("/dev/tcp/127.0.0.1/9092") && !kafka_health.contains(".sh"),
        "the broker's healthcheck: {kafka_health}"
    );
    let pg_health = serde_yaml::to_string(&services["postgres"]["healthcheck"]["test"]).unwrap();
    assert!(
        pg_health.contains("-h 127.0.0.1") && pg_health.contains("-d monitor"),
        "Postgres's healthcheck: {pg_health}"
    );
    assert!(init.contains("CREATE DATABASE monitor;"));

    // Every service with a healthcheck is waited for by what depends on it.
    for (name, spec) in services.as_mapping().unwrap() {
        if let Some(deps) = spec["depends_on"].as_mapping() {
            for (dep, how) in deps {
                let condition = how["condition"].as_str().unwrap_or("");
                assert!(
                    condition == "service_healthy" || condition == "service_completed_successfully",
                    "{name:?} depends on {dep:?} without waiting for it ({condition})"
                );
            }
        }
    }
}

/// deploy/Dockerfile builds without BuildKit too (docker-compose 1.x, `DOCKER_BUILDKIT=0`, a
/// docker CLI without buildx): no instruction only BuildKit knows, and BIN chosen after the
/// build stage, so that the six images share one compilation in the layer cache.
#[test]
fn the_dockerfile_needs_no_buildkit_and_compiles_once_for_every_image() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let instructions: Vec<&str> = dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    for line in &instructions {
        assert!(
            !line.contains("--mount") && !line.contains("<<") && !line.contains("--link"),
            "a BuildKit-only instruction: {line}"
        );
    }
    assert!(
        !dockerfile.starts_with("# syntax"),
        "a frontend image is pulled"
    );
    let build_stage = dockerfile
        .split("FROM ${BINARIES}")
        .next()
        .expect("a BINARIES stage");
    assert!(
        !build_stage.contains("ARG BIN\n") && !build_stage.contains("$BIN"),
        "the build stage depends on BIN: each image would compile the workspace again"
    );
    for bin in e2e::Process::ALL.map(e2e::Process::program) {
        assert!(
            build_stage.contains(&format!("--bin {bin}")),
            "the build stage does not build {bin}"
        );
    }
}

/// docker-compose.standin.yml, the project's own stand-ins for images only a registry has,
/// changes nothing of docker-compose.yml but which images run and how the stand-in broker is
/// addressed: every other setting of every service is the one users run.
#[test]
fn the_stand_in_override_changes_only_images_and_the_brokers_address() {
    let users = compose();
    let ours = compose_of(&["docker-compose.yml", "docker-compose.standin.yml"]);
    let services = users["services"].as_mapping().unwrap();
    for (name, spec) in services {
        let name = name.as_str().unwrap();
        let mut theirs = spec.as_mapping().unwrap().clone();
        let mut mine = ours["services"][name].as_mapping().unwrap().clone();
        theirs.remove("image");
        mine.remove("image");
        // The processes' images: the same Dockerfile and BIN, the binaries from this machine.
        if let (Some(Value::Mapping(a)), Some(Value::Mapping(b))) = (
            theirs
                .get_mut("build")
                .and_then(|b| b.get_mut("args"))
                .cloned(),
            mine.get_mut("build")
                .and_then(|b| b.get_mut("args"))
                .cloned(),
        ) {
            let mut b = b;
            assert_eq!(
                b.remove("BINARIES")
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .as_deref(),
                Some("order-saga/binaries:local"),
                "{name}"
            );
            assert_eq!(a, b, "{name}: build arguments");
            theirs.remove("build");
            mine.remove("build");
        }
        match name {
            "kafka" => {
                for key in ["environment", "networks"] {
                    theirs.remove(key);
                    mine.remove(key);
                }
            }
            "topics" => {
                theirs.remove("command");
                mine.remove("command");
            }
            _ => {
                theirs.remove("networks");
                mine.remove("networks");
            }
        }
        // `docker-compose config` lists merged ports in another order.
        for spec in [&mut theirs, &mut mine] {
            if let Some(Value::Sequence(ports)) = spec.get_mut("ports") {
                ports.sort_by_key(|p| serde_yaml::to_string(p).unwrap_or_default());
            }
        }
        assert_eq!(
            theirs, mine,
            "{name}: the override changes more than its image"
        );
    }
}
