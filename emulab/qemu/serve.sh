# emulab live guest: the command loop on the guest's second serial port (ttyS1), run by /init as
# the guest's script (emulab.qemu.live). A request is a line "ID TIMEOUT BASE64(command)"; the
# command runs under sh with stdin from /dev/null, killed (SIGKILL) after TIMEOUT seconds; the
# reply is framed: "@@EMULAB-REPLY ID STATUS@@", its output in base64, "@@EMULAB-END ID@@"
# (emulab/qemu/channel.py parses it). "ID 0 ." ends the loop, and /init powers the guest off.
PORT=${1:-/dev/ttyS1}
D=${2:-$(mktemp -d /tmp/emulab-live.XXXXXX)}  # where a command and its output are kept
exec 3<>"$PORT"
stty raw -echo <&3
echo "@@EMULAB-READY@@" >&3
echo "@@EMULAB-READY@@"
while read -r id t body <&3; do
  [ "$body" = "." ] && break
  printf '%s' "$body" | base64 -d > "$D/cmd.sh"
  timeout -s KILL "$t" sh "$D/cmd.sh" > "$D/out" 2>&1 < /dev/null
  rc=$?
  { printf '@@EMULAB-REPLY %s %s@@\n' "$id" "$rc"; base64 < "$D/out"
    printf '\n@@EMULAB-END %s@@\n' "$id"; } >&3
done
echo "emulab-live: command loop ended"
