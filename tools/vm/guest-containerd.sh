#!/bin/sh
# Guest test: the snapshotter with real containerd 1.6 + runc in the real kernel, for ublk and NBD.
# `lazyblk pull` takes the converted image's layer remotely, a container serves HTTP from it, and while
# a reader in the container loops over every file, the snapshotter *and* the node daemon serving the
# layer are killed with SIGKILL: the restarted snapshotter starts a new daemon, which resumes the device
# from its persisted state; the reader sees zero errors and a new container starts.
export PATH=/payload/bin:$PATH
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null
mkdir -p /var/lib /run/lazyblk /etc
echo "127.0.0.1 localhost" > /etc/hosts; echo "nameserver 127.0.0.1" > /etc/resolv.conf; echo vm > /etc/hostname
docker-registry serve /payload/registry.yml > /tmp/registry.log 2>&1 &
for i in $(seq 1 100); do wget -q -O /dev/null http://127.0.0.1:5000/v2/ 2>/dev/null && break; sleep 0.2; done
snap() {
  lazyblk snapshotter --address /run/lazyblk/$1.sock --root /var/lib/lb-$1 --backend $1 --plain-http --grace-secs 1 >> /tmp/snap-$1.log 2>&1 &
  echo $! > /tmp/snap-$1.pid
  for i in $(seq 1 300); do [ -S /run/lazyblk/$1.sock ] && break; sleep 0.1; done
}
# Like systemd's Before=containerd.service: the proxy sockets exist when containerd starts.
snap ublk
snap nbd
containerd --config /payload/containerd.toml > /tmp/containerd.log 2>&1 &
for i in $(seq 1 300); do [ -S /run/containerd/containerd.sock ] && break; sleep 0.1; done
[ -S /run/containerd/containerd.sock ] || { echo "containerd: did not start"; tail /tmp/containerd.log; exit 1; }
img=127.0.0.1:5000/test/tiny:lazyblk
rc=0
port=8080
for b in ublk nbd; do
  out=$(lazyblk pull $img --plain-http --snapshotter lazyblk-$b --namespace $b --address /run/containerd/containerd.sock 2>&1)
  echo "containerd-$b: pull: $out"
  echo "$out" | grep -q "1 remote layer(s), 0 unpacked" || { rc=1; continue; }
  port=$((port+1))
  ctr -n $b run -d --no-pivot --net-host --snapshotter lazyblk-$b $img web /bin/busybox httpd -f -p 127.0.0.1:$port -h /srv/app > /tmp/run.log 2>&1 || { echo "containerd-$b: run failed: $(cat /tmp/run.log)"; tail -5 /tmp/containerd.log; rc=1; continue; }
  body=""
  for i in $(seq 1 100); do body=$(wget -q -O - http://127.0.0.1:$port/index.html 2>/dev/null) && break; sleep 0.1; done
  echo "containerd-$b: http: $body"
  [ "$body" = "<h1>lazyblk in a VM</h1>" ] || rc=1
  dev=$(lazyblk ls --run-dir /var/lib/lb-$b/run | awk 'NR==2 {print $1, $7}')
  echo "containerd-$b: layer device and server: $dev"
  # Reader inside the container; the guest drops the page cache so reads reach the device.
  rm -f /tmp/stop-$b
  (while [ ! -e /tmp/stop-$b ]; do echo 3 > /proc/sys/vm/drop_caches; sleep 0.2; done) &
  ctr -n $b task exec --exec-id reader web sh -c 'ok=0; fail=0; for i in $(seq 1 40); do if sha256sum -c /data/SHA256SUMS >/dev/null 2>&1; then ok=$((ok+1)); else fail=$((fail+1)); fi; done; echo "ok=$ok fail=$fail"' > /tmp/reader-$b 2>&1 &
  rpid=$!
  sleep 2
  kill -9 $(cat /tmp/snap-$b.pid)
  kill -9 $(echo $dev | awk '{print $2}')
  echo "containerd-$b: killed the snapshotter and the node daemon"
  snap $b
  wait $rpid
  touch /tmp/stop-$b
  echo "containerd-$b: reader in the container: $(cat /tmp/reader-$b)"
  grep -q "fail=0" /tmp/reader-$b && ! grep -q "ok=0 " /tmp/reader-$b || rc=1
  echo "containerd-$b: after: $(lazyblk ls --run-dir /var/lib/lb-$b/run | awk 'NR==2 {print $1, $7, $8}')"
  # containerd's client to the proxy backs off after the refused dials of the restart: retry.
  for i in $(seq 1 30); do
    ctr -n $b run --rm --no-pivot --snapshotter lazyblk-$b $img probe cat /srv/app/index.html > /tmp/probe-$b 2>&1 && break
    sleep 1
  done
  echo "containerd-$b: new container after the restart: $(cat /tmp/probe-$b)"
  grep -q "lazyblk in a VM" /tmp/probe-$b || rc=1
  ctr -n $b task kill -s KILL web; sleep 1; ctr -n $b task rm -f web >/dev/null 2>&1; ctr -n $b containers rm web
done
kill $(cat /tmp/snap-ublk.pid) $(cat /tmp/snap-nbd.pid)
exit $rc
