#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each) and fails
# if any finds a crash. Needs a nightly toolchain and cargo-fuzz:
#   rustup toolchain install nightly && cargo install cargo-fuzz
# Usage: fuzz/run.sh [SECONDS] [TARGET...]
# Crashes land in fuzz/artifacts/TARGET/; the corpus grows in
# fuzz/corpus/TARGET/ (seeds are committed in fuzz/seeds/TARGET/).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(frame idx key_file config_file)
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "skipping: cargo-fuzz or the nightly toolchain is missing" >&2
  echo "  rustup toolchain install nightly && cargo install cargo-fuzz" >&2
  exit 0
fi
cargo +nightly fuzz build
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "seeds/$t"
  echo "== $t: ${secs}s"
  if ! cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -timeout=10 \
      -print_final_stats=1 2>"$t.log"; then
    echo "!! $t found a crash; see fuzz/$t.log and fuzz/artifacts/$t/" >&2
    status=1
  fi
  grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "$t.log" || true
done
exit $status
