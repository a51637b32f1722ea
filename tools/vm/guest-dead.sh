#!/bin/sh
# Guest test: the NBD server is killed and never restarted. Reads must fail with an I/O error once the
# kernel's dead-connection timeout (read deadline + 30 s) passes: bounded, never a hang.
lazyblk attach /payload/layer.blob --backend nbd --read-deadline 2 --mount /mnt/d --run-dir /run/lazyblk-dead > /tmp/d-dev &
pid=$!
for i in $(seq 1 300); do [ -s /tmp/d-dev ] && break; sleep 0.1; done
[ -s /tmp/d-dev ] || { echo "dead: attach failed"; exit 1; }
kill -9 $pid
echo 3 > /proc/sys/vm/drop_caches
start=$(date +%s)
if cat /mnt/d/data/f3 > /dev/null 2>/tmp/d-err; then
  echo "dead: read succeeded with the server gone"; exit 1
fi
echo "dead: read failed after $(( $(date +%s) - start ))s: $(cat /tmp/d-err)"
umount -l /mnt/d 2>/dev/null
exit 0
