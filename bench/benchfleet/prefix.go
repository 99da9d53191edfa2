package benchfleet

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math/rand"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/hcache/hcache/bench/prefixwl"
	hc "github.com/hcache/hcache/clients/hcacheclient"
)

// The prefix workload: a bench/prefixwl request stream (PrefixWorkload,
// scaled to PrefixScale of its sessions, at most Requests requests), each
// request sent to a random node: a restore by the prompt's tokens (what
// the node has locally, or, with the shared tier, promotes from the
// bucket), then a save of prompt and answer by tokens (the node's groups,
// published to the bucket at close). Rows are a function of the token
// prefix (as a model's states are), so shared prefixes have equal rows
// and every restored row can be checked.

// PrefixMode is one run of the prefix workload.
type PrefixMode struct {
	SharedTier bool `json:"shared_tier"`
	Requests   int  `json:"requests"`
	// Restorable: requests whose prompt has at least one whole group saved
	// earlier on some node (a fleet-wide count); RestorableTokens sums
	// those groups' tokens.
	Restorable       int   `json:"restorable_requests"`
	RestorableTokens int64 `json:"restorable_tokens"`
	// HitRate: restorable requests that restored something (local or
	// remote); TokenHitRate: restored tokens over restorable tokens.
	HitRate      float64 `json:"hit_rate"`
	TokenHitRate float64 `json:"token_hit_rate"`
	LocalHit     Class   `json:"local_hit"`
	RemoteHit    Class   `json:"remote_hit"`
	Miss         Class   `json:"miss"`
	WrongBytes   int     `json:"wrong_bytes"`
	Seconds      float64 `json:"seconds"`
}

// tokenRows are the rows of tokens [from, from+n) of a layer: a function
// of the whole prefix up to each token (a running hash).
func tokenRows(h []uint64, layer, from, n, rb int) []byte {
	b := make([]byte, n*rb)
	for t := range n {
		x := h[from+t] ^ uint64(layer+1)*0x9E3779B97F4A7C15
		row := b[t*rb : (t+1)*rb]
		for i := 0; i+8 <= len(row); i += 8 {
			x ^= x >> 12
			x ^= x << 25
			x ^= x >> 27
			binary.LittleEndian.PutUint64(row[i:], x*0x2545F4914F6CDD1D)
		}
	}
	return b
}

func prefixHashes(tokens []uint32) []uint64 {
	h := make([]uint64, len(tokens))
	var x uint64 = 0xcbf29ce484222325
	for i, t := range tokens {
		x = (x ^ uint64(t) ^ uint64(i)<<32) * 0x100000001b3
		h[i] = x | 1
	}
	return h
}

// metric reads one sample of a node's metrics (0 when absent).
func (n *node) metric(line string) (float64, error) {
	resp, err := http.Get("http://" + n.metrics + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if l := sc.Text(); strings.HasPrefix(l, line+" ") {
			return strconv.ParseFloat(strings.Fields(l)[1], 64)
		}
	}
	return 0, sc.Err()
}

const promotedMetric = `hcache_remote_token_lookups_total{result="promoted"}`

func runPrefix(o Options, dir, endpoint string, shared bool) (*PrefixMode, error) {
	p, ok := prefixwl.Defaults[o.PrefixWorkload]
	if !ok {
		return nil, fmt.Errorf("prefix workload %q: want one of %v", o.PrefixWorkload, prefixwl.Names())
	}
	w, err := p.Scaled(o.PrefixScale).Generate(o.Seed)
	if err != nil {
		return nil, err
	}
	reqs := w.Requests
	if len(reqs) > o.Requests {
		reqs = reqs[:o.Requests]
	}
	prefix := fmt.Sprintf("prefix-%d-%v/", time.Now().UnixNano(), shared)
	mdir := filepath.Join(dir, fmt.Sprintf("prefix-shared-%v", shared))
	nodes := make([]*node, o.Nodes)
	defer func() {
		for _, n := range nodes {
			if n != nil {
				n.stop()
			}
		}
	}()
	for i := range nodes {
		n, err := startNode(o, mdir, endpoint, i, shared, prefix)
		if err != nil {
			return nil, err
		}
		nodes[i] = n
	}
	ctx := context.Background()
	info, err := nodes[0].c.Info(ctx)
	if err != nil {
		return nil, err
	}
	ct := int(info.GetChunkTokens())
	ident := identity(o)
	rng := rand.New(rand.NewSource(o.Seed))
	saved := map[[32]byte]bool{} // whole-group prefixes saved on some node
	groupKeys := func(tokens []uint32) [][32]byte {
		var out [][32]byte
		h := sha256.New()
		var b [4]byte
		for i := 0; i+ct <= len(tokens); i += ct {
			for _, t := range tokens[i : i+ct] {
				binary.LittleEndian.PutUint32(b[:], t)
				h.Write(b[:])
			}
			var k [32]byte
			h.Sum(k[:0])
			out = append(out, k)
		}
		return out
	}
	m := &PrefixMode{SharedTier: shared, Requests: len(reqs)}
	var local, rem, miss []time.Duration
	var localB, remB int64
	var restored int64
	start := time.Now()
	for i, r := range reqs {
		n := nodes[rng.Intn(o.Nodes)]
		prompt := r.Tokens[:r.Prompt]
		h := prefixHashes(r.Tokens)
		restorable := 0
		for _, k := range groupKeys(prompt) {
			if !saved[k] {
				break
			}
			restorable += ct
		}
		before := 0.0
		if shared {
			before, _ = n.metric(promotedMetric)
		}
		wrong := false
		t0 := time.Now()
		got, err := n.c.RestoreTokens(ctx, hc.Prefix{Namespace: "chat", Identity: ident, Tokens: prompt}, func(layer int, rows []byte) error {
			k := len(rows) / o.RowBytes
			for _, t := range []int{0, k / 2, k - 1} {
				if k > 0 && string(rows[t*o.RowBytes:(t+1)*o.RowBytes]) != string(tokenRows(h, layer, t, 1, o.RowBytes)) {
					wrong = true
				}
			}
			return nil
		})
		d := time.Since(t0)
		if err != nil {
			return nil, fmt.Errorf("request %d: restore by tokens: %w", i, err)
		}
		if wrong {
			m.WrongBytes++
		}
		if restorable > 0 {
			m.Restorable++
			m.RestorableTokens += int64(restorable)
			restored += int64(min(int(got), restorable))
		}
		b := int64(got) * int64(o.RowBytes) * int64(o.Layers)
		switch {
		case got == 0:
			if restorable > 0 {
				miss = append(miss, d)
			}
		default:
			after := before
			if shared {
				after, _ = n.metric(promotedMetric)
			}
			if after > before {
				rem, remB = append(rem, d), remB+b
			} else {
				local, localB = append(local, d), localB+b
			}
		}
		// Save prompt and answer by tokens under the request's own id.
		wr, err := n.c.CreateTokens(ctx, "chat", fmt.Sprintf("s%d-r%d", r.Session, i), ident, r.Tokens, nil, false)
		if err != nil {
			return nil, fmt.Errorf("request %d: create by tokens: %w", i, err)
		}
		from := int(wr.Tokens)
		if cnt := len(r.Tokens) - from; cnt > 0 {
			for l := range o.Layers {
				if err := wr.AppendLayer(ctx, l, tokenRows(h, l, from, cnt, o.RowBytes)); err != nil {
					return nil, fmt.Errorf("request %d: append: %w", i, err)
				}
			}
		}
		if err := wr.Close(ctx); err != nil {
			return nil, fmt.Errorf("request %d: close: %w", i, err)
		}
		for _, k := range groupKeys(r.Tokens) {
			saved[k] = true
		}
		fmt.Fprintf(o.Log, ".")
	}
	fmt.Fprintln(o.Log)
	m.Seconds = time.Since(start).Seconds()
	m.LocalHit, m.RemoteHit, m.Miss = class(local, localB), class(rem, remB), class(miss, 0)
	if m.Restorable > 0 {
		m.HitRate = float64(len(local)+len(rem)) / float64(m.Restorable)
		m.TokenHitRate = float64(restored) / float64(m.RestorableTokens)
	}
	return m, nil
}
