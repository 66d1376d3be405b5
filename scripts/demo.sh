#!/usr/bin/env bash
# demo.sh: the main job of a new user. Starts a local 3-node Cairn cluster on
# 127.0.0.1, records a 3-replica volume in the Raft volume store, shows a
# leader failover, and leaves the cluster running for you to explore.
# Run through `make demo` (which builds bin/cairn first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CAIRN=bin/cairn
DIR=.demo
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

if [[ -f "$DIR/cluster.json" ]]; then
	say "Removing the previous demo cluster in $DIR"
	"$CAIRN" dev down --dir "$DIR"
fi

say "Starting a 3-node cluster (three 'cairn node' processes) in $DIR"
"$CAIRN" dev up --nodes 3 --dir "$DIR" --zones

SERVERS=$(python3 -c 'import json,sys; print(",".join(n["agent"] for n in json.load(open(sys.argv[1]))["nodes"]))' "$DIR/cluster.json" 2>/dev/null ||
	sed -n 's/.*"agent": "\(.*\)".*/\1/p' "$DIR/cluster.json" | paste -sd,)
ctl() { "$CAIRN" ctl --server "$SERVERS" "$@"; }

say "Cluster status: one leader, three voters, three nodes up"
ctl status

say "Creating a 1 GiB volume with 3 replicas; placement puts one replica in each zone"
VOL=$(ctl volume create demo-data --size 1Gi --replicas 3 -o json | sed -n 's/^  "id": "\(.*\)",$/\1/p')
ctl volume get "$VOL"

LEADER=$(ctl status -o json | sed -n 's/^  "leader": "\(.*\)",$/\1/p')
say "Killing the leader ($LEADER) with SIGKILL"
"$CAIRN" dev kill --dir "$DIR" "$LEADER"
start=$(date +%s%N)
until NEW=$(ctl --timeout 2s status -o json 2>/dev/null | sed -n 's/^  "leader": "\(.*\)",$/\1/p') && [[ -n "$NEW" && "$NEW" != "$LEADER" ]]; do
	sleep 0.1
done
echo "new leader: $NEW after $(( ($(date +%s%N) - start) / 1000000 )) ms"

say "Waiting for the leader to notice that $LEADER stopped sending heartbeats"
until ctl status -o json | grep -A1 "\"id\": \"$LEADER\"" | grep -q '"state": "down"'; do sleep 0.5; done
ctl status

say "The store still takes writes with two of three members; placement skips the down node"
ctl volume create demo-logs --size 256Mi --replicas 2

say "Restarting $LEADER from its data dir: it rejoins and catches up"
"$CAIRN" dev start --dir "$DIR" "$LEADER"
until ctl status -o json | grep -A1 "\"id\": \"$LEADER\"" | grep -q '"state": "up"'; do sleep 0.5; done
ctl status
ctl volume list

say "The demo cluster keeps running. Try:"
cat <<MSG
  $CAIRN ctl --server $SERVERS status
  $CAIRN ctl --server $SERVERS volume list
  $CAIRN dev kill --dir $DIR node-1 ; $CAIRN dev start --dir $DIR node-1
  metrics: curl -s http://\$(sed -n 's/.*"metrics": "\(.*\)".*/\1/p' $DIR/cluster.json | head -1)/metrics | grep cairn_
Stop it with: $CAIRN dev down --dir $DIR   (or: make clean)
MSG
