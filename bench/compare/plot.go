package compare

import (
	"fmt"
	"image/color"
	"os"
	"sort"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// style is how one system is drawn in every plot: its own colour (the
// Okabe-Ito palette, told apart also by readers with a colour-vision
// deficiency) and its own marker, so that a system reads the same across
// plots and no two systems share both.
type style struct {
	color  color.RGBA
	glyph  draw.GlyphDrawer
	dashes []vg.Length // the limits are dashed: they are computed, not measured
}

var styles = map[string]style{
	"hcache":         {color.RGBA{0, 114, 178, 255}, draw.CircleGlyph{}, nil},    // blue
	"hcache-dram":    {color.RGBA{86, 180, 233, 255}, draw.RingGlyph{}, nil},     // sky blue
	"hcache-kv":      {color.RGBA{230, 159, 0, 255}, draw.SquareGlyph{}, nil},    // orange
	"file-per-chunk": {color.RGBA{0, 158, 115, 255}, draw.TriangleGlyph{}, nil},  // bluish green
	"pebble-blob":    {color.RGBA{204, 121, 167, 255}, draw.PyramidGlyph{}, nil}, // reddish purple
	"redis":          {color.RGBA{213, 94, 0, 255}, draw.BoxGlyph{}, nil},        // vermillion
	"recompute":      {color.RGBA{120, 120, 120, 255}, draw.PlusGlyph{}, nil},    // grey
	"limit-disk":     {color.RGBA{0, 0, 0, 255}, draw.CrossGlyph{}, []vg.Length{vg.Points(6), vg.Points(3)}},
	"limit-dram":     {color.RGBA{140, 90, 40, 255}, draw.CrossGlyph{}, []vg.Length{vg.Points(2), vg.Points(2)}},
}

func styleOf(name string) style {
	if s, ok := styles[name]; ok {
		return s
	}
	return style{color.RGBA{60, 60, 60, 255}, draw.CircleGlyph{}, nil}
}

// Restore plots leave out the recompute row: it runs a different, tiny
// model on the CPU (Options.RecomputeModel), so its times do not belong on
// the axes of the model the other systems store; the report's table has it.
var notPlotted = map[string]bool{"recompute": true}

const legendWidth = 1.7 * vg.Inch

// PlotRestore draws restore time against context length at concurrency c:
// for each system a faint point per restore request (the samples) and a line
// through the medians of up to 10 length bins. The legend sits to the right
// of the axes, never over the data.
func PlotRestore(r *Result, c int, path string) error {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("restore time, %s (%d of %d layers), %s workload, concurrency %d", r.Model, r.Layers, r.ModelLayers, r.Workload, c)
	p.X.Label.Text = "context length (tokens); faint points: one request each, line: median of each length bin"
	p.Y.Label.Text = "restore time per request (ms, log scale)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	names, by := restoreSeries(r, c)
	if len(names) == 0 {
		return fmt.Errorf("compare: no restores at concurrency %d to plot", c)
	}
	legend := plot.NewLegend()
	legend.Top, legend.Left = true, true
	p.Add(plotter.NewGrid())
	for _, name := range names {
		st := styleOf(name)
		pts := by[name]
		var samples plotter.XYs
		for _, pt := range pts {
			samples = append(samples, plotter.XY{X: float64(pt.Tokens), Y: pt.MS})
		}
		if st.dashes == nil { // a limit's samples lie on its line
			sc, err := plotter.NewScatter(samples)
			if err != nil {
				return err
			}
			faint := color.NRGBA{R: st.color.R, G: st.color.G, B: st.color.B, A: 100} // not premultiplied
			sc.GlyphStyle = draw.GlyphStyle{Color: faint, Radius: vg.Points(1.8), Shape: st.glyph}
			p.Add(sc)
		}
		l, s, err := plotter.NewLinePoints(bins(pts, 10))
		if err != nil {
			return err
		}
		l.Color, l.Width, l.Dashes = st.color, vg.Points(1.5), st.dashes
		s.GlyphStyle = draw.GlyphStyle{Color: st.color, Radius: vg.Points(3.5), Shape: st.glyph}
		p.Add(l, s)
		legend.Add(name, l, s)
	}
	return saveWithLegend(p, &legend, 10*vg.Inch, 5.5*vg.Inch, path)
}

// restoreSeries groups the restores at concurrency c by system, in the
// order the systems ran, leaving out notPlotted.
func restoreSeries(r *Result, c int) ([]string, map[string][]Point) {
	by := map[string][]Point{}
	var names []string
	for _, pt := range r.Points {
		if pt.Concurrency != c || pt.MS <= 0 || notPlotted[pt.System] {
			continue
		}
		if _, ok := by[pt.System]; !ok {
			names = append(names, pt.System)
		}
		by[pt.System] = append(by[pt.System], pt)
	}
	return names, by
}

// saveWithLegend draws p on the left and the legend in a column of its own
// on the right, and writes a PNG.
func saveWithLegend(p *plot.Plot, legend *plot.Legend, w, h vg.Length, path string) error {
	img := vgimg.New(w, h)
	dc := draw.New(img)
	dc.SetColor(color.White)
	dc.Fill(dc.Rectangle.Path())
	p.Draw(draw.Crop(dc, 0, -legendWidth, 0, 0))
	legend.Draw(draw.Crop(dc, w-legendWidth+vg.Points(6), 0, 0, -vg.Points(30)))
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
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
// for memory-only systems), each bar in its system's colour.
func PlotBytes(r *Result, path string) error {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("bytes per token, %s (%d of %d layers), %s workload", r.Model, r.Layers, r.ModelLayers, r.Workload)
	p.Y.Label.Text = "bytes per token (disk; memory for redis, hcache-dram, limit-dram)"
	p.Add(plotter.NewGrid())
	var names []string
	seen := map[string]bool{}
	for _, row := range r.Rows {
		if seen[row.System] || row.BytesPerToken <= 0 {
			continue
		}
		seen[row.System] = true
		names = append(names, row.System)
		b, err := plotter.NewBarChart(plotter.Values{row.BytesPerToken}, vg.Points(28))
		if err != nil {
			return err
		}
		b.Color = styleOf(row.System).color
		b.LineStyle.Width = 0
		b.XMin = float64(len(names) - 1)
		p.Add(b)
	}
	if len(names) == 0 {
		return fmt.Errorf("compare: no sizes to plot")
	}
	p.NominalX(names...)
	return p.Save(10*vg.Inch, 5*vg.Inch, path)
}
