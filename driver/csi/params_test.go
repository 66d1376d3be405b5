package csi

import (
	"errors"
	"strings"
	"testing"
)

func TestChecksumAlgorithmParam(t *testing.T) {
	p, err := ParseParams(nil)
	if err != nil || p.ChecksumAlgorithm != "crc32c" {
		t.Fatalf("default: %q, %v; want crc32c", p.ChecksumAlgorithm, err)
	}
	if _, ok := p.volumeParameters()[ParamChecksumAlgorithm]; ok {
		t.Fatal("the default is recorded in the volume's parameters; volumes made before the key existed would stop matching their CreateVolume retries")
	}
	p, err = ParseParams(map[string]string{ParamChecksumAlgorithm: "none"})
	if err != nil || p.ChecksumAlgorithm != "none" || p.volumeParameters()[ParamChecksumAlgorithm] != "none" {
		t.Fatalf("none: %+v, %v", p, err)
	}
	_, err = ParseParams(map[string]string{ParamChecksumAlgorithm: "sha256"})
	if !errors.Is(err, errInvalid) || !strings.Contains(err.Error(), "checksumAlgorithm") || !strings.Contains(err.Error(), "sha256") {
		t.Fatalf("unknown value: %v, want an invalid-argument error naming the key and the value", err)
	}
}
