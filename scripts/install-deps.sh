#!/usr/bin/env bash
# Installs the Debian packages vdisk-mount and its tests use, when any is missing.
# Needs root, or sudo.
#
#   fuse3                   fusermount3 and mount.fuse3 (running the daemon, fstab mounts)
#   qemu-utils              qemu-img, qemu-io, qemu-storage-daemon: the independent
#                           implementation results are checked against, and a benchmark peer
#   libvhdi-utils           vhdimount: a second independent reader
#   mount util-linux fdisk  losetup, mount, blkid, sfdisk
#   e2fsprogs btrfs-progs xfsprogs
#                           filesystems on mounted disks and inside the sample images
#   zstd                    the sample-image corpus is stored compressed
#   diffutils openssl       cmp, and fast digests of multi-GiB disks
#   systemd                 systemd-analyze verify of the shipped units
#   fio                     the benchmark script (its quick mode runs in the tests)
#   dpkg-dev binutils       scripts/build-deb.sh: dpkg-shlibdeps, strip
#   fuse2fs ntfs-3g         the rescue without root: filesystems in partition files
#   nbdkit libnbd-bin       serving images over NBD through the plugin (nbdkit-vdisk/),
#                           and its clients nbdinfo and nbdcopy
set -euo pipefail

packages=(
    fuse3 qemu-utils libvhdi-utils mount util-linux fdisk e2fsprogs btrfs-progs xfsprogs
    zstd diffutils openssl systemd fio dpkg-dev binutils fuse2fs ntfs-3g
    nbdkit libnbd-bin
)

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" ||
        missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
echo "Installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update
$sudo apt-get install -y --no-install-recommends "${missing[@]}"
