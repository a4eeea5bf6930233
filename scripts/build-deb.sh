#!/usr/bin/env bash
# Builds the Debian package target/debian/vdisk-mount_VERSION_ARCH.deb (the version from
# Cargo.toml, the architecture from dpkg), with dpkg-deb as cargo-deb would:
#
#   /usr/bin/vdisk-mount, /usr/bin/vdisk     the release binaries
#   /usr/lib/MULTIARCH/nbdkit/plugins/nbdkit-vdisk-plugin.so
#                                            the nbdkit plugin: `nbdkit vdisk image=...`
#   /sbin/mount.vdisk                        mount(8)'s helper for type vdisk: a link
#   /lib/systemd/system/vdisk-mount@.service
#   /usr/share/man/man1, man8                made by `vdisk docs` from the programs' own
#   bash, zsh and fish completions           command-line definitions
#   /usr/share/doc/vdisk-mount/              README, copyright, changelog, the example
#                                            mount unit
#
# Depends: fuse3 and the shared libraries the binaries link, found by dpkg-shlibdeps;
# suggests nbdkit, which loads the plugin.
# Needs cargo, dpkg-dev, binutils and gzip (scripts/install-deps.sh installs them).
#
#   scripts/build-deb.sh [--binaries DIR] [--plugin FILE] [--output DIR]
#
# --binaries DIR packages the vdisk-mount and vdisk already built in DIR instead of
# building them (the tests package the binaries under test), --plugin FILE the plugin
# built already (default: libnbdkit_vdisk.so in DIR); --output DIR writes the package
# there instead of target/debian.
set -euo pipefail

binaries=""
plugin=""
output=""
while [ $# -gt 0 ]; do
    case "$1" in
        --binaries) binaries=$(realpath "$2"); shift 2 ;;
        --plugin) plugin=$(realpath "$2"); shift 2 ;;
        --output) output=$(realpath -m "$2"); shift 2 ;;
        *) echo "usage: $0 [--binaries DIR] [--plugin FILE] [--output DIR]" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
output=${output:-target/debian}

name=vdisk-mount
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
# Who wrote the repository's commits.
maintainer="Seed 788cb5b9 maintainers <maintainers@users.noreply.h-seed-788cb5b9.example>"
# File dates and the changelog's: the commit's time where there is one, so the same
# commit gives the same package.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

for tool in dpkg-deb dpkg-shlibdeps dpkg-architecture gzip strip; do
    command -v "$tool" >/dev/null ||
        { echo "$0: $tool is missing (scripts/install-deps.sh installs it)" >&2; exit 1; }
done

if [ -z "$binaries" ]; then
    cargo build --release --locked --bins -p vdisk-mount
    cargo build --release --locked -p nbdkit-vdisk
    binaries=target/release
fi
plugin=${plugin:-$binaries/libnbdkit_vdisk.so}
# Where Debian's nbdkit looks for plugins by name.
plugins=/usr/lib/$(dpkg-architecture -qDEB_HOST_MULTIARCH)/nbdkit/plugins

work=$(mktemp -d "${TMPDIR:-/tmp}/vdisk-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
umask 022
root=$work/root
doc=$root/usr/share/doc/$name

install -d "$root/usr/bin" "$root/sbin" "$root/lib/systemd/system" "$doc/examples" \
    "$root/usr/share/man/man1" "$root/usr/share/man/man8" \
    "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/share/fish/vendor_completions.d" "$root$plugins" "$root/DEBIAN"
install -m 755 "$binaries/vdisk-mount" "$binaries/vdisk" "$root/usr/bin/"
install -m 644 "$plugin" "$root$plugins/nbdkit-vdisk-plugin.so"
strip --strip-unneeded --remove-section=.comment --remove-section=.note \
    "$root/usr/bin/vdisk-mount" "$root/usr/bin/vdisk" "$root$plugins/nbdkit-vdisk-plugin.so"
# Across top-level directories a link is absolute (Debian policy 10.5).
ln -s /usr/bin/vdisk-mount "$root/sbin/mount.vdisk"
install -m 644 systemd/vdisk-mount@.service "$root/lib/systemd/system/"
install -m 644 systemd/mnt-images-a.mount "$doc/examples/"

"$root/usr/bin/vdisk" docs "$work/docs" >/dev/null
install -m 644 "$work"/docs/man/man1/*.1 "$root/usr/share/man/man1/"
install -m 644 "$work"/docs/man/man8/*.8 "$root/usr/share/man/man8/"
gzip -9n "$root"/usr/share/man/man1/*.1 "$root"/usr/share/man/man8/*.8
ln -s vdisk-mount.8.gz "$root/usr/share/man/man8/mount.vdisk.8.gz"
install -m 644 "$work"/docs/completions/bash/* "$root/usr/share/bash-completion/completions/"
install -m 644 "$work"/docs/completions/zsh/* "$root/usr/share/zsh/vendor-completions/"
install -m 644 "$work"/docs/completions/fish/* "$root/usr/share/fish/vendor_completions.d/"

install -m 644 README.md "$doc/"
gzip -9n "$doc/README.md"
commit=$("$root/usr/bin/vdisk" --version | sed -n 's/.*(commit \(.*\))$/\1/p')
cat >"$work/changelog" <<EOF
$name ($version) unstable; urgency=medium

  * Built from commit $commit.

 -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")
EOF
install -m 644 "$work/changelog" "$doc/changelog"
gzip -9n "$doc/changelog"
cat >"$doc/copyright" <<EOF
$name: VHD and VHDX disk images on Linux through FUSE

Copyright $(date -u -d "@$SOURCE_DATE_EPOCH" +%Y) $maintainer

License: none stated. The sources name no license (Cargo.toml has no license
field), and this package grants none.

The binaries are statically linked with Rust crates from crates.io, listed with
their versions in the sources' Cargo.lock; each comes under its own license.
EOF
chmod 644 "$doc/copyright"

# dpkg-shlibdeps reads the source package's control file; a minimal one will do.
mkdir -p "$work/src/debian"
printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$name" "$name" \
    >"$work/src/debian/control"
shlibs=$(cd "$work/src" &&
    dpkg-shlibdeps -O "$root/usr/bin/vdisk-mount" "$root/usr/bin/vdisk" \
        "$root$plugins/nbdkit-vdisk-plugin.so" |
    sed -n 's/^shlibs:Depends=//p')

cat >"$root/DEBIAN/control" <<EOF
Package: $name
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: fuse3, $shlibs
Suggests: nbdkit
Section: admin
Priority: optional
Description: mount VHD and VHDX disk images through FUSE
 vdisk-mount serves a VHD or VHDX disk image (fixed, dynamic or differencing,
 as Hyper-V, Windows, WSL, Azure and qemu make them) as one flat read/write raw
 file, MOUNTPOINT/disk.img, to loop-mount, partition, fsck or dd into. Every
 change lands in the image, which stays valid for the programs that made it.
 It mounts from the command line, from fstab and mount(8) (types vdisk and
 fuse.vdisk-mount) and as a systemd service.
 .
 vdisk creates, inspects, maps, checks and repairs, converts, compacts,
 resizes and merges images, each change safe to interrupt. The nbdkit plugin
 vdisk serves images over NBD with the same drivers.
EOF
(cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum >DEBIAN/md5sums)
chmod 644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"

mkdir -p "$output"
deb=$output/${name}_${version}_${arch}.deb
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
echo "$deb"
