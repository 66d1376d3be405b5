#!/usr/bin/env bash
# demo.sh: the main job of a new user. Starts a local 3-node Cairn cluster on
# 127.0.0.1, creates a 3-replica volume, serves it over NBD, writes data,
# kills a replica's node while writing, watches the replica rebuild when the
# node returns, checks the data and the replicas, shows a leader failover of
# the volume store, and cleans up. DEMO_KEEP=1 leaves the cluster running.
# Run through `make demo` (which installs what it needs and builds bin/cairn).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CAIRN=bin/cairn
DIR=.demo
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
field() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }

if [[ -f "$DIR/cluster.json" ]]; then
	say "Removing the previous demo cluster in $DIR"
	"$CAIRN" dev down --dir "$DIR"
fi
cleanup() {
	if [[ "${DEMO_KEEP:-0}" != 1 && -f "$DIR/cluster.json" ]]; then
		say "Cleaning up: stopping every node and removing $DIR"
		"$CAIRN" dev down --dir "$DIR"
	fi
}
trap cleanup EXIT

say "Starting a 3-node cluster (three 'cairn node' processes, one per zone) in $DIR"
"$CAIRN" dev up --nodes 3 --dir "$DIR" --zones
SERVERS=$(field '",".join(n["agent"] for n in d["nodes"])' <"$DIR/cluster.json")
ctl() { "$CAIRN" ctl --server "$SERVERS" "$@"; }
ctl status

say "Creating a 256 MiB volume with 3 replicas (one per zone) and a write quorum of 2"
VOL=$(ctl volume create demo-data --size 256Mi --replicas 3 -o json | field 'd["id"]')
ctl volume get "$VOL"

SOCK="$PWD/$DIR/demo-data.sock"
URI="nbd+unix:///?socket=$SOCK"
say "Exporting it on node-1 over NBD ($SOCK)"
ctl volume export "$VOL" --node node-1 --nbd "$SOCK"
nbdinfo "$URI" | sed -n '1,4p'

say "Writing 256 MiB of random data through NBD"
head -c 256M /dev/urandom >"$DIR/data-1"
nbdcopy "$DIR/data-1" "$URI"
cp "$DIR/data-1" "$DIR/expected"
echo "written: $(sha256sum <"$DIR/data-1" | cut -c1-16)…"

VICTIM=node-3
say "Killing $VICTIM (it holds a replica) with SIGKILL, then writing 32 MiB more"
"$CAIRN" dev kill --dir "$DIR" "$VICTIM"
head -c 32M /dev/urandom >"$DIR/data-2"
nbdcopy "$DIR/data-2" "$URI"
dd if="$DIR/data-2" of="$DIR/expected" conv=notrunc status=none
echo "the writes were acknowledged by the two live replicas; $VICTIM's replica was ejected first:"
ctl volume get "$VOL" | sed -n '/^replicas:/,$p'

say "Restarting $VICTIM: its replica comes back stale and rebuilds, copying only what changed"
"$CAIRN" dev start --dir "$DIR" "$VICTIM"
for _ in $(seq 1 600); do
	json=$(ctl volume get "$VOL" -o json)
	line=$(field '"{} {} {} {} {}".format(sum(r["state"]=="healthy" for r in d["replicas"]), (d.get("rebuild") or {}).get("bytes_compared",0), (d.get("rebuild") or {}).get("bytes_total",1), (d.get("rebuild") or {}).get("bytes_copied",0), (d.get("rebuild") or {}).get("done",False))' <<<"$json")
	read -r healthy compared total copied done <<<"$line"
	pct=$((compared * 100 / total))
	bar=$(printf '%*s' $((pct * 30 / 100)) '' | tr ' ' '#')
	printf '\r  rebuild [%-30s] %3d%%  copied %d MiB  healthy replicas %d/3 ' "$bar" "$pct" $((copied >> 20)) "$healthy"
	if [[ "$healthy" == 3 && "$done" == True ]]; then break; fi
	sleep 0.2
done
echo
ctl volume get "$VOL"

say "Reading the volume back through NBD and comparing with what was written"
nbdcopy "$URI" "$DIR/read-back"
if cmp -s "$DIR/read-back" "$DIR/expected"; then
	echo "identical: $(sha256sum <"$DIR/read-back" | cut -c1-16)…"
else
	echo "MISMATCH between what was written and what was read" >&2
	exit 1
fi
say "Comparing the three replicas extent by extent"
ctl volume verify "$VOL"

LEADER=$(ctl status -o json | field 'd["leader"]')
say "Killing the volume store's leader ($LEADER); the other two elect a new one"
"$CAIRN" dev kill --dir "$DIR" "$LEADER"
start=$(date +%s%N)
until NEW=$(ctl --timeout 2s status -o json 2>/dev/null | field 'd["leader"]') && [[ -n "$NEW" && "$NEW" != "$LEADER" ]]; do
	sleep 0.1
done
echo "new leader: $NEW after $((($(date +%s%N) - start) / 1000000)) ms"
ctl volume create demo-logs --size 64Mi --replicas 2 >/dev/null && echo "the store still takes writes: created demo-logs"
"$CAIRN" dev start --dir "$DIR" "$LEADER"
ctl status
ctl volume list

rm -f "$DIR/data-1" "$DIR/data-2" "$DIR/expected" "$DIR/read-back"
if [[ "${DEMO_KEEP:-0}" == 1 ]]; then
	say "The demo cluster keeps running (DEMO_KEEP=1). Try:"
	cat <<MSG
  $CAIRN ctl --server $SERVERS status
  $CAIRN ctl --server $SERVERS volume get $VOL
  nbdinfo '$URI'
Stop it with: $CAIRN dev down --dir $DIR   (or: make clean)
MSG
fi
