#!/usr/bin/env bash
# Sets up what vdisk-mount needs (Debian packages, when missing), builds it, creates a
# 256 MiB dynamic VHDX with `vdisk create`, mounts it on a temporary directory and prints
# what to try next. Run it as yourself; it asks sudo only to install and to mount.
set -euo pipefail
cd "$(dirname "$0")"

scripts/install-deps.sh
cargo build --release --quiet
bin="$PWD/target/release"
work="$(mktemp -d /tmp/vdisk-demo.XXXXXX)"
image="$work/sample.vhdx"
mnt="$work/mnt"
mkdir "$mnt"
"$bin/vdisk" create --size 256M "$image"
"$bin/vdisk" info "$image"

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
$sudo "$bin/vdisk-mount" "$image" "$mnt"

cat <<MSG

Mounted $image
     at $mnt/disk.img  ($(stat -c %s "$mnt/disk.img") bytes, a flat raw disk)

Put a filesystem on it through a loop device:
    dev=\$(sudo losetup -f --show $mnt/disk.img)
    sudo mkfs.ext4 -q \$dev
    sudo mkdir -p $work/fs && sudo mount \$dev $work/fs
    echo hello | sudo tee $work/fs/hello.txt

Then undo everything, innermost first:
    sudo umount $work/fs && sudo losetup -d \$dev
    sudo umount $mnt

The image is an ordinary VHDX again; look at it with:
    $bin/vdisk info $image
    qemu-img check $image
MSG
