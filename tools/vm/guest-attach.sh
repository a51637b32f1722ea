#!/bin/sh
# Guest test: the loop backend on a real 6.12 kernel — attach the payload layer lazily, mount it,
# check every file against the checksums made on the host, detach, and nothing stays mounted.
lazyblk attach /payload/layer.blob --backend loop --mount /mnt/layer --run-dir /run/lazyblk > /tmp/dev &
for i in $(seq 1 300); do [ -s /tmp/dev ] && break; sleep 0.1; done
[ -s /tmp/dev ] || { echo "attach failed"; exit 1; }
echo "attached $(cat /tmp/dev)"
lazyblk ls --run-dir /run/lazyblk
(cd /mnt/layer && sha256sum -c /payload/SHA256SUMS > /tmp/check.log 2>&1) || { grep -v ': OK' /tmp/check.log | head; exit 1; }
echo "checksums ok: $(wc -l < /tmp/check.log) files"
lazyblk detach all --run-dir /run/lazyblk || exit 1
wait
if grep -q /mnt/layer /proc/mounts; then echo "still mounted"; exit 1; fi
echo "detached cleanly"
