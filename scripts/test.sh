#!/usr/bin/env bash
# The whole test suite, as README.md's "Test it" and .ci/run run it: both tiers through
# cargo, then the tests that go through a mount once more with every mount served through
# FUSE over io_uring (scripts/test-io-uring.sh). Needs root and the tools
# scripts/install-deps.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --release --features system-tests
scripts/test-io-uring.sh
