#!/bin/sh
# Guest benchmark (tools/bench/vm-blockdev.sh): 4 KiB random-read latency (QD1, O_DIRECT) and
# sequential throughput through ublk, kernel NBD and loop-over-FUSE, against a loop device on the raw
# image; cold (empty cache, every chunk fetched from the in-guest docker-registry) and warm (cache
# filled). Prints one "BENCH {json}" line per measurement.
set -e
cfg=/tmp/registry.yml
printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: /payload/registry\nhttp:\n  addr: 127.0.0.1:5000\n' > $cfg
/payload/docker-registry serve $cfg > /tmp/registry.log 2>&1 &
for i in $(seq 1 100); do wget -q -O /dev/null http://127.0.0.1:5000/v2/ 2>/dev/null && break; sleep 0.2; done
src="127.0.0.1:5000/bench/layer@$(cat /payload/digest)"
idx="$(cat /payload/index-args)"
lazyblk layer export /payload/layer.blob --output /tmp/raw.img >/dev/null
losetup -r /dev/loop7 /tmp/raw.img
echo "BENCH $(lazyblk bench device /dev/loop7 --random 2000 --label raw-loop/warm)"
losetup -d /dev/loop7
rm /tmp/raw.img
for b in ublk nbd loop; do
  for phase in seq rand; do
    rm -rf /tmp/cache; mkdir -p /tmp/cache
    lazyblk attach "$src" $idx --plain-http --cache-dir /tmp/cache --backend $b --run-dir /run/lb > /tmp/dev 2>/tmp/err &
    pid=$!
    for i in $(seq 1 300); do [ -s /tmp/dev ] && break; sleep 0.1; done
    [ -s /tmp/dev ] || { echo "attach $b failed: $(cat /tmp/err)"; exit 1; }
    dev=$(cat /tmp/dev)
    if [ $phase = seq ]; then
      echo "BENCH $(lazyblk bench device $dev --random 0 --label $b/cold-seq)"
      echo "BENCH $(lazyblk bench device $dev --random 2000 --label $b/warm)"
    else
      echo "BENCH $(lazyblk bench device $dev --random 300 --seq-mib 1 --seed 7 --label $b/cold-rand)"
    fi
    lazyblk detach all --run-dir /run/lb >/dev/null
    wait $pid
  done
done
