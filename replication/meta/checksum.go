package meta

import "fmt"

// ParamChecksumAlgorithm is the volume parameter (StorageClass key) that
// chooses end-to-end block checksums (docs/integrity.md).
const ParamChecksumAlgorithm = "checksumAlgorithm"

// Checksum algorithms.
const (
	// ChecksumCRC32C keeps a CRC32C per 4 KiB block on every replica and
	// checks it on the wire and on every read. The default.
	ChecksumCRC32C = "crc32c"
	// ChecksumNone keeps no block checksums.
	ChecksumNone = "none"
)

// ChecksumAlgorithm returns the checksum algorithm volume parameters ask
// for: ChecksumCRC32C when the key is absent or empty; an unknown value →
// ErrInvalidArgument naming the key and the value.
func ChecksumAlgorithm(p map[string]string) (string, error) {
	switch v := p[ParamChecksumAlgorithm]; v {
	case "", ChecksumCRC32C:
		return ChecksumCRC32C, nil
	case ChecksumNone:
		return ChecksumNone, nil
	default:
		return "", fmt.Errorf("parameter %q: unknown value %q (want %q or %q): %w",
			ParamChecksumAlgorithm, v, ChecksumCRC32C, ChecksumNone, ErrInvalidArgument)
	}
}

// Checksummed reports whether the volume keeps block checksums. An unknown
// value counts as none; it cannot reach the store, since creation refuses
// it.
func (v *Volume) Checksummed() bool {
	a, err := ChecksumAlgorithm(v.Parameters)
	return err == nil && a == ChecksumCRC32C
}
