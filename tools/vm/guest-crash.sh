#!/bin/sh
# Guest crash test, for ublk and kernel NBD: a reader loops over every file (page cache dropped each
# round, so reads reach the device) while the serving process is killed with SIGKILL. A supervising
# `lazyblk recover --watch`, started beforehand, notices and takes the device over (ublk user recovery
# with reissue; NBD_CMD_RECONFIGURE). The reader must see zero errors. `ublk-idle`: the same with no
# read in flight at the kill (the kernel quiesces the device without a request to requeue).
rc=0
for mode in ublk nbd ublk-idle; do
  backend=${mode%-idle}
  run=/run/lazyblk-crash-$mode
  mnt=/mnt/c-$mode
  rm -f /tmp/stop /tmp/reader /tmp/recover /tmp/dev /tmp/attach.err
  lazyblk attach /payload/layer.blob --backend $backend --mount $mnt --run-dir $run > /tmp/dev 2>/tmp/attach.err &
  pid=$!
  for i in $(seq 1 300); do [ -s /tmp/dev ] && break; sleep 0.1; done
  [ -s /tmp/dev ] || { echo "crash-$mode: attach failed: $(cat /tmp/attach.err)"; rc=1; continue; }
  lazyblk recover --watch --run-dir $run > /tmp/recover 2>/tmp/recover.err &
  wpid=$!
  if [ $mode != ublk-idle ]; then
    (
      ok=0; fail=0; longest=0
      while [ ! -e /tmp/stop ]; do
        s=$(date +%s)
        echo 3 > /proc/sys/vm/drop_caches
        if (cd $mnt && sha256sum -c /payload/SHA256SUMS > /tmp/round.log 2>&1); then ok=$((ok+1)); else fail=$((fail+1)); grep -v ': OK' /tmp/round.log | head -3; fi
        d=$(( $(date +%s) - s )); [ $d -gt $longest ] && longest=$d
      done
      echo "crash-$mode: reader rounds ok=$ok fail=$fail longest=${longest}s" > /tmp/reader
    ) &
    rpid=$!
  fi
  sleep 2
  kill -9 $pid
  t0=$(date +%s)
  echo "crash-$mode: killed the serving process"
  for i in $(seq 1 600); do grep -q recovered /tmp/recover 2>/dev/null && break; sleep 0.1; done
  echo "crash-$mode: supervisor said after $(( $(date +%s) - t0 ))s: $(cat /tmp/recover)"
  grep -q "recovered" /tmp/recover || { rc=1; tail -5 /tmp/recover.err; for t in /proc/$wpid/task/*; do echo "$t $(cat $t/comm) $(cat $t/wchan)"; done; }
  if [ $mode = ublk-idle ]; then
    echo 3 > /proc/sys/vm/drop_caches
    (cd $mnt && sha256sum -c /payload/SHA256SUMS > /tmp/round.log 2>&1) && ok=1 || ok=0
    echo "crash-$mode: reader rounds ok=$ok fail=$((1-ok)) (after recovery)" > /tmp/reader
  else
    sleep 3
    touch /tmp/stop
    wait $rpid
  fi
  cat /tmp/reader
  grep -q "fail=0" /tmp/reader || rc=1
  grep -q "ok=0 " /tmp/reader && { echo "crash-$mode: reader never completed a round"; rc=1; }
  lazyblk ls --run-dir $run
  kill $wpid
  wait $wpid || { echo "crash-$mode: supervisor exited with an error: $(tail -3 /tmp/recover.err)"; rc=1; }
  if grep -q " $mnt " /proc/mounts; then echo "crash-$mode: still mounted"; rc=1; fi
done
exit $rc
