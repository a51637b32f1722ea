#!/bin/sh
# Node daemon crash test, for ublk and kernel NBD: ten layers attached in one `lazyblk daemon`, read
# lazily over HTTP ranges from a busybox httpd (the registry), with a disk cache. Once every chunk has
# been read once, readers loop over every file of every layer (page cache dropped each round, so reads
# reach the devices) while the daemon is killed with SIGKILL and the HTTP server stopped for good. A new
# daemon resumes every device (ublk user recovery with reissue; NBD_CMD_RECONFIGURE) from the spec and
# verified index it persisted, with the source unreachable. The readers must see zero errors.
rc=0
# Whether process $1 has exited (gone, or a zombie not yet reaped). The last test catches a process
# reaped between the first two (its status file vanished under grep): without it a daemon that had
# exited was twice reported as "did not exit", its /proc entry already gone when the stacks were read.
gone() { [ ! -e /proc/$1 ] || grep -q '^State:.*[ZX]' /proc/$1/status 2>/dev/null || [ ! -e /proc/$1 ]; }
eval "$(lazyblk layer inspect --json /payload/upper.blob | sed -n 's/^ *"\(index_offset\|index_length\|index_digest\)": "\{0,1\}\([^",]*\)"\{0,1\},\{0,1\}$/u_\1=\2/p')"
eval "$(lazyblk layer inspect --json /payload/layer.blob | sed -n 's/^ *"\(index_offset\|index_length\|index_digest\)": "\{0,1\}\([^",]*\)"\{0,1\},\{0,1\}$/\1=\2/p')"
for backend in ublk nbd; do
  run=/run/lb-crash-$backend
  rm -f /tmp/stop /tmp/reader
  busybox httpd -f -p 127.0.0.1:8000 -h /payload &
  hpid=$!
  lazyblk daemon --run-dir $run --cache-dir /tmp/cache-$backend 2>/tmp/daemon1.err &
  dpid=$!
  for i in $(seq 1 300); do [ -S $run/daemon.sock ] && break; sleep 0.1; done
  n=0
  for i in 0 1 2 3 4 5 6 7 8 9; do
    lazyblk attach http://127.0.0.1:8000/layer.blob --index-offset "$index_offset" --index-length "$index_length" \
      --index-digest "$index_digest" --backend $backend --mount /mnt/c-$backend-$i --run-dir $run >/dev/null 2>>/tmp/attach.err && n=$((n+1))
  done
  echo "crash-$backend: $n layers attached in one daemon (pid $dpid): $(ls $run/devices/*.index | wc -l) persisted indexes"
  [ $n = 10 ] || { rc=1; tail -3 /tmp/attach.err; }
  # Every chunk once (into the disk cache), then the readers.
  for i in 0 1 2 3 4 5 6 7 8 9; do (cd /mnt/c-$backend-$i && sha256sum -c /payload/SHA256SUMS >/dev/null) || rc=1; done
  (
    ok=0; fail=0
    while [ ! -e /tmp/stop ]; do
      echo 3 > /proc/sys/vm/drop_caches
      for i in 0 1 2 3 4 5 6 7 8 9; do
        if (cd /mnt/c-$backend-$i && sha256sum -c /payload/SHA256SUMS > /tmp/round.log 2>&1); then ok=$((ok+1)); else fail=$((fail+1)); grep -v ': OK' /tmp/round.log | head -3; fi
      done
    done
    echo "crash-$backend: reader rounds ok=$ok fail=$fail" > /tmp/reader
  ) &
  rpid=$!
  sleep 2
  kill -9 $dpid
  kill $hpid; wait $hpid 2>/dev/null
  t0=$(date +%s)
  echo "crash-$backend: killed the daemon and stopped the HTTP server"
  if wget -q -O /dev/null http://127.0.0.1:8000/SHA256SUMS 2>/dev/null; then echo "crash-$backend: the source still answers"; rc=1; fi
  lazyblk daemon --run-dir $run --cache-dir /tmp/cache-$backend 2>/tmp/daemon2.err &
  dpid=$!
  serving=0
  for i in $(seq 1 600); do
    serving=$(lazyblk ls --json --run-dir $run 2>/dev/null | grep -c '"state": "serving"')
    [ "$serving" = 10 ] && break
    sleep 0.1
  done
  echo "crash-$backend: daemon restarted, $serving of 10 devices serving after $(( $(date +%s) - t0 ))s, $(lazyblk events --run-dir $run | grep -c recovered) recovered events"
  [ "$serving" = 10 ] || { rc=1; lazyblk ls --run-dir $run; tail -5 /tmp/daemon2.err; }
  sleep 3
  touch /tmp/stop
  wait $rpid
  cat /tmp/reader
  grep -q "fail=0" /tmp/reader || rc=1
  grep -q "ok=0 " /tmp/reader && { echo "crash-$backend: reader never completed a round"; rc=1; }
  lazyblk ls --run-dir $run | head -3
  # A restart while an attach is half done: the daemon is killed while the 11th attach's mount waits
  # for the layer's first blocks, read through a shaper adding 2 s to every round trip. The mount
  # runs in a helper process, so the killed daemon exits at once (a mount in the daemon itself would
  # leave it unkillable, holding the device), and the new daemon rolls the attach back.
  busybox httpd -f -p 127.0.0.1:8000 -h /payload &
  hpid=$!
  lazyblk bench shape 127.0.0.1:8000 --rtt-ms 2000 --mbit 0 >/tmp/shape.addr &
  spid=$!
  # A hang guard, not a timing (a TCG guest on a loaded host once took over 10 s to start it).
  for i in $(seq 1 600); do [ -s /tmp/shape.addr ] && break; sleep 0.1; done
  [ -s /tmp/shape.addr ] || { echo "crash-$backend: the shaper never printed its address"; rc=1; }
  lazyblk attach "http://$(cat /tmp/shape.addr)/upper.blob" --index-offset "$u_index_offset" --index-length "$u_index_length" \
    --index-digest "$u_index_digest" --backend $backend --mount /mnt/c-$backend-half --run-dir $run >/dev/null 2>/tmp/half.err &
  apid=$!
  half=
  for i in $(seq 1 600); do
    half=$(grep -l "c-$backend-half" $run/devices/*.json 2>/dev/null | head -1)
    [ -n "$half" ] && grep -q '"mounter": {' "$half" && break
    half=
    sleep 0.1
  done
  mounter=$([ -n "$half" ] && sed -n '/"mounter": {/,/}/s/.*"pid": \([0-9]*\).*/\1/p' "$half")
  [ -n "$mounter" ] || { echo "crash-$backend: the half-done attach never reached its mount"; rc=1; tail -3 /tmp/half.err; lazyblk ls --run-dir $run | tail -3; }
  sleep 0.5
  [ -n "$mounter" ] && gone $mounter && { echo "crash-$backend: the mount finished before the kill"; rc=1; }
  kill -9 $dpid
  # A hang guard, not a timing: a daemon that mounted in its own thread never exits at all.
  for i in $(seq 1 600); do gone $dpid && break; sleep 0.1; done
  if gone $dpid; then
    wait $dpid 2>/dev/null
  else
    echo "crash-$backend: the daemon killed during a mount did not exit"
    rc=1
    for t in /proc/$dpid/task/*; do echo "  task $(cat $t/comm): $(cut -d' ' -f3 $t/stat) $(cat $t/wchan 2>/dev/null)"; cat $t/stack 2>/dev/null | head -8; done
  fi
  for i in $(seq 1 100); do gone $apid && break; sleep 0.1; done
  gone $apid || { echo "crash-$backend: the attach client was not told its daemon died"; rc=1; }
  wait $apid 2>/dev/null
  lazyblk daemon --run-dir $run --cache-dir /tmp/cache-$backend 2>/tmp/daemon3.err &
  dpid=$!
  for i in $(seq 1 600); do
    serving=$(lazyblk ls --json --run-dir $run 2>/dev/null | grep -c '"state": "serving"')
    [ "$serving" -ge 10 ] && ! lazyblk ls --json --run-dir $run | grep -q "c-$backend-half" && break
    sleep 0.1
  done
  for i in $(seq 1 100); do [ -z "$mounter" ] || gone $mounter && break; sleep 0.1; done
  echo "crash-$backend: restart during an attach's mount: $serving devices serving, $(lazyblk ls --json --run-dir $run | grep -c "c-$backend-half") record(s) of the half-done attach, $(grep -c " /mnt/c-$backend-half " /proc/mounts) mount(s), helper $([ -n "$mounter" ] && gone $mounter && echo gone || echo running)"
  [ "$serving" -ge 10 ] || { rc=1; lazyblk ls --run-dir $run; tail -5 /tmp/daemon3.err; }
  kill $spid; wait $spid 2>/dev/null
  for i in 0 1 2 3 4 5 6 7 8 9; do (cd /mnt/c-$backend-$i && sha256sum -c /payload/SHA256SUMS >/dev/null) || { echo "crash-$backend: layer $i wrong after the second restart"; rc=1; }; done
  lazyblk detach all --run-dir $run >/dev/null || { echo "crash-$backend: detach failed"; lazyblk ls --run-dir $run; rc=1; }
  kill $dpid; wait $dpid
  kill $hpid; wait $hpid 2>/dev/null
  if grep -q " /mnt/c-$backend" /proc/mounts; then echo "crash-$backend: still mounted"; rc=1; fi
  echo "crash-$backend: after detach all: $(ls /dev/ublkb* /dev/nbd* 2>/dev/null | while read d; do [ -e /sys/block/$(basename $d)/size ] && [ "$(cat /sys/block/$(basename $d)/size)" != 0 ] && echo $d; done | wc -l) devices left"
done
exit $rc
