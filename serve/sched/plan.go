package sched

import (
	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/state"
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
