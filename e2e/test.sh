#!/usr/bin/env bash
# The test command: installs whatever the tests need that is missing
# (e2e/setup.sh, idempotent and quick when everything is there), then runs
# every test of the workspace. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash e2e/setup.sh
echo "== cargo test --workspace"
exec cargo test --workspace --locked "$@"
