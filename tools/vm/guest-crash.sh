#!/bin/sh
# Guest crash test (kernel NBD): a reader loops over every file (page cache dropped each round, so reads
# reach the device) while the serving process is killed with SIGKILL and `lazyblk recover` takes the
# device over with NBD_CMD_RECONFIGURE. The reader must see zero errors.
lazyblk attach /payload/layer.blob --backend nbd --mount /mnt/c --run-dir /run/lazyblk > /tmp/dev 2>/tmp/attach.err &
pid=$!
for i in $(seq 1 300); do [ -s /tmp/dev ] && break; sleep 0.1; done
[ -s /tmp/dev ] || { echo "crash: attach failed: $(cat /tmp/attach.err)"; exit 1; }
(
  ok=0; fail=0
  for i in $(seq 1 6); do
    echo 3 > /proc/sys/vm/drop_caches
    if (cd /mnt/c && sha256sum -c /payload/SHA256SUMS > /tmp/round.log 2>&1); then ok=$((ok+1)); else fail=$((fail+1)); grep -v ': OK' /tmp/round.log | head -3; fi
  done
  echo "crash: reader rounds ok=$ok fail=$fail" > /tmp/reader
) &
rpid=$!
sleep 1
kill -9 $pid
echo "crash: killed the serving process"
sleep 1
lazyblk recover --run-dir /run/lazyblk > /tmp/recover 2>/tmp/recover.err &
for i in $(seq 1 300); do [ -s /tmp/recover ] && break; sleep 0.1; done
echo "crash: $(cat /tmp/recover) $(cat /tmp/recover.err | tail -1)"
wait $rpid
cat /tmp/reader
lazyblk detach all --run-dir /run/lazyblk
grep -q "fail=0" /tmp/reader
