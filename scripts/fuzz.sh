#!/usr/bin/env bash
# Fuzzes every parser and I/O path: scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Runs each target (default: all, see fuzz/Cargo.toml) for SECONDS (default 60) with
# libFuzzer under AddressSanitizer, through cargo-fuzz on the nightly toolchain. Seeds come
# from images made here and, when it is found ($VDISK_CORPUS, or ../shared/corpus beside the
# checkout), the sample corpus. What a target finds is kept in fuzz/corpus/TARGET; a crash
# is saved under fuzz/artifacts/TARGET and makes the script exit 1 after the other targets
# ran. Each run ends with its libFuzzer statistics (executions, coverage, peak memory).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(open_read io_model chain vhdx_log structures partitions)
fi

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz.sh: the nightly Rust toolchain is missing (see 'rustup toolchain list');" \
        "cargo-fuzz needs it for its sanitizer flags" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi

cd fuzz
cargo +nightly fuzz build -O

seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT
images=()
corpus=${VDISK_CORPUS:-../../shared/corpus}
if [ -d "$corpus/images" ]; then
    while IFS= read -r -d '' packed; do
        image="$seeds/images/$(basename "${packed%.zst}")"
        mkdir -p "$seeds/images"
        zstd -q -d -f -o "$image" "$packed"
        images+=("$image")
    done < <(find "$corpus/images" -name '*.zst' -print0)
else
    echo "fuzz.sh: no sample corpus at $corpus; seeding from images made here only"
fi
# qemu lays its images out differently from this project's own (log and metadata places,
# BAT padding, block alignment): a second writer's images seed the targets too.
if command -v qemu-img >/dev/null; then
    mkdir -p "$seeds/images"
    for spec in "vhdx 64M subformat=dynamic,block_size=1M" "vhdx 8M subformat=fixed" \
        "vpc 16M subformat=dynamic" "vpc 4M subformat=fixed"; do
        read -r format size opts <<<"$spec"
        image="$seeds/images/qemu-$format-$size-${opts//[=,]/-}"
        qemu-img create -q -f "$format" -o "$opts" "$image" "$size"
        qemu-io -f "$format" -c "write -P 0x5a 0 64k" -c "write -P 0xa5 1M 4k" "$image" >/dev/null
        images+=("$image")
    done
fi
target/x86_64-unknown-linux-gnu/release/make_seeds "$seeds/seeds" "${images[@]}"
rm -rf "$seeds/images"

failed=()
for target in "${targets[@]}"; do
    echo "== $target: $seconds s"
    mkdir -p "corpus/$target" "$seeds/seeds/$target"
    if ! cargo +nightly fuzz run -O "$target" "corpus/$target" "$seeds/seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 \
        -print_final_stats=1 2>&1 | grep -v -E '^(#[0-9]+\s+(NEW|REDUCE|pulse))|^INFO: |^"|^###### '; then
        failed+=("$target")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: findings in ${failed[*]}: see fuzz/artifacts/" >&2
    exit 1
fi
echo "fuzz.sh: ${#targets[@]} targets ran $seconds s each without a finding"
