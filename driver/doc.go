// Package driver is Cairn's CSI plugin: the Identity, Controller and Node
// servers, mounting and formatting, and the frontends (FUSE + loop, NBD) that
// expose a volume's engine as a block device on the node. driver/agent
// assembles a node agent from these and the replication components.
//
// It speaks CSI and nothing else: the volume store, the replicas and the write
// path live in replication, and every volume I/O goes through iosched. driver
// may import replication and iosched, never cmd or tests. Errors from the
// packages below are turned into CSI status codes in one place here.
package driver
