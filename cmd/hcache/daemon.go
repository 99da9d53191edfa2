package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hcache/hcache/bench/benchdaemon"
	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/remote"
	hc "github.com/hcache/hcache/clients/hcacheclient"
	hcachev1 "github.com/hcache/hcache/proto/hcache/v1"
	"github.com/hcache/hcache/state"
)

// Commands that work against a running hcached (--addr) or, when none runs,
// on a store directory (--dir): ls, rm, pin, gc here, stat and fsck in
// store.go; they share one flag set (targetFlags).

func init() {
	register("ls", "list contexts (--addr: through hcached; --dir: on a store directory)", ls)
	register("rm", "delete a context (--addr or --dir)", rm)
	register("pin", "pin a context against eviction, or --unpin it (--addr or --dir)", pin)
	register("gc", "compact segments below the live ratio (--addr or --dir)", gcCmd)
	register("bench daemon", "restore throughput through hcached's shared memory against the embedded store, and with 1/4/16 clients", benchDaemon)
	examples["ls"] = "hcache ls --addr unix:///run/hcache/hcache.sock --ns engine-a --json"
	examples["rm"] = "hcache rm --addr unix:///run/hcache/hcache.sock --ns engine-a --id conv-1"
	examples["pin"] = "hcache pin --dir /var/lib/hcache --ns engine-a --id system-prompt   # no daemon running"
	examples["gc"] = "hcache gc --addr 10.0.0.5:7070 --tls-ca ca.pem --token-file admin.token"
	examples["bench daemon"] = "hcache bench daemon --dir /mnt/nvme --model llama2-7b --tokens 512 --contexts 8 --json"
}

// target is where a command works: a daemon or a directory.
type target struct {
	addr, dir, tokenFile, tlsCA string
	asJSON                      bool
	ns, id                      string // for commands on one context
	remote                      *remote.Flags
}

// targetFlags is the flag set of a command that works on a target: --addr,
// --dir, --token-file, --tls-ca and --json, then the command's own flags, and
// --ns and --id for a command on one context (forContext). The daemon
// subcommands share it, so each flag is defined and checked once.
type targetFlags struct {
	*flag.FlagSet
	t          target
	oneContext bool
}

func newTargetFlags(name string, stderr io.Writer) *targetFlags {
	f := &targetFlags{FlagSet: newFlags(name, stderr)}
	f.StringVar(&f.t.addr, "addr", "", "hcached address: unix:///path/hcache.sock, /path/hcache.sock or host:port")
	f.StringVar(&f.t.dir, "dir", "", "existing store directory (when no daemon runs on it; never creates a store)")
	f.StringVar(&f.t.tokenFile, "token-file", "", "file holding a bearer token (default: $HCACHE_TOKEN)")
	f.StringVar(&f.t.tlsCA, "tls-ca", "", "PEM certificates that verify a TCP daemon's TLS certificate (then TLS is used)")
	f.BoolVar(&f.t.asJSON, "json", false, "print JSON")
	f.t.remote = remote.RegisterFlags(f.FlagSet)
	return f
}

// forContext adds the required --ns and --id.
func (f *targetFlags) forContext() *targetFlags {
	f.StringVar(&f.t.ns, "ns", "", "namespace (required)")
	f.StringVar(&f.t.id, "id", "", "context id (required)")
	f.oneContext = true
	return f
}

// parse parses args and checks them: exactly one of --addr and --dir, and
// --ns and --id for a command on one context.
func (f *targetFlags) parse(args []string) (*target, error) {
	if err := parseFlags(f.FlagSet, args); err != nil {
		return nil, err
	}
	switch {
	case f.t.addr == "" && f.t.dir == "":
		return nil, f.usage("missing --dir DIR (a store directory) or --addr ADDR (a running hcached)")
	case f.t.addr != "" && f.t.dir != "":
		return nil, f.usage("give only one of --addr and --dir")
	case f.oneContext && (f.t.ns == "" || f.t.id == ""):
		return nil, f.usage("--ns and --id are required")
	}
	return &f.t, nil
}

func (f *targetFlags) usage(msg string) error {
	fmt.Fprintln(f.Output(), msg)
	f.Usage()
	return errUsage
}

func (t *target) dial() (*hc.Client, error) {
	tok := os.Getenv("HCACHE_TOKEN")
	if t.tokenFile != "" {
		b, err := os.ReadFile(t.tokenFile)
		if err != nil {
			return nil, err
		}
		tok = strings.TrimSpace(string(b))
	}
	var opts []hc.Option
	if tok != "" {
		opts = append(opts, hc.WithToken(tok))
	}
	if t.tlsCA != "" {
		pem, err := os.ReadFile(t.tlsCA)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--tls-ca %s: no PEM certificate in it", t.tlsCA)
		}
		opts = append(opts, hc.WithTLS(&tls.Config{RootCAs: pool}))
	}
	return hc.Dial(t.addr, opts...)
}

// open opens the existing store in --dir (a directory that is not a store
// is refused and left as it is: only hcached, demo and stress create one);
// readOnly for the commands that only read (no lock file, no recovery
// applied).
func (t *target) open(stderr io.Writer, readOnly bool) (*chunk.Store, error) {
	if _, err := os.Stat(t.dir); err != nil {
		return nil, fmt.Errorf("store directory: %w", err)
	}
	// A store whose segments the remote tier holds opens with its provider
	// (--remote-*); reads through it write nothing to the bucket.
	var providers []chunk.ObjectProvider
	if t.remote != nil {
		rc, err := t.remote.Config()
		if err != nil {
			return nil, err
		}
		if rc != nil {
			c, err := remote.New(*rc)
			if err != nil {
				return nil, err
			}
			providers = []chunk.ObjectProvider{c.Provider()}
		}
	}
	st, err := chunk.Open(chunk.Options{Dir: t.dir, ReadOnly: readOnly, MustExist: true, GCInterval: -1, Providers: providers, Logf: func(f string, a ...any) { fmt.Fprintf(stderr, f+"\n", a...) }})
	switch {
	case errors.Is(err, chunk.ErrNotStore):
		return nil, fmt.Errorf("%w (hcached --dir, hcache demo --dir or the library create a store; this command only opens one)", err)
	case err != nil && strings.Contains(err.Error(), "in use by another process"): // chunk's words for a held lock
		return nil, fmt.Errorf("%w; if hcached serves this store, ask it instead: --addr unix:///run/hcache/hcache.sock (its --listen)", err)
	}
	return st, err
}

// do runs remote against the daemon at --addr, or local against the store
// in --dir, which it closes afterwards (Close commits, so its error counts).
func (t *target) do(stderr io.Writer, readOnly bool, remote func(context.Context, *hc.Client) error, local func(*chunk.Store) error) error {
	if t.addr != "" {
		return t.call(remote)
	}
	st, err := t.open(stderr, readOnly)
	if err != nil {
		return err
	}
	err = local(st)
	if cerr := st.Close(); err == nil {
		err = cerr
	}
	return err
}

// call dials the daemon at --addr and runs fn with a deadline.
func (t *target) call(fn func(context.Context, *hc.Client) error) error {
	c, err := t.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := rpcCtx()
	defer cancel()
	return fn(ctx, c)
}

func rpcCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 10*time.Minute)
}

// ctxRow is one context as ls prints it.
type ctxRow struct {
	Namespace string `json:"namespace"`
	ID        string `json:"id"`
	Tokens    uint64 `json:"tokens"`
	LiveBytes int64  `json:"live_bytes"`
	Pinned    bool   `json:"pinned"`
	Damaged   bool   `json:"damaged"`
	Writer    bool   `json:"writer_open,omitempty"`
	LastUse   string `json:"last_use"`
}

func ls(args []string, stdout, stderr io.Writer) error {
	fs := newTargetFlags("ls", stderr)
	ns := fs.String("ns", "", "only this namespace")
	t, err := fs.parse(args)
	if err != nil {
		return err
	}
	var rows []ctxRow
	err = t.do(stderr, true, func(ctx context.Context, c *hc.Client) error {
		list, err := c.List(ctx, *ns)
		for _, ci := range list {
			rows = append(rows, ctxRow{ci.GetNamespace(), ci.GetId(), ci.GetTokens(), ci.GetLiveBytes(), ci.GetPinned(), ci.GetDamaged(), ci.GetWriterOpen(),
				time.Unix(0, ci.GetLastUseUnixNanos()).UTC().Format(time.RFC3339)})
		}
		return err
	}, func(st *chunk.Store) error {
		for _, ci := range st.Contexts() {
			if *ns != "" && ci.Namespace != *ns {
				continue
			}
			rows = append(rows, ctxRow{ci.Namespace, ci.ID, ci.Tokens, ci.LiveBytes, ci.Pinned, ci.Damaged, false, ci.LastUse.UTC().Format(time.RFC3339)})
		}
		return nil
	})
	if err != nil {
		return err
	}
	if t.asJSON {
		if rows == nil {
			rows = []ctxRow{}
		}
		return printJSON(stdout, rows)
	}
	fmt.Fprintf(stdout, "%-16s %-32s %10s %14s %-20s %s\n", "NAMESPACE", "CONTEXT", "TOKENS", "LIVE_BYTES", "LAST_USE", "FLAGS")
	for _, r := range rows {
		var flags []string
		if r.Pinned {
			flags = append(flags, "pinned")
		}
		if r.Damaged {
			flags = append(flags, "damaged")
		}
		if r.Writer {
			flags = append(flags, "writing")
		}
		fmt.Fprintf(stdout, "%-16s %-32s %10d %14d %-20s %s\n", r.Namespace, r.ID, r.Tokens, r.LiveBytes, r.LastUse, strings.Join(flags, ","))
	}
	return nil
}

// errPinned refuses to delete a pinned context without --force.
func errPinned(ns, id string) error {
	return fmt.Errorf("%s/%s is pinned: unpin it first (hcache pin --unpin) or pass --force", ns, id)
}

func rm(args []string, stdout, stderr io.Writer) error {
	fs := newTargetFlags("rm", stderr).forContext()
	force := fs.Bool("force", false, "delete the context even when it is pinned")
	t, err := fs.parse(args)
	if err != nil {
		return err
	}
	err = t.do(stderr, false,
		func(ctx context.Context, c *hc.Client) error {
			if !*force {
				ci, err := c.Stat(ctx, t.ns, t.id)
				if err != nil {
					return err
				}
				if ci.GetPinned() {
					return errPinned(t.ns, t.id)
				}
			}
			return c.Delete(ctx, t.ns, t.id)
		},
		func(st *chunk.Store) error {
			if !*force {
				for _, ci := range st.Contexts() {
					if ci.Namespace == t.ns && ci.ID == t.id && ci.Pinned {
						return errPinned(t.ns, t.id)
					}
				}
			}
			return st.Delete(t.ns, t.id)
		})
	if err != nil {
		return err
	}
	return report(stdout, t.asJSON, map[string]any{"deleted": t.ns + "/" + t.id}, "deleted %s/%s\n", t.ns, t.id)
}

func report(w io.Writer, asJSON bool, v any, format string, a ...any) error {
	if asJSON {
		return printJSON(w, v)
	}
	_, err := fmt.Fprintf(w, format, a...)
	return err
}

func pin(args []string, stdout, stderr io.Writer) error {
	fs := newTargetFlags("pin", stderr).forContext()
	unpin := fs.Bool("unpin", false, "lift the pin")
	t, err := fs.parse(args)
	if err != nil {
		return err
	}
	err = t.do(stderr, false,
		func(ctx context.Context, c *hc.Client) error { return c.Pin(ctx, t.ns, t.id, !*unpin) },
		func(st *chunk.Store) error { return st.Pin(t.ns, t.id, !*unpin) }) // do's Close commits the pin
	if err != nil {
		return err
	}
	return report(stdout, t.asJSON, map[string]any{"context": t.ns + "/" + t.id, "pinned": !*unpin}, "%s/%s pinned: %v\n", t.ns, t.id, !*unpin)
}

func gcCmd(args []string, stdout, stderr io.Writer) error {
	t, err := newTargetFlags("gc", stderr).parse(args)
	if err != nil {
		return err
	}
	var out struct {
		Segments     int64  `json:"segments"`
		MovedRecords int64  `json:"moved_records"`
		MovedBytes   uint64 `json:"moved_bytes"`
	}
	err = t.do(stderr, false, func(ctx context.Context, c *hc.Client) error {
		r, err := c.API.Gc(ctx, &hcachev1.GcRequest{})
		out.Segments, out.MovedRecords, out.MovedBytes = r.GetSegments(), r.GetMovedRecords(), r.GetMovedBytes()
		return err
	}, func(st *chunk.Store) error {
		r := st.GC()
		out.Segments, out.MovedRecords, out.MovedBytes = int64(r.Segments), int64(r.MovedRecords), r.MovedBytes
		return r.Err
	})
	if err != nil {
		return err
	}
	return report(stdout, t.asJSON, out, "gc: %d segments compacted, %d records (%d bytes) moved\n", out.Segments, out.MovedRecords, out.MovedBytes)
}

// fsckDaemon runs fsck through hcached.
func fsckDaemon(t *target, stdout io.Writer) error {
	var r *hcachev1.FsckReply
	err := t.call(func(ctx context.Context, c *hc.Client) (err error) {
		r, err = c.API.Fsck(ctx, &hcachev1.FsckRequest{})
		return err
	})
	if err != nil {
		return err
	}
	rep := chunk.CheckReport{Contexts: int(r.GetContexts()), Chunks: int(r.GetChunks()), Slices: int(r.GetSlices()), Segments: int(r.GetSegments()),
		Errors: r.GetErrors(), DamagedContexts: r.GetDamagedContexts(), Orphans: r.GetOrphans()}
	return printCheck(stdout, &rep, t.asJSON)
}

// statDaemon prints what a daemon shows the caller: its namespaces and contexts.
func statDaemon(t *target, stdout io.Writer) error {
	var info *hcachev1.InfoReply
	var list []*hcachev1.ContextInfo
	err := t.call(func(ctx context.Context, c *hc.Client) (err error) {
		if info, err = c.Info(ctx); err != nil {
			return err
		}
		list, err = c.List(ctx, "")
		return err
	})
	if err != nil {
		return err
	}
	var live int64
	var tokens uint64
	for _, ci := range list {
		live += ci.GetLiveBytes()
		tokens += ci.GetTokens()
	}
	out := map[string]any{"version": info.GetVersion(), "chunk_tokens": info.GetChunkTokens(), "granted_namespaces": info.GetNamespaces(),
		"shm_socket": info.GetShmSocket(), "contexts": len(list), "tokens": tokens, "live_bytes": live}
	if t.asJSON {
		return printJSON(stdout, out)
	}
	fmt.Fprintf(stdout, "%s, chunk tokens %d, granted %v, shared memory %q\n%d contexts, %d tokens, %d live bytes (run 'hcache ls --addr' for each)\n",
		info.GetVersion(), info.GetChunkTokens(), info.GetNamespaces(), info.GetShmSocket(), len(list), tokens, live)
	return nil
}

// isTerminal reports whether w is a terminal (progress shows only there).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

func benchDaemon(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench daemon", stderr)
	dir := fs.String("dir", os.TempDir(), "directory on the device to measure")
	mdl := fs.String("model", "llama2-7b", "model preset whose row shapes to store")
	tokens := fs.Int("tokens", 512, "tokens per context")
	contexts := fs.Int("contexts", 8, "contexts")
	clients := fs.String("clients", "1,4,16", "client counts of the concurrency rows")
	rounds := fs.Int("rounds", 4, "restores per client in each concurrency row")
	cdName := fs.String("codec", "none", "codec of the stored rows: none, fp8 or fp8-block (the client encodes; the daemon stores them as given)")
	asJSON := fs.Bool("json", false, "print one JSON object")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	cd, err := state.ParseCodec(*cdName)
	if err != nil {
		return fmt.Errorf("--codec: %w", err)
	}
	var ns []int
	for _, f := range strings.Split(*clients, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return fmt.Errorf("--clients %q: want positive integers separated by commas", *clients)
		}
		ns = append(ns, n)
	}
	var prog io.Writer
	if isTerminal(stderr) {
		prog = stderr
	}
	res, err := benchdaemon.Run(benchdaemon.Options{Dir: *dir, Model: *mdl, Tokens: *tokens, Contexts: *contexts, Clients: ns, Rounds: *rounds, Codec: cd, Progress: prog})
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(stdout, res)
	}
	fmt.Fprintf(stdout, "restore %s (codec %s), %d x %d tokens (%d bytes each): embedded %.2f GB/s, daemon %.2f GB/s, ratio %.2f; inline in the messages %.2f GB/s\n",
		res.Model, res.Codec, res.Contexts, res.Tokens, res.BytesPerContext, res.EmbeddedGBps, res.DaemonGBps, res.Ratio, res.InlineGBps)
	for _, r := range res.Rows {
		fmt.Fprintf(stdout, "%3d clients: %.2f GB/s aggregate, p50 %.1f ms, p99 %.1f ms (%d restores)\n", r.Clients, r.AggregateGBps, r.P50MS, r.P99MS, r.Restores)
	}
	return nil
}
