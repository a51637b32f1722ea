#!/bin/sh
# Guest test: a hostile image whose superblock says errors=panic and whose directory block is garbage
# (its chunks verify: the publisher built it so). Mounted by lazyblk over ublk, reading the directory
# must fail with an error, the mount must stay, and the kernel must not panic.
lazyblk attach /payload/panic.blob --backend auto --mount /mnt/hostile --run-dir /run/lazyblk > /tmp/h.dev 2>/tmp/h.err &
for i in $(seq 1 300); do [ -s /tmp/h.dev ] && break; sleep 0.1; done
[ -s /tmp/h.dev ] || { echo "hostile: attach failed: $(cat /tmp/h.err)"; exit 1; }
echo "hostile: mounted with $(grep ' /mnt/hostile ' /proc/mounts | cut -d' ' -f4)"
if ls /mnt/hostile/data > /tmp/h.ls 2>&1; then
  echo "hostile: corrupt directory listed without an error: $(head -3 /tmp/h.ls)"
else
  echo "hostile: reading the corrupt directory failed: $(tail -1 /tmp/h.ls)"
fi
cat /mnt/hostile/keep/a > /dev/null 2>&1 && echo "hostile: other files still read"
echo "hostile: kernel alive"
lazyblk detach all --run-dir /run/lazyblk >/dev/null 2>&1
wait
