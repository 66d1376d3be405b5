// Package iosched is the node's I/O scheduler: every volume I/O on a node is a
// request {volume, op, bytes, class, deadline} that passes through it.
//
// It keeps per-volume token buckets for IOPS and bytes/s, lets volumes under
// their reserved minimum go ahead of volumes spending spare capacity, and among
// eligible requests dispatches the earliest deadline first to a fixed depth.
//
// iosched knows nothing of CSI or Raft and imports the standard library only;
// replication and driver build on it.
package iosched
