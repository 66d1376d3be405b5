#!/usr/bin/env bash
# demo.sh: the main job of a new user. Starts a local 3-node Cairn cluster
# (three node agents on loopback addresses, and the CSI controller), creates
# a 3-replica volume through the CSI API, stages and publishes it on node-1
# as ext4, writes files, kills node-2 and shows the volume still serving and
# degraded, restarts node-2 and shows the rebuild until healthy, checks the
# files, kills and restarts node-1's agent, which serves the mounted volume
# (its fuse holder keeps the volume serving meanwhile), checks the replicas,
# shows a leader failover of the volume store, and cleans up.
# DEMO_KEEP=1 leaves the cluster running. Run through `make demo` (which
# installs what it needs and builds bin/cairn). Needs root (FUSE, loop, mount).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CAIRN=bin/cairn
DIR=.demo
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
field() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }

if [[ $(id -u) != 0 ]]; then
	echo "make demo needs root: it mounts a file system on a loop device backed by FUSE" >&2
	exit 1
fi
if [[ -f "$DIR/cluster.json" ]]; then
	say "Removing the previous demo cluster in $DIR"
	"$CAIRN" dev down --dir "$DIR"
fi
cleanup() {
	if [[ "${DEMO_KEEP:-0}" != 1 && -f "$DIR/cluster.json" ]]; then
		say "Cleaning up: unmounting, stopping every process and removing $DIR"
		"$CAIRN" dev down --dir "$DIR"
		left=$( (grep -c "$PWD/$DIR" /proc/self/mountinfo || true) )
		loops=$( (grep -l "$PWD/$DIR" /sys/block/loop*/loop/backing_file 2>/dev/null || true) | wc -l)
		echo "left behind: $left mounts, $loops loop devices, $(pgrep -fc "$PWD/$DIR" || true) processes"
		# dev down leaves the files it did not make (the demo's kubelet
		# directories, the files' checksums): remove them too, unless
		# something is still mounted there.
		if [[ $left == 0 ]]; then
			rm -rf "$DIR"
		fi
	fi
}
trap cleanup EXIT

say "Starting a 3-node cluster (three 'cairn node' processes, one per zone, and the CSI controller) in $DIR, with mutual TLS on every port"
"$CAIRN" dev up --nodes 3 --dir "$DIR" --zones --tls
# Every port speaks mutual TLS; ctl presents the certificate dev up issued it.
export CAIRN_TLS_DIR="$PWD/$DIR/pki/ctl"
SERVERS=$(field '",".join(n["agent"] for n in d["nodes"])' <"$DIR/cluster.json")
ctl() { "$CAIRN" ctl --server "$SERVERS" "$@"; }
csi() { "$CAIRN" dev csi --dir "$DIR" "$@"; }
ctl status
ctl cert status
echo "without a certificate the store refuses ctl:"
"$CAIRN" ctl --server "$SERVERS" --tls-dir "" --timeout 2s status 2>&1 | sed 's/^/  /' || true

say "CSI CreateVolume: 256 MiB, StorageClass parameter replicas=3 (one replica per zone)"
VOL=$(csi create demo-data --size 256Mi --param replicas=3 --param csi.storage.k8s.io/fstype=ext4)
ctl volume get "$VOL"

say "CSI ControllerPublish + NodeStage + NodePublish on node-1: engine, FUSE file, loop device, mkfs.ext4, mount"
MNT=$(csi publish "$VOL" --node node-1)
findmnt -no SOURCE,FSTYPE,TARGET "$MNT" || true
df -h "$MNT" | tail -1

say "Writing 20 files through ext4"
for i in $(seq -w 1 20); do
	head -c $((1 + RANDOM % 4))M /dev/urandom >"$MNT/file-$i"
done
sync -f "$MNT"
(cd "$MNT" && sha256sum file-* >"$OLDPWD/$DIR/manifest")
echo "20 files, $(du -sh "$MNT" | cut -f1) written and synced"

say "Killing node-2 (it holds a replica) with SIGKILL; the volume keeps serving"
"$CAIRN" dev kill --dir "$DIR" node-2
for i in $(seq -w 21 30); do
	head -c 2M /dev/urandom >"$MNT/file-$i"
done
sync -f "$MNT"
(cd "$MNT" && sha256sum file-* >"$OLDPWD/$DIR/manifest")
echo "10 more files written and synced with node-2 down; the volume is degraded:"
ctl volume get "$VOL" | sed -n '/^replicas:/,$p'

say "Restarting node-2: its replica rebuilds (only the extents that changed are copied)"
"$CAIRN" dev start --dir "$DIR" node-2
for _ in $(seq 1 900); do
	line=$(ctl volume get "$VOL" -o json | field '"{} {} {} {} {}".format(sum(r["state"]=="healthy" for r in d["replicas"]), (d.get("rebuild") or {}).get("bytes_compared",0), (d.get("rebuild") or {}).get("bytes_total",1), (d.get("rebuild") or {}).get("bytes_copied",0), (d.get("rebuild") or {}).get("done",False))')
	read -r healthy compared total copied done <<<"$line"
	pct=$((compared * 100 / total))
	bar=$(printf '%*s' $((pct * 30 / 100)) '' | tr ' ' '#')
	printf '\r  rebuild [%-30s] %3d%%  copied %3d MiB  healthy replicas %d/3 ' "$bar" "$pct" $((copied >> 20)) "$healthy"
	if [[ "$healthy" == 3 && "$done" == True ]]; then break; fi
	sleep 0.2
done
echo
ctl volume get "$VOL"

say "Checking every file against its checksum"
(cd "$MNT" && sha256sum --quiet -c "$OLDPWD/$DIR/manifest") && echo "all 30 files intact"

say "Killing node-1's agent with SIGKILL while a write is synced: it serves the mounted volume"
echo "its cairn fuse-holder keeps the FUSE connection, so the file system waits instead of failing"
head -c 2M /dev/urandom >"$MNT/file-31"
start=$(date +%s%N)
sync -f "$MNT" &
syncer=$!
"$CAIRN" dev kill --dir "$DIR" node-1
sleep 1
say "Restarting node-1's agent: it takes the FUSE connection back and the sync completes"
"$CAIRN" dev start --dir "$DIR" node-1
wait "$syncer"
echo "the sync returned after $((($(date +%s%N) - start) / 1000000)) ms, without an error"
echo "mount options: $(findmnt -no OPTIONS "$MNT" | cut -d, -f1) (not read-only)"
head -c 2M /dev/urandom >"$MNT/file-32"
sync -f "$MNT"
(cd "$MNT" && sha256sum file-* >"$OLDPWD/$DIR/manifest")
(cd "$MNT" && sha256sum --quiet -c "$OLDPWD/$DIR/manifest") && echo "all 32 files readable and intact; a new file was written after the restart"
grep -h '"volumes taken over from the earlier agent"' "$DIR/node-1/node.log" | tail -1 | field '"node-1 log: took over {} in {:.0f} ms".format(d["volumes"], d["took"]*1000)'

say "Unpublishing (flush, unmount, detach, stop the engine) and comparing the three replicas extent by extent"
csi unpublish "$VOL" --node node-1
ctl volume verify "$VOL"

LEADER=$(ctl status -o json | field 'd["leader"]')
say "Killing the volume store's leader ($LEADER); the other two elect a new one"
"$CAIRN" dev kill --dir "$DIR" "$LEADER"
start=$(date +%s%N)
until NEW=$(ctl --timeout 2s status -o json 2>/dev/null | field 'd["leader"]') && [[ -n "$NEW" && "$NEW" != "$LEADER" ]]; do
	sleep 0.1
done
echo "new leader: $NEW after $((($(date +%s%N) - start) / 1000000)) ms"
"$CAIRN" dev start --dir "$DIR" "$LEADER"

say "The data is still there: publishing on node-3 and checking the files again"
MNT=$(csi publish "$VOL" --node node-3)
(cd "$MNT" && sha256sum --quiet -c "$OLDPWD/$DIR/manifest") && echo "all 32 files intact on node-3"
csi unpublish "$VOL" --node node-3
csi delete "$VOL"
echo "volume deleted"

if [[ "${DEMO_KEEP:-0}" == 1 ]]; then
	say "The demo cluster keeps running (DEMO_KEEP=1). Try:"
	cat <<MSG
  $CAIRN ctl --server $SERVERS status
  $CAIRN dev csi --dir $DIR --help
Stop it with: $CAIRN dev down --dir $DIR   (or: make clean)
MSG
fi
