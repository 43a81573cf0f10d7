#!/usr/bin/env bash
# Runs the whole test suite: unit, codec and end-to-end tests (real binaries, real Postgres, real
# Tansu broker; each end-to-end test starts its own broker and creates its own databases), then the
# end-to-end suite again against a running stack (scripts/run.sh's, started here if none runs), and
# then against the Docker Compose stack, in containers (scripts/compose-test.sh).
# Installs what is missing first (Postgres, Tansu, cargo-deny, kcat, promtool, Docker, socat,
# openssl, Chromium and ChromeDriver, and schemathesis in a venv). Checks the dependencies with cargo deny. Extra arguments
# go to the test runner.
#
# With E2E_STACK=compose (after `docker compose up --wait`) or E2E_STACK=local (after
# scripts/run.sh), runs only the end-to-end suite, against that stack, one test at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

have_nextest() { cargo nextest --version >/dev/null 2>&1; }

# The end-to-end suite against the running stack named by $E2E_STACK. One test at a time: a
# shared stack's counters are read as increases, which only a test running alone can own. The
# tests that need a stack of their own (they kill, restart or reconfigure processes) live in
# `own_stack` modules and are left out by name, so the runner counts them as skipped.
# The tests that cut, pause and kill the Compose stack's containers, compose_stack::*, run only
# against it (scripts/compose-test.sh sets E2E_COMPOSE_PROJECT).
e2e_against_stack() {
    local skip=(--skip own_stack::) what="own_stack::*"
    if [ "$E2E_STACK" != compose ] || [ -z "${E2E_COMPOSE_PROJECT:-}" ]; then
        skip+=(--skip compose_stack::)
        what="own_stack::* and compose_stack::*"
    fi
    say "running the end-to-end suite against the running stack E2E_STACK=$E2E_STACK, one test at a time (the tests that must stop or reconfigure processes, $what, are skipped)"
    # Test-name filters go after `--`; the caller's own `--`, if any, is reused.
    local args=("$@") separator=(--)
    for arg in "$@"; do [ "$arg" = -- ] && separator=(); done
    if have_nextest; then
        cargo nextest run -p e2e --no-fail-fast --test-threads 1 "${args[@]}" "${separator[@]}" "${skip[@]}"
    else
        cargo test -p e2e --no-fail-fast "${args[@]}" "${separator[@]}" "${skip[@]}" --test-threads 1
    fi
}

if [ -n "${E2E_STACK:-}" ]; then
    say "building the binaries"
    cargo build --workspace --bins
    ensure_kcat
    export KCAT_LIB_DIR
    ensure_promtool
    ensure_chromium
    e2e_against_stack "$@"
    exit
fi

ensure_curl
ensure_postgres
ensure_tansu
ensure_cargo_deny
# Supply chain: licenses, duplicate and wildcard dependencies, and crate sources (deny.toml).
# Advisories need the RustSec database from GitHub, which these machines cannot reach.
say "checking dependencies with cargo deny (licenses, bans, sources)"
cargo deny --log-level error check licenses bans sources
say "building the binaries"
cargo build --workspace --bins
ensure_kcat
export KCAT_LIB_DIR
ensure_promtool
ensure_docker_compose
ensure_tls_tools
ensure_chromium
status=0
# The Compose stack's own tests run in scripts/compose-test.sh, below; here the runner skips them.
args=("$@") separator=(--)
for arg in "$@"; do [ "$arg" = -- ] && separator=(); done
if have_nextest; then
    say "running the tests with cargo-nextest"
    cargo nextest run --workspace --no-fail-fast "${args[@]}" "${separator[@]}" --skip compose_stack:: || status=$?
else
    say "running the tests with cargo test"
    cargo test --workspace --no-fail-fast "${args[@]}" "${separator[@]}" --skip compose_stack:: || status=$?
fi

# The same end-to-end tests against a stack they did not start, as against Compose.
if curl -fsS http://127.0.0.1:8080/readyz >/dev/null 2>&1; then
    say "a stack already runs on 127.0.0.1:8080; testing against it"
else
    say "starting the local stack (scripts/run.sh) to run the end-to-end suite against it"
    trap 'say "stopping the local stack"; scripts/stop.sh >&2 || true' EXIT
    # The debug builds made above: the same code as the release builds scripts/run.sh makes
    # by default, without a second build of the workspace.
    SAGA_PROFILE=debug scripts/run.sh >/dev/null
    started_stack=yes
fi
# Hostile HTTP input first, while the stack holds only what it was seeded with (the audit that
# ends the fuzzing checks the whole stack; some end-to-end tests below produce events by hand
# for orders no service has): a short schemathesis run from each service's own /openapi.json
# (scripts/fuzz-http.sh 1500 is the long run the README reports).
if [ "$#" -eq 0 ] && [ -n "${started_stack:-}" ]; then
    say "fuzzing the services' HTTP APIs from their /openapi.json (short run)"
    SAGA_PROFILE=debug scripts/fuzz-http.sh 30 || status=$?
elif [ "$#" -eq 0 ]; then
    say "not fuzzing the HTTP APIs: the running stack was not started here, and its audit would judge what ran before"
fi
E2E_STACK=local e2e_against_stack "$@" || status=$?

# And against the Docker Compose stack, in containers (scripts/compose-test.sh: a Docker engine,
# the images, the stack up, the same suite with E2E_STACK=compose, everything torn down). Its
# services publish the same ports as the local stack, which is stopped first.
if [ -n "${started_stack:-}" ]; then
    say "stopping the local stack"
    scripts/stop.sh >&2 || true
    trap - EXIT
    say "the end-to-end suite against the Docker Compose stack (scripts/compose-test.sh)"
    scripts/compose-test.sh "$@" || status=$?
else
    say "SKIPPED: the end-to-end suite against Docker Compose; the local stack this command did not start holds its ports (stop it with scripts/stop.sh, or run scripts/compose-test.sh)"
fi
exit "$status"
