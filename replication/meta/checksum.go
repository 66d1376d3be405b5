package meta

// Checksummed reports whether the volume keeps block checksums. An unknown
// checksumAlgorithm counts as none; it cannot reach the store, since
// creation refuses it. A bad value of another key does not change the
// answer (Decode still reads this one).
func (v *Volume) Checksummed() bool {
	s, _ := v.Spec()
	return s.Checksummed()
}
