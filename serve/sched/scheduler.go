package sched

import (
	"fmt"

	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/state"
)

// Decision is the scheduler's answer for one model and context length.
type Decision struct {
	Split       Split             `json:"split"`
	PredictedMS float64           `json:"predicted_ms"`
	Costs       Costs             `json:"costs"`
	Plan        []state.LayerPlan `json:"-"`
	// Codec is the rows' encoding (the identity's codec) and
	// BytesPerToken the stored bytes of one token over every layer.
	Codec         state.Codec `json:"-"`
	CodecName     string      `json:"codec"`
	BytesPerToken int         `json:"bytes_per_token"`
}

// Choose plans a context of model c expected to reach tokens tokens. The
// plan always stores at least one layer (the store refuses an empty plan).
func (pl *Platform) Choose(c *model.Config, tokens int) (Decision, error) {
	if tokens <= 0 {
		return Decision{}, fmt.Errorf("sched: expected context length %d must be positive", tokens)
	}
	cs, err := pl.Costs(c, tokens)
	if err != nil {
		return Decision{}, err
	}
	s, t := Optimise(Problem{Layers: c.Layers, Costs: []Costs{cs}, Hidden: HiddenAllowed(c), MaxRecompute: c.Layers - 1})
	d := Decision{Split: s, PredictedMS: t, Costs: cs, Plan: s.Plan(c), CodecName: state.CodecNone.String()}
	d.BytesPerToken = (&state.Identity{Plan: d.Plan}).TokenBytes()
	return d, nil
}

// ChooseCodec plans a context of model c among the codecs the caller allows
// (a lossy codec is opted into, never assumed): for each codec the best
// split of recompute, hidden and KV layers by the pipeline model, with the
// codec's stored bytes and decode cost; then the fastest, ties going to the
// fewer bytes. It returns the choice and every codec's best, in codecs'
// order.
func (pl *Platform) ChooseCodec(c *model.Config, tokens int, codecs []state.Codec) (Decision, []Decision, error) {
	if tokens <= 0 {
		return Decision{}, nil, fmt.Errorf("sched: expected context length %d must be positive", tokens)
	}
	if len(codecs) == 0 {
		codecs = []state.Codec{state.CodecNone}
	}
	var all []Decision
	best := -1
	for _, cd := range codecs {
		cs, err := pl.CostsCodec(c, tokens, cd)
		if err != nil {
			return Decision{}, nil, err
		}
		s, t := Optimise(Problem{Layers: c.Layers, Costs: []Costs{cs}, Hidden: HiddenAllowed(c), MaxRecompute: c.Layers - 1})
		d := Decision{Split: s, PredictedMS: t, Costs: cs, Plan: s.PlanCodec(c, cd), Codec: cd, CodecName: cd.String()}
		d.BytesPerToken = (&state.Identity{Plan: d.Plan}).TokenBytes()
		all = append(all, d)
		if best < 0 || t < all[best].PredictedMS || (t == all[best].PredictedMS && d.BytesPerToken < all[best].BytesPerToken) {
			best = len(all) - 1
		}
	}
	return all[best], all, nil
}

// ChooseFor plans for a distribution of context lengths: it minimises the
// mean predicted restore time over lengths. allowNone lets it store nothing
// at all (recompute every layer), which a caller that keeps no state may do.
func (pl *Platform) ChooseFor(c *model.Config, lengths []int, allowNone bool) (Split, error) {
	if len(lengths) == 0 {
		return Split{}, fmt.Errorf("sched: no context lengths to plan for")
	}
	pr := Problem{Layers: c.Layers, Hidden: HiddenAllowed(c), MaxRecompute: c.Layers - 1}
	if allowNone {
		pr.MaxRecompute = c.Layers
	}
	for _, n := range lengths {
		cs, err := pl.Costs(c, n)
		if err != nil {
			return Split{}, err
		}
		pr.Costs = append(pr.Costs, cs)
	}
	s, _ := Optimise(pr)
	return s, nil
}
