#!/usr/bin/env bash
# Coverage-guided fuzzing with cargo-fuzz (libFuzzer, nightly toolchain).
#
#   ./e2e/fuzz.sh smoke [SECONDS]        every target: its seeds, then 20,000 inputs from a
#                                        fixed seed, at most SECONDS (default 30): what CI runs
#   ./e2e/fuzz.sh run TARGET [SECONDS]   one target, long (default 900 s)
#   ./e2e/fuzz.sh list                   the targets
#
# Corpora grow in fuzz/corpus/<target> (not committed); the seeds in
# fuzz/seeds/<target> and the dictionaries in fuzz/dict start them. A crash
# is written to fuzz/artifacts/<target>/ and the run fails; turn it into a
# unit test next to the code it broke, then fix.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

toolchain=nightly
if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
  echo "the nightly toolchain is needed: rustup toolchain install nightly" >&2
  exit 1
fi
if ! cargo +"$toolchain" fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

targets() { cargo +"$toolchain" fuzz list; }

dict_for() {
  case "$1" in
    resp|resp_commands) echo "-dict=dict/resp.dict" ;;
    frame|peer_msg|handshake) echo "-dict=dict/frame.dict" ;;
    http) echo "-dict=dict/http.dict" ;;
    *) echo "" ;;
  esac
}

run_one() {
  local t=$1 secs=$2 extra=${3:-}
  mkdir -p "corpus/$t" "artifacts/$t"
  local seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  echo "== fuzz $t for ${secs}s"
  # -rss_limit_mb catches unbounded growth; -timeout catches hangs.
  cargo +"$toolchain" fuzz run "$t" "corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1 $(dict_for "$t") $extra 2>&1 \
    | grep -E "^(#[0-9]+[[:space:]]+DONE|stat::|==|INFO: Seed|SUMMARY|.*(panicked|ERROR|crash|leak|timeout))" || true
  if ls "artifacts/$t"/* >/dev/null 2>&1; then
    echo "fuzz $t: crash artifacts in fuzz/artifacts/$t" >&2
    return 1
  fi
}

case "${1:-smoke}" in
  list) targets ;;
  build) cargo +"$toolchain" fuzz build ;;
  smoke)
    # Deterministic, so CI fails for a regression and not for luck: the
    # seeds (crashes found before among them), then a fixed-seed run of
    # SMOKE_RUNS inputs, capped at SECONDS.
    secs=${2:-30}
    cargo +"$toolchain" fuzz build
    failed=0
    for t in $(targets); do
      run_one "$t" "$secs" "-seed=1 -runs=${SMOKE_RUNS:-20000}" || failed=1
    done
    exit $failed
    ;;
  run) run_one "${2:?target}" "${3:-900}" ;;
  *) echo "usage: $0 smoke [secs] | run TARGET [secs] | list | build" >&2; exit 2 ;;
esac
