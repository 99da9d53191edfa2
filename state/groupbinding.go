package state

import "crypto/sha256"

// NewGroupBinding is the binding of a group record, the shared record of
// one full group of a token chain: SHA-256("hcache group binding v1\x00" ||
// ns || 0x00 || key || encoded identity). It names no context and no
// generation: every context whose chain reaches key reads the same record,
// and a slice served for another group, namespace or identity fails its
// checksum (which starts from SliceSeed(binding, group, layer)).
func NewGroupBinding(ns string, id *Identity, key ChainKey) Binding {
	h := sha256.New()
	h.Write([]byte("hcache group binding v1\x00"))
	h.Write([]byte(ns))
	h.Write([]byte{0})
	h.Write(key[:])
	h.Write(id.Encode())
	var b Binding
	h.Sum(b[:0])
	return b
}
