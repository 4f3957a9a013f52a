#!/usr/bin/env bash
# Static checks: rustfmt, clippy with warnings as errors (functions over 80
# lines included: clippy.toml), and no Rust file over 600 lines.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo fmt --all -- --check || { echo "the code is not rustfmt-clean: run cargo fmt --all" >&2; exit 1; }
(cd fuzz && cargo fmt -- --check) || { echo "fuzz/ is not rustfmt-clean: run (cd fuzz && cargo fmt)" >&2; exit 1; }

echo "== cargo clippy -D warnings"
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
cargo clippy --workspace --all-targets --locked -q -- -D warnings

echo "== file sizes (at most 600 lines)"
long=$(git ls-files '*.rs' | xargs wc -l | awk '$2 != "total" && $1 > 600 {print}')
if [ -n "$long" ]; then
  echo "files over 600 lines (split them by subject):" >&2
  echo "$long" >&2
  exit 1
fi
echo "lint: ok"
