#!/usr/bin/env bash
# Builds vdisk-mount, creates a 64 MiB dynamic VHD with qemu-img, mounts it on a temporary
# directory and prints what to try next. Run it as yourself; it asks sudo only to mount.
set -euo pipefail
cd "$(dirname "$0")"

cargo build --release --quiet
bin="$PWD/target/release/vdisk-mount"
work="$(mktemp -d /tmp/vdisk-demo.XXXXXX)"
image="$work/sample.vhd"
mnt="$work/mnt"
mkdir "$mnt"
qemu-img create -q -f vpc "$image" 64M

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
$sudo "$bin" "$image" "$mnt"

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

The image is an ordinary VHD again; check it with:
    qemu-img info $image
MSG
