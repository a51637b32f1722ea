#!/bin/sh
# Guest side of tools/bench/vm-readiness.sh: readiness of the nginx image per mode on the ublk and NBD
# backends (one snapshotter each) and on the SOCI snapshotter, each run from a cold state
# (containers, images and snapshots removed through containerd's GC, the lazyblk chunk cache
# emptied, the SOCI snapshotter restarted on an empty root, the page cache dropped). Every run pulls
# over HTTPS (registry under a host name, CA trusted through SSL_CERT_FILE). One line per run:
#   RESULT IMAGE MODE[@BACKEND] RUN PULL_S START_S READY_S FETCHED_BYTES ("-": not counted)
export PATH=/payload/bin:$PATH
export SSL_CERT_FILE=/payload/tls/ca.pem
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null
mkdir -p /var/lib /run/lazyblk /etc
mount -t tmpfs -o size=2g var /var/lib
echo "127.0.0.1 localhost lazyblk-bench.test" > /etc/hosts; echo "hosts: files dns" > /etc/nsswitch.conf; echo "nameserver 127.0.0.1" > /etc/resolv.conf; echo vm > /etc/hostname
docker-registry serve /payload/registry.yml > /tmp/registry.log 2>&1 &
docker-registry serve /payload/registry-tls.yml > /tmp/registry-tls.log 2>&1 &
for i in $(seq 1 100); do wget -q -O /dev/null http://127.0.0.1:5000/v2/ 2>/dev/null && break; sleep 0.2; done
for i in $(seq 1 100); do netstat -ltn 2>/dev/null | grep -q ':5443 ' && break; sleep 0.2; done
BACKENDS="ublk nbd"
for b in $BACKENDS; do
  lazyblk snapshotter --address /run/lazyblk/$b.sock --root /var/lib/lb-$b --backend $b --grace-secs 0 > /tmp/snap-$b.log 2>&1 &
  for i in $(seq 1 300); do [ -S /run/lazyblk/$b.sock ] && break; sleep 0.1; done
done
# The peer, as a proxy plugin named "soci"; soci_cold restarts it on an empty root.
mkdir -p /run/soci
soci_pid=
soci_start() {
  soci-snapshotter-grpc -address /run/soci/soci.sock -root /var/lib/soci -config /payload/soci.toml -log-level warn >> /tmp/soci.log 2>&1 &
  soci_pid=$!
  for i in $(seq 1 300); do [ -S /run/soci/soci.sock ] && break; sleep 0.1; done
  [ -S /run/soci/soci.sock ] || { echo "soci-snapshotter-grpc: did not start"; tail /tmp/soci.log; exit 1; }
}
soci_cold() {
  [ -n "$soci_pid" ] && { kill $soci_pid; for i in $(seq 1 300); do kill -0 $soci_pid 2>/dev/null || break; sleep 0.1; done; kill -9 $soci_pid 2>/dev/null; }
  for mp in $(awk '$5 ~ "^/var/lib/soci/" {print $5}' /proc/self/mountinfo | sort -r); do umount -l $mp; done
  rm -rf /var/lib/soci /run/soci/soci.sock
  soci_start
}
soci_start
containerd --config /payload/containerd.toml > /tmp/containerd.log 2>&1 &
for i in $(seq 1 300); do [ -S /run/containerd/containerd.sock ] && break; sleep 0.1; done
[ -S /run/containerd/containerd.sock ] || { echo "containerd: did not start"; tail /tmp/containerd.log; exit 1; }
R=lazyblk-bench.test:5443/bench
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
  soci_cold
  sync; echo 3 > /proc/sys/vm/drop_caches
}
ready() {
  for i in $(seq 1 6000); do wget -q -O /dev/null http://127.0.0.1:$PORT/ 2>/dev/null && return 0; done
  return 1
}
fetched() { cat /var/lib/lb-$1/run/devices/*.stats.json 2>/dev/null | sed 's/.*"fetched_bytes":\([0-9]*\).*/\1/' | awk '{s+=$1} END {print s+0}'; }
pull() { # SNAPSHOTTER IMAGE
  if [ $1 = overlayfs ]; then ctrb images pull $2 >/tmp/pull.log 2>&1
  elif [ $1 = soci ]; then soci -n bench image rpull $2 >/tmp/pull.log 2>&1
  else lazyblk pull $2 --snapshotter $1 --namespace bench --address /run/containerd/containerd.sock >/tmp/pull.log 2>&1; fi
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
lazyblk trace push $R/nginx-traced:v1-lazyblk /tmp/nginx.trace || exit 1
lazyblk trace relayout $R/nginx:v1-lazyblk $R/nginx-relaid:v1-lazyblk --trace /tmp/nginx.trace || exit 1
# SOCI's index, with its defaults, built from the image in containerd's content store and pushed.
cold
ctrb images pull $R/nginx-soci:v1 >/tmp/soci-pull.log 2>&1 || { echo "soci: pull failed: $(cat /tmp/soci-pull.log)"; exit 1; }
t0=$(now)
soci -n bench create $R/nginx-soci:v1 >/tmp/soci-create.log 2>&1 || { echo "soci create failed: $(cat /tmp/soci-create.log)"; exit 1; }
soci -n bench push $R/nginx-soci:v1 >/tmp/soci-push.log 2>&1 || { echo "soci push failed: $(cat /tmp/soci-push.log)"; exit 1; }
echo "soci: $(soci --version); create + push $(awk -v a=$t0 -v b=$(now) 'BEGIN {printf "%.1f", b-a}') s"
soci -n bench index list
rc=0
for run in $(seq 1 $(cat /payload/runs)); do
  for mb in overlayfs $(for b in $BACKENDS; do echo lazyblk@$b lazyblk+trace@$b lazyblk+relayout@$b; done) soci; do
    mode=${mb%@*}; b=${mb#*@}
    case $mode in
      overlayfs) img=$R/nginx:v1 ;;
      lazyblk) img=$R/nginx:v1-lazyblk ;;
      lazyblk+trace) img=$R/nginx-traced:v1-lazyblk ;;
      lazyblk+relayout) img=$R/nginx-relaid:v1-lazyblk ;;
      soci) img=$R/nginx-soci:v1 ;;
    esac
    case $mode in overlayfs|soci) snap=$mode ;; *) snap=lazyblk-$b ;; esac
    cold
    t0=$(now)
    pull $snap $img || { echo "$mb: pull failed: $(cat /tmp/pull.log)"; rc=1; continue; }
    t1=$(now)
    ctrb run -d --no-pivot --net-host --snapshotter $snap $img web sh -c "$APP" >/tmp/run.log 2>&1 || { echo "$mb: run failed: $(cat /tmp/run.log)"; rc=1; continue; }
    t2=$(now)
    ready || { echo "$mb: no HTTP 200"; rc=1; continue; }
    t3=$(now)
    sleep 0.5
    case $mode in overlayfs) f=$(cat /payload/overlay_bytes) ;; soci) f=- ;; *) f=$(fetched $b) ;; esac
    echo "RESULT nginx $mb $run $(awk -v a=$t0 -v b=$t1 -v c=$t2 -v d=$t3 'BEGIN {printf "%.2f %.2f %.2f", b-a, c-b, d-c}') $f"
  done
done
cold
exit $rc
