#!/bin/sh
# Fetches Debian's arm64 Linux kernel and busybox-static into .cache/linux/
# without touching the machine's own apt state (lists, caches, locks, dpkg
# status): apt runs on a private sources list, lists folder and cache, for
# arm64 only. Idempotent: a cache that already holds both is left alone.
#
# Prints the paths it produced, one per line, as NAME=PATH:
#   IMAGE=.cache/linux/Image            uncompressed arm64 Image (QEMU's
#                                       guest-loader does not decompress)
#   BUSYBOX=.cache/linux/busybox        static arm64 busybox
#   KERNEL_VERSION=6.1.0-NN-arm64
#
# Usage: tests/linux/fetch.sh [--refresh]   (--refresh: fetch again)
set -eu

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${KEEL_LINUX_CACHE:-$ROOT/.cache/linux}
IMAGE=$CACHE/Image
BUSYBOX=$CACHE/busybox
VERSION_FILE=$CACHE/kernel-version

report() {
    echo "IMAGE=$IMAGE"
    echo "BUSYBOX=$BUSYBOX"
    echo "KERNEL_VERSION=$(cat "$VERSION_FILE")"
}

if [ "${1:-}" != "--refresh" ] && [ -s "$IMAGE" ] && [ -x "$BUSYBOX" ] && [ -s "$VERSION_FILE" ]; then
    report
    exit 0
fi

mkdir -p "$CACHE/lists/partial" "$CACHE/apt/archives/partial" "$CACHE/state" \
    "$CACHE/etc/sources.list.d" "$CACHE/etc/preferences.d" "$CACHE/debs" "$CACHE/root"
: > "$CACHE/state/status"

# The machine's own Debian mirror (one-line or deb822 sources), else the
# default one. The security archive carries the newest kernel point releases.
mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
    sed -n -e 's/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\/debian\/\{0,1\}\) .*/\2/p' \
           -e 's/^URIs: *\([^ ]*\/debian\/\{0,1\}\)$/\1/p' | head -n 1)
security=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
    sed -n -e 's/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\/debian-security\/\{0,1\}\) .*/\2/p' \
           -e 's/^URIs: *\([^ ]*\/debian-security\/\{0,1\}\)$/\1/p' | head -n 1)
mirror=${mirror:-http://deb.debian.org/debian}
security=${security:-http://deb.debian.org/debian-security}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
cat > "$CACHE/etc/sources.list" <<EOF
deb [arch=arm64 signed-by=$keyring] $mirror bookworm main
deb [arch=arm64 signed-by=$keyring] $mirror bookworm-updates main
deb [arch=arm64 signed-by=$keyring] $security bookworm-security main
EOF

# Every path apt writes or locks points into the cache; the machine's
# apt.conf.d is not read (no hooks, proxies still come from the environment).
o="-oAPT::Architecture=arm64 -oAPT::Architectures=arm64
   -oDir::State=$CACHE/state -oDir::State::Lists=$CACHE/lists -oDir::State::status=$CACHE/state/status
   -oDir::Cache=$CACHE/apt -oDir::Cache::pkgcache= -oDir::Cache::srcpkgcache=
   -oDir::Etc::SourceList=$CACHE/etc/sources.list -oDir::Etc::SourceParts=$CACHE/etc/sources.list.d
   -oDir::Etc::Preferences=$CACHE/etc/preferences -oDir::Etc::PreferencesParts=$CACHE/etc/preferences.d
   -oDir::Log=$CACHE/log -oDebug::NoLocking=1 -oAPT::Sandbox::User=root
   -oAcquire::Languages=none -oAPT::Get::List-Cleanup=0"

echo "fetch.sh: apt-get update (arm64, private lists in $CACHE/lists)" >&2
# shellcheck disable=SC2086
apt-get $o -qq update >&2

# The newest 6.1 kernel flavour arm64: the signed image (linux-image-X-arm64)
# when there is one, else the -unsigned one; never -dbg.
# shellcheck disable=SC2086
kpkg=$(apt-cache $o pkgnames linux-image-6.1.0- |
    grep -E '^linux-image-6\.1\.0-[0-9]+-arm64(-unsigned)?$' |
    sort -t- -k4,4n -k5,5 | awk -F- '
        { abi = $4 + 0; if (abi > best) { best = abi; pick = "" }
          if (abi == best && (pick == "" || $0 !~ /-unsigned$/)) pick = $0 }
        END { print pick }')
if [ -z "$kpkg" ]; then
    echo "fetch.sh: no linux-image-6.1.0-*-arm64 package in the lists" >&2
    exit 1
fi
echo "fetch.sh: downloading $kpkg and busybox-static" >&2
# shellcheck disable=SC2086
(cd "$CACHE/debs" && rm -f ./*.deb && apt-get $o -qq download "$kpkg" busybox-static >&2)

rm -rf "$CACHE/root" && mkdir -p "$CACHE/root"
for deb in "$CACHE"/debs/*.deb; do
    dpkg -x "$deb" "$CACHE/root"
done

version=${kpkg#linux-image-}
version=${version%-unsigned}
vmlinuz=$CACHE/root/boot/vmlinuz-$version
[ -f "$vmlinuz" ] || { echo "fetch.sh: $vmlinuz missing from $kpkg" >&2; exit 1; }

# Debian's arm64 vmlinuz is a gzip'd Image (an EFI zboot image is a PE file
# with "zimg" at offset 4 whose payload is gzip too): find the gzip stream
# and decompress it; a file that is already an Image ("ARMd" at 0x38) is
# copied.
python3 - "$vmlinuz" "$IMAGE.tmp" <<'EOF'
import gzip, struct, sys, zlib
src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()
def is_image(b):
    return len(b) > 64 and b[0x38:0x3c] == b"ARMd"
if is_image(data):
    out = data
else:
    start = 0
    if data[4:8] == b"zimg":  # EFI zboot: payload offset and size at 8, 12
        off, size = struct.unpack_from("<II", data, 8)
        data, start = data[off:off + size], 0
    if data[:2] != b"\x1f\x8b":
        sys.exit(f"fetch.sh: {src} is neither an Image nor gzip data")
    out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[start:])
    if not is_image(out):
        sys.exit(f"fetch.sh: decompressed {src} is not an arm64 Image")
open(dst, "wb").write(out)
EOF
mv "$IMAGE.tmp" "$IMAGE"
cp "$CACHE/root/bin/busybox" "$BUSYBOX"
chmod +x "$BUSYBOX"
echo "$version" > "$VERSION_FILE"
report
