package gpu

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hcache/hcache/model"
	"github.com/hcache/hcache/state"
)

// Backend restores contexts into paged KV caches: a model's projection
// weights (and, after LoadRecompute, what recomputing its first layers
// needs) on one device.
type Backend interface {
	// Name is the backend's kind ("cpu", "cuda").
	Name() string
	// Config is the model the backend restores for.
	Config() *model.Config
	// Project computes the K and V of one layer for tokens at positions
	// from their hidden rows ([len(positions) x hidden] in the model
	// dtype) and writes them into a host cache, synchronously: the
	// checked per-layer path (profiles, tests). Restores use BeginRestore.
	Project(layer int, hidden []byte, positions []int, dst *PagedKV) error
	// LoadKV writes stored K||V rows ([len(positions) x 2 x kv_dim] in the
	// model dtype: a layer saved as KV) into a host cache, like Project.
	LoadKV(layer int, rows []byte, positions []int, dst *PagedKV) error
	// LoadRecompute makes the first layers layers recomputable from token
	// ids: w holds every tensor the forward pass needs (model.WeightsAll).
	// A later call for no more layers does nothing.
	LoadRecompute(w *model.Weights, layers int) error
	// BeginRestore opens the restore of tokens at positions into dst: a
	// HostCache, or a cache of the backend's own device memory. A backend
	// may run a bounded number of restores at once (Concurrency); past
	// that BeginRestore waits for one to end, so a caller must not hold
	// what another restore needs to end while it calls BeginRestore.
	BeginRestore(dst Cache, positions []int) (Restore, error)
	// Concurrency is how many restores may run on the backend at once;
	// each queues its own work, and a backend with several runs them side
	// by side rather than in turns.
	Concurrency() int
	Close() error
}

// Cache is where a restore writes K and V: a HostCache, or a backend's
// device cache (gpu/cuda's *Cache). Its layers are the model's.
type Cache interface {
	CacheLayers() int
}

// HostCache is a cache in host memory, one PagedKV per layer. Several
// entries may share one PagedKV when each layer is read out before the next
// is written (a writer that streams layers onward).
type HostCache []*PagedKV

// CacheLayers implements Cache.
func (h HostCache) CacheLayers() int { return len(h) }

// Restore is one context's restore in progress. Its calls come from one
// goroutine, in the order the work must run: Recompute first when the plan
// recomputes a prefix, then stored layers as they arrive. Each returns once
// its work is queued (the CPU backend: done); errors of queued work come
// back from a later call or from Wait. Wait must be called once, errors
// included: it waits for everything queued and every release.
type Restore interface {
	// Recompute queues the forward pass of tokens (one per position; the
	// positions must be 0..n-1, the whole context) through layers
	// [0, layers), writing each layer's K and V where a restore of that
	// layer would. done (may be nil) is called for each layer as its work
	// is written (CPU) or queued (a device).
	Recompute(tokens []int, layers int, done func(layer int)) error
	// Hidden queues one hidden layer ([tokens x hidden] rows): projected by
	// the layer's K/V weights, rotated and scattered into the cache.
	// release (may be nil) is called once rows have been read, in every
	// case, errors included; rows must not change until then.
	Hidden(layer int, rows []byte, release func()) error
	// KV queues one layer stored as KV ([tokens x 2 x kv_dim]: K then V).
	KV(layer int, rows []byte, release func()) error
	// Abort asks queued work to stop as soon as it can (a restore that
	// failed elsewhere); what was queued on a device still runs to its
	// end. Safe to call from any goroutine, more than once. An aborted
	// restore's Wait returns an error (ErrAborted where nothing else
	// failed) once a backend has stopped work for it.
	Abort()
	// Wait ends the restore and returns its first error.
	Wait() (Timing, error)
}

// DeviceDecoder is a Restore that takes rows as stored under a codec and
// decodes them itself after the copy (gpu/cuda: fp8 decoded on the device,
// so the copy moves the encoded bytes). serve hands a layer as stored when
// DecodesOnDevice reports the codec, and decodes on the host otherwise.
type DeviceDecoder interface {
	// DecodesOnDevice reports whether Encoded takes rows under cd.
	DecodesOnDevice(cd state.Codec) bool
	// Encoded queues one stored layer (kind LayerHidden or LayerKV) whose
	// rows are encoded by cd (state/codec's row layout), as Hidden or KV
	// would queue the decoded rows; release as for Hidden.
	Encoded(layer int, kind state.LayerKind, cd state.Codec, rows []byte, release func()) error
}

// Timing of a finished restore.
type Timing struct {
	Layers int           // layers submitted (recomputed ones included)
	Bytes  int64         // host bytes handed to the device
	GPU    time.Duration // device time, first copy to last kernel (0 on the CPU)
	Wall   time.Duration // BeginRestore to the end of Wait
}

// ErrAborted is returned by work stopped by Abort.
var ErrAborted = errors.New("gpu: restore aborted")

// LoadRecompute implements Backend: it builds the reference forward pass.
func (b *CPU) LoadRecompute(w *model.Weights, layers int) error {
	if layers < 0 || layers > b.cfg.Layers {
		return fmt.Errorf("gpu: recompute of %d layers, the model has %d", layers, b.cfg.Layers)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.m != nil || layers == 0 {
		return nil
	}
	if w == nil {
		return errors.New("gpu: LoadRecompute needs weights")
	}
	m, err := model.New(b.cfg, w)
	if err != nil {
		return fmt.Errorf("gpu: LoadRecompute: %w", err)
	}
	b.m = m
	return nil
}

// Concurrency implements Backend: CPU restores share nothing mutable, so
// any number run at once (the caller bounds them).
func (b *CPU) Concurrency() int { return 1 << 20 }

// BeginRestore implements Backend for a HostCache.
func (b *CPU) BeginRestore(dst Cache, positions []int) (Restore, error) {
	h, ok := dst.(HostCache)
	if !ok {
		return nil, fmt.Errorf("gpu: the cpu backend restores into a HostCache, not a %T", dst)
	}
	if len(h) != b.cfg.Layers {
		return nil, fmt.Errorf("gpu: a %d-layer cache for a %d-layer model", len(h), b.cfg.Layers)
	}
	if len(positions) == 0 {
		return nil, errors.New("gpu: a restore of no positions")
	}
	b.mu.Lock()
	m := b.m
	b.mu.Unlock()
	return &cpuRestore{b: b, m: m, dst: h, positions: positions, stop: make(chan struct{}), t0: time.Now()}, nil
}

// cpuRestore runs each call to completion before returning.
type cpuRestore struct {
	b         *CPU
	m         *model.Model
	dst       HostCache
	positions []int
	stop      chan struct{}
	stopOnce  sync.Once
	t0        time.Time
	t         Timing
	err       error
	ended     bool
}

func (r *cpuRestore) Abort() { r.stopOnce.Do(func() { close(r.stop) }) }

func (r *cpuRestore) check() error {
	if r.ended {
		return errors.New("gpu: restore already waited for")
	}
	select {
	case <-r.stop:
		return r.fail(ErrAborted)
	default:
	}
	return r.err
}

func (r *cpuRestore) fail(err error) error {
	if err != nil && r.err == nil {
		r.err = err
	}
	return err
}

func (r *cpuRestore) Recompute(tokens []int, layers int, done func(layer int)) error {
	if err := r.check(); err != nil {
		return err
	}
	c := r.b.cfg
	if r.m == nil || layers > c.Layers {
		return r.fail(fmt.Errorf("gpu: recompute of %d layers: LoadRecompute has not loaded the forward pass", layers))
	}
	if len(tokens) != len(r.positions) {
		return r.fail(fmt.Errorf("gpu: recompute of %d tokens in a restore of %d positions", len(tokens), len(r.positions)))
	}
	for i, p := range r.positions {
		if p != i {
			return r.fail(errors.New("gpu: recompute needs the restore's positions to be 0..n-1 (the whole context)"))
		}
	}
	kvd, tb := c.KVDim(), c.KVDim()*c.ElemBytes()
	var werr error
	err := r.m.PrefillStop(tokens, layers, func(l int, _, k, v []float32) {
		if werr != nil {
			return
		}
		for i := range tokens {
			kb, vb, err := r.dst[l].Token(i)
			if err != nil {
				werr = err
				return
			}
			c.EncodeRow(kb[:tb], k[i*kvd:(i+1)*kvd])
			c.EncodeRow(vb[:tb], v[i*kvd:(i+1)*kvd])
		}
		r.t.Layers++
		if done != nil {
			done(l)
		}
	}, r.stop)
	if err = errors.Join(err, werr); err != nil {
		select {
		case <-r.stop:
			err = ErrAborted
		default:
		}
	}
	return r.fail(err)
}

func (r *cpuRestore) Hidden(layer int, rows []byte, release func()) error {
	return r.layer(layer, rows, release, true)
}

func (r *cpuRestore) KV(layer int, rows []byte, release func()) error {
	return r.layer(layer, rows, release, false)
}

func (r *cpuRestore) layer(layer int, rows []byte, release func(), hidden bool) error {
	if release != nil {
		defer release()
	}
	if err := r.check(); err != nil {
		return err
	}
	if layer < 0 || layer >= len(r.dst) {
		return r.fail(fmt.Errorf("gpu: layer %d out of range [0, %d)", layer, len(r.dst)))
	}
	var err error
	if hidden {
		err = r.b.Project(layer, rows, r.positions, r.dst[layer])
	} else {
		err = r.b.LoadKV(layer, rows, r.positions, r.dst[layer])
	}
	if err == nil {
		r.t.Layers++
		r.t.Bytes += int64(len(rows))
	}
	return r.fail(err)
}

func (r *cpuRestore) Wait() (Timing, error) {
	if r.ended {
		return Timing{}, errors.New("gpu: restore already waited for")
	}
	r.ended = true
	r.t.Wall = time.Since(r.t0)
	select {
	case <-r.stop:
		r.fail(ErrAborted)
	default:
	}
	return r.t, r.err
}

var _ Backend = (*CPU)(nil)
