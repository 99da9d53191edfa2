// Package state says what a stored state is, with no I/O: the per-layer plan
// (LayerKind, LayerPlan and each layer's row size), the Identity a state must
// match before it is served (model fingerprint, plan and the rows' codec:
// version 1 encodings have no codec, version 2 carries one), its binary encoding,
// the Binding that ties stored bytes to one context, the chain keys that
// address state by its tokens (chain.go), and the rules for
// namespace and context id names.
//
// It is the leaf every side shares: the storage engine (chunk, lsm) stores and
// checks these values, planning (serve/sched) builds plans, and the daemon and
// its clients carry them on the wire. It imports only the standard library, so
// planning and the clients can use it without linking the engine (Pebble,
// io_uring); internal/importrules_test.go enforces that.
package state
