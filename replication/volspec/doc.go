// Package volspec owns a volume's parameters: the keys a StorageClass, a
// VolumeAttributesClass or `cairn ctl volume create --param` may give, their
// units, defaults and validation, and the typed Spec they describe. A new
// StorageClass key is added here, in the table of spec.go, and nowhere else.
//
// Parameters have two forms.
//
// The request form is what a person writes: StorageClass parameters, a
// VolumeAttributesClass, ctl's flags and --param. Parse reads it. Sizes and
// rates take units (see ParseQuantity), staleReplicaTimeout takes a bare
// number of minutes, keys under csi.storage.k8s.io/ other than the fstype are
// ignored (the sidecars add them), and any other key Parse does not know is
// refused by name. Errors are *Error values naming the key and what would be
// accepted; they wrap ErrInvalid.
//
// The stored form is what the volume store records in Volume.Parameters, and
// so what its Raft log and snapshots hold: Spec.Params writes it, Decode reads
// it. It is canonical — plain numbers (maxBandwidth in bytes per second), Go
// durations ("10m0s"), zero limits left out, checksumAlgorithm only when it is
// not the default, dataLocality always — so that a CreateVolume retried with
// the same StorageClass records the same map, which is how the store knows the
// retry for the same volume (replication/meta apply.go, sameParameters). The
// replica count and write quorum are not in it: CreateVolume and Volume carry
// them in typed fields (meta's Volume.Spec puts them back).
//
// Decode is deliberately lenient where Parse is strict, and strict where the
// stored form is: it ignores keys it does not know, and reads an empty value
// as an absent key. The store validates with Decode when it applies a
// CreateVolume or SetParameters, and every member must decide the same for
// the same entry; a key added by a newer version must not make an older
// member refuse an entry that newer members apply (the state would diverge
// during a rolling upgrade). Unknown keys are refused at the edges instead, by
// Parse, before anything reaches the store. For the same reason Decode's
// syntax is that of the stored form, not the request form: an older member
// accepts only plain numbers and Go durations there.
package volspec
