#!/bin/sh
# Guest side of tools/bench/vm-readiness.sh: readiness of the nginx image per mode on the ublk and NBD
# backends (one snapshotter each), each run from a cold state (containers, images and snapshots removed through containerd's GC, the
# lazyblk chunk cache emptied, the page cache dropped). Prints one line per run:
#   RESULT IMAGE MODE[@BACKEND] RUN PULL_S START_S READY_S FETCHED_BYTES
export PATH=/payload/bin:$PATH
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null
mkdir -p /var/lib /run/lazyblk /etc
mount -t tmpfs -o size=2g var /var/lib
echo "127.0.0.1 localhost" > /etc/hosts; echo "nameserver 127.0.0.1" > /etc/resolv.conf; echo vm > /etc/hostname
docker-registry serve /payload/registry.yml > /tmp/registry.log 2>&1 &
for i in $(seq 1 100); do wget -q -O /dev/null http://127.0.0.1:5000/v2/ 2>/dev/null && break; sleep 0.2; done
BACKENDS="ublk nbd"
for b in $BACKENDS; do
  lazyblk snapshotter --address /run/lazyblk/$b.sock --root /var/lib/lb-$b --backend $b --plain-http --grace-secs 0 > /tmp/snap-$b.log 2>&1 &
  for i in $(seq 1 300); do [ -S /run/lazyblk/$b.sock ] && break; sleep 0.1; done
done
containerd --config /payload/containerd.toml > /tmp/containerd.log 2>&1 &
for i in $(seq 1 300); do [ -S /run/containerd/containerd.sock ] && break; sleep 0.1; done
[ -S /run/containerd/containerd.sock ] || { echo "containerd: did not start"; tail /tmp/containerd.log; exit 1; }
R=127.0.0.1:5000/bench
PORT=18080
APP="sed -i 's/listen 80 default_server;/listen $PORT default_server;/; s/listen \[::\]:80 default_server;//' /etc/nginx/sites-enabled/default && exec nginx -g 'daemon off;'"
now() { awk '{print $1}' /proc/uptime; }
ctrb() { ctr -n bench "$@"; }
cold() {
  for c in $(ctrb containers ls -q); do
    ctrb task kill -s KILL $c >/dev/null 2>&1; sleep 0.5
    ctrb task rm -f $c >/dev/null 2>&1; ctrb containers rm $c >/dev/null 2>&1
  done
  imgs=$(ctrb images ls -q)
  [ -n "$imgs" ] && ctrb images rm --sync $imgs >/dev/null 2>&1
  for bk in $BACKENDS; do
    for i in $(seq 1 300); do ls /var/lib/lb-$bk/run/devices/*[0-9].json >/dev/null 2>&1 || break; sleep 0.1; done
    rm -rf /var/lib/lb-$bk/cache/*
  done
  sync; echo 3 > /proc/sys/vm/drop_caches
}
ready() {
  for i in $(seq 1 6000); do wget -q -O /dev/null http://127.0.0.1:$PORT/ 2>/dev/null && return 0; done
  return 1
}
fetched() { cat /var/lib/lb-$1/run/devices/*.stats.json 2>/dev/null | sed 's/.*"fetched_bytes":\([0-9]*\).*/\1/' | awk '{s+=$1} END {print s+0}'; }
pull() { # SNAPSHOTTER IMAGE
  if [ $1 = overlayfs ]; then ctrb images pull --plain-http $2 >/tmp/pull.log 2>&1
  else lazyblk pull $2 --plain-http --snapshotter $1 --namespace bench --address /run/containerd/containerd.sock >/tmp/pull.log 2>&1; fi
}
# The trace: one cold run of the plain converted image, recorded, pushed to the second repository
# (same manifest, so the plain runs never see it) and baked into a re-laid-out image.
cold
lazyblk trace record --run-dir /var/lib/lb-ublk/run --ready-url http://127.0.0.1:$PORT/ --timeout 600 -o /tmp/nginx.trace > /tmp/record.log 2>&1 &
rec=$!
pull lazyblk-ublk $R/nginx:v1-lazyblk || { echo "record pull failed: $(cat /tmp/pull.log)"; exit 1; }
ctrb run -d --no-pivot --net-host --snapshotter lazyblk-ublk $R/nginx:v1-lazyblk record sh -c "$APP" >/tmp/run.log 2>&1 || { echo "record run failed: $(cat /tmp/run.log)"; exit 1; }
wait $rec || { echo "trace record failed: $(cat /tmp/record.log)"; exit 1; }
echo "trace: $(cat /tmp/record.log)"
lazyblk trace push $R/nginx-traced:v1-lazyblk /tmp/nginx.trace --plain-http || exit 1
lazyblk trace relayout $R/nginx:v1-lazyblk $R/nginx-relaid:v1-lazyblk --trace /tmp/nginx.trace --plain-http || exit 1
rc=0
for run in $(seq 1 $(cat /payload/runs)); do
  for mb in overlayfs $(for b in $BACKENDS; do echo lazyblk@$b lazyblk+trace@$b lazyblk+relayout@$b; done); do
    mode=${mb%@*}; b=${mb#*@}
    case $mode in
      overlayfs) img=$R/nginx:v1 ;;
      lazyblk) img=$R/nginx:v1-lazyblk ;;
      lazyblk+trace) img=$R/nginx-traced:v1-lazyblk ;;
      lazyblk+relayout) img=$R/nginx-relaid:v1-lazyblk ;;
    esac
    snap=overlayfs; [ $mode = overlayfs ] || snap=lazyblk-$b
    cold
    t0=$(now)
    pull $snap $img || { echo "$mb: pull failed: $(cat /tmp/pull.log)"; rc=1; continue; }
    t1=$(now)
    ctrb run -d --no-pivot --net-host --snapshotter $snap $img web sh -c "$APP" >/tmp/run.log 2>&1 || { echo "$mb: run failed: $(cat /tmp/run.log)"; rc=1; continue; }
    t2=$(now)
    ready || { echo "$mb: no HTTP 200"; rc=1; continue; }
    t3=$(now)
    sleep 0.5
    if [ $mode = overlayfs ]; then f=$(cat /payload/overlay_bytes); else f=$(fetched $b); fi
    echo "RESULT nginx $mb $run $(awk -v a=$t0 -v b=$t1 -v c=$t2 -v d=$t3 'BEGIN {printf "%.2f %.2f %.2f", b-a, c-b, d-c}') $f"
  done
done
cold
exit $rc
