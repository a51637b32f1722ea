#!/bin/sh
# Guest test: a hostile image whose superblock says errors=panic and whose directory block is garbage
# (its chunks verify: the publisher built it so). Mounted by lazyblk over ublk: ext4 reports the
# corruption, lookups in the directory fail, other files still read, and the kernel does not panic.
lazyblk attach /payload/panic.blob --backend auto --mount /mnt/hostile --run-dir /run/lazyblk > /tmp/h.dev 2>/tmp/h.err &
for i in $(seq 1 300); do [ -s /tmp/h.dev ] && break; sleep 0.1; done
[ -s /tmp/h.dev ] || { echo "hostile: attach failed: $(cat /tmp/h.err)"; exit 1; }
echo "hostile: mounted with $(grep ' /mnt/hostile ' /proc/mounts | cut -d' ' -f4)"
ls /mnt/hostile/data > /tmp/h.ls 2>&1
echo "hostile: corrupt directory: ls exit=$? entries=$(grep -c . /tmp/h.ls)"
if cat /mnt/hostile/data/f0 > /dev/null 2>/tmp/h.cat; then
  echo "hostile: a file under the corrupt directory was read"
else
  echo "hostile: lookup under the corrupt directory failed: $(tail -1 /tmp/h.cat)"
fi
dmesg | grep -q "EXT4-fs error (device $(basename "$(cat /tmp/h.dev)"))" && echo "hostile: ext4 reported the corruption"
cat /mnt/hostile/keep/a > /dev/null 2>&1 && echo "hostile: other files still read"
echo "hostile: kernel alive"
lazyblk detach all --run-dir /run/lazyblk >/dev/null 2>&1
wait
