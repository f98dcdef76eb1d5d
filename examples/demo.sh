#!/usr/bin/env bash
# Publish a busybox container's port 80 on the host with oci-portfwd-hook and crun: no daemon,
# just the hook registered in config.json. Run as root after `make venv` (or `make demo`).
#   DEMO_PORT=18080 bash examples/demo.sh
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
HOOK=$REPO/.venv/bin/oci-portfwd-hook
PORT=${DEMO_PORT:-18080}
ID=portfwd-demo-$$
CONTROLLERS=/sys/fs/cgroup/unified/cgroup.controllers

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (rootful crun)"
[ -x "$HOOK" ] || die "$HOOK is missing: run 'make venv'"
for tool in crun busybox curl ss nsenter unshare; do
    command -v "$tool" >/dev/null || die "$tool is missing: run 'make deps'"
done
if ss -Hltn "sport = :$PORT" | grep -q . || ss -Hlun "sport = :$PORT" | grep -q .; then
    die "port $PORT is in use on the host; pick another with DEMO_PORT=..."
fi

WORK=$(mktemp -d /tmp/oci-portfwd-demo.XXXXXX)
STARTED=
cleanup() {
    status=$?
    if [ -n "$STARTED" ]; then
        crun kill "$ID" KILL 2>/dev/null || true
        crun delete -f "$ID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    [ "$status" = 0 ] || echo "demo: FAILED (exit $status)" >&2
}
trap cleanup EXIT

# crun refuses hybrid cgroup hosts whose cgroup v2 hierarchy has controllers; mask that file
# in a private mount namespace for crun only (the host's mounts stay as they are).
crun_run() {
    # (test -s does not work here: cgroupfs files report size 0)
    if [ -n "$(cat "$CONTROLLERS" 2>/dev/null)" ]; then
        unshare -m --propagation slave sh -c \
            "mount --bind /dev/null $CONTROLLERS && exec crun \"\$@\"" crun "$@"
    else
        crun "$@"
    fi
}

say "Building a busybox bundle in $WORK"
B=$WORK/bundle
mkdir -p "$B"/rootfs/{bin,proc,sys,dev,tmp,etc,www}
cp "$(command -v busybox)" "$B/rootfs/bin/busybox"
chroot "$B/rootfs" /bin/busybox --install -s /bin
echo "hello from a container, through oci-portfwd-hook" >"$B/rootfs/www/index.html"

say "Writing the hook's config (its own state dir, so the demo touches nothing else)"
cat >"$WORK/oci-portfwd.json" <<EOF
{"state_dir": "$WORK/state", "log_level": "info"}
EOF
cat "$WORK/oci-portfwd.json"

PORTS="127.0.0.1:$PORT:80,[::1]:$PORT:80,$PORT:80/udp"
say "Writing config.json: httpd on port 80, annotation io.oci-portfwd.ports=$PORTS"
(cd "$B" && crun spec)
/usr/bin/python3 - "$B/config.json" "$HOOK" "$WORK/oci-portfwd.json" "$PORTS" <<'EOF'
import json, sys
path, hook, hook_config, ports = sys.argv[1:]
config = json.load(open(path))
config["process"]["terminal"] = False
config["process"]["args"] = ["httpd", "-f", "-p", "80", "-h", "/www"]
config.setdefault("annotations", {})["io.oci-portfwd.ports"] = ports
env = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", f"OCI_PORTFWD_CONFIG={hook_config}"]
config["hooks"] = {stage: [{"path": hook, "args": ["oci-portfwd-hook", stage], "env": env,
                            "timeout": 30}] for stage in ("prestart", "poststop")}
json.dump(config, open(path, "w"), indent=2)
print(json.dumps({"annotations": config["annotations"], "hooks": config["hooks"]}, indent=2))
EOF

say "Starting the container: crun run -d $ID"
crun_run run -d --bundle "$B" --pid-file "$WORK/pid" "$ID" </dev/null >"$WORK/container.log" 2>&1 \
    || { cat "$WORK/container.log"; cat "$WORK/state/$ID.log" 2>/dev/null; die "crun run failed"; }
STARTED=1
PID=$(cat "$WORK/pid")
echo "container init pid $PID"

say "Waiting until httpd listens inside the container's network namespace"
for _ in $(seq 50); do
    nsenter --net="/proc/$PID/ns/net" ss -Hltn 'sport = :80' | grep -q . && break
    sleep 0.1
done
nsenter --net="/proc/$PID/ns/net" ss -ltn 'sport = :80'

say "The host listens on the published ports (no daemon: the hook's supervisor holds them)"
ss -ltnp "sport = :$PORT"
ss -lunp "sport = :$PORT"
echo "state file $WORK/state/$ID.json:"
cat "$WORK/state/$ID.json"; echo

say "curl http://127.0.0.1:$PORT/"
curl -sS --noproxy '*' --max-time 5 "http://127.0.0.1:$PORT/"

say "curl -g http://[::1]:$PORT/"
curl -g -sS --noproxy '*' --max-time 5 "http://[::1]:$PORT/"

say "The hook's log for this container"
cat "$WORK/state/$ID.log" 2>/dev/null || true

say "Stopping and deleting the container (crun runs the poststop hook at delete)"
crun kill "$ID" KILL
crun delete -f "$ID"
STARTED=

say "The port is free again"
if ss -Hltn "sport = :$PORT" | grep -q . || ss -Hlun "sport = :$PORT" | grep -q .; then
    ss -ltnup "sport = :$PORT"
    die "port $PORT is still bound after delete"
fi
ss -ltnu "sport = :$PORT"
echo "nothing listens on $PORT any more; state dir after poststop:"
ls -la "$WORK/state"

say "Demo done"
