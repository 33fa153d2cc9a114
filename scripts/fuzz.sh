#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of every decoder that reads bytes from
# outside: one target per decoder in fuzz/fuzz_targets/, seeded with fuzz/corpus/<target>/.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 15 s each, every target)
#
# scripts/test.sh runs it briefly so a regression shows in CI; for a long run, give more time
# and keep what the fuzzer learns (README.md, section Fuzzing):
#
#   FUZZ_CORPUS_DIR=/var/tmp/peerix-fuzz scripts/fuzz.sh 3600 nar
#
# New inputs go to a scratch corpus (FUZZ_CORPUS_DIR, a temporary directory by default), never
# into the committed seeds. A crash, a panic, a timeout or an allocation past the limits fails
# the command; the input is saved under fuzz/artifacts/<target>/ and the line to replay it is
# printed. Installs what is missing: the nightly toolchain (rustup) and cargo-fuzz.
set -euo pipefail
cd "$(dirname "$0")/.."
# The fuzz crate always builds in fuzz/target (instrumented, nightly): never in a target
# directory shared with the stable builds.
unset CARGO_TARGET_DIR

secs=${1:-15}
shift || true
all=(narinfo nar protocol_request protocol_reply manifest config signing admin store_path)
targets=("$@")
[ ${#targets[@]} = 0 ] && targets=("${all[@]}")

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "== installing the nightly toolchain (cargo-fuzz needs it)"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo +nightly install --locked cargo-fuzz
fi

echo "== building the fuzz targets"
if ! (cd fuzz && cargo +nightly fuzz build); then
  echo "!! the fuzz targets did not build (see above); nothing was fuzzed"
  exit 1
fi

scratch=${FUZZ_CORPUS_DIR:-}
tmp=$(mktemp -d)
# The NAR target unpacks what it accepts; keep that off the disk when /dev/shm exists.
nar_tmp=$(mktemp -d "$([ -d /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")/peerix-fuzz.XXXXXX")
trap 'rm -rf "$tmp" "$nar_tmp"' EXIT
[ -n "$scratch" ] || scratch=$tmp/corpus
mkdir -p "$scratch"

summary=()
status=0
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "fuzz/artifacts/$t"
  log="$tmp/$t.log"
  echo "== fuzzing $t for ${secs}s"
  set +e
  # -rss_limit_mb and -malloc_limit_mb: every decoder bounds what it allocates; one that
  # allocates hundreds of MiB for a few KiB of input is a finding, not a slow run.
  (cd fuzz && PEERIX_FUZZ_TMP="$nar_tmp" cargo +nightly fuzz run "$t" \
    "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=256 \
    -print_final_stats=1) >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -n1)
  cov=$(grep -E '^#[0-9]+' "$log" | grep -oE 'cov: [0-9]+ ft: [0-9]+' | tail -n1)
  if [ "$rc" != 0 ]; then
    tail -n 60 "$log"
    echo "!! $t failed (exit $rc); the input is in fuzz/artifacts/$t/. Replay it with:"
    echo "   (cd fuzz && cargo +nightly fuzz run $t artifacts/$t/<file>)"
    status=1
    summary+=("$t: FAILED after ${execs:-?} executions")
  else
    summary+=("$t: ${execs:-?} executions, ${cov:-no coverage line}")
  fi
done

echo "== fuzzing summary (${secs}s per target)"
printf '   %s\n' "${summary[@]}"
exit "$status"
