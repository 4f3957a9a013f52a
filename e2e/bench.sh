#!/usr/bin/env bash
# Bench harness: prints one `name value unit` line per figure.
# Usage: ./e2e/bench.sh [demo|failover|rolling|store|resp|tomcat|backup|idle|writes|lag|detect|transfer|all]   (BENCH_QUICK=1 for a short run)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p sessionmesh-sidecar --bins
exec ./target/release/sessionmesh-bench "${1:-all}"
