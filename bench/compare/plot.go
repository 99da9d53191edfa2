package compare

import (
	"fmt"
	"image/color"
	"sort"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// PlotRestore draws restore time against context length at concurrency c,
// one line per system (median of each of up to 10 length bins).
func PlotRestore(r *Result, c int, path string) error {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("restore time, %s, %s workload, concurrency %d (%d of %d layers)", r.Model, r.Workload, c, r.Layers, r.ModelLayers)
	p.X.Label.Text = "context length (tokens)"
	p.Y.Label.Text = "restore time (ms, log scale)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	p.Legend.Top, p.Legend.Left = true, true
	by := map[string][]Point{}
	var names []string
	for _, pt := range r.Points {
		if pt.Concurrency != c || pt.MS <= 0 {
			continue
		}
		if _, ok := by[pt.System]; !ok {
			names = append(names, pt.System)
		}
		by[pt.System] = append(by[pt.System], pt)
	}
	if len(names) == 0 {
		return fmt.Errorf("compare: no restores at concurrency %d to plot", c)
	}
	for i, name := range names {
		xys := bins(by[name], 10)
		l, s, err := plotter.NewLinePoints(xys)
		if err != nil {
			return err
		}
		l.Color = plotutil.Color(i)
		l.Dashes = plotutil.Dashes(i)
		s.Color = plotutil.Color(i)
		s.Shape = plotutil.Shape(i)
		p.Add(l, s)
		p.Legend.Add(name, l, s)
	}
	p.Add(plotter.NewGrid())
	return p.Save(9*vg.Inch, 5.5*vg.Inch, path)
}

// bins groups points by context length into at most n bins of equal count
// and returns each bin's median length and median time.
func bins(pts []Point, n int) plotter.XYs {
	sort.Slice(pts, func(i, j int) bool { return pts[i].Tokens < pts[j].Tokens })
	per := (len(pts) + n - 1) / n
	var out plotter.XYs
	for i := 0; i < len(pts); i += per {
		b := pts[i:min(i+per, len(pts))]
		var ms []float64
		for _, p := range b {
			ms = append(ms, p.MS)
		}
		out = append(out, plotter.XY{X: float64(b[len(b)/2].Tokens), Y: quantile(ms, 0.5)})
	}
	return out
}

// PlotBytes draws bytes per stored token per system (on disk, or in memory
// for memory-only systems).
func PlotBytes(r *Result, path string) error {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("bytes per token, %s (%d of %d layers), %s workload", r.Model, r.Layers, r.ModelLayers, r.Workload)
	p.Y.Label.Text = "bytes per token (disk; memory for redis, hcache-dram, limit-dram)"
	var vals plotter.Values
	var names []string
	seen := map[string]bool{}
	for _, row := range r.Rows {
		if seen[row.System] || row.BytesPerToken <= 0 {
			continue
		}
		seen[row.System] = true
		vals = append(vals, row.BytesPerToken)
		names = append(names, row.System)
	}
	if len(vals) == 0 {
		return fmt.Errorf("compare: no sizes to plot")
	}
	b, err := plotter.NewBarChart(vals, vg.Points(28))
	if err != nil {
		return err
	}
	b.Color = color.RGBA{R: 60, G: 110, B: 180, A: 255}
	p.Add(b)
	p.NominalX(names...)
	return p.Save(9*vg.Inch, 5*vg.Inch, path)
}
