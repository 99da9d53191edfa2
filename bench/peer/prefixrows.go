package peer

// PrefixRows are the rows of one token list made the way a model's state
// depends on its tokens: the row of (layer, token t) is drawn from a 64-bit
// rolling hash of tokens [0, t], so two lists that share a prefix have the
// same rows over it and differ after it, whatever a store's group size.
type PrefixRows struct {
	src      *Source
	rowBytes int
	h        []uint64
}

// PrefixRows returns the rows of tokens.
func (s *Source) PrefixRows(tokens []uint32, rowBytes int) *PrefixRows {
	h := make([]uint64, len(tokens))
	x := uint64(0xcbf29ce484222325)
	for i, t := range tokens {
		x = (x ^ uint64(t)) * 0x100000001b3
		x ^= x >> 31
		h[i] = x
	}
	return &PrefixRows{src: s, rowBytes: rowBytes, h: h}
}

// Fill writes the rows of tokens [from, to) of one layer into dst.
func (p *PrefixRows) Fill(dst []byte, layer, from, to int) {
	for t := from; t < to; t++ {
		p.src.Row(dst[(t-from)*p.rowBytes:(t-from+1)*p.rowBytes], p.h[t], layer, t)
	}
}

// Rows is p as a Rows function (a fresh buffer per call; safe for
// concurrent calls).
func (p *PrefixRows) Rows(layer, from, to int) []byte {
	b := make([]byte, (to-from)*p.rowBytes)
	p.Fill(b, layer, from, to)
	return b
}
