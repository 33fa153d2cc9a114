#!/usr/bin/env bash
# Where a loopback download's CPU goes, as a flame graph: perf samples every thread of
# `peerix bench` (the seeder and the leecher, both in its process) only while its measured
# single-seeder download runs, not its set-up, warm-up or HTTP baseline, and inferno draws
# the stacks. It also prints the share of the samples under a few functions of interest.
#
#   scripts/profile.sh [OUT.svg] [SIZE_MIB]      (default docs/flame-loopback.svg, 1024)
#
# Needs perf (Debian: linux-perf) and the permission to use it (root, or
# kernel.perf_event_paranoid ≤ 1); installs inferno with cargo if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/flame-loopback.svg}
size=${2:-1024}

command -v perf >/dev/null || { echo "profile.sh: perf is needed (Debian: linux-perf)" >&2; exit 1; }
command -v inferno-flamegraph >/dev/null || cargo install --locked inferno
cargo build --release --locked
bin=${CARGO_TARGET_DIR:-target}/release/peerix

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkfifo "$dir/ctl"
# Held open, so that perf does not see the control FIFO close between commands.
exec 3<>"$dir/ctl"

# Events start disabled (-D -1); the bench's progress lines on stderr switch them on for the
# measured download and off after it. DWARF call graphs: the release build has no frame
# pointers.
perf record -F 499 --call-graph dwarf,16384 -D -1 --control "fifo:$dir/ctl" \
    -o "$dir/perf.data" -- "$bin" bench --seeders 1 --size-mib "$size" 2>&1 >"$dir/bench.txt" |
    while IFS= read -r line; do
        printf '%s\n' "$line" >&2
        case "$line" in
        "bench: 1 seeder(s)…") echo enable >&3 ;;
        "bench: 1 seeder(s): "*) echo disable >&3 ;;
        esac
    done
cat "$dir/bench.txt"

perf script -i "$dir/perf.data" 2>/dev/null | inferno-collapse-perf >"$dir/folded"
inferno-flamegraph --minwidth 0.5 --title "peerix bench --seeders 1 --size-mib $size: the measured download" \
    <"$dir/folded" >"$out"
echo "profile.sh: $out"

# What the samples add up to: by thread, by function sampled (self), and under a few functions
# of interest (a stack may count under several), for the whole process and for the seeder's
# side (the threads of its runtime, `bench-seeders`) apart; the rest is the leecher's.
awk -v interest='sha2::|sha256;blake3;aes|gcm|ghash;memmove|memcpy;take_received_plaintext;memset;generic_perform_write;tcp_sendmsg;tcp_recvmsg;fdatasync|ext4_sync_file;_raw_spin_unlock_irqrestore|try_to_wake_up' '
    BEGIN { np = split(interest, pat, ";") }
    {
        n = $NF; total += n; line = $0; sub(/ [0-9]+$/, "", line)
        k = split(line, f, ";"); thread[f[1]] += n; self[f[k]] += n
        seeder = f[1] ~ /^bench-seeders/; if (seeder) seeders += n
        for (i = 1; i <= np; i++) if (line ~ pat[i]) { under[i] += n; if (seeder) under_s[i] += n }
    }
    END {
        print "by thread:"
        for (t in thread) printf "%6.1f %%  %s\n", 100 * thread[t] / total, t | "sort -rn | head -8"
        close("sort -rn | head -8")
        print "by function sampled (self):"
        for (s in self) printf "%6.1f %%  %s\n", 100 * self[s] / total, substr(s, 1, 110) | "sort -rn | head -20"
        close("sort -rn | head -20")
        printf "under (all; the leecher; the seeder, whose threads took %.1f %%):\n", 100 * seeders / total
        for (i = 1; i <= np; i++)
            printf "%6.1f %% %6.1f %% %6.1f %%  %s\n", 100 * under[i] / total,
                100 * (under[i] - under_s[i]) / total, 100 * under_s[i] / total, pat[i]
    }' "$dir/folded"
