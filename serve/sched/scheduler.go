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
	return Decision{Split: s, PredictedMS: t, Costs: cs, Plan: s.Plan(c)}, nil
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
