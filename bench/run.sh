#!/usr/bin/env bash
# Side-by-side benchmark of vdisk-mount against the raw backing file, a FUSE pass-through
# of that file (vdisk-mount -o format=raw), qemu-storage-daemon's FUSE export and libvhdi's
# vhdimount, with fio; allocating writes into empty dynamic images, alone and beside a
# writer that fsyncs after every 4 KiB; then fstrim through the mount against a raw sparse
# file, and `vdisk compact` and `vdisk convert` against `qemu-img convert`. Everything is
# measured three times, by turns with what it is compared with (A B C A B C ...), and
# reported as median and min–max. Writes the results into BENCHMARKS.md (or --output FILE)
# between the "bench:begin" and "bench:end" markers, keeping any text around them.
#
#   bench/run.sh [--quick] [--only nbd] [--output FILE] [--workdir DIR]
#
# --quick   small images, short jobs, the page cache dropped before each contender's first
#           run rather than before every job: proves the script, numbers are rough.
# --only nbd  measure only the NBD section (the nbdkit plugin against qemu-nbd); its
#           results are printed, and written only where --output says.
# --output  where the results go (default: BENCHMARKS.md beside this directory).
# --workdir where images are created (default: a new directory under /var/tmp, removed
#           afterwards). It must be on a disk filesystem that supports O_DIRECT.
# VDISK_MOUNT=path selects the binary (its companion `vdisk` must sit beside it); by
# default `cargo build --release` builds both.
# VDISK_MOUNT_OPTIONS=opts adds `-o opts` to every vdisk-mount (e.g. threads=16).
# VDISK_NBDKIT_PLUGIN=path selects the nbdkit plugin (default: libnbdkit_vdisk.so beside
# the binary; `cargo build` builds it with the binaries).
#
# When `vdisk-mount --help` offers `io_uring=` and the kernel has
# /sys/module/fuse/parameters/enable_uring, every vdisk-mount that fio measures runs twice,
# with `-o io_uring=off` and with `-o io_uring=on`; enable_uring is switched on for the run
# and restored afterwards. Otherwise the io_uring columns say why they are empty.
#
# Needs root (mounts, loop devices, dropping the page cache) and these tools, which it
# never installs: fio; qemu-img, qemu-io and qemu-storage-daemon (Debian: qemu-utils);
# vhdimount (libvhdi-utils); fusermount3 (fuse3); losetup (mount); fstrim and fallocate
# (util-linux); mkfs.ext4 (e2fsprogs); nbdkit (nbdkit) and qemu-nbd, with fio's nbd
# engine (Debian's fio has it).
set -euo pipefail

usage() {
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
    exit "${1:-0}"
}

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
quick=0
only=""
output="$repo/BENCHMARKS.md"
output_given=0
workdir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --only)
            only=${2:?--only needs a section}
            [ "$only" = nbd ] || { echo "--only: no section $only (only nbd runs alone)" >&2; exit 2; }
            shift
            ;;
        --output) output=${2:?--output needs a file}; output_given=1; shift ;;
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
need nbdkit nbdkit
need qemu-nbd qemu-utils
fio --enghelp=nbd > /dev/null 2>&1 || missing+=("fio's nbd engine (a fio built with libnbd)")
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
    echo "building vdisk-mount and the nbdkit plugin (cargo build --release)"
    cargo build --release --quiet --manifest-path "$repo/Cargo.toml" -p vdisk-mount -p nbdkit-vdisk
    bin="$repo/target/release/vdisk-mount"
fi
[ -x "$bin" ] || { echo "no vdisk-mount binary at $bin" >&2; exit 1; }
vdisk="$(dirname "$bin")/vdisk"
[ -x "$vdisk" ] || { echo "no vdisk binary beside $bin" >&2; exit 1; }
plugin=${VDISK_NBDKIT_PLUGIN:-$(dirname "$bin")/libnbdkit_vdisk.so}
[ -f "$plugin" ] || { echo "no nbdkit plugin at $plugin (set VDISK_NBDKIT_PLUGIN)" >&2; exit 1; }

# --- sizes and durations -----------------------------------------------------------------

MIB=$((1 << 20))
reps=3 # runs of every measurement, taken by turns with what it is compared with
if [ $quick = 1 ]; then
    size=$((256 * MIB)) # each benchmark image
    runtime=100ms # each fio job at most
    alloc_size=$((128 * MIB)) # the allocating write
    mixed_region=$((256 * MIB)) # each writer's share of the mixed-workload image
    mixed_runtime=250ms
    trim_size=$((512 * MIB)) # the image under the filesystem that fstrim trims
    trim_files=$((256 * MIB)) # the files written, deleted, then trimmed
    compact_size=$((512 * MIB)) # the image vdisk compact packs
else
    size=$((4096 * MIB))
    runtime=1s
    alloc_size=$((1024 * MIB))
    mixed_region=$((2048 * MIB))
    mixed_runtime=2s
    trim_size=$((4096 * MIB))
    trim_files=$((1024 * MIB))
    # Half the size of the fio images: with every measurement taken three times, the run
    # would otherwise outgrow its 20 minutes (BENCHMARKS.md, Method).
    compact_size=$((2048 * MIB))
fi
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

# --- FUSE transports ---------------------------------------------------------------------
# Every vdisk-mount runs over /dev/fuse; those fio measures run again over io_uring where
# both vdisk-mount and the kernel offer it. uring_na says why there are no io_uring
# figures (empty when there are).

uring_param=/sys/module/fuse/parameters/enable_uring
uring_option=0 # vdisk-mount has -o io_uring=
uring_na=""
if "$bin" --help 2>&1 | grep -q 'io_uring='; then
    uring_option=1
    [ -e "$uring_param" ] || uring_na="n/a (kernel without FUSE over io_uring)"
else
    uring_na="n/a (transport not built)"
fi
uring_saved="" # enable_uring as found, put back on exit

# --- cleanup: everything started here is stopped on exit ---------------------------------

mounts=()    # FUSE mountpoints (directories or qemu export files)
loop=""      # the attached loop device, if any
fs_mnt=""    # the mounted filesystem on that loop device, if any
qsd_pid=""   # the running qemu-storage-daemon, if any
nbd_pid=""   # the running NBD server (nbdkit or qemu-nbd), if any
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
    [ -z "$nbd_pid" ] || kill "$nbd_pid" 2> /dev/null || true
    # Only once no io_uring mount is left to need it.
    [ -z "$uring_saved" ] || echo "$uring_saved" > "$uring_param" 2> /dev/null || true
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

if [ -z "$uring_na" ]; then
    uring_saved=$(cat "$uring_param")
    echo Y > "$uring_param" || {
        echo "cannot switch on FUSE over io_uring ($uring_param)" >&2
        exit 1
    }
fi

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

# qemu's name of a vdisk format, and the options with which qemu-img makes what `vdisk
# create` makes by default (qemu-img's VHD blocks are 2 MiB, as ours).
qemu_format_of() { # vdisk-format
    case $1 in vhd) echo vpc ;; *) echo "$1" ;; esac
}
qemu_options_of() { # vdisk-format
    case $1 in
        vhd) echo "subformat=dynamic,force_size=on" ;;
        vhdx) echo "subformat=dynamic,block_size=$vhdx_block" ;;
        raw) echo "" ;;
    esac
}

# A new empty dynamic image, made by qemu-img.
empty_image() { # vdisk-format path bytes
    qemu-img create -q -f "$(qemu_format_of "$1")" -o "$(qemu_options_of "$1")" "$2" "$3"
}

# --- targets -----------------------------------------------------------------------------
# Every target is started by `start_<kind> ...` and leaves its file in $target_file and its
# daemon in $target_pid (empty for the raw file); `stop_target` ends it.

target_file=""
target_pid=""
target_mount=""
target_kind=""
target_reads_only=0
target_format="" # qemu's name of the format of a bare image
target_scratch="" # an image made for this target alone, removed when it stops
target_uri="" # the NBD export of an NBD server, which fio reaches with its nbd engine

start_vdisk() { # transport(fuse|io_uring) image [mount options]
    local transport=$1 image=$2 mnt choice=()
    shift 2
    # Named even for /dev/fuse: with enable_uring on, vdisk-mount would otherwise pick io_uring.
    [ $uring_option = 0 ] || choice=(-o "io_uring=$([ "$transport" = io_uring ] && echo on || echo off)")
    mnt=$(mktemp -d "$workdir/mnt.XXXXXX")
    mounts+=("$mnt")
    "$bin" "$@" ${VDISK_MOUNT_OPTIONS:+-o "$VDISK_MOUNT_OPTIONS"} "${choice[@]}" "$image" "$mnt"
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
    target_reads_only=1
}

start_file() { # path
    target_file=$1
    target_pid=""
    target_mount=""
    target_kind=file
}

# An image that a tool opens itself (qemu-io), served by nothing.
start_image() { # path qemu-format
    start_file "$1"
    target_format=$2
}

# An NBD server on a new socket: `server-command SOCKET PIDFILE` starts it in the
# background; it is ready once its pid file is there.
start_nbd() { # server-command...
    local socket i
    socket=$(mktemp -u "$workdir/nbd.XXXXXX")
    "$@" "$socket" "$socket.pid"
    for i in $(seq 300); do
        [ -s "$socket.pid" ] && break
        sleep 0.1
    done
    target_pid=$(cat "$socket.pid")
    nbd_pid=$target_pid
    target_uri="nbd+unix:///?socket=$socket"
    target_kind=nbd
}

nbdkit_vdisk() { # image socket pidfile
    nbdkit -U "$2" -P "$3" "$plugin" "image=$1"
}

qemu_nbd() { # format image socket pidfile
    qemu-nbd --fork --persistent --shared=16 -f "$1" -k "$3" --pid-file="$4" "$2"
}

stop_target() {
    if [ -n "$loop" ]; then
        losetup -d "$loop"
        loop=""
    fi
    case $target_kind in
        fuse) fusermount3 -u "$target_mount" ;;
        # qemu-storage-daemon keeps running after its export is unmounted; SIGTERM makes
        # it close the image and remove the export.
        qsd) kill "$target_pid" ;;
        # Both servers close the image and exit on SIGTERM.
        nbd) kill "$target_pid" ;;
    esac
    [ -z "$target_pid" ] || wait_gone "$target_pid"
    [ "$target_kind" != qsd ] || qsd_pid=""
    [ "$target_kind" != nbd ] || nbd_pid=""
    [ -z "$target_scratch" ] || rm -f "$target_scratch"
    target_file="" target_pid="" target_mount="" target_kind="" target_reads_only=0
    target_format="" target_scratch="" target_uri=""
}

# Starts what a contender's name says: "[loop:]WHO[ io_uring]". `loop:` puts a loop device
# with direct I/O over the target's file; ` io_uring` has vdisk-mount take its requests
# over io_uring. WHO names a target over one of the images made below, or "vdisk-mount F",
# "qsd F" or "qemu-io F" (F: VHDX or VHD) for a new empty dynamic image of `bytes`, made
# for this start alone.
start_contender() { # name [bytes]
    local who=${1#loop:} transport=fuse format
    if [[ $who == *" io_uring" ]]; then
        transport=io_uring who=${who% io_uring}
    fi
    case $who in
        "raw file") start_file "$raw" ;;
        "FUSE raw") start_vdisk $transport "$raw" -o format=raw ;;
        "VHDX dynamic") start_vdisk $transport "$vhdx_dyn" ;;
        "VHDX fixed") start_vdisk $transport "$vhdx_fixed" ;;
        "VHD dynamic") start_vdisk $transport "$vhd_dyn" ;;
        "qsd VHDX dynamic") start_qsd "$vhdx_dyn" vhdx ;;
        "qsd VHDX fixed") start_qsd "$vhdx_fixed" vhdx ;;
        "qsd VHD dynamic") start_qsd "$vhd_dyn" vpc ;;
        "vhdimount VHDX dynamic") start_vhdimount "$vhdx_dyn" ;;
        "nbdkit VHDX dynamic") start_nbd nbdkit_vdisk "$vhdx_dyn" ;;
        "nbdkit VHD dynamic") start_nbd nbdkit_vdisk "$vhd_dyn" ;;
        "qemu-nbd VHDX dynamic") start_nbd qemu_nbd vhdx "$vhdx_dyn" ;;
        "qemu-nbd VHD dynamic") start_nbd qemu_nbd vpc "$vhd_dyn" ;;
        "vdisk-mount VHDX" | "vdisk-mount VHD" | "qsd VHDX" | "qsd VHD" | "qemu-io VHDX" | "qemu-io VHD")
            format=${who##* } format=${format,,}
            empty_image "$format" "$workdir/empty.$format" "$2"
            case $who in
                vdisk-mount*) start_vdisk $transport "$workdir/empty.$format" ;;
                qsd*) start_qsd "$workdir/empty.$format" "$(qemu_format_of "$format")" ;;
                qemu-io*) start_image "$workdir/empty.$format" "$(qemu_format_of "$format")" ;;
            esac
            target_scratch="$workdir/empty.$format"
            ;;
        *)
            echo "bench/run.sh: no target named $1" >&2
            exit 1
            ;;
    esac
    if [[ $1 == loop:* ]]; then
        loop=$(losetup -f --show --direct-io=on "$target_file")
        target_file=$loop
    fi
}

# --- repeated measurements ---------------------------------------------------------------

declare -A runs # what was measured -> its figure from every run, space-separated
recorded=()     # what the current by_turns recorded, in order

record() { # what figure
    [ -n "${runs[$1]+set}" ] || recorded+=("$1")
    runs[$1]+=" $2"
}

# The median, least and greatest of a list of figures, each printed with `format`.
spread() { # format figures
    printf '%s\n' $2 | sort -g | awk -v f="$1" '
        NF { v[++n] = $1 }
        END {
            if (n == 0) { print "- - -"; exit }
            m = n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
            printf f " " f " " f "\n", m, v[1], v[n]
        }'
}

# Repeated figures as one table cell: "median (least–greatest)", or "-" when there are none.
figures_cell() { # format figures
    local med lo hi
    read -r med lo hi <<< "$(spread "$1" "$2")"
    if [ "$med" = - ]; then echo -; else echo "$med ($lo–$hi)"; fi
}

# Runs every step $reps times, by turns: each step once, then each again (A B C A B C ...),
# so that whatever else the machine does meanwhile weighs on all of them alike. A step
# "runner|argument" calls run_<runner> with the argument and the run's number; what the
# runners record is then logged as median and min–max.
by_turns() { # step...
    local rep step what
    recorded=()
    for rep in $(seq $reps); do
        for step in "$@"; do
            "run_${step%%|*}" "${step#*|}" "$rep"
        done
    done
    for what in "${recorded[@]}"; do
        log "$what: $(figures_cell %.10g "${runs[$what]}") over $reps runs"
    done
}

# Before every timed run, what earlier steps left dirty is written out, so no contender
# pays for it (a copy's dirty pages would go out with compact's first flush). A full run
# also drops the page cache before every timed run, a quick one only before each
# contender's first.
drop_before_run() { # rep
    sync
    [ $quick = 1 ] && [ "$1" -gt 1 ] || drop_caches
}

# Seconds spent in each part of the run, for the report.
declare -A spent
parts=()
part_started=$SECONDS
part_done() { # part
    spent[$1]=$((SECONDS - part_started))
    parts+=("$1")
    part_started=$SECONDS
}

# --- fio ---------------------------------------------------------------------------------

# name rw bs iodepth: the measured jobs.
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

# Random jobs and the fsync writer report IOPS, sequential and allocating writers MiB/s.
unit() { # job
    case $1 in rand-* | fsync-*) echo IOPS ;; *) echo MiB/s ;; esac
}
figure_format() { # job
    if [ "$(unit "$1")" = IOPS ]; then echo %.0f; else echo %.1f; fi
}

fio_common=(--ioengine=libaio --direct=1 --norandommap --randrepeat=0
    --output-format=terse --terse-version=3)

# Reads fio's terse (v3) output and prints "job MiB/s IOPS" per job, or per reporting group
# with group_reporting, for the direction the job went (fields 6-8: read KiB, KiB/s and
# IOPS; 47-49: the same for writes). Other lines (fio's notes about exec_prerun) are
# skipped.
fio_results() {
    awk -F';' '
        $1 != 3 { next }
        $5 != 0 { print "fio job " $3 " failed with error " $5 > "/dev/stderr"; exit 1 }
        { w = $47 > $6; printf "%s %.1f %.0f\n", $3, (w ? $48 : $7) / 1024, w ? $49 : $8 }'
}

# Runs fio with `args` on the current target and records each job's figure (unit() says
# which) as "contender|job".
fio_on_target() { # contender fio-args...
    local who=$1 out name mib iops figure
    shift
    # exec_prerun leaves its output in the current directory.
    out=$(cd "$workdir" && fio "${fio_common[@]}" "$@" | fio_results)
    while read -r name mib iops; do
        figure=$mib
        [ "$(unit "$name")" != IOPS ] || figure=$iops
        record "$who|$name" "$figure"
        log "$who $name: $figure $(unit "$name")"
    done <<< "$out"
}

declare -A rss # daemon -> its greatest peak RSS (VmHWM) over its runs, in KiB
note_rss() { # daemon
    local kib
    kib=$(peak_rss_kib "$target_pid")
    [ "${rss[$1]:-0}" -ge "$kib" ] || rss[$1]=$kib
}

fio_job_runs=0
# The jobs, one after the other, on a contender (reads only on a read-only one), the page
# cache dropped before each in a full run. Each stops after its runtime or one pass over
# the disk, whichever comes first, so a read does not find what an earlier pass left in
# the image's page cache: sequential jobs never come back to a block, random ones rarely
# (a second of 4 KiB reads touches a few per cent of the disk). Each write job ends with
# an fsync that counts in its time, so the figure is for data that reached the image
# file's disk, not the page cache in front of it.
run_fio() { # contender rep
    local who=$1 spec name rw bs qd args
    start_contender "$who"
    if [ -n "$target_uri" ]; then
        args=(--ioengine=nbd --uri="$target_uri" --runtime="$runtime" --size="$size")
    else
        args=(--filename="$target_file" --runtime="$runtime")
        [ -b "$target_file" ] || args+=(--size="$size")
    fi
    [ $quick = 1 ] || args+=(--exec_prerun="sh -c 'sync; echo 3 > /proc/sys/vm/drop_caches'")
    for spec in "${jobs[@]}"; do
        read -r name rw bs qd <<< "$spec"
        if [[ $rw == *write* ]]; then
            [ "$target_reads_only" = 0 ] || continue
        fi
        args+=(--name="$name" --stonewall --rw="$rw" --bs="$bs" --iodepth="$qd")
        [[ $rw != *write* ]] || args+=(--end_fsync=1)
        fio_job_runs=$((fio_job_runs + 1))
    done
    drop_before_run "$2"
    fio_on_target "$who" "${args[@]}"
    [ -z "$target_pid" ] || note_rss "${who#loop:}"
    stop_target
}

# The names given, each followed by its io_uring twin when that transport is measured.
with_uring() { # name...
    local name
    for name; do
        echo "$name"
        [ -n "$uring_na" ] || echo "$name io_uring"
    done
}

# --- images ------------------------------------------------------------------------------

started=$(date +%s)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
log "work directory $workdir; images of $((size / MIB)) MiB"
raw="$workdir/raw.img"
# Random contents: every block of every image is allocated and holds real data.
head -c "$size" /dev/urandom > "$raw"
vhdx_dyn="$workdir/dynamic.vhdx"
qemu-img convert -f raw -O vhdx -o "$(qemu_options_of vhdx)" "$raw" "$vhdx_dyn"
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
start_vdisk fuse "$vhd_dyn"
dd if="$raw" of="$target_file" bs=1M oflag=direct conv=notrunc,fsync status=none
stop_target
part_done images

# With --only nbd, everything from here to the NBD section is left out.
if [ -z "$only" ]; then

# --- the fio jobs on every target ----------------------------------------------------------
# All targets by turns, on the disk file and through a loop device, each vdisk-mount next
# to qemu-storage-daemon's export of the same image.

ours=("VHDX dynamic" "VHDX fixed" "VHD dynamic")
steps=()
for prefix in "" loop:; do
    mapfile -t names < <(
        echo "raw file"
        with_uring "FUSE raw"
        for image in "${ours[@]}"; do
            with_uring "$image"
            echo "qsd $image"
        done
        # Read-only: no loop device (its writes would fail).
        [ -n "$prefix" ] || echo "vhdimount VHDX dynamic"
    )
    for who in "${names[@]}"; do steps+=("fio|$prefix$who"); done
done
by_turns "${steps[@]}"
part_done "fio jobs"

# --- allocating writes into empty dynamic images ---------------------------------------------

# The whole disk of a new empty image written once from the start: through a mount by fio
# (1 MiB at qd16, a final fsync counted), or by qemu-io on the image itself (one request
# through qemu's driver, writeback cache, flushed on exit).
run_alloc() { # contender rep
    local who=$1 t0 t1
    start_contender "$who" "$alloc_size"
    drop_before_run "$2"
    if [ -n "$target_format" ]; then
        t0=$EPOCHREALTIME
        qemu-io -f "$target_format" -c "write 0 $alloc_size" "$target_file" > /dev/null
        t1=$EPOCHREALTIME
        record "$who|seq-write-alloc" "$(awk -v b="$alloc_size" -v t0="$t0" -v t1="$t1" \
            'BEGIN { printf "%.1f\n", b / 1048576 / (t1 - t0) }')"
    else
        fio_on_target "$who" --filename="$target_file" --name=seq-write-alloc --rw=write \
            --bs=1M --iodepth=16 --size="$alloc_size" --end_fsync=1
    fi
    stop_target
}

# The mixed workload on a new empty image: four writers allocate with 64 KiB writes, each
# from the start of a region of its own, alone or beside a fifth that writes 4 KiB at a
# time, each write followed by an fsync, in a region behind theirs. The regions hold more
# than the writers fill in $mixed_runtime, so the four allocate throughout and all five
# stop together.
mixed() { # beside(0|1) contender rep
    local args
    start_contender "$2" $((5 * mixed_region))
    args=(--filename="$target_file" --runtime="$mixed_runtime" --group_reporting
        --name="alloc-64K-$([ "$1" = 1 ] && echo beside || echo alone)" --rw=write --bs=64k
        --iodepth=1 --numjobs=4 --size="$mixed_region" --offset_increment="$mixed_region"
        --end_fsync=1)
    [ "$1" = 0 ] || args+=(--name=fsync-4K --new_group --rw=write --bs=4k --iodepth=1
        --fsync=1 --offset=$((4 * mixed_region)) --size="$mixed_region")
    drop_before_run "$3"
    fio_on_target "$2" "${args[@]}"
    stop_target
}
run_alone() { mixed 0 "$@"; }
run_beside() { mixed 1 "$@"; }

steps=()
for name in VHDX VHD; do
    mapfile -t names < <(with_uring "vdisk-mount $name"; echo "qsd $name"; echo "qemu-io $name")
    for who in "${names[@]}"; do steps+=("alloc|$who"); done
done
by_turns "${steps[@]}"
part_done "allocating writes"

steps=()
for name in VHDX VHD; do
    mapfile -t names < <(with_uring "vdisk-mount $name"; echo "qsd $name")
    for who in "${names[@]}"; do steps+=("alone|$who" "beside|$who"); done
done
by_turns "${steps[@]}"
part_done "mixed workload"

# --- timed commands ------------------------------------------------------------------------

declare -A after # "who|format" -> file length after compacting, in bytes

# Seconds between two $EPOCHREALTIME readings.
seconds() { # t0 t1
    awk -v t0="$1" -v t1="$2" 'BEGIN { printf "%.3f\n", t1 - t0 }'
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
    record "trim|$who" "$(seconds "$t0" "$t1")"
    record "trim freed|$who" "$freed"
    log "fstrim on $who: $(seconds "$t0" "$t1") s, $((freed / MIB)) MiB given back"
}

trim_image="$workdir/trim"
# fstrim through vdisk-mount over a new dynamic image (VHDX or VHD), or on a raw sparse file.
run_trim() { # VHDX|VHD|raw rep
    local image
    if [ "$1" = raw ]; then
        truncate -s "$trim_size" "$trim_image.raw"
        trim_run "raw file" "$trim_image.raw" "$trim_image.raw" "$2"
        rm "$trim_image.raw"
    else
        image="$trim_image.${1,,}"
        "$vdisk" create --format "${1,,}" --size "$trim_size" "$image" > /dev/null
        start_vdisk fuse "$image"
        trim_run "$1" "$target_file" "$image" "$2"
        stop_target
        rm "$image"
    fi
}
by_turns "trim|VHDX" "trim|raw" "trim|VHD"
part_done fstrim

# --- vdisk compact against qemu-img convert ------------------------------------------------

# A dynamic image of $compact_size, every byte written (0x5a) through vdisk-mount, then
# every other block discarded through it: half its blocks are holes in the file.
holey_image() { # format path block
    local format=$1 image=$2 block=$3 off
    "$vdisk" create --format "$format" --size "$compact_size" --block-size "$block" "$image" > /dev/null
    start_vdisk fuse "$image"
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

holey_image vhdx "$workdir/holey.vhdx" $((32 * MIB))
holey_image vhd "$workdir/holey.vhd" $((2 * MIB))

# Both contenders start from a sparse copy of the same image, made before the clock starts.
work_copy() { # format rep
    cp --sparse=always "$workdir/holey.$1" "$workdir/work.$1"
    drop_before_run "$2"
}

# vdisk compact packs the copy in place.
run_compact() { # VHDX|VHD rep
    local name=$1 format=${1,,} qfmt summary moved t0 t1
    qfmt=$(qemu_format_of "$format")
    work_copy "$format" "$2"
    t0=$EPOCHREALTIME
    summary=$("$vdisk" compact --json "$workdir/work.$format")
    t1=$EPOCHREALTIME
    same_contents "$qfmt" "$workdir/holey.$format" "$qfmt" "$workdir/work.$format" "vdisk compact"
    moved=$(sed -n 's/^ *"bytes_moved": *\([0-9]*\).*/\1/p' <<< "$summary")
    [ -n "$moved" ] || { echo "no bytes_moved in vdisk compact --json: $summary" >&2; exit 1; }
    record "compact|$name" "$(seconds "$t0" "$t1")"
    record "compact MiB/s|$name" "$(awk -v b="$moved" -v t0="$t0" -v t1="$t1" \
        'BEGIN { printf "%.1f\n", b / 1048576 / (t1 - t0) }')"
    record "compact moved|$name" "$moved"
    after["compact|$name"]=$(stat -c %s "$workdir/work.$format")
    log "vdisk compact $name: $(seconds "$t0" "$t1") s, $((moved / MIB)) MiB moved"
    rm "$workdir/work.$format"
}

# qemu-img convert, the way to a packed image without vdisk, writes a second one.
run_repack() { # VHDX|VHD rep
    local name=$1 format=${1,,} qfmt new t0 t1
    qfmt=$(qemu_format_of "$format") new="$workdir/converted.$format"
    work_copy "$format" "$2"
    t0=$EPOCHREALTIME
    # -t writeback: its output flushed at the end, as a copy that replaces the image
    # must be (convert's default, -t unsafe, skips that flush); compact flushes too.
    qemu-img convert -t writeback -f "$qfmt" -O "$qfmt" -o "$(qemu_options_of "$format")" \
        "$workdir/work.$format" "$new"
    t1=$EPOCHREALTIME
    same_contents "$qfmt" "$workdir/holey.$format" "$qfmt" "$new" "qemu-img convert"
    record "convert|$name" "$(seconds "$t0" "$t1")"
    after["convert|$name"]=$(stat -c %s "$new")
    log "qemu-img convert $name: $(seconds "$t0" "$t1") s"
    rm "$workdir/work.$format" "$new"
}
by_turns "compact|VHDX" "repack|VHDX" "compact|VHD" "repack|VHD"
part_done compact

# --- vdisk convert against qemu-img convert ------------------------------------------------

# The half-full images above, each converted into the other format and into raw by both
# tools; outputs made durable by both (vdisk convert flushes before it renames its output
# into place; qemu-img with -t writeback) and checked equal to the source.
convert_pairs=("vhdx vhd" "vhd vhdx" "vhdx raw")

# One tool converts one pair, timed.
convert_with() { # tool(vdisk|qemu-img) "from to" rep
    local tool=$1 from to qfrom qto source new name options t0 t1
    read -r from to <<< "$2"
    source="$workdir/holey.$from" qfrom=$(qemu_format_of "$from") qto=$(qemu_format_of "$to")
    new="$workdir/converted.$to" name="${from^^} → ${to^^}" options=$(qemu_options_of "$to")
    drop_before_run "$3"
    t0=$EPOCHREALTIME
    if [ "$tool" = vdisk ]; then
        "$vdisk" convert --format "$to" "$source" "$new" > /dev/null
    else
        qemu-img convert -t writeback -f "$qfrom" -O "$qto" ${options:+-o "$options"} "$source" "$new"
    fi
    t1=$EPOCHREALTIME
    same_contents "$qfrom" "$source" "$qto" "$new" "$tool convert"
    record "$tool convert|$name" "$(seconds "$t0" "$t1")"
    log "$tool convert $name: $(seconds "$t0" "$t1") s"
    rm "$new"
}
run_vdisk_convert() { convert_with vdisk "$@"; }
run_qemu_convert() { convert_with qemu-img "$@"; }

steps=()
for pair in "${convert_pairs[@]}"; do steps+=("vdisk_convert|$pair" "qemu_convert|$pair"); done
by_turns "${steps[@]}"
rm "$workdir"/holey.*
part_done convert

# --- start-up time and memory for a huge empty image -------------------------------------

huge="$workdir/huge.vhdx"
empty_image vhdx "$huge" "$huge_size"

# Seconds from starting the daemon until the first 4 KiB of its disk file read back.
run_startup() { # vdisk-mount|qsd rep
    local t0 t1
    drop_before_run "$2"
    t0=$EPOCHREALTIME
    if [ "$1" = vdisk-mount ]; then start_vdisk fuse "$huge"; else start_qsd "$huge" vhdx; fi
    until dd if="$target_file" of=/dev/null bs=4k count=1 iflag=direct status=none 2> /dev/null; do
        sleep 0.01
    done
    t1=$EPOCHREALTIME
    record "startup|$1" "$(seconds "$t0" "$t1")"
    note_rss "$([ "$1" = vdisk-mount ] && echo "10 TiB VHDX" || echo "qsd 10 TiB VHDX")"
    stop_target
}
by_turns "startup|vdisk-mount" "startup|qsd"
part_done start-up

fi # [ -z "$only" ]

# --- NBD: the nbdkit plugin against qemu-nbd -------------------------------------------------
# The fio jobs once more, through fio's nbd engine (libnbd) on a Unix socket: nbdkit with
# this repository's plugin next to qemu-nbd, each serving the same image.

nbd_images=("VHDX dynamic" "VHD dynamic")
steps=()
for image in "${nbd_images[@]}"; do steps+=("fio|nbdkit $image" "fio|qemu-nbd $image"); done
by_turns "${steps[@]}"
part_done nbd

load_after=$(cut -d' ' -f1-3 /proc/loadavg)
elapsed=$(($(date +%s) - started))

# --- report ------------------------------------------------------------------------------

# a ÷ b for repeated figures: the ratio of the medians and, in brackets, the range the runs
# allow (least a ÷ greatest b to greatest a ÷ least b). Against a goal ("≥ 0.90" where more
# is better, "≤ 1.00" for times) the cell is marked as a miss only when that whole range
# misses it, that is when the two spreads do not overlap once scaled by the goal; a
# difference inside the range is within what the runs vary by.
ratio_cell() { # goal a-figures b-figures
    local am alo ahi bm blo bhi
    read -r am alo ahi <<< "$(spread %.9g "$2")"
    read -r bm blo bhi <<< "$(spread %.9g "$3")"
    awk -v goal="$1" -v am="$am" -v alo="$alo" -v ahi="$ahi" -v bm="$bm" -v blo="$blo" -v bhi="$bhi" '
        function r2(x) { return sprintf("%.2f", x) + 0 }
        BEGIN {
            if (am == "-" || bm == "-" || blo + 0 <= 0) { print "n/a"; exit }
            m = am / bm; lo = alo / bhi; hi = ahi / blo
            split(goal, g, " ")
            if ((g[1] == "≥" && r2(hi) < g[2] + 0) || (g[1] == "≤" && r2(lo) > g[2] + 0))
                printf "**%.2f** (%.2f–%.2f; goal %s)\n", m, lo, hi, goal
            else
                printf "%.2f (%.2f–%.2f)\n", m, lo, hi
        }'
}

# The goal of a ratio column of the fio tables for a job, if it has one: vdisk-mount over
# /dev/fuse ÷ the FUSE pass-through (fuse-raw) and ÷ qsd (qsd); vdisk-mount over io_uring
# ÷ over /dev/fuse (uring-fuse), ÷ qsd (uring-qsd) and ÷ the raw file (uring-raw).
goal() { # column job
    case $1/$2 in
        fuse-raw/*) echo "≥ 0.90" ;;
        qsd/rand-*-4K-qd16) echo "≥ 1.50" ;;
        qsd/*) echo "≥ 1.00" ;;
        uring-fuse/rand-read-4K-qd1) echo "≥ 1.50" ;;
        uring-qsd/rand-read-4K-qd16) echo "≥ 2.00" ;;
        uring-qsd/*) goal qsd "$2" ;;
        uring-raw/rand-read-4K-qd16) echo "≥ 0.60" ;;
    esac
}

# The cell of a contender's figures for a job, or why there are none over io_uring.
fig() { # contender job
    if [[ $1 == *" io_uring" && -n $uring_na ]]; then
        echo "$uring_na"
    else
        figures_cell "$(figure_format "$2")" "${runs["$1|$2"]:-}"
    fi
}

# ratio_cell for vdisk-mount over io_uring, or why there is none.
uring_ratio_cell() { # goal a-figures b-figures
    if [ -n "$uring_na" ]; then echo "$uring_na"; else ratio_cell "$@"; fi
}

misses=()
# Notes a cell marked as a miss in the list of goals missed.
miss() { # cell what
    [[ $1 != "**"* ]] || misses+=("$2: $1")
}

# Prints a table row from its cells.
row() { # cell...
    local out="|" cell
    for cell; do out+=" $cell |"; done
    echo "$out"
}

# KiB of the BAT of a `bytes`-byte image (8-byte VHDX entries per 32 MiB block, 4-byte
# VHD entries per 2 MiB block), for the memory goal.
bat_kib() { # bytes format
    local entry=8 block=$((32 * MIB))
    [ "$2" = vhd ] && entry=4 block=$((2 * MIB))
    awk -v n="$1" -v e=$entry -v b=$block 'BEGIN { printf "%.1f\n", n / b * e / 1024 }'
}

report() {
    local path prefix spec job image who a u q f r i cells name part line label med lo hi
    local freed moved_mib mib_c mib_q pair from to
    local -a headers
    echo "Machine: $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM," \
        "Linux $(uname -r); $(fio --version); $(qemu-img --version | head -1);" \
        "vhdimount $(vhdimount -V 2> /dev/null | awk 'NR == 1 { print $2 }')."
    echo
    echo "Run: $(date -u +'%Y-%m-%d %H:%M UTC'), $([ $quick = 1 ] && echo '`--quick`' || echo full)," \
        "images of $((size / MIB)) MiB; every figure is the median of $reps runs taken by turns with what it is" \
        "compared with, min–max beside it. fio libaio direct=1, each job $runtime at most and one pass over the" \
        "disk at most, writes ending with an fsync that counts; page cache dropped before" \
        "$([ $quick = 1 ] && echo "each contender's first run" || echo 'each job'); $fio_job_runs fio job runs." \
        "vdisk-mount options: ${VDISK_MOUNT_OPTIONS:-defaults}; FUSE transports: /dev/fuse$([ -z "$uring_na" ] &&
            echo " and io_uring" || echo ", io_uring $uring_na")." \
        "Load average (1/5/15 min) before: $load_before, after: $load_after."
    echo
    line="Time spent:"
    for part in "${parts[@]}"; do line+=" $part ${spent[$part]} s,"; done
    echo "$line $elapsed s in all."
    # With --only nbd, everything from here to the NBD table is left out.
    if [ -z "$only" ]; then
    echo
    echo "Targets: **raw file** = fio on the backing file itself; the **raw** image = the same file through" \
        "\`vdisk-mount -o format=raw\` (the FUSE pass-through, \"FUSE raw\"); **VHDX dynamic/fixed**, **VHD dynamic** =" \
        "fully allocated images holding the same data (VHDX blocks of $vhdx_block); **vdisk-mount** = over /dev/fuse," \
        "**vdisk-mount io_uring** = over FUSE's io_uring transport (\`-o io_uring=on\`); **qsd** =" \
        "\`qemu-storage-daemon --export type=fuse\` over the same image; **vhdimount** = libvhdi's FUSE mount (reads" \
        "only). Sequential jobs in MiB/s, random jobs in IOPS, higher is better; each cell median (min–max)."
    for path in direct loop; do
        prefix=""
        [ $path = direct ] || prefix="loop:"
        echo
        if [ $path = direct ]; then
            echo "### fio on the disk file"
        else
            echo "### fio on a loop device (\`losetup --direct-io=on\`) over the disk file"
        fi
        echo
        row job unit image "raw file" vdisk-mount "vdisk-mount io_uring" qsd vhdimount
        row --- --- --- --- --- --- --- ---
        for spec in "${jobs[@]}"; do
            read -r job _ <<< "$spec"
            row "$job" "$(unit "$job")" raw "$(fig "${prefix}raw file" "$job")" \
                "$(fig "${prefix}FUSE raw" "$job")" "$(fig "${prefix}FUSE raw io_uring" "$job")" - -
            for image in "${ours[@]}"; do
                row "$job" "$(unit "$job")" "$image" - "$(fig "$prefix$image" "$job")" \
                    "$(fig "$prefix$image io_uring" "$job")" "$(fig "${prefix}qsd $image" "$job")" \
                    "$(fig "${prefix}vhdimount $image" "$job")"
            done
        done
        echo
        echo "Ratios: of the medians, in brackets the range the runs allow; a ratio is marked as a miss only" \
            "when that whole range misses the goal. vdisk-mount over /dev/fuse ÷ FUSE raw (goal ≥ 0.90), ÷ qsd" \
            "on the same image (goal ≥ 1.00, ≥ 1.50 for rand-4K-qd16), ÷ raw file; vdisk-mount over io_uring" \
            "÷ over /dev/fuse (goal ≥ 1.50 for rand-read-4K-qd1), ÷ qsd (goal ≥ 2.00 for rand-read-4K-qd16," \
            "as ÷ qsd otherwise), ÷ raw file (goal ≥ 0.60 for rand-read-4K-qd16)."
        echo
        headers=("÷ FUSE raw" "÷ qsd" "÷ raw file" "io_uring ÷ /dev/fuse" "io_uring ÷ qsd" "io_uring ÷ raw file")
        row job image "${headers[@]}"
        row --- --- --- --- --- --- --- ---
        for spec in "${jobs[@]}"; do
            read -r job _ <<< "$spec"
            f=${runs["${prefix}FUSE raw|$job"]:-} r=${runs["${prefix}raw file|$job"]:-}
            for image in raw "${ours[@]}"; do
                who=$image
                [ "$image" != raw ] || who="FUSE raw"
                a=${runs["$prefix$who|$job"]:-} u=${runs["$prefix$who io_uring|$job"]:-}
                q=${runs["${prefix}qsd $image|$job"]:-}
                if [ "$image" = raw ]; then
                    cells=(- - "$(ratio_cell "" "$a" "$r")" "$(uring_ratio_cell "$(goal uring-fuse "$job")" "$u" "$a")" -
                        "$(uring_ratio_cell "$(goal uring-raw "$job")" "$u" "$r")")
                else
                    cells=("$(ratio_cell "$(goal fuse-raw "$job")" "$a" "$f")"
                        "$(ratio_cell "$(goal qsd "$job")" "$a" "$q")"
                        "$(ratio_cell "" "$a" "$r")"
                        "$(uring_ratio_cell "$(goal uring-fuse "$job")" "$u" "$a")"
                        "$(uring_ratio_cell "$(goal uring-qsd "$job")" "$u" "$q")"
                        "$(uring_ratio_cell "$(goal uring-raw "$job")" "$u" "$r")")
                fi
                row "$job" "$image" "${cells[@]}"
                for i in "${!cells[@]}"; do miss "${cells[$i]}" "$path $job $image, ${headers[$i]}"; done
            done
        done
    done
    echo
    echo "### Allocating sequential write into an empty dynamic image"
    echo
    echo "$((alloc_size / MIB)) MiB written once from the start of a new image: fio 1 MiB qd16 with a final" \
        "fsync (counted) through each mount; \`qemu-io -c \"write 0 $((alloc_size / MIB))M\"\` (one request," \
        "writeback cache, flushed on exit) on the same kind of image. MiB/s, median (min–max) of $reps runs." \
        "Goal: vdisk-mount ≥ qemu-io (ratios as above)."
    echo
    row image vdisk-mount "vdisk-mount io_uring" qsd qemu-io "÷ qemu-io" "io_uring ÷ qemu-io"
    row --- --- --- --- --- --- ---
    for name in VHDX VHD; do
        job=seq-write-alloc
        cells=("$(ratio_cell "≥ 1.00" "${runs["vdisk-mount $name|$job"]:-}" "${runs["qemu-io $name|$job"]:-}")"
            "$(uring_ratio_cell "≥ 1.00" "${runs["vdisk-mount $name io_uring|$job"]:-}" "${runs["qemu-io $name|$job"]:-}")")
        row "$name" "$(fig "vdisk-mount $name" $job)" "$(fig "vdisk-mount $name io_uring" $job)" \
            "$(fig "qsd $name" $job)" "$(fig "qemu-io $name" $job)" "${cells[@]}"
        miss "${cells[0]}" "allocating write $name, ÷ qemu-io"
        miss "${cells[1]}" "allocating write $name, io_uring ÷ qemu-io"
    done
    echo
    echo "### Mixed workload: allocating writers beside an fsync writer"
    echo
    echo "A new empty dynamic image of $((5 * mixed_region / MIB)) MiB for every run (made by qemu-img: VHDX with" \
        "$vhdx_block blocks, VHD with 2 MiB blocks). Four fio jobs write 64 KiB at a time (libaio, direct, qd1" \
        "each, a final fsync counted), each sequentially from the start of a $((mixed_region / MIB)) MiB region of" \
        "its own, so that their writes keep allocating blocks; for $mixed_runtime, alone, and beside a fifth job that" \
        "writes 4 KiB at a time sequentially in a region behind theirs, each write followed by fsync. Writers:" \
        "the four together, MiB/s; fsync writer: its writes (each with its fsync) per second. Median (min–max)" \
        "of $reps runs; ratios as above. Goals: beside the fsync writer the four keep ≥ 0.85 of their" \
        "throughput alone and reach ≥ 2.00× qsd's; the fsync writer reaches ≥ 2.00× qsd's IOPS."
    echo
    row figure image vdisk-mount "vdisk-mount io_uring" qsd "÷ qsd" "io_uring ÷ qsd"
    row --- --- --- --- --- --- ---
    for name in VHDX VHD; do
        for spec in "alloc-64K-alone|4 writers alone, MiB/s|" \
            "alloc-64K-beside|4 writers beside the fsync writer, MiB/s|≥ 2.00" "fsync-4K|fsync writer, IOPS|≥ 2.00"; do
            IFS='|' read -r job label g <<< "$spec"
            cells=("$(ratio_cell "$g" "${runs["vdisk-mount $name|$job"]:-}" "${runs["qsd $name|$job"]:-}")"
                "$(uring_ratio_cell "$g" "${runs["vdisk-mount $name io_uring|$job"]:-}" "${runs["qsd $name|$job"]:-}")")
            row "$label" "$name" "$(fig "vdisk-mount $name" "$job")" "$(fig "vdisk-mount $name io_uring" "$job")" \
                "$(fig "qsd $name" "$job")" "${cells[@]}"
            miss "${cells[0]}" "mixed workload $name, $label, ÷ qsd"
            miss "${cells[1]}" "mixed workload $name, $label, io_uring ÷ qsd"
        done
        cells=()
        for who in "vdisk-mount $name" "vdisk-mount $name io_uring" "qsd $name"; do
            g="≥ 0.85"
            [[ $who != qsd* ]] || g=""
            a=${runs["$who|alloc-64K-beside"]:-} r=${runs["$who|alloc-64K-alone"]:-}
            if [[ $who == *io_uring ]]; then
                cells+=("$(uring_ratio_cell "$g" "$a" "$r")")
            else
                cells+=("$(ratio_cell "$g" "$a" "$r")")
            fi
        done
        row "4 writers beside ÷ alone" "$name" "${cells[@]}" - -
        miss "${cells[0]}" "mixed workload $name, 4 writers beside ÷ alone"
        miss "${cells[1]}" "mixed workload $name, io_uring, 4 writers beside ÷ alone"
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
        "lower is better; ratios as above. Host MiB freed: the median of what the" \
        "image file held on the host before fstrim minus after, a check that the space went back" \
        "(goal ≥ 90 % of the files)."
    echo
    row "fstrim on" seconds min–max "÷ raw file" "host MiB freed"
    row --- --- --- --- ---
    for who in VHDX VHD "raw file"; do
        read -r med lo hi <<< "$(spread %.3f "${runs["trim|$who"]:-}")"
        read -r freed _ <<< "$(spread %.0f "${runs["trim freed|$who"]:-}")"
        freed=$(awk -v b="$freed" 'BEGIN { if (b == "-") print "-"; else printf "%.1f\n", b / 1048576 }')
        label="vdisk-mount $who" r=$(ratio_cell "" "${runs["trim|$who"]:-}" "${runs["trim|raw file"]:-}")
        [ "$who" != "raw file" ] || label="raw sparse file" r="-"
        row "$label" "$med" "$lo–$hi" "$r" "$freed"
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
        "$dropped; ratios as above. MiB/s moved: \`bytes_moved\` of" \
        "\`vdisk compact --json\` ÷ seconds. Goal: compact takes no longer than convert (÷ ≤ 1.00)."
    echo
    echo "| image | compact s | min–max | convert s | min–max | compact ÷ convert | compact MiB/s moved | min–max | MiB moved | file MiB after compact | after convert |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
    local c_med c_lo c_hi q_med q_lo q_hi m_med m_lo m_hi
    for name in VHDX VHD; do
        read -r c_med c_lo c_hi <<< "$(spread %.3f "${runs["compact|$name"]:-}")"
        read -r q_med q_lo q_hi <<< "$(spread %.3f "${runs["convert|$name"]:-}")"
        read -r m_med m_lo m_hi <<< "$(spread %.1f "${runs["compact MiB/s|$name"]:-}")"
        read -r moved_mib _ <<< "$(spread %.0f "${runs["compact moved|$name"]:-}")"
        moved_mib=$(awk -v b="$moved_mib" 'BEGIN { if (b == "-") print "-"; else printf "%.1f\n", b / 1048576 }')
        mib_c=$(awk -v b="${after["compact|$name"]:-}" 'BEGIN { if (b == "") print "-"; else printf "%.1f\n", b / 1048576 }')
        mib_q=$(awk -v b="${after["convert|$name"]:-}" 'BEGIN { if (b == "") print "-"; else printf "%.1f\n", b / 1048576 }')
        label="$name $([ $name = VHDX ] && echo 32 || echo 2) MiB blocks"
        r=$(ratio_cell "≤ 1.00" "${runs["compact|$name"]:-}" "${runs["convert|$name"]:-}")
        row "$label" "$c_med" "$c_lo–$c_hi" "$q_med" "$q_lo–$q_hi" "$r" "$m_med" "$m_lo–$m_hi" "$moved_mib" "$mib_c" "$mib_q"
        miss "$r" "vdisk compact $label, time ÷ qemu-img convert's"
    done
    echo
    echo "### vdisk convert against qemu-img convert"
    echo
    echo "The two half-full images of the compact rows (the VHDX with 32 MiB blocks, the VHD with" \
        "2 MiB blocks) converted by \`vdisk convert\` and by \`qemu-img convert -t writeback\` into a new" \
        "dynamic image of the other format (the block size each tool makes by default, 32 MiB for VHDX," \
        "2 MiB for VHD) and into a raw file; both outputs durable on return and checked equal to the source" \
        "with \`qemu-img compare\`. Median of $reps runs taken by turns, min–max beside it, page cache" \
        "dropped before $dropped; ratios as above. Goal: vdisk convert takes no longer than qemu-img" \
        "convert (÷ ≤ 1.00)."
    echo
    row "source → output" "vdisk convert s" min–max "qemu-img convert s" min–max "vdisk ÷ qemu-img"
    row --- --- --- --- --- ---
    for pair in "${convert_pairs[@]}"; do
        read -r from to <<< "$pair"
        name="${from^^} → ${to^^}"
        read -r c_med c_lo c_hi <<< "$(spread %.3f "${runs["vdisk convert|$name"]:-}")"
        read -r q_med q_lo q_hi <<< "$(spread %.3f "${runs["qemu-img convert|$name"]:-}")"
        r=$(ratio_cell "≤ 1.00" "${runs["vdisk convert|$name"]:-}" "${runs["qemu-img convert|$name"]:-}")
        row "$name" "$c_med" "$c_lo–$c_hi" "$q_med" "$q_lo–$q_hi" "$r"
        miss "$r" "vdisk convert $name, time ÷ qemu-img convert's"
    done
    echo
    echo "### Start-up and memory"
    echo
    echo "Time from starting the daemon to the first 4 KiB read of its disk file, for an empty $huge_size dynamic VHDX," \
        "median (min–max) of $reps starts (goal < 1 s): vdisk-mount $(figures_cell %.3f "${runs["startup|vdisk-mount"]:-}") s," \
        "qemu-storage-daemon $(figures_cell %.3f "${runs["startup|qsd"]:-}") s."
    read -r _ lo _ <<< "$(spread %.3f "${runs["startup|vdisk-mount"]:-}")"
    awk -v t="$lo" 'BEGIN { exit !(t == "-" || t >= 1) }' \
        && misses+=("start-up of a $huge_size VHDX: fastest of $reps starts $lo s (goal < 1 s)")
    echo
    echo "Peak resident memory (VmHWM) of each daemon, the greatest over its runs; goal for vdisk-mount: ≤ 64 MiB + BAT size."
    echo
    row daemon "peak RSS MiB" "BAT KiB" "within goal"
    row --- --- --- ---
    local bat ok target daemons=()
    for target in "FUSE raw" "${ours[@]}"; do daemons+=("$target" "$target io_uring"); done
    for target in "${daemons[@]}" "10 TiB VHDX" "qsd VHDX dynamic" "qsd VHDX fixed" "qsd VHD dynamic" "qsd 10 TiB VHDX" "vhdimount VHDX dynamic"; do
        bat=0
        case $target in
            "10 TiB VHDX" | "qsd 10 TiB VHDX") bat=$(bat_kib "$(numfmt --from=iec "$huge_size")" vhdx) ;;
            *VHDX*) bat=$(bat_kib "$size" vhdx) ;;
            *VHD*) bat=$(bat_kib "$size" vhd) ;;
        esac
        if [[ $target == *" io_uring" && -n $uring_na ]]; then
            row "$target" "$uring_na" "$bat" -
            continue
        fi
        ok="-"
        if [[ $target != qsd* && $target != vhdimount* ]]; then
            ok=$(awk -v r="${rss[$target]}" -v b="$bat" 'BEGIN { print (r <= 65536 + b) ? "yes" : "**no**" }')
            [ "$ok" = yes ] || misses+=("peak RSS of $target: $((rss[$target] / 1024)) MiB (goal 64 MiB + $bat KiB)")
        fi
        row "$target" "$(awk -v r="${rss[$target]}" 'BEGIN { printf "%.1f", r / 1024 }')" "$bat" "$ok"
    done
    echo
    fi # [ -z "$only" ]
    echo
    echo "### fio over NBD: the nbdkit plugin against qemu-nbd"
    echo
    echo "The fio jobs above (each $runtime at most and one pass at most, writes ending with a flush that" \
        "counts) through fio's nbd engine (libnbd) on a Unix socket, against \`nbdkit vdisk\` (this" \
        "repository's plugin, \`nbdkit-vdisk/\`) and \`qemu-nbd\` (its default writeback cache) serving the same" \
        "image, by turns. Figures as above, median (min–max) of $reps runs; ratio nbdkit ÷ qemu-nbd." \
        "Goal: ≥ 1.00 on every job."
    echo
    row job unit image "nbdkit vdisk" qemu-nbd "nbdkit ÷ qemu-nbd"
    row --- --- --- --- --- ---
    for spec in "${jobs[@]}"; do
        read -r job _ <<< "$spec"
        for image in "${nbd_images[@]}"; do
            cells=("$(ratio_cell "≥ 1.00" "${runs["nbdkit $image|$job"]:-}" "${runs["qemu-nbd $image|$job"]:-}")")
            row "$job" "$(unit "$job")" "$image" "$(fig "nbdkit $image" "$job")" \
                "$(fig "qemu-nbd $image" "$job")" "${cells[0]}"
            miss "${cells[0]}" "NBD $job $image, nbdkit ÷ qemu-nbd"
        done
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
if [ -n "$only" ] && [ $output_given = 0 ]; then
    exit 0
fi

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
