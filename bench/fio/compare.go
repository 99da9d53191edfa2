package fio

// Comparison sets our read and write bandwidth against fio's on the same
// disk: fio's figures with the same job in the same run, and, when a sweep
// ran, the best fio found over its grid. bench io and bench store report it
// under their own names (read/write, restore/save).
type Comparison struct {
	FioReadGBps, FioWriteGBps float64      // fio's same-job bandwidth (0: not run)
	ReadRatio, WriteRatio     float64      // ours / fio's same-job (0 when fio's is 0)
	Sweep                     *SweepResult // nil when no sweep ran
	BestReadGBps              float64      // the sweep's best read
	BestWriteGBps             float64      // the sweep's best write
	ReadVsBest, WriteVsBest   float64      // ours / the sweep's best
}

// Compare sets ours (readGBps, writeGBps) against fio's same-job figures
// (fioReadGBps, fioWriteGBps; 0 when fio did not run) and, when sweep is not
// nil, runs that sweep in dir (unless it names its own directory) and sets
// ours against its best points.
func Compare(readGBps, writeGBps, fioReadGBps, fioWriteGBps float64, sweep *SweepOptions, dir string) (*Comparison, error) {
	var sw *SweepResult
	if sweep != nil {
		var err error
		if sw, err = RunSweepIn(*sweep, dir); err != nil {
			return nil, err
		}
	}
	return compare(readGBps, writeGBps, fioReadGBps, fioWriteGBps, sw), nil
}

// CompareWith is Compare with a sweep that already ran (nil: none).
func CompareWith(readGBps, writeGBps, fioReadGBps, fioWriteGBps float64, sw *SweepResult) *Comparison {
	return compare(readGBps, writeGBps, fioReadGBps, fioWriteGBps, sw)
}

func compare(readGBps, writeGBps, fioReadGBps, fioWriteGBps float64, sw *SweepResult) *Comparison {
	c := &Comparison{FioReadGBps: fioReadGBps, FioWriteGBps: fioWriteGBps,
		ReadRatio: ratio(readGBps, fioReadGBps), WriteRatio: ratio(writeGBps, fioWriteGBps)}
	if sw != nil {
		c.Sweep = sw
		c.BestReadGBps, c.BestWriteGBps = sw.BestRead.GBps, sw.BestWrite.GBps
		c.ReadVsBest, c.WriteVsBest = ratio(readGBps, sw.BestRead.GBps), ratio(writeGBps, sw.BestWrite.GBps)
	}
	return c
}

// ratio is ours/theirs, 0 when theirs is not a measurement (JSON has no
// infinity).
func ratio(ours, theirs float64) float64 {
	if theirs <= 0 {
		return 0
	}
	return ours / theirs
}
