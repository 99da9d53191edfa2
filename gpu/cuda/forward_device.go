package cuda

import (
	"errors"
	"fmt"

	"github.com/hcache/hcache/model"
)

// LoadRecompute puts on the device, once, what recomputing the first layers
// layers needs beyond the K/V weights Open uploaded: the token (and, for
// OPT, position) embeddings and those layers' attention, MLP and norm
// weights, from w (model.WeightsAll). It refuses, allocating nothing, when
// they would take more than Options.RecomputeMemory (an error wrapping
// ErrRecomputeMemory). A later call for no more layers does nothing; one for
// more replaces them.
func (b *Backend) LoadRecompute(w *model.Weights, layers int) error {
	if w == nil {
		return errors.New("cuda: LoadRecompute needs weights")
	}
	done := b.exclusive() // no restore reads the weights meanwhile
	defer done()
	return b.with(func() error {
		b.mu.Lock()
		defer b.mu.Unlock()
		if err := b.live(); err != nil {
			return err
		}
		if b.fwd != nil && len(b.fwd.layers) >= layers {
			return nil
		}
		limit := b.opts.RecomputeMemory
		if limit == 0 {
			limit = b.memory / 2
		}
		if b.fwd != nil {
			b.fwd.release(b)
			b.fwd = nil
		}
		fw, err := uploadFwdWeights(b, b.cfg, w, layers, limit, b.weights, b.biases)
		if err != nil {
			return err
		}
		b.fwd = fw
		return b.sync()
	})
}

// RecomputeLayers is how many layers LoadRecompute has put on the device,
// and RecomputeBytes the device memory they take.
func (b *Backend) RecomputeLayers() (layers int, bytes int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.fwd == nil {
		return 0, 0
	}
	return len(b.fwd.layers), b.fwd.bytes
}

// Recompute queues, on the compute stream, the forward pass of the
// restore's tokens through layers [0, layers) and writes each layer's K and
// V into the cache where a restore of that layer would (model.Prefill on
// the device). The restore's positions must be 0..n-1 (the whole context)
// and tokens its token ids, one per position. Layers loaded by
// LoadRecompute only. Layers submitted after it (Hidden, KV) queue behind
// it on the compute stream; their copies overlap it. done (may be nil) is
// called for each layer once all of them are queued.
func (r *Restore) Recompute(tokens []int, layers int, done func(layer int)) (err error) {
	defer func() {
		if err != nil && r.err == nil {
			r.err = err
		}
	}()
	if r.ended {
		return errEnded
	}
	if r.err != nil {
		return r.err
	}
	b, c := r.b, r.b.cfg
	if len(tokens) != r.n {
		return fmt.Errorf("cuda: recompute of %d tokens in a restore of %d positions", len(tokens), r.n)
	}
	if !r.fromZero {
		return errors.New("cuda: recompute needs the restore's positions to be 0..n-1 (the whole context)")
	}
	host := make([]int32, len(tokens))
	for i, t := range tokens {
		if t < 0 || t >= c.Vocab {
			return fmt.Errorf("cuda: recompute: token %d (at %d) is outside the vocabulary [0, %d)", t, i, c.Vocab)
		}
		host[i] = int32(t)
	}
	if b.fwd == nil || len(b.fwd.layers) < layers {
		have := 0
		if b.fwd != nil {
			have = len(b.fwd.layers)
		}
		return fmt.Errorf("cuda: recompute of %d layers, LoadRecompute put %d on the device", layers, have)
	}
	return b.with(func() error {
		ln := r.lane
		mem := laneMem{b, ln}
		if err := ln.scr.ensure(mem, c, r.n); err != nil {
			return err
		}
		if err := mem.grow(&ln.toks, 4*len(host)); err != nil {
			return err
		}
		// From pageable memory: returns once src is staged, ordered on the
		// compute stream before the kernels that read it.
		if err := b.ops.copyAsync(ln.toks.ptr, i32bytes(host), ln.compS); err != nil {
			return err
		}
		p := &fwdPass{cfg: c, dtype: b.dtype, threads: b.opts.Threads, w: b.fwd, scr: &ln.scr, ops: laneOps{b, ln}}
		t := fwdTarget{k: r.c.K, v: r.c.V, table: r.c.table, nblocks: len(r.c.hostTable), blockTokens: r.c.BlockTokens, layerMap: r.layerMap}
		if err := p.run(r.n, ln.toks.ptr, ln.pos.ptr, r.rope.devPtr(), layers, t); err != nil {
			return err
		}
		r.recomputed += layers
		for l := 0; done != nil && l < layers; l++ {
			done(l)
		}
		return nil
	})
}
