#!/usr/bin/env bash
# Side-by-side benchmark of vdisk-mount against the raw backing file, a FUSE pass-through
# of that file (vdisk-mount -o format=raw), qemu-storage-daemon's FUSE export and libvhdi's
# vhdimount, with fio; then fstrim through the mount against a raw sparse file, and
# `vdisk compact` and `vdisk convert` against `qemu-img convert`. Writes the results into
# BENCHMARKS.md (or --output FILE) between the "bench:begin" and "bench:end" markers,
# keeping any text around them.
#
#   bench/run.sh [--quick] [--output FILE] [--workdir DIR]
#
# --quick   small images, half-second jobs, the page cache dropped once per target rather
#           than before every job: proves the script, numbers are rough.
# --output  where the results go (default: BENCHMARKS.md beside this directory).
# --workdir where images are created (default: a new directory under /var/tmp, removed
#           afterwards). It must be on a disk filesystem that supports O_DIRECT.
# VDISK_MOUNT=path selects the binary (its companion `vdisk` must sit beside it); by
# default `cargo build --release` builds both.
# VDISK_MOUNT_OPTIONS=opts adds `-o opts` to every vdisk-mount (e.g. threads=16).
#
# Needs root (mounts, loop devices, dropping the page cache) and these tools, which it
# never installs: fio; qemu-img, qemu-io and qemu-storage-daemon (Debian: qemu-utils);
# vhdimount (libvhdi-utils); fusermount3 (fuse3); losetup (mount); fstrim and fallocate
# (util-linux); mkfs.ext4 (e2fsprogs).
set -euo pipefail

usage() {
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
quick=0
output="$repo/BENCHMARKS.md"
workdir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --output) output=${2:?--output needs a file}; shift ;;
        --workdir) workdir=${2:?--workdir needs a directory}; shift ;;
        -h | --help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 >&2 ;;
    esac
    shift
done

# --- prerequisites ---------------------------------------------------------------------

missing=()
need() { # tool package
    command -v "$1" > /dev/null || missing+=("$1 (Debian package $2)")
}
need fio fio
need qemu-img qemu-utils
need qemu-io qemu-utils
need qemu-storage-daemon qemu-utils
need vhdimount libvhdi-utils
need fusermount3 fuse3
need losetup mount
need fstrim util-linux
need fallocate util-linux
need mkfs.ext4 e2fsprogs
if [ ${#missing[@]} -gt 0 ]; then
    echo "bench/run.sh needs these tools, which it does not install:" >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "bench/run.sh must run as root (FUSE mounts, loop devices, drop_caches)" >&2
    exit 1
fi
if [ ! -e /dev/fuse ]; then
    echo "bench/run.sh needs /dev/fuse" >&2
    exit 1
fi

if [ -n "${VDISK_MOUNT:-}" ]; then
    bin=$VDISK_MOUNT
else
    echo "building vdisk-mount (cargo build --release)"
    cargo build --release --quiet --manifest-path "$repo/Cargo.toml"
    bin="$repo/target/release/vdisk-mount"
fi
[ -x "$bin" ] || { echo "no vdisk-mount binary at $bin" >&2; exit 1; }
vdisk="$(dirname "$bin")/vdisk"
[ -x "$vdisk" ] || { echo "no vdisk binary beside $bin" >&2; exit 1; }

# --- sizes and durations -----------------------------------------------------------------

MIB=$((1 << 20))
if [ $quick = 1 ]; then
    size=$((256 * MIB)) # each benchmark image
    alloc_size=$((256 * MIB)) # the allocating write
    ramp=0s
    runtime=500ms
    trim_size=$((512 * MIB)) # the image under the filesystem that fstrim trims
    trim_files=$((256 * MIB)) # the files written, deleted, then trimmed
    compact_size=$((512 * MIB)) # the image vdisk compact packs
else
    size=$((4096 * MIB))
    alloc_size=$((1024 * MIB))
    ramp=1s
    runtime=3s
    trim_size=$((4096 * MIB))
    trim_files=$((1024 * MIB))
    compact_size=$((4096 * MIB))
fi
reps=3 # timed runs of each contender for fstrim and compact (median, min-max)
huge_size=10T # the image whose start-up time is measured
vhdx_block=32M

if [ -z "$workdir" ]; then
    workdir=$(mktemp -d /var/tmp/vdisk-bench.XXXXXX)
    remove_workdir=1
else
    mkdir -p "$workdir"
    workdir=$(cd "$workdir" && pwd)
    remove_workdir=0
fi

# --- cleanup: everything started here is stopped on exit ---------------------------------

mounts=()    # FUSE mountpoints (directories or qemu export files)
loop=""      # the attached loop device, if any
fs_mnt=""    # the mounted filesystem on that loop device, if any
qsd_pid=""   # the running qemu-storage-daemon, if any
cleanup() {
    local m
    if [ -n "$fs_mnt" ] && mountpoint -q "$fs_mnt" 2> /dev/null; then
        umount "$fs_mnt" 2> /dev/null || umount -l "$fs_mnt" 2> /dev/null || true
    fi
    [ -z "$loop" ] || losetup -d "$loop" 2> /dev/null || true
    for m in "${mounts[@]}"; do
        if mountpoint -q "$m" 2> /dev/null; then
            fusermount3 -u "$m" 2> /dev/null || umount -l "$m" 2> /dev/null || true
        fi
    done
    [ -z "$qsd_pid" ] || kill "$qsd_pid" 2> /dev/null || true
    if [ "$remove_workdir" = 1 ]; then
        # Only after every mount inside it is gone.
        for m in "${mounts[@]}" ${fs_mnt:+"$fs_mnt"}; do
            mountpoint -q "$m" 2> /dev/null && return
        done
        rm -rf "$workdir"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

drop_caches() {
    sync
    echo 3 > /proc/sys/vm/drop_caches
}

# Waits up to 30 s for `pid` to exit. A zombie has: it holds no file any more, and whoever
# reaps it (a daemon's parent is gone) may take seconds to get round to it.
wait_gone() {
    local i
    for i in $(seq 300); do
        kill -0 "$1" 2> /dev/null || return 0
        [ "$(sed -n 's/.*) \(.\).*/\1/p' "/proc/$1/stat" 2> /dev/null)" != Z ] || return 0
        sleep 0.1
    done
    echo "process $1 did not exit" >&2
    return 1
}

# Peak resident set (VmHWM) of a process, in KiB.
peak_rss_kib() {
    awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"
}

# The daemon serving a mountpoint: the process whose command line names it.
pid_serving() {
    pgrep -n -f -- "$1"
}

# --- targets -----------------------------------------------------------------------------
# Every target is started by `start_<kind> image` and leaves its file in $target_file and
# its daemon in $target_pid (empty for the raw file); `stop_target` ends it.

target_file=""
target_pid=""
target_mount=""
target_kind=""

start_vdisk() { # image [mount options]
    local image=$1 mnt
    shift
    mnt=$(mktemp -d "$workdir/mnt.XXXXXX")
    mounts+=("$mnt")
    "$bin" "$@" ${VDISK_MOUNT_OPTIONS:+-o "$VDISK_MOUNT_OPTIONS"} "$image" "$mnt"
    target_mount=$mnt
    target_file="$mnt/disk.img"
    target_pid=$(pid_serving "$mnt")
    target_kind=fuse
}

start_qsd() { # image format
    local image=$1 format=$2 export_file
    export_file=$(mktemp "$workdir/qsd-export.XXXXXX")
    mounts+=("$export_file")
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=file0,filename=$image" \
        --blockdev "driver=$format,node-name=fmt0,file=file0" \
        --export "type=fuse,id=exp0,node-name=fmt0,mountpoint=$export_file,writable=on" \
        --pidfile "$export_file.pid" --daemonize
    qsd_pid=$(cat "$export_file.pid")
    target_pid=$qsd_pid
    target_mount=$export_file
    target_file=$export_file
    target_kind=qsd
}

start_vhdimount() { # image
    local mnt
    mnt=$(mktemp -d "$workdir/vhdi.XXXXXX")
    mounts+=("$mnt")
    vhdimount "$1" "$mnt" > /dev/null
    target_mount=$mnt
    target_file="$mnt/vhdi1"
    target_pid=$(pid_serving "$mnt")
    target_kind=fuse
}

start_file() { # path
    target_file=$1
    target_pid=""
    target_mount=""
    target_kind=file
}

stop_target() {
    case $target_kind in
        fuse) fusermount3 -u "$target_mount" ;;
        # qemu-storage-daemon keeps running after its export is unmounted; SIGTERM makes
        # it close the image and remove the export.
        qsd) kill "$target_pid" ;;
    esac
    [ -z "$target_pid" ] || wait_gone "$target_pid"
    [ "$target_kind" != qsd ] || qsd_pid=""
    target_file="" target_pid="" target_mount="" target_kind=""
}

# --- fio ---------------------------------------------------------------------------------

# name rw bs iodepth: the measured jobs. Sequential jobs report MiB/s, random ones IOPS.
jobs=(
    "seq-read-1M-qd1 read 1M 1"
    "seq-read-1M-qd16 read 1M 16"
    "seq-write-1M-qd1 write 1M 1"
    "seq-write-1M-qd16 write 1M 16"
    "rand-read-4K-qd1 randread 4k 1"
    "rand-read-4K-qd16 randread 4k 16"
    "rand-write-4K-qd1 randwrite 4k 1"
    "rand-write-4K-qd16 randwrite 4k 16"
)

declare -A result # "target|job" -> number
declare -A rss    # target -> peak RSS in KiB

fio_common=(--ioengine=libaio --direct=1 --norandommap --randrepeat=0
    --output-format=terse --terse-version=3)

# Reads fio's terse (v3) output and prints "job value" per job: MiB/s for sequential jobs,
# IOPS for random ones (fields 7/8: read KiB/s and IOPS, 48/49: the same for writes).
# Other lines (fio's notes about exec_prerun) are skipped.
fio_results() {
    awk -F';' '
        $1 != 3 { next }
        $5 != 0 { print "fio job " $3 " failed with error " $5 > "/dev/stderr"; exit 1 }
        { w = $3 ~ /write/; kib = w ? $48 : $7; iops = w ? $49 : $8 }
        $3 ~ /rand/ { printf "%s %.0f\n", $3, iops; next }
        { printf "%s %.1f\n", $3, kib / 1024 }'
}

# Runs the job list (reads only with `reads`) on the current target, one after the other
# in one fio run. A full run drops the page cache before every job, a quick one only
# before the first.
run_jobs() { # label [reads]
    local label=$1 only=${2:-} spec name rw bs qd value args
    args=("${fio_common[@]}" --filename="$target_file" --ramp_time="$ramp"
        --runtime="$runtime" --time_based)
    [ -b "$target_file" ] || args+=(--size="$size")
    [ $quick = 1 ] || args+=(--exec_prerun="sh -c 'sync; echo 3 > /proc/sys/vm/drop_caches'")
    for spec in "${jobs[@]}"; do
        read -r name rw bs qd <<< "$spec"
        [ "$only" = reads ] && [[ $rw == *write* ]] && continue
        args+=(--name="$name" --stonewall --rw="$rw" --bs="$bs" --iodepth="$qd")
    done
    drop_caches
    while read -r name value; do
        result["$label|$name"]=$value
        log "$label $name: $value"
    # exec_prerun leaves its output in the current directory.
    done < <(cd "$workdir" && fio "${args[@]}" | fio_results)
}

# Runs the jobs on the current target directly and through a direct-I/O loop device.
run_target() { # label [reads]
    local label=$1 file=$target_file
    run_jobs "$label" "${2:-}"
    if [ "${2:-}" != reads ]; then
        loop=$(losetup -f --show --direct-io=on "$file")
        target_file=$loop
        run_jobs "loop:$label"
        target_file=$file
        losetup -d "$loop"
        loop=""
    fi
    [ -z "$target_pid" ] || rss[$label]=$(peak_rss_kib "$target_pid")
}

# --- images ------------------------------------------------------------------------------

log "work directory $workdir; images of $((size / MIB)) MiB"
raw="$workdir/raw.img"
# Random contents: every block of every image is allocated and holds real data.
head -c "$size" /dev/urandom > "$raw"
vhdx_dyn="$workdir/dynamic.vhdx"
qemu-img convert -f raw -O vhdx -o "subformat=dynamic,block_size=$vhdx_block" "$raw" "$vhdx_dyn"
# block_state_zero=off: qemu-img otherwise marks a new fixed image's blocks ZERO, and the
# first write to each then allocates it anew at the end of the file.
vhdx_fixed="$workdir/fixed.vhdx"
qemu-img create -q -f vhdx -o "subformat=fixed,block_size=$vhdx_block,block_state_zero=off" \
    "$vhdx_fixed" "$size"
qemu-img convert -n -f raw -O vhdx "$raw" "$vhdx_fixed"
# Filled through vdisk-mount, which starts each block's data on a page boundary; qemu-img
# convert starts it 512 bytes past one, which costs any reader of the file (BENCHMARKS.md,
# Findings). vdisk-mount and qemu-storage-daemon are both measured on this same file.
vhd_dyn="$workdir/dynamic.vhd"
"$vdisk" create --format vhd --size "$size" "$vhd_dyn" > /dev/null
start_vdisk "$vhd_dyn"
dd if="$raw" of="$target_file" bs=1M oflag=direct conv=notrunc,fsync status=none
stop_target

# --- the measured targets ------------------------------------------------------------------

started=$(date +%s)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

start_file "$raw"
run_target "raw file"
stop_target

start_vdisk "$raw" -o format=raw
run_target "FUSE raw"
stop_target

start_vdisk "$vhdx_dyn"
run_target "VHDX dynamic"
stop_target

start_vdisk "$vhdx_fixed"
run_target "VHDX fixed"
stop_target

start_vdisk "$vhd_dyn"
run_target "VHD dynamic"
stop_target

start_qsd "$vhdx_dyn" vhdx
run_target "qsd VHDX dynamic"
stop_target

start_qsd "$vhdx_fixed" vhdx
run_target "qsd VHDX fixed"
stop_target

start_qsd "$vhd_dyn" vpc
run_target "qsd VHD dynamic"
stop_target

start_vhdimount "$vhdx_dyn"
run_target "vhdimount VHDX dynamic" reads
stop_target

# --- allocating sequential writes into empty dynamic images ---------------------------------

declare -A alloc # "who|format" -> MiB/s

empty_image() { # format path
    case $1 in
        vhdx) qemu-img create -q -f vhdx -o "block_size=$vhdx_block" "$2" "$alloc_size" ;;
        vpc) qemu-img create -q -f vpc -o subformat=dynamic,force_size=on "$2" "$alloc_size" ;;
    esac
}

# fio writes the whole disk once, sequentially, and syncs at the end (as qemu-io does).
alloc_fio() { # label
    drop_caches
    result["$1|alloc"]=$(fio "${fio_common[@]}" --name=seq-write-alloc --filename="$target_file" \
        --rw=write --bs=1M --iodepth=16 --size="$alloc_size" --end_fsync=1 |
        fio_results | cut -d' ' -f2)
    log "$1 allocating write: ${result["$1|alloc"]} MiB/s"
}

for format in vhdx vpc; do
    name=$([ $format = vhdx ] && echo VHDX || echo VHD)
    image="$workdir/empty.$format"

    empty_image $format "$image"
    start_vdisk "$image"
    alloc_fio "vdisk-mount $name"
    stop_target
    rm -f "$image"

    empty_image $format "$image"
    start_qsd "$image" $format
    alloc_fio "qsd $name"
    stop_target
    rm -f "$image"

    empty_image $format "$image"
    drop_caches
    t0=$EPOCHREALTIME
    qemu-io -f $format -c "write 0 $alloc_size" "$image" > /dev/null
    t1=$EPOCHREALTIME
    result["qemu-io $name|alloc"]=$(awk -v b="$alloc_size" -v t0="$t0" -v t1="$t1" \
        'BEGIN { printf "%.1f\n", b / 1048576 / (t1 - t0) }')
    log "qemu-io $name allocating write: ${result["qemu-io $name|alloc"]} MiB/s"
    rm -f "$image"
done

# --- repeated timings ----------------------------------------------------------------------
# fstrim and compact time every contender $reps times, by turns with what it is compared
# with; runs[] keeps one figure per run, reported as median and min–max.

declare -A runs  # "what|who" -> figures, space-separated
declare -A after # "who|format" -> file length after compacting, in bytes

# Seconds between two $EPOCHREALTIME readings.
seconds() { # t0 t1
    awk -v t0="$1" -v t1="$2" 'BEGIN { printf "%.3f\n", t1 - t0 }'
}

# Before every timed run, what earlier steps left dirty is written out, so no contender
# pays for it (a copy's dirty pages would go out with compact's first flush). A full run
# also drops the page cache before every timed run, a quick one only before each
# contender's first (as for the fio jobs).
drop_before_run() { # rep
    sync
    [ $quick = 1 ] && [ "$1" -gt 1 ] || drop_caches
}

# Bytes the host filesystem holds for a file.
allocated() { # file
    stat -c '%b %B' "$1" | awk '{ printf "%.0f\n", $1 * $2 }'
}

# --- fstrim through the mount --------------------------------------------------------------

# The files written into the filesystem are copies of one chunk of random data.
chunk="$workdir/chunk"
chunk_size=$((64 * MIB))
head -c "$chunk_size" /dev/urandom > "$chunk"

# ext4 on a loop device over `file` (a mount's disk file, or a raw file); $trim_files of
# files written and synced, deleted and synced; then fstrim on the filesystem, timed, and
# the space the host gave back for `host` (the file on the host's own filesystem).
trim_run() { # who file host rep
    local who=$1 file=$2 host=$3 i t0 t1 before freed
    loop=$(losetup -f --show --direct-io=on "$file")
    mkfs.ext4 -q -b 4096 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$loop"
    fs_mnt=$(mktemp -d "$workdir/ext4.XXXXXX")
    mount "$loop" "$fs_mnt"
    for ((i = 0; i < trim_files / chunk_size; i++)); do
        cp "$chunk" "$fs_mnt/file$i"
    done
    sync
    rm "$fs_mnt"/file*
    sync
    drop_before_run "$4"
    before=$(allocated "$host")
    t0=$EPOCHREALTIME
    fstrim "$fs_mnt"
    t1=$EPOCHREALTIME
    freed=$((before - $(allocated "$host")))
    umount "$fs_mnt"
    rmdir "$fs_mnt"
    fs_mnt=""
    losetup -d "$loop"
    loop=""
    runs["trim|$who"]+=" $(seconds "$t0" "$t1")"
    runs["trim freed|$who"]+=" $freed"
    log "fstrim on $who: $(seconds "$t0" "$t1") s, $((freed / MIB)) MiB given back"
}

trim_image="$workdir/trim"
for rep in $(seq $reps); do
    for who in VHDX raw VHD; do
        if [ $who = raw ]; then
            truncate -s "$trim_size" "$trim_image.raw"
            trim_run "raw file" "$trim_image.raw" "$trim_image.raw" "$rep"
            rm "$trim_image.raw"
        else
            image="$trim_image.${who,,}"
            "$vdisk" create --format "${who,,}" --size "$trim_size" "$image" > /dev/null
            start_vdisk "$image"
            trim_run "$who" "$target_file" "$image" "$rep"
            stop_target
            rm "$image"
        fi
    done
done

# --- vdisk compact against qemu-img convert ------------------------------------------------

# A dynamic image of $compact_size, every byte written (0x5a) through vdisk-mount, then
# every other block discarded through it: half its blocks are holes in the file.
holey_image() { # format path block
    local format=$1 image=$2 block=$3 off
    "$vdisk" create --format "$format" --size "$compact_size" --block-size "$block" "$image" > /dev/null
    start_vdisk "$image"
    dd if=/dev/zero bs=1M count=$((compact_size / MIB)) status=none | tr '\0' '\132' |
        dd of="$target_file" bs=1M iflag=fullblock oflag=direct conv=notrunc,fsync status=none
    for ((off = block; off < compact_size; off += 2 * block)); do
        fallocate --punch-hole --offset "$off" --length "$block" "$target_file"
    done
    stop_target
}

# Fails the run unless `copy` reads exactly as `original`: a figure for a tool that lost
# data would be worthless.
same_contents() { # original-format original copy-format copy tool
    qemu-img compare -q -f "$1" -F "$3" "$2" "$4" || {
        echo "$5 changed what the image holds: $4 differs from $2" >&2
        exit 1
    }
}

for format in vhdx vhd; do
    name=${format^^}
    if [ $format = vhdx ]; then
        qfmt=vhdx block=$((32 * MIB)) convert_opts="subformat=dynamic,block_size=32M"
    else
        qfmt=vpc block=$((2 * MIB)) convert_opts="subformat=dynamic,force_size=on"
    fi
    source="$workdir/holey.$format"
    work="$workdir/work.$format"
    new="$workdir/converted.$format"
    holey_image $format "$source" $block
    for rep in $(seq $reps); do
        # Both start from a sparse copy of the same image, made before the clock starts.
        cp --sparse=always "$source" "$work"
        drop_before_run "$rep"
        t0=$EPOCHREALTIME
        summary=$("$vdisk" compact --json "$work")
        t1=$EPOCHREALTIME
        same_contents $qfmt "$source" $qfmt "$work" "vdisk compact"
        moved=$(sed -n 's/^ *"bytes_moved": *\([0-9]*\).*/\1/p' <<< "$summary")
        [ -n "$moved" ] || { echo "no bytes_moved in vdisk compact --json: $summary" >&2; exit 1; }
        runs["compact|$name"]+=" $(seconds "$t0" "$t1")"
        runs["compact MiB/s|$name"]+=" $(awk -v b="$moved" -v t0="$t0" -v t1="$t1" \
            'BEGIN { printf "%.1f\n", b / 1048576 / (t1 - t0) }')"
        runs["compact moved|$name"]+=" $moved"
        after["compact|$name"]=$(stat -c %s "$work")
        log "vdisk compact $name: $(seconds "$t0" "$t1") s, $((moved / MIB)) MiB moved"
        rm "$work"

        cp --sparse=always "$source" "$work"
        drop_before_run "$rep"
        t0=$EPOCHREALTIME
        # -t writeback: its output flushed at the end, as a copy that replaces the image
        # must be (convert's default, -t unsafe, skips that flush); compact flushes too.
        qemu-img convert -t writeback -f $qfmt -O $qfmt -o "$convert_opts" "$work" "$new"
        t1=$EPOCHREALTIME
        same_contents $qfmt "$source" $qfmt "$new" "qemu-img convert"
        runs["convert|$name"]+=" $(seconds "$t0" "$t1")"
        after["convert|$name"]=$(stat -c %s "$new")
        log "qemu-img convert $name: $(seconds "$t0" "$t1") s"
        rm "$work" "$new"
    done
done

# --- vdisk convert against qemu-img convert ------------------------------------------------

# The half-full images above, each converted into the other format and into raw by both
# tools, by turns; outputs made durable by both (vdisk convert flushes before it renames
# its output into place; qemu-img with -t writeback) and checked equal to the source.
qemu_format_of() { # vdisk-format
    case $1 in vhd) echo vpc ;; *) echo "$1" ;; esac
}
# What `vdisk create` makes by default (qemu-img's VHD blocks are 2 MiB, as ours).
qemu_options_of() { # vdisk-format
    case $1 in
        vhd) echo "subformat=dynamic,force_size=on" ;;
        vhdx) echo "subformat=dynamic,block_size=32M" ;;
        raw) echo "" ;;
    esac
}
convert_pairs=("vhdx vhd" "vhd vhdx" "vhdx raw")
for rep in $(seq $reps); do
    for pair in "${convert_pairs[@]}"; do
        read -r from to <<< "$pair"
        source="$workdir/holey.$from" qfrom=$(qemu_format_of $from) qto=$(qemu_format_of $to)
        name="${from^^} → ${to^^}" new="$workdir/converted.$to"

        drop_before_run "$rep"
        t0=$EPOCHREALTIME
        "$vdisk" convert --format $to "$source" "$new" > /dev/null
        t1=$EPOCHREALTIME
        same_contents $qfrom "$source" $qto "$new" "vdisk convert"
        runs["vdisk convert|$name"]+=" $(seconds "$t0" "$t1")"
        log "vdisk convert $name: $(seconds "$t0" "$t1") s"
        rm "$new"

        drop_before_run "$rep"
        t0=$EPOCHREALTIME
        options=$(qemu_options_of $to)
        qemu-img convert -t writeback -f $qfrom -O $qto ${options:+-o "$options"} "$source" "$new"
        t1=$EPOCHREALTIME
        same_contents $qfrom "$source" $qto "$new" "qemu-img convert"
        runs["qemu-img convert|$name"]+=" $(seconds "$t0" "$t1")"
        log "qemu-img convert $name: $(seconds "$t0" "$t1") s"
        rm "$new"
    done
done
rm "$workdir"/holey.*

# --- start-up time and memory for a huge empty image -------------------------------------

huge="$workdir/huge.vhdx"
qemu-img create -q -f vhdx -o "block_size=$vhdx_block" "$huge" "$huge_size"

declare -A startup
# Seconds from starting the daemon until the first 4 KiB of its disk file read back.
measure_startup() { # who start-command...
    local who=$1 t0 t1
    shift
    drop_caches
    t0=$EPOCHREALTIME
    "$@"
    until dd if="$target_file" of=/dev/null bs=4k count=1 iflag=direct status=none 2> /dev/null; do
        sleep 0.01
    done
    t1=$EPOCHREALTIME
    startup[$who]=$(awk -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.3f\n", t1 - t0 }')
}

measure_startup vdisk-mount start_vdisk "$huge"
rss["10 TiB VHDX"]=$(peak_rss_kib "$target_pid")
stop_target
measure_startup qsd start_qsd "$huge" vhdx
rss["qsd 10 TiB VHDX"]=$(peak_rss_kib "$target_pid")
stop_target
log "10 TiB VHDX usable after ${startup[vdisk-mount]} s (qemu-storage-daemon: ${startup[qsd]} s)"

load_after=$(cut -d' ' -f1-3 /proc/loadavg)
elapsed=$(($(date +%s) - started))

# --- report ------------------------------------------------------------------------------

ratio() { # a b
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "n/a"; else printf "%.2f\n", a / b }'
}

# Marks a ratio that misses its goal.
judge() { # ratio goal
    awk -v r="$1" -v g="$2" 'BEGIN {
        if (r == "n/a") print "n/a"; else if (r + 0 >= g) print r; else printf "**%s** (goal %s)\n", r, g }'
}

# Marks a ratio of times that misses its goal (lower is better).
judge_at_most() { # ratio goal
    awk -v r="$1" -v g="$2" 'BEGIN {
        if (r == "n/a") print "n/a"; else if (r + 0 <= g) print r; else printf "**%s** (goal %s)\n", r, g }'
}

# The median, least and greatest of a contender's figures, each printed with `format`.
spread() { # format figures
    printf '%s\n' $2 | sort -g | awk -v f="$1" '
        NF { v[++n] = $1 }
        END {
            if (n == 0) { print "- - -"; exit }
            m = n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
            printf f " " f " " f "\n", m, v[1], v[n]
        }'
}

unit() { [[ $1 == seq* ]] && echo MiB/s || echo IOPS; }

# KiB of the BAT of a `bytes`-byte image (8-byte VHDX entries per 32 MiB block, 4-byte
# VHD entries per 2 MiB block), for the memory goal.
bat_kib() { # bytes format
    local entry=8 block=$((32 * MIB))
    [ "$2" = vhd ] && entry=4 block=$((2 * MIB))
    awk -v n="$1" -v e=$entry -v b=$block 'BEGIN { printf "%.1f\n", n / b * e / 1024 }'
}

ours=("VHDX dynamic" "VHDX fixed" "VHD dynamic")
declare -A qsd_of=(["VHDX dynamic"]="qsd VHDX dynamic" ["VHDX fixed"]="qsd VHDX fixed"
    ["VHD dynamic"]="qsd VHD dynamic")
misses=()

report() {
    local path prefix name t row r2 r4 r1 g4 goal unit_ cols target
    echo "Machine: $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM," \
        "Linux $(uname -r); $(fio --version); $(qemu-img --version | head -1);" \
        "vhdimount $(vhdimount -V 2> /dev/null | awk 'NR == 1 { print $2 }')."
    echo
    echo "Run: $(date -u +'%Y-%m-%d %H:%M UTC'), $([ $quick = 1 ] && echo '`--quick`' || echo full)," \
        "images of $((size / MIB)) MiB, fio libaio direct=1, ramp ${ramp} + ${runtime} measured per job," \
        "page cache dropped before $([ $quick = 1 ] && echo "each target's first job" || echo 'each job');" \
        "vdisk-mount options: ${VDISK_MOUNT_OPTIONS:-defaults}; ${elapsed} s in all." \
        "Load average (1/5/15 min) before: $load_before, after: $load_after."
    echo
    echo "Targets: **raw file** = fio on the backing file itself; **FUSE raw** = \`vdisk-mount -o format=raw\`" \
        "over it; **VHDX dynamic/fixed**, **VHD dynamic** = vdisk-mount over fully allocated images" \
        "holding the same data (VHDX blocks of $vhdx_block); **qsd** = \`qemu-storage-daemon --export type=fuse\`" \
        "over the same images; **vhdimount** = libvhdi's FUSE mount (reads only)." \
        "Sequential jobs in MiB/s, random jobs in IOPS; higher is better."
    for path in direct loop; do
        prefix=""
        [ $path = loop ] && prefix="loop:"
        echo
        if [ $path = direct ]; then
            echo "### fio on the disk file"
            cols=("raw file" "FUSE raw" "${ours[@]}" "qsd VHDX dynamic" "qsd VHDX fixed" "qsd VHD dynamic" "vhdimount VHDX dynamic")
        else
            echo "### fio on a loop device (\`losetup --direct-io=on\`) over the disk file"
            cols=("raw file" "FUSE raw" "${ours[@]}" "qsd VHDX dynamic" "qsd VHDX fixed" "qsd VHD dynamic")
        fi
        echo
        row="| job | unit |"
        for target in "${cols[@]}"; do row+=" $target |"; done
        echo "$row"
        echo "$row" | sed 's/[^|]\+/---/g'
        for spec in "${jobs[@]}"; do
            read -r name _ <<< "$spec"
            row="| $name | $(unit "$name") |"
            for target in "${cols[@]}"; do row+=" ${result["$prefix$target|$name"]:--} |"; done
            echo "$row"
        done
        echo
        echo "Ratios: ours ÷ FUSE raw (goal ≥ 0.90), ours ÷ qsd on the same image (goal ≥ 1.00, ≥ 1.50 for rand-4K-qd16), ours ÷ raw file."
        echo
        echo "| job | image | ÷ FUSE raw | ÷ qsd | ÷ raw file |"
        echo "|---|---|---|---|---|"
        for spec in "${jobs[@]}"; do
            read -r name _ <<< "$spec"
            g4=1.00
            [[ $name == rand-*-4K-qd16 ]] && g4=1.50
            for target in "${ours[@]}"; do
                r2=$(ratio "${result["$prefix$target|$name"]:-}" "${result["${prefix}FUSE raw|$name"]:-}")
                r4=$(ratio "${result["$prefix$target|$name"]:-}" "${result["$prefix${qsd_of[$target]}|$name"]:-}")
                r1=$(ratio "${result["$prefix$target|$name"]:-}" "${result["${prefix}raw file|$name"]:-}")
                echo "| $name | $target | $(judge "$r2" 0.90) | $(judge "$r4" "$g4") | $r1 |"
                [[ $(judge "$r2" 0.90) == "**"* ]] && misses+=("$path $name $target: $r2× FUSE raw (goal 0.90)")
                [[ $(judge "$r4" "$g4") == "**"* ]] && misses+=("$path $name $target: $r4× qsd (goal $g4)")
            done
        done
    done
    echo
    echo "### Allocating sequential write into an empty dynamic image"
    echo
    echo "$((alloc_size / MIB)) MiB written once from the start: fio 1 MiB qd16 with a final fsync through" \
        "each mount; \`qemu-io -c \"write 0 $((alloc_size / MIB))M\"\` (one request, writeback cache, flushed on exit)" \
        "on the same kind of image. Goal: vdisk-mount ≥ qemu-io."
    echo
    echo "| image | vdisk-mount MiB/s | qsd MiB/s | qemu-io MiB/s | vdisk-mount ÷ qemu-io |"
    echo "|---|---|---|---|---|"
    for name in VHDX VHD; do
        r=$(ratio "${result["vdisk-mount $name|alloc"]}" "${result["qemu-io $name|alloc"]}")
        echo "| $name | ${result["vdisk-mount $name|alloc"]} | ${result["qsd $name|alloc"]} | ${result["qemu-io $name|alloc"]} | $(judge "$r" 1.00) |"
        [[ $(judge "$r" 1.00) == "**"* ]] && misses+=("allocating write $name: $r× qemu-io (goal 1.00)")
    done
    local dropped="every timed run"
    [ $quick = 0 ] || dropped="each contender's first timed run"
    echo
    echo "### fstrim of $((trim_files / MIB)) MiB freed through the mount"
    echo
    echo "ext4 (4 KiB blocks, inode tables written by mkfs) on a loop device (\`losetup --direct-io=on\`)" \
        "over vdisk-mount's disk file for a new $((trim_size / MIB)) MiB dynamic image (\`vdisk create\`:" \
        "VHDX with 32 MiB blocks, VHD with 2 MiB blocks), and over a raw sparse file of that size;" \
        "$((trim_files / MIB)) MiB of files written and synced, deleted and synced, then \`fstrim\` on the" \
        "filesystem timed (its first trim after mounting: all free space). Median of $reps runs taken by" \
        "turns (VHDX, raw, VHD), min–max beside it, page cache dropped before $dropped;" \
        "lower is better. Host MiB freed: the median of what the" \
        "image file held on the host before fstrim minus after, a check that the space went back" \
        "(goal ≥ 90 % of the files)."
    echo
    echo "| fstrim on | seconds | min–max | ÷ raw file | host MiB freed |"
    echo "|---|---|---|---|---|"
    local med lo hi raw_med freed label
    read -r raw_med _ <<< "$(spread %.3f "${runs["trim|raw file"]:-}")"
    for who in VHDX VHD "raw file"; do
        read -r med lo hi <<< "$(spread %.3f "${runs["trim|$who"]:-}")"
        read -r freed _ <<< "$(spread %.0f "${runs["trim freed|$who"]:-}")"
        freed=$(awk -v b="$freed" 'BEGIN { if (b == "-") print "-"; else printf "%.1f\n", b / 1048576 }')
        label="vdisk-mount $who" r=$(ratio "$med" "$raw_med")
        [ "$who" != "raw file" ] || label="raw sparse file" r="-"
        echo "| $label | $med | $lo–$hi | $r | $freed |"
        awk -v f="$freed" -v want="$((trim_files / MIB))" 'BEGIN { exit !(f == "-" || f < 0.9 * want) }' \
            && misses+=("fstrim on $label: $freed MiB given back on the host of $((trim_files / MIB)) MiB freed (goal ≥ 90 %)")
    done
    echo
    echo "### vdisk compact of a $((compact_size / MIB)) MiB image with half its blocks free"
    echo
    echo "Dynamic images made by \`vdisk create\` (VHDX with 32 MiB blocks, VHD with 2 MiB blocks), every" \
        "byte written through vdisk-mount, then every other block discarded through it (\`fallocate" \
        "--punch-hole\`), which leaves half the blocks as holes in the file. Each run starts from a sparse" \
        "copy of that image (\`cp --sparse=always\`, not timed): \`vdisk compact\` packs it in place;" \
        "\`qemu-img convert -O vhdx\` (resp. \`vpc\`), the way to get there without vdisk, writes a second" \
        "image, made durable (\`-t writeback\`, so it is flushed like compact's work; convert's default" \
        "\`-t unsafe\` leaves it in the page cache). Both results are checked equal to the original with" \
        "\`qemu-img compare\`. Median of $reps" \
        "runs taken by turns (compact, convert, ...), min–max beside it, page cache dropped before" \
        "$dropped. MiB/s moved: \`bytes_moved\` of" \
        "\`vdisk compact --json\` ÷ seconds. Goal: compact takes no longer than convert (÷ ≤ 1.00)."
    echo
    echo "| image | compact s | min–max | convert s | min–max | compact ÷ convert | compact MiB/s moved | min–max | MiB moved | file MiB after compact | after convert |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
    local c_med c_lo c_hi q_med q_lo q_hi m_med m_lo m_hi moved_mib mib_c mib_q
    for name in VHDX VHD; do
        read -r c_med c_lo c_hi <<< "$(spread %.3f "${runs["compact|$name"]:-}")"
        read -r q_med q_lo q_hi <<< "$(spread %.3f "${runs["convert|$name"]:-}")"
        read -r m_med m_lo m_hi <<< "$(spread %.1f "${runs["compact MiB/s|$name"]:-}")"
        read -r moved_mib _ <<< "$(spread %.0f "${runs["compact moved|$name"]:-}")"
        moved_mib=$(awk -v b="$moved_mib" 'BEGIN { if (b == "-") print "-"; else printf "%.1f\n", b / 1048576 }')
        mib_c=$(awk -v b="${after["compact|$name"]:-}" 'BEGIN { if (b == "") print "-"; else printf "%.1f\n", b / 1048576 }')
        mib_q=$(awk -v b="${after["convert|$name"]:-}" 'BEGIN { if (b == "") print "-"; else printf "%.1f\n", b / 1048576 }')
        label="$name $([ $name = VHDX ] && echo 32 || echo 2) MiB blocks"
        r=$(ratio "$c_med" "$q_med")
        echo "| $label | $c_med | $c_lo–$c_hi | $q_med | $q_lo–$q_hi | $(judge_at_most "$r" 1.00) | $m_med | $m_lo–$m_hi | $moved_mib | $mib_c | $mib_q |"
        [[ $(judge_at_most "$r" 1.00) == "**"* ]] && misses+=("vdisk compact $label: $r× the time of qemu-img convert (goal ≤ 1.00)")
    done
    echo
    echo "### vdisk convert against qemu-img convert"
    echo
    echo "The two half-full images of the compact rows (the VHDX with 32 MiB blocks, the VHD with" \
        "2 MiB blocks) converted by \`vdisk convert\` and by \`qemu-img convert -t writeback\` into a new" \
        "dynamic image of the other format (the block size each tool makes by default, 32 MiB for VHDX," \
        "2 MiB for VHD) and into a raw file; both outputs durable on return and checked equal to the source" \
        "with \`qemu-img compare\`. Median of $reps runs taken by turns, min–max beside it, page cache" \
        "dropped before $dropped. Goal: vdisk convert takes no longer than qemu-img convert (÷ ≤ 1.00)."
    echo
    echo "| source → output | vdisk convert s | min–max | qemu-img convert s | min–max | vdisk ÷ qemu-img |"
    echo "|---|---|---|---|---|---|"
    local v_med v_lo v_hi pair from to
    for pair in "${convert_pairs[@]}"; do
        read -r from to <<< "$pair"
        name="${from^^} → ${to^^}"
        read -r v_med v_lo v_hi <<< "$(spread %.3f "${runs["vdisk convert|$name"]:-}")"
        read -r q_med q_lo q_hi <<< "$(spread %.3f "${runs["qemu-img convert|$name"]:-}")"
        r=$(ratio "$v_med" "$q_med")
        echo "| $name | $v_med | $v_lo–$v_hi | $q_med | $q_lo–$q_hi | $(judge_at_most "$r" 1.00) |"
        [[ $(judge_at_most "$r" 1.00) == "**"* ]] && misses+=("vdisk convert $name: $r× the time of qemu-img convert (goal ≤ 1.00)")
    done
    echo
    echo "### Start-up and memory"
    echo
    echo "Time from starting the daemon to the first 4 KiB read of its disk file, for an empty $huge_size dynamic VHDX" \
        "(goal < 1 s): vdisk-mount ${startup[vdisk-mount]} s, qemu-storage-daemon ${startup[qsd]} s."
    awk -v t="${startup[vdisk-mount]}" 'BEGIN { exit !(t >= 1) }' \
        && misses+=("start-up of a $huge_size VHDX: ${startup[vdisk-mount]} s (goal < 1 s)")
    echo
    echo "Peak resident memory (VmHWM) of each daemon after its jobs; goal for vdisk-mount: ≤ 64 MiB + BAT size."
    echo
    echo "| daemon | peak RSS MiB | BAT KiB | within goal |"
    echo "|---|---|---|---|"
    local bat fmt ok
    for target in "FUSE raw" "${ours[@]}" "10 TiB VHDX" "qsd VHDX dynamic" "qsd VHDX fixed" "qsd VHD dynamic" "qsd 10 TiB VHDX" "vhdimount VHDX dynamic"; do
        bat=0
        case $target in
            "10 TiB VHDX" | "qsd 10 TiB VHDX") bat=$(bat_kib "$(numfmt --from=iec "$huge_size")" vhdx) ;;
            *VHDX*) bat=$(bat_kib "$size" vhdx) ;;
            *VHD*) bat=$(bat_kib "$size" vhd) ;;
        esac
        ok="-"
        if [[ $target != qsd* && $target != vhdimount* ]]; then
            ok=$(awk -v r="${rss[$target]}" -v b="$bat" 'BEGIN { print (r <= 65536 + b) ? "yes" : "**no**" }')
            [ "$ok" = yes ] || misses+=("peak RSS of $target: $((rss[$target] / 1024)) MiB (goal 64 MiB + $bat KiB)")
        fi
        echo "| $target | $(awk -v r="${rss[$target]}" 'BEGIN { printf "%.1f", r / 1024 }') | $bat | $ok |"
    done
    echo
    echo "### Goals missed in this run"
    echo
    if [ ${#misses[@]} -eq 0 ]; then
        echo "None."
    else
        printf -- '- %s\n' "${misses[@]}"
    fi
}

section=$(report)
echo "$section"

begin="<!-- bench:begin (written by bench/run.sh; edit outside these markers) -->"
end="<!-- bench:end -->"
if [ -f "$output" ] && grep -qF "$begin" "$output" && grep -qF "$end" "$output"; then
    awk -v begin="$begin" -v end="$end" -v body="$section" '
        $0 == begin { print; print body; skip = 1; next }
        $0 == end { skip = 0 }
        !skip { print }' "$output" > "$output.new"
    mv "$output.new" "$output"
else
    { echo "# Benchmarks"; echo; echo "$begin"; echo "$section"; echo "$end"; } > "$output"
fi
log "results written to $output"
