#!/usr/bin/env bash
# Runs the tests that go through a mount once more, every mount served through FUSE over
# io_uring (VDISK_TEST_TRANSPORT=io_uring: the harness adds -o io_uring=on). Switches
# /sys/module/fuse/parameters/enable_uring on for the run, since the kernel offers FUSE
# over io_uring only then, and back to what it was afterwards, however the run ends: the
# switch holds for every FUSE mount made on the machine meanwhile. Needs root.
#
#   scripts/test-io-uring.sh [FILTER...]
#
# FILTERs go to the test binary (default: the mount tests, discard, partition files, and
# the daemon's signals and faults).
set -euo pipefail
cd "$(dirname "$0")/.."

switch=/sys/module/fuse/parameters/enable_uring
if [ ! -e "$switch" ]; then
    echo "test-io-uring: $switch is missing: this kernel cannot carry FUSE over io_uring;" \
        "the mount tests ran through /dev/fuse only" >&2
    exit 0
fi
previous=$(cat "$switch")
trap 'echo "$previous" > "$switch"' EXIT
echo Y > "$switch"

if [ $# -eq 0 ]; then
    set -- mount_ discard:: partition_files:: service_signals:: service_faults::
fi
VDISK_TEST_TRANSPORT=io_uring cargo test --release --features system-tests --test system -- "$@"
