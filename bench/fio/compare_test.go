package fio

import "testing"

func TestCompare(t *testing.T) {
	sw := &SweepResult{BestRead: Point{GBps: 8}, BestWrite: Point{Write: true, GBps: 4}}
	cases := []struct {
		name                                string
		read, write, fioRead, fioWrite      float64
		sweep                               *SweepResult
		readRatio, writeRatio, rBest, wBest float64
	}{
		{"same job and sweep", 6, 3, 5, 2, sw, 1.2, 1.5, 0.75, 0.75},
		{"same job only", 6, 3, 5, 2, nil, 1.2, 1.5, 0, 0},
		{"fio not run", 6, 3, 0, 0, nil, 0, 0, 0, 0},
		{"fio not run, sweep ran", 6, 3, 0, 0, sw, 0, 0, 0.75, 0.75},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := compare(c.read, c.write, c.fioRead, c.fioWrite, c.sweep)
			if got.FioReadGBps != c.fioRead || got.FioWriteGBps != c.fioWrite || got.ReadRatio != c.readRatio || got.WriteRatio != c.writeRatio ||
				got.ReadVsBest != c.rBest || got.WriteVsBest != c.wBest || got.Sweep != c.sweep {
				t.Fatalf("compare = %+v, want fio %v/%v ratios %v/%v vs best %v/%v sweep %v", got, c.fioRead, c.fioWrite, c.readRatio, c.writeRatio, c.rBest, c.wBest, c.sweep)
			}
			if c.sweep != nil && (got.BestReadGBps != 8 || got.BestWriteGBps != 4) {
				t.Fatalf("best = %v/%v, want 8/4", got.BestReadGBps, got.BestWriteGBps)
			}
		})
	}
}
