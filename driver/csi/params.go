package csi

// StorageClass parameters are volspec's: it owns their keys, units, defaults
// and validation (replication/volspec/doc.go).
