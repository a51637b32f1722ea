#!/bin/sh
# Guest test: the server is killed and never restarted; reads must fail with an I/O error, bounded,
# never hang. NBD: the kernel's dead-connection timeout (read deadline + 30 s) fails them. ublk: the
# kernel holds them for a recovery (that is the point of USER_RECOVERY) until `lazyblk detach` deletes
# the orphaned device, which fails them at once.
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
lazyblk detach all --run-dir /run/lazyblk-dead 2>/dev/null

lazyblk attach /payload/layer.blob --backend ublk --mount /mnt/du --run-dir /run/lazyblk-deadu > /tmp/du-dev &
pid=$!
for i in $(seq 1 300); do [ -s /tmp/du-dev ] && break; sleep 0.1; done
[ -s /tmp/du-dev ] || { echo "dead-ublk: attach failed"; exit 1; }
kill -9 $pid
wait $pid 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
(cat /mnt/du/data/f5 > /dev/null 2>/tmp/du-err; echo "exit=$?" > /tmp/du-rc) &
sleep 8
if [ -s /tmp/du-rc ]; then echo "dead-ublk: read finished before detach: $(cat /tmp/du-rc)"; exit 1; fi
echo "dead-ublk: reader waiting for recovery (8 s), detaching"
lazyblk detach all --run-dir /run/lazyblk-deadu
for i in $(seq 1 100); do [ -s /tmp/du-rc ] && break; sleep 0.1; done
echo "dead-ublk: reader $(cat /tmp/du-rc 2>/dev/null || echo still-blocked): $(cat /tmp/du-err)"
grep -q "exit=1" /tmp/du-rc
