package sched

import (
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// DefaultPlan stores, per layer, whichever of hidden state and KV is smaller:
// hidden for MHA models (half the bytes), KV for GQA models.
func DefaultPlan(c *model.Config) []state.LayerPlan {
	if c.HiddenRowBytes() <= c.KVRowBytes() {
		return PlanOf(c, state.LayerHidden)
	}
	return PlanOf(c, state.LayerKV)
}

// PlanOf builds a plan of one kind for every layer.
func PlanOf(c *model.Config, kind state.LayerKind) []state.LayerPlan {
	p := make([]state.LayerPlan, c.Layers)
	for l := range p {
		p[l] = LayerPlanOf(c, kind)
	}
	return p
}

// LayerPlanOf is one layer's plan entry of a kind (row bytes from the model).
func LayerPlanOf(c *model.Config, kind state.LayerKind) state.LayerPlan {
	switch kind {
	case state.LayerHidden:
		return state.LayerPlan{Kind: kind, RowBytes: uint32(c.HiddenRowBytes())}
	case state.LayerKV:
		return state.LayerPlan{Kind: kind, RowBytes: uint32(c.KVRowBytes())}
	}
	return state.LayerPlan{Kind: state.LayerNone}
}

// PlanOfCodec builds a plan of one kind for every layer, rows encoded by cd
// (row bytes are the encoded sizes; codec none gives PlanOf's plan).
func PlanOfCodec(c *model.Config, kind state.LayerKind, cd state.Codec) []state.LayerPlan {
	p := make([]state.LayerPlan, c.Layers)
	for l := range p {
		p[l] = LayerPlanOfCodec(c, kind, cd)
	}
	return p
}

// LayerPlanOfCodec is one layer's plan entry of a kind, rows encoded by cd.
func LayerPlanOfCodec(c *model.Config, kind state.LayerKind, cd state.Codec) state.LayerPlan {
	switch kind {
	case state.LayerHidden:
		return state.LayerPlan{Kind: kind, RowBytes: uint32(codec.HiddenRowBytes(cd, c.DType, c.HiddenSize))}
	case state.LayerKV:
		return state.LayerPlan{Kind: kind, RowBytes: uint32(kvRowBytesCodec(c, cd))}
	}
	return state.LayerPlan{Kind: state.LayerNone}
}

// kvRowBytesCodec is a stored KV row under cd: K and V segments of kv_dim
// values, or for MLA the latent and the rotary key (two segments; one
// under int8, mlaInt8Row).
func kvRowBytesCodec(c *model.Config, cd state.Codec) int {
	if m := c.MLA; m != nil {
		if cd == state.CodecInt8Channel {
			segs, n := mlaInt8Row(m)
			return codec.RowBytes(cd, c.DType, segs, n)
		}
		return codec.AlignRow(cd, codec.SegmentBytes(cd, c.DType, m.KVLoraRank)+codec.SegmentBytes(cd, c.DType, m.QKRopeDim))
	}
	return codec.KVRowBytes(cd, c.DType, c.KVDim())
}

// mlaInt8Row is how an MLA model's KV row (its latent, then its rotary key)
// is encoded under int8, as codec.EncodeRows takes rows: segs segments of n
// values. An int8 row is encoded whole (its scale area follows all its
// codes: a bf16 scale per channel per aligned 64-token group, spread over
// the group's rows; int8.go) and its segments must be equal, which the
// latent (512) and the rotary key (64) are not, so it is one segment of
// latent + rope values: a group row scales every channel on its own anyway;
// a token row has one scale over both. (Under fp8 the two are segments of
// their own, each with its scales.) No MLA forward pass saves rows yet: this
// is the layout the plan's row size is computed from.
func mlaInt8Row(m *model.MLA) (segs, n int) {
	return 1, m.KVLoraRank + m.QKRopeDim
}
