#!/usr/bin/env bash
# Prepares the real-kernel VM for tests: Debian's linux-image 6.12 (downloaded once, cached), its block
# and filesystem modules (decompressed), and an initramfs with busybox, the lazyblk binary and its
# shared libraries, a test payload directory and a guest test script.
#
#   [LAZYBLK_BIN=path] tools/vm/prepare.sh PAYLOAD_DIR GUEST_SCRIPT...   -> .cache/vm/{vmlinuz,initrd.gz}
# The guest runs the scripts in order; the run passes only if all of them exit 0.
set -euo pipefail
cd "$(dirname "$0")/../.."
payload=$1
shift
kver=6.12.107+deb12-amd64
vm=.cache/vm
mkdir -p "$vm"
if [[ ! -f "$vm/vmlinuz" || ! -f "$vm/modules/crc32c_generic.ko" ]]; then
  (cd "$vm" && apt-get download "linux-image-$kver" >/dev/null 2>&1)
  rm -rf "$vm/kpkg"
  dpkg-deb -x "$vm"/linux-image-"$kver"_*.deb "$vm/kpkg"
  cp "$vm/kpkg/boot/vmlinuz-$kver" "$vm/vmlinuz"
  mkdir -p "$vm/modules"
  for m in crc16 crc32c_generic mbcache jbd2 ext4 loop nbd ublk_drv overlay; do
    f=$(find "$vm/kpkg/lib/modules" -name "$m.ko.xz" | head -1)
    [[ -n "$f" ]] || { echo "module $m not in the kernel package" >&2; exit 1; }
    xz -dc "$f" >"$vm/modules/$m.ko"
  done
  rm -rf "$vm/kpkg"
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,run,mnt,lib,lib64,modules,payload,etc}
cp /bin/busybox "$root/bin/busybox"
for app in $("$root/bin/busybox" --list); do
  [[ -e "$root/bin/$app" ]] || ln -s busybox "$root/bin/$app"
done
cp "$vm"/modules/*.ko "$root/modules/"
bin=${LAZYBLK_BIN:-target/release/lazyblk}
cp "$bin" "$root/bin/lazyblk"
# The binary's shared libraries, at the paths the loader expects.
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp -a "$payload"/. "$root/payload/"
# Shared libraries of any binaries the payload brings (payload/bin: containerd, runc, ...).
if [[ -d "$payload/bin" ]]; then
  for b in "$payload"/bin/*; do
    for lib in $(ldd "$b" 2>/dev/null | grep -o '/[^ ]*'); do
      mkdir -p "$root$(dirname "$lib")"
      [[ -e "$root$lib" ]] || cp -L "$lib" "$root$lib"
    done
  done
fi
mkdir -p "$root/tests"
{
  echo '#!/bin/sh'
  echo 'rc=0'
  for script in "$@"; do
    cp "$script" "$root/tests/$(basename "$script")"
    echo "sh /tests/$(basename "$script") || { echo \"$(basename "$script") FAILED\"; rc=1; }"
  done
  echo 'exit $rc'
} >"$root/test.sh"
chmod +x "$root/test.sh"
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
for m in crc16 crc32c_generic mbcache jbd2 ext4 loop nbd ublk_drv overlay; do insmod /modules/$m.ko || echo "insmod $m failed"; done
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
echo "LAZYBLK-VM: kernel $(uname -r), ublk-control: $([ -e /dev/ublk-control ] && echo yes || echo no), nbd: $([ -e /sys/module/nbd ] && echo yes || echo no)"
if sh /test.sh; then echo "LAZYBLK-VM-RESULT: PASS"; else echo "LAZYBLK-VM-RESULT: FAIL"; fi
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc 2>/dev/null | gzip -1) >"$vm/initrd.gz"
ls -la "$vm/vmlinuz" "$vm/initrd.gz" >&2
