#!/bin/busybox sh
# emulab guest /init: mount the basics, load the requested modules, run the test script between
# markers on the serial console, power off. Written by emulab.qemu; runs as PID 1.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mkdir -p /proc /sys /dev /tmp /run /var/run
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
[ -d /sys/kernel/debug ] && mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
ip link set lo up 2>/dev/null
KV=$(uname -r)
if [ -f /emulab/modules ]; then
  while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$KV/$mod" || echo "emulab-init: insmod $mod failed"
  done < /emulab/modules
fi
# A NIC driver probes asynchronously (iavf: its init task talks to the PF first): the script
# starts once its interface exists, as `ip link set eth0 up` in a first command expects.
if grep -q 'iavf.ko$' /emulab/modules 2>/dev/null; then
  for i in $(seq 1 120); do
    [ -n "$(ls /sys/class/net | grep -v '^lo$')" ] && break
    sleep 0.25
  done
fi
echo "=====EMULAB-BEGIN====="
sh /emulab/script.sh 2>&1
rc=$?
echo "=====EMULAB-END rc=$rc====="
sync
poweroff -f
