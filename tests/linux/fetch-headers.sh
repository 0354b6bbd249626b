#!/bin/sh
# Fetches what an out-of-tree module for the Debian kernel of fetch.sh needs,
# as Debian packages, into .cache/linux-headers/ (ignored by git), without
# touching the machine's own apt state (private sources, lists, cache and
# dpkg status, as fetch.sh does):
#   linux-headers-VER          (arm64)  the kernel's Makefile, .config,
#                                       Module.symvers, generated headers
#   linux-headers-VERBASE-common (all)  the kernel's source headers
#   linux-kbuild-6.1           (amd64)  kbuild's host programs, for this machine
#                                       (the version the headers package has)
# VER is .cache/linux/kernel-version (e.g. 6.1.0-56-arm64; VERBASE 6.1.0-56).
# Debian's headers Makefile includes the -common tree by its absolute
# /usr/src path; the unpacked copy is made to include the cache's instead.
# Idempotent. Prints KDIR=PATH (the tree to pass as make -C).
#
# Usage: tests/linux/fetch-headers.sh [--refresh]
set -eu

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LINUX=${KEEL_LINUX_CACHE:-$ROOT/.cache/linux}
CACHE=${KEEL_HEADERS_CACHE:-$ROOT/.cache/linux-headers}

"$(dirname "$0")/fetch.sh" >/dev/null
version=$(cat "$LINUX/kernel-version")          # 6.1.0-56-arm64
base=${version%-arm64}                           # 6.1.0-56
kdir=$CACHE/root/usr/src/linux-headers-$version
stamp=$CACHE/version

if [ "${1:-}" != "--refresh" ] && [ -s "$stamp" ] && [ "$(cat "$stamp")" = "$version" ] &&
    [ -f "$kdir/Makefile" ]; then
    echo "KDIR=$kdir"
    exit 0
fi

mkdir -p "$CACHE/lists/partial" "$CACHE/apt/archives/partial" "$CACHE/state" \
    "$CACHE/etc/sources.list.d" "$CACHE/etc/preferences.d" "$CACHE/debs"
: > "$CACHE/state/status"

# The same mirrors fetch.sh picked (it wrote them into its sources list).
sed 's/arch=arm64/arch=arm64,amd64/' "$LINUX/etc/sources.list" > "$CACHE/etc/sources.list"

o="-oAPT::Architecture=amd64 -oAPT::Architectures::=amd64 -oAPT::Architectures::=arm64
   -oDir::State=$CACHE/state -oDir::State::Lists=$CACHE/lists -oDir::State::status=$CACHE/state/status
   -oDir::Cache=$CACHE/apt -oDir::Cache::pkgcache= -oDir::Cache::srcpkgcache=
   -oDir::Etc::SourceList=$CACHE/etc/sources.list -oDir::Etc::SourceParts=$CACHE/etc/sources.list.d
   -oDir::Etc::Preferences=$CACHE/etc/preferences -oDir::Etc::PreferencesParts=$CACHE/etc/preferences.d
   -oDir::Log=$CACHE/log -oDebug::NoLocking=1 -oAPT::Sandbox::User=root
   -oAcquire::Languages=none -oAPT::Get::List-Cleanup=0"

echo "fetch-headers.sh: apt-get update (arm64+amd64, private lists in $CACHE/lists)" >&2
# shellcheck disable=SC2086
apt-get $o -qq update >&2

# shellcheck disable=SC2086
pkgver=$(apt-cache $o show "linux-headers-$version:arm64" | sed -n 's/^Version: //p' | head -n 1)
series=${base%.*}                                # 6.1
pkgs="linux-headers-$version:arm64 linux-headers-$base-common linux-kbuild-$series:amd64=$pkgver"
echo "fetch-headers.sh: downloading $pkgs" >&2
# shellcheck disable=SC2086
(cd "$CACHE/debs" && rm -f ./*.deb && apt-get $o -qq download $pkgs >&2)

rm -rf "$CACHE/root" && mkdir -p "$CACHE/root"
for deb in "$CACHE"/debs/*.deb; do
    dpkg -x "$deb" "$CACHE/root"
done
[ -f "$kdir/Makefile" ] || { echo "fetch-headers.sh: $kdir/Makefile missing" >&2; exit 1; }

# Absolute symlinks (scripts, tools -> /usr/lib/linux-kbuild-X) and the
# Makefile's include of /usr/src/linux-headers-BASE-common point at the
# machine's root: point them into the cache.
find "$CACHE/root" -type l | while read -r link; do
    target=$(readlink "$link")
    case "$target" in
        /*) ln -sfn "$CACHE/root$target" "$link" ;;
    esac
done
sed -i "s|/usr/src/linux-headers-|$CACHE/root/usr/src/linux-headers-|g" "$kdir/Makefile"

echo "$version" > "$stamp"
echo "KDIR=$kdir"
