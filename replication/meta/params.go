package meta

import "github.com/cairn-csi/cairn/replication/volspec"

// Spec reads the volume's parameters (in volspec's stored form) and its
// typed replica count and write quorum into one typed spec. An error means
// the stored parameters do not decode, which the store's own validation
// (applyCreateVolume, applySetParameters) keeps from happening to any
// volume created since it validates them.
func (v *Volume) Spec() (volspec.Spec, error) {
	s, err := volspec.Decode(v.Parameters)
	s.Replicas, s.WriteQuorum = v.ReplicaCount, v.WriteQuorum
	return s, err
}
