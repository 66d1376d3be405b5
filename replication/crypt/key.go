package crypt

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"

	"golang.org/x/crypto/scrypt"
)

// Cipher is the one value of the StorageClass parameter encryption that
// encrypts.
const Cipher = "aes-256-gcm"

// SecretKey is the key of the Kubernetes Secret (the CSI secrets of
// CreateVolume and NodeStageVolume) that holds the passphrase; ceph-csi
// uses the same name.
const SecretKey = "encryptionPassphrase"

// ErrWrongKey: the passphrase does not unwrap the volume's data key.
var ErrWrongKey = errors.New("the passphrase does not unwrap the volume's data key")

// scrypt's cost: N = 2^15, r = 8, p = 1 (32 MiB and 65 ms of a core of the
// development VM a derivation, once per CreateVolume and NodeStage;
// BenchmarkUnwrap).
const (
	scryptN = 1 << 15
	scryptR = 8
	scryptP = 1
	kdfName = "scrypt"
)

// wrapAAD binds a wrapped key to its purpose and cipher.
var wrapAAD = []byte("cairn volume data key " + Cipher)

// WrappedKey is a volume's data key sealed by a key-encryption key (KEK)
// derived from a passphrase. It is what the volume's record in the store
// keeps: nothing in it gives the data key without the passphrase.
type WrappedKey struct {
	Cipher string `json:"cipher"`
	// KeyID names the KEK (a hash of it): two volumes with the same KeyID
	// were wrapped with the same passphrase and salt.
	KeyID string `json:"key_id"`
	KDF   string `json:"kdf"`
	N     int    `json:"n"`
	R     int    `json:"r"`
	P     int    `json:"p"`
	Salt  []byte `json:"salt"`
	Nonce []byte `json:"nonce"`
	// Sealed is the 32-byte data key sealed with AES-256-GCM under the KEK
	// (48 bytes with its tag).
	Sealed []byte `json:"sealed"`
}

// NewDataKey makes a random data key for a new volume and wraps it with
// passphrase. It returns the wrapped key and the data key.
func NewDataKey(passphrase []byte) (*WrappedKey, []byte, error) {
	if len(passphrase) == 0 {
		return nil, nil, errors.New("empty passphrase")
	}
	dataKey := make([]byte, 32)
	w := &WrappedKey{Cipher: Cipher, KDF: kdfName, N: scryptN, R: scryptR, P: scryptP, Salt: make([]byte, 16), Nonce: make([]byte, 12)}
	for _, b := range [][]byte{dataKey, w.Salt, w.Nonce} {
		if _, err := rand.Read(b); err != nil {
			return nil, nil, err
		}
	}
	kek, err := w.kek(passphrase)
	if err != nil {
		return nil, nil, err
	}
	aead, err := gcm(kek)
	if err != nil {
		return nil, nil, err
	}
	w.KeyID = keyID(kek)
	w.Sealed = aead.Seal(nil, w.Nonce, dataKey, wrapAAD)
	return w, dataKey, nil
}

// Unwrap returns the data key, or ErrWrongKey.
func (w *WrappedKey) Unwrap(passphrase []byte) ([]byte, error) {
	if w.Cipher != Cipher || w.KDF != kdfName {
		return nil, fmt.Errorf("wrapped key of cipher %q, KDF %q: this build knows %q with %q", w.Cipher, w.KDF, Cipher, kdfName)
	}
	if len(passphrase) == 0 {
		return nil, fmt.Errorf("empty passphrase: %w", ErrWrongKey)
	}
	kek, err := w.kek(passphrase)
	if err != nil {
		return nil, err
	}
	if keyID(kek) != w.KeyID {
		return nil, fmt.Errorf("key id %s, the volume's is %s: %w", keyID(kek), w.KeyID, ErrWrongKey)
	}
	aead, err := gcm(kek)
	if err != nil {
		return nil, err
	}
	dataKey, err := aead.Open(nil, w.Nonce, w.Sealed, wrapAAD)
	if err != nil || len(dataKey) != 32 {
		return nil, ErrWrongKey
	}
	return dataKey, nil
}

func (w *WrappedKey) kek(passphrase []byte) ([]byte, error) {
	// Bounded: a record with absurd parameters must not make a node
	// allocate without limit.
	if w.N < 2 || w.N > 1<<20 || w.R < 1 || w.R > 32 || w.P < 1 || w.P > 16 || len(w.Salt) < 16 {
		return nil, fmt.Errorf("wrapped key with scrypt N=%d r=%d p=%d salt %d bytes: out of bounds", w.N, w.R, w.P, len(w.Salt))
	}
	return scrypt.Key(passphrase, w.Salt, w.N, w.R, w.P, 32)
}

func gcm(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// keyID is a short, one-way name of a KEK.
func keyID(kek []byte) string {
	h := sha256.Sum256(append([]byte("cairn key id\x00"), kek...))
	return hex.EncodeToString(h[:8])
}

// Clone returns a deep copy of w (nil for nil).
func (w *WrappedKey) Clone() *WrappedKey {
	if w == nil {
		return nil
	}
	c := *w
	c.Salt, c.Nonce, c.Sealed = bytes.Clone(w.Salt), bytes.Clone(w.Nonce), bytes.Clone(w.Sealed)
	return &c
}
