#!/bin/sh
# Guest test: two converted layers, the lower through kernel NBD and the upper through ublk (`auto`
# picks ublk here), each mounted read-only, stacked with overlayfs (upper first): the upper layer's whiteout hides a lower file, its opaque directory hides the
# lower directory's content, and everything else of the lower layer shows through.
set -e
n=0
for lb in layer:nbd upper:auto; do
  l=${lb%:*}
  lazyblk attach /payload/$l.blob --backend ${lb#*:} --mount /mnt/o-$l --run-dir /run/lazyblk > /tmp/o-$l &
  for i in $(seq 1 300); do [ -s /tmp/o-$l ] && break; sleep 0.1; done
  [ -s /tmp/o-$l ] || { echo "overlay: attach $l failed"; exit 1; }
done
mkdir -p /mnt/merged
mount -t overlay overlay -o lowerdir=/mnt/o-upper:/mnt/o-layer /mnt/merged
fail=0
[ -e /mnt/o-layer/data/f1 ] || { echo "overlay: f1 missing from the lower layer"; fail=1; }
[ ! -e /mnt/merged/data/f1 ] || { echo "overlay: whiteout did not hide data/f1"; fail=1; }
[ -e /mnt/merged/data/f2 ] || { echo "overlay: data/f2 should show through"; fail=1; }
[ "$(ls /mnt/o-layer/keep | wc -l)" = 2 ] || { echo "overlay: lower keep/ should have 2 entries"; fail=1; }
[ "$(ls /mnt/merged/keep)" = "new" ] || { echo "overlay: opaque keep/ shows: $(ls /mnt/merged/keep)"; fail=1; }
[ "$(cat /mnt/merged/keep/new)" = "from the upper layer" ] || { echo "overlay: keep/new content"; fail=1; }
umount /mnt/merged
lazyblk detach all --run-dir /run/lazyblk
wait
[ $fail = 0 ] && echo "overlay: whiteouts and opaque directories correct"
exit $fail
