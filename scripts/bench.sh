#!/usr/bin/env bash
# The benchmark: in one run, the machine's ceilings (raw produce to the broker, Postgres commits,
# pgbench) and the system measured against them (relay drain and commit→ack latency, the saga
# open loop at fixed rates and its highest sustained rate, CPU and memory under load and idle).
# Prints the ratios and writes target/release/bench/report.json. Release build; starts its own
# brokers, processes and databases (nothing of scripts/run.sh's stack is used or disturbed).
# About 6 minutes; `scripts/bench.sh --quick` takes about 2. Options: see tests/src/bin/saga-bench.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_curl
ensure_postgres
ensure_tansu
say "building the release binaries (the first time takes about 10 minutes on 2 cores)"
cargo build --release --workspace --bins
export TANSU_BIN
say "running the benchmark; progress below, results at the end"
exec target/release/saga-bench "$@"
