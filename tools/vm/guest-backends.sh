#!/bin/sh
# Guest test: every backend (ublk, kernel NBD, loop) attaches the payload layer lazily, mounts it,
# serves every file correctly (checksums made on the host), reads back byte-identical to the raw image
# both sequentially and at random offsets, shows up in `lazyblk ls`, and detaches leaving nothing
# mounted.
rc=0
lazyblk layer export /payload/layer.blob --output /tmp/raw.img || { echo "export failed"; exit 1; }
blocks=$(( $(stat -c %s /tmp/raw.img) / 4096 ))
for backend in ublk nbd loop; do
  mnt=/mnt/$backend
  lazyblk attach /payload/layer.blob --backend $backend --mount $mnt --run-dir /run/lazyblk > /tmp/dev.$backend 2>/tmp/err.$backend &
  pid=$!
  for i in $(seq 1 300); do [ -s /tmp/dev.$backend ] && break; kill -0 $pid 2>/dev/null || break; sleep 0.1; done
  if [ ! -s /tmp/dev.$backend ]; then echo "$backend: attach failed: $(cat /tmp/err.$backend)"; rc=1; continue; fi
  dev=$(cat /tmp/dev.$backend)
  echo "$backend: attached $dev, read-only=$(cat /sys/block/$(basename $dev)/ro)"
  if (cd $mnt && sha256sum -c /payload/SHA256SUMS > /tmp/check.$backend 2>&1); then
    echo "$backend: checksums ok: $(wc -l < /tmp/check.$backend) files"
  else
    echo "$backend: checksum failures:"; grep -v ': OK' /tmp/check.$backend | head; rc=1
  fi
  echo 3 > /proc/sys/vm/drop_caches
  bad=0
  for i in $(seq 1 64); do
    b=$(( ($RANDOM * 32768 + $RANDOM) % blocks ))
    dd if=$dev of=/tmp/r1 bs=4096 skip=$b count=1 2>/dev/null
    dd if=/tmp/raw.img of=/tmp/r2 bs=4096 skip=$b count=1 2>/dev/null
    cmp -s /tmp/r1 /tmp/r2 || { bad=$((bad+1)); echo "$backend: block $b differs"; }
  done
  [ $bad = 0 ] && echo "$backend: random reads ok: 64 blocks" || rc=1
  if cmp $dev /tmp/raw.img; then echo "$backend: sequential read identical"; else rc=1; fi
  lazyblk ls --run-dir /run/lazyblk > /tmp/ls.$backend
  cat /tmp/ls.$backend
  grep -q "^$dev .* serving " /tmp/ls.$backend && echo "$backend: listed" || { echo "$backend: not listed"; rc=1; }
  lazyblk detach all --run-dir /run/lazyblk || rc=1
  wait $pid || { echo "$backend: attach exited with an error: $(cat /tmp/err.$backend)"; rc=1; }
  if grep -q " $mnt " /proc/mounts; then echo "$backend: still mounted"; rc=1; fi
  [ -e "$dev" ] && [ $backend = ublk ] && { echo "$backend: $dev still exists"; rc=1; }
  echo "$backend: detached cleanly"
done
exit $rc
