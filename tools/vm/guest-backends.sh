#!/bin/sh
# Guest test: every available backend (kernel NBD, then loop) attaches the payload layer lazily, mounts
# it, serves every file correctly (checksums made on the host), and detaches leaving nothing mounted.
rc=0
for backend in nbd loop; do
  mnt=/mnt/$backend
  lazyblk attach /payload/layer.blob --backend $backend --mount $mnt --run-dir /run/lazyblk > /tmp/dev.$backend 2>/tmp/err.$backend &
  pid=$!
  for i in $(seq 1 300); do [ -s /tmp/dev.$backend ] && break; kill -0 $pid 2>/dev/null || break; sleep 0.1; done
  if [ ! -s /tmp/dev.$backend ]; then echo "$backend: attach failed: $(cat /tmp/err.$backend)"; rc=1; continue; fi
  echo "$backend: attached $(cat /tmp/dev.$backend), read-only=$(cat /sys/block/$(basename $(cat /tmp/dev.$backend))/ro)"
  if (cd $mnt && sha256sum -c /payload/SHA256SUMS > /tmp/check.$backend 2>&1); then
    echo "$backend: checksums ok: $(wc -l < /tmp/check.$backend) files"
  else
    echo "$backend: checksum failures:"; grep -v ': OK' /tmp/check.$backend | head; rc=1
  fi
  lazyblk detach all --run-dir /run/lazyblk || rc=1
  wait $pid || { echo "$backend: attach exited with an error: $(cat /tmp/err.$backend)"; rc=1; }
  if grep -q " $mnt " /proc/mounts; then echo "$backend: still mounted"; rc=1; fi
  echo "$backend: detached cleanly"
done
exit $rc
