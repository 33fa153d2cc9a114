#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a fresh Debian machine: installs what the tests
# need (real Nix from Debian's nix-bin), then checks formatting and lints and runs every test.
# README.md gives this command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

if ! command -v nix-store >/dev/null 2>&1; then
  echo "== installing nix-bin (real Nix for the tests)"
  as_root apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nix-bin ||
    echo "!! could not install nix-bin: the tests that need real Nix will say SKIPPED"
fi

# As root (CI), nothing may be skipped: a test that cannot find Nix fails instead.
if [ "$(id -u)" = 0 ]; then
  export PEERIX_REQUIRE_NIX=1
fi

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
