package meta

import (
	"context"
	"fmt"

	"github.com/cairn-csi/cairn/replication/crypt"
	"github.com/cairn-csi/cairn/replication/volspec"
)

// Encryption at rest (docs/encryption.md). The store keeps two things of
// it: each encrypted volume's data key, wrapped by its passphrase
// (Volume.Encryption; never a plaintext key), and the cluster's count of
// nonce leases (State.NonceLeases), from which every engine that writes an
// encrypted volume takes a lease of its own (LeaseNonces, 31). An
// encrypted volume is made by AdmitVolume or RestoreVolume, which the gate
// holds as if they were of type 31 (gate.go), so every member that applies
// one keeps its key.

// LeaseNonces hands out the next nonce lease: a number no engine in the
// cluster ever had before. VolumeID names the volume it is for (logs only;
// leases are cluster-wide, so that clones, which share their source's data
// key, never share a nonce with it).
type LeaseNonces struct {
	VolumeID string `json:"volume_id"`
}

func (LeaseNonces) Type() CommandType { return CmdLeaseNonces }

func applyLeaseNonces(s *State, c *LeaseNonces) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	if v.Encryption == nil {
		return Result{}, fmt.Errorf("volume %s is not encrypted: %w", v.ID, ErrInvalidArgument)
	}
	if s.NonceLeases >= crypt.MaxLease {
		return Result{}, fmt.Errorf("nonce leases used up (%d): %w", s.NonceLeases, ErrFailedPrecondition)
	}
	s.NonceLeases++
	return Result{Lease: s.NonceLeases}, nil
}

// LeaseNonces asks the store for a nonce lease for volume id.
func (c *Client) LeaseNonces(ctx context.Context, id string) (uint64, error) {
	res, err := c.Apply(ctx, &LeaseNonces{VolumeID: id})
	if err != nil {
		return 0, err
	}
	return res.Lease, nil
}

// checkEncryption: a volume of encryption aes-256-gcm comes with its
// wrapped key, and only such a volume does.
func checkEncryption(c *CreateVolume, spec volspec.Spec) error {
	switch {
	case spec.Encrypted() && c.Encryption == nil:
		return fmt.Errorf("volume %q: encryption %s without a wrapped data key: %w", c.Name, spec.Encryption, ErrInvalidArgument)
	case !spec.Encrypted() && c.Encryption != nil:
		return fmt.Errorf("volume %q: a wrapped data key, but encryption is not %s: %w", c.Name, volspec.EncryptionAESGCM, ErrInvalidArgument)
	case spec.Encrypted() && c.SizeBytes%crypt.BlockSize != 0:
		return fmt.Errorf("volume %q: size %d of an encrypted volume is not a multiple of its %d-byte blocks: %w", c.Name, c.SizeBytes, crypt.BlockSize, ErrInvalidArgument)
	case spec.Encrypted() && spec.Compression != "":
		// volspec.Parse refuses it; the store checks the stored form too.
		return fmt.Errorf("volume %q: compression %s cannot go with encryption %s (encrypted blocks do not compress): %w",
			c.Name, spec.Compression, spec.Encryption, ErrInvalidArgument)
	}
	return nil
}

// Encrypted reports whether the volume's blocks are encrypted at rest.
func (v *Volume) Encrypted() bool { return v.Encryption != nil }

// encryptedParam reports whether the volume's parameters ask for
// encryption.
func (v *Volume) encryptedParam() bool {
	s, err := v.Spec()
	return err == nil && s.Encrypted()
}

// ReplicaBytes is the size of the volume's replicas: SizeBytes, or for an
// encrypted volume that much data and the blocks' metadata beside it
// (crypt.PhysicalSize).
func (v *Volume) ReplicaBytes() uint64 { return replicaBytes(v.SizeBytes, v.Encrypted()) }

func replicaBytes(size uint64, encrypted bool) uint64 {
	if encrypted {
		return crypt.PhysicalSize(size)
	}
	return size
}
