package meta

import "github.com/cairn-csi/cairn/replication/volspec"

// Checksum algorithms (the checksumAlgorithm parameter; docs/integrity.md).
const (
	ChecksumCRC32C = volspec.ChecksumCRC32C
	ChecksumNone   = volspec.ChecksumNone
)

// Checksummed reports whether the volume keeps block checksums. An unknown
// checksumAlgorithm counts as none; it cannot reach the store, since
// creation refuses it. A bad value of another key does not change the
// answer (Decode still reads this one).
func (v *Volume) Checksummed() bool {
	s, _ := v.Spec()
	return s.Checksummed()
}
