#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a fresh Debian machine: installs what the tests
# need (real Nix from Debian's nix-bin, Chromium for the dashboard test, iptables for the NAT
# test, the cargo-nextest runner), then checks formatting and lints, runs every test this
# environment can run, then each fuzz target briefly (scripts/fuzz.sh). README.md gives this
# command; .ci/run calls it; TESTING.md says what each test group proves and needs.
#
# Tests that need root live in modules named `needs_root`, tests that need real Nix (but not
# root) in modules named `needs_nix`; inside, a missing requirement is a failure, never a quiet
# pass. As root everything runs. Otherwise the groups whose requirement is missing are left
# out with a filterset and named, with the reason, after nextest's summary. In CI (CI=true, or
# root) a test that did not run fails the command.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

# A one-off run (CI, a fresh clone) never reuses incremental compilation's cache, which here is
# as large as the rest of the debug build; and the run's disk may be shared. Say how much there
# is, so that a test failing with ENOSPC is read as what it is.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"; fi
free_gib=$(df -Pk "${CARGO_TARGET_DIR:-.}" "${TMPDIR:-/tmp}" 2>/dev/null | awk 'NR > 1 { g = int($4 / 1048576); if (m == "" || g < m) m = g } END { print m }')
echo "== disk: ${free_gib:-?} GiB free for the build and the tests' stores"
if [ -n "$free_gib" ] && [ "$free_gib" -lt 16 ]; then
  echo "!! less than 16 GiB free: a fresh build, the fuzz build and the big-path tests need about 12"
fi

if ! command -v nix-store >/dev/null 2>&1; then
  echo "== installing nix-bin (real Nix for the tests)"
  as_root apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nix-bin ||
    echo "!! could not install nix-bin: the needs_nix tests will not run here"
fi

# A browser for the dashboard test (tests/dashboard.rs renders the page headless).
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium (a headless browser for the dashboard test)"
  as_root apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium ||
    echo "!! could not install chromium: the dashboard test will fail"
fi

# NAT between network namespaces for the NAT traversal test (tests/nat.rs, needs root).
if [ "$(id -u)" = 0 ] && ! command -v iptables >/dev/null 2>&1; then
  echo "== installing iptables (NAT routers for the NAT traversal test)"
  as_root apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iptables ||
    echo "!! could not install iptables: the NAT traversal test will fail"
fi

# The runner: per-test timeouts and filtersets; there is no weaker fallback.
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "== installing cargo-nextest (the test runner)"
  cargo install --locked cargo-nextest
fi

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

# What this environment cannot run, and why.
ci=no
if [ "$(id -u)" = 0 ] || [ "${CI:-}" = true ]; then ci=yes; fi
groups=() # "module|need X|why"
if [ "$(id -u)" != 0 ]; then
  groups+=("needs_root|need root|they create network namespaces")
  nix_why=""
  if ! command -v nix-store >/dev/null 2>&1; then
    nix_why="nix-store is not installed"
  else
    # The needs_nix tests build in chroot stores; as a normal user Nix's build sandbox needs
    # unprivileged user namespaces. One tiny build says whether this machine allows that.
    probe=$(mktemp -d)
    if ! err=$(env NIX_CONFIG=$'build-users-group =\nsandbox = false\nsubstituters =\nsandbox-paths = /bin /lib /lib64 /usr' \
      HOME="$probe/home" XDG_CACHE_HOME="$probe/cache" NIX_REMOTE="$probe/store" \
      timeout 120 nix-build --store "$probe/store" --no-out-link -E \
      'builtins.derivation { name = "peerix-probe"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; }' \
      2>&1 >/dev/null); then
      nix_why="Nix cannot build in a chroot store as $(id -un): $(printf '%s' "$err" | grep -m1 error: || printf '%s' "$err" | tail -n1)"
    fi
    chmod -R u+w "$probe" 2>/dev/null || true
    rm -rf "$probe"
  fi
  if [ -n "$nix_why" ]; then groups+=("needs_nix|need Nix|$nix_why"); fi
fi

# The filterset of what runs, and its complement: what does not.
excluded=""
for g in ${groups[@]+"${groups[@]}"}; do
  excluded="${excluded:+$excluded | }test(${g%%|*}::)"
done
run_filter=()
if [ -n "$excluded" ]; then run_filter=(-E "not ($excluded)"); fi

echo "== tests${excluded:+ (left out here: $excluded)}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo nextest run --workspace --locked --no-fail-fast ${run_filter[@]+"${run_filter[@]}"} 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# Every decoder of outside bytes, fuzzed briefly over the committed corpus (scripts/fuzz.sh;
# PEERIX_FUZZ_SECONDS per target, 0 skips): a crash found again fails the command.
fuzz_secs=${PEERIX_FUZZ_SECONDS:-15}
if [ "$fuzz_secs" != 0 ]; then
  echo "== fuzzing (${fuzz_secs}s per target)"
  if ! scripts/fuzz.sh "$fuzz_secs"; then
    echo "!! scripts/fuzz.sh failed: a target did not build, or fuzzing found a problem (see above)"
    status=1
  fi
fi

# The tests left out, by name, per reason.
not_run=0
reasons=()
for g in ${groups[@]+"${groups[@]}"}; do
  IFS='|' read -r module need why <<<"$g"
  names=$(cargo nextest list --workspace --locked -E "test($module::)" --message-format oneline 2>/dev/null)
  n=$(printf '%s' "$names" | grep -c . || true)
  [ "$n" = 0 ] && continue
  echo "== not run: $n tests in $module modules ($need: $why)"
  printf '%s\n' "$names" | sed 's/^/   /'
  not_run=$((not_run + n))
  reasons+=("$need: $(printf '%s' "$names" | paste -sd, - | sed 's/,/, /g')")
done

if [ "$not_run" != 0 ]; then
  if [ "$ci" = yes ]; then
    echo "!! in CI (root or CI=true) every test must run; $not_run did not"
    [ "$status" = 0 ] && status=1
  fi
  line="not run: $not_run tests ("
  for i in "${!reasons[@]}"; do
    [ "$i" = 0 ] || line+="; "
    line+="${reasons[$i]}"
  done
  echo "$line)"
  # The last line stays a plain summary line, counted from nextest's own.
  summary=$(grep -E '^ *Summary \[' "$log" | tail -n1 || true)
  if [ -n "$summary" ]; then
    passed=$(grep -oE '[0-9]+ passed' <<<"$summary" | grep -oE '^[0-9]+' || true)
    failed=0
    for k in failed 'timed out'; do
      n=$(grep -oE "[0-9]+ $k" <<<"$summary" | grep -oE '^[0-9]+' || true)
      failed=$((failed + ${n:-0}))
    done
    echo "${passed:-0} passed, $failed failed, $not_run not run"
  fi
fi
exit "$status"
