#!/bin/sh
# Builds a gzip'd newc cpio initramfs from Debian's busybox-static (see
# fetch.sh) and an init script, which becomes /init. busybox installs its
# applet links at run time (`busybox --install -s`, in the init script), as
# the arm64 binary cannot run here.
#
# Extra files: SRC=DEST (DEST a path inside the archive, e.g.
# .cache/linux/keel/keel.ko=/keel/keel.ko); executables keep their mode.
#
# Usage: tests/linux/mkinitramfs.sh INIT OUTPUT.cpio.gz [SRC=DEST...]
set -eu

if [ $# -lt 2 ]; then
    echo "usage: $0 INIT OUTPUT.cpio.gz [SRC=DEST...]" >&2
    exit 2
fi
init=$1
out=$2
shift 2
HERE=$(cd "$(dirname "$0")" && pwd)

busybox=$("$HERE/fetch.sh" | sed -n 's/^BUSYBOX=//p')
command -v cpio >/dev/null || { apt-get update -qq && apt-get install -y -qq cpio; } >&2
command -v gzip >/dev/null || { apt-get update -qq && apt-get install -y -qq gzip; } >&2

stage=$(mktemp -d "${TMPDIR:-/tmp}/keel-initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
chmod 755 "$stage"
mkdir -p "$stage/bin" "$stage/sbin" "$stage/usr/bin" "$stage/usr/sbin" \
    "$stage/dev" "$stage/proc" "$stage/sys" "$stage/tmp" "$stage/root" "$stage/etc"
cp "$busybox" "$stage/bin/busybox"
chmod 755 "$stage/bin/busybox"
ln -s busybox "$stage/bin/sh"
cp "$init" "$stage/init"
chmod 755 "$stage/init"
for extra in "$@"; do
    src=${extra%%=*}
    dest=${extra#*=}
    case "$dest" in /*) ;; *) echo "mkinitramfs.sh: $extra: DEST must be absolute" >&2; exit 2 ;; esac
    mkdir -p "$stage$(dirname "$dest")"
    cp "$src" "$stage$dest"
done
# The kernel opens /dev/console for init's stdin/stdout before devtmpfs is
# mounted: the node must be in the archive (needs root or CAP_MKNOD).
if ! mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null; then
    echo "mkinitramfs.sh: warning: cannot create /dev/console (not root?): init starts without a console" >&2
fi

(cd "$stage" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --quiet) | gzip -9 -n > "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
