#!/usr/bin/env bash
# Crash soak: SIGKILLs the mount daemon at random instants of a write workload, many more
# times than the regular test run does (tests/system/mount_crash.rs), in release mode.
#
#   scripts/crash-soak.sh [KILLS]       default 1000 VHDX kills (and a third as many VHD)
#   VDISK_CRASH_SEED=N scripts/crash-soak.sh [KILLS]   replay the run that printed seed N
#
# Needs root (or FUSE and fusermount3 for the user) and qemu-img.
set -euo pipefail
cd "$(dirname "$0")/.."

kills="${1:-1000}"
if ! [[ "$kills" =~ ^[0-9]+$ ]]; then
    echo "usage: $0 [KILLS]" >&2
    exit 2
fi

VDISK_CRASH_ITERATIONS="$kills" exec cargo test --release --features system-tests --test system \
    mount_crash:: -- --nocapture
