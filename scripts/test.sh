#!/usr/bin/env bash
# Runs the whole test suite: unit, codec and end-to-end tests (real binaries, real Postgres, real
# Tansu broker; each end-to-end test starts its own broker and creates its own databases).
# Installs what is missing first (Postgres, Tansu, kcat, promtool, docker-compose). Extra arguments go to the test runner.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_postgres
ensure_tansu
say "building the binaries"
cargo build --workspace --bins
ensure_kcat
export KCAT_LIB_DIR
ensure_promtool
ensure_docker_compose
if cargo nextest --version >/dev/null 2>&1; then
    say "running the tests with cargo-nextest"
    cargo nextest run --workspace --no-fail-fast "$@"
else
    say "running the tests with cargo test"
    cargo test --workspace --no-fail-fast "$@"
fi
