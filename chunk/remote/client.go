package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync/atomic"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/hcache/hcache/chunk/format"
)

// Config names an S3-compatible bucket and this store's place in it.
type Config struct {
	// Endpoint is host:port of the S3 API (no scheme), e.g.
	// s3.amazonaws.com or 127.0.0.1:8333.
	Endpoint string
	// Bucket holds every node's objects (required). Prefix is prepended
	// to every key ("" or ending in "/" by convention; any string works).
	Bucket, Prefix string
	// Secure: HTTPS (TLS) instead of plain HTTP.
	Secure bool
	// Region of the bucket; "" lets the client discover it.
	Region string
	// AccessKey and SecretKey (and SessionToken) are static credentials.
	// Without them the usual conventions apply, first found wins:
	// AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY(/AWS_SESSION_TOKEN),
	// MINIO_ACCESS_KEY/MINIO_SECRET_KEY, ~/.aws/credentials
	// (AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE), ~/.mc/config.json.
	AccessKey, SecretKey, SessionToken string
	// StoreID names this store in the bucket (required, 1..64 of
	// [A-Za-z0-9._-]): segment ids restart at 1 in every store, so a
	// segment's object key carries it. Every store of a fleet needs its own.
	StoreID string
	// Parallel bounds the ranged GETs one read keeps in flight (default 8).
	Parallel int
	// RangeBytes is the size of one ranged GET of a large read (default 8 MiB).
	RangeBytes int64
	// Timeout bounds one request (default 30 s); MaxRetries the client's
	// retries of a failed one (default 2; the store's callers fall back
	// to a miss rather than wait).
	Timeout    time.Duration
	MaxRetries int
	// PublishBatchBytes bounds the rows a publish by tokens holds in
	// memory at once (default 64 MiB): the groups to upload are read from
	// the store in batches of at most this many bytes (at least one group
	// each), each batch uploaded before the next is read.
	PublishBatchBytes int64
}

var storeIDRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)

func (c *Config) fill() error {
	if c.Endpoint == "" {
		return errors.New("remote: Config.Endpoint (host:port of the S3 API) is required")
	}
	if strings.Contains(c.Endpoint, "://") {
		return fmt.Errorf("remote: endpoint %q: give host:port without a scheme (TLS is Config.Secure)", c.Endpoint)
	}
	if c.Bucket == "" {
		return errors.New("remote: Config.Bucket is required")
	}
	if !storeIDRE.MatchString(c.StoreID) {
		return fmt.Errorf("remote: store id %q: want 1..64 characters of [A-Za-z0-9._-], unique in the fleet", c.StoreID)
	}
	if c.Parallel == 0 {
		c.Parallel = 8
	}
	if c.Parallel < 1 || c.Parallel > 256 {
		return fmt.Errorf("remote: Parallel %d not in [1, 256]", c.Parallel)
	}
	if c.RangeBytes == 0 {
		c.RangeBytes = 8 << 20
	}
	if c.RangeBytes < 4096 {
		return fmt.Errorf("remote: RangeBytes %d is below 4096", c.RangeBytes)
	}
	if c.Timeout == 0 {
		c.Timeout = 30 * time.Second
	}
	if c.MaxRetries == 0 {
		c.MaxRetries = 2
	}
	if c.PublishBatchBytes == 0 {
		c.PublishBatchBytes = DefaultPublishBatchBytes
	}
	if c.PublishBatchBytes < 0 {
		return fmt.Errorf("remote: PublishBatchBytes %d is negative", c.PublishBatchBytes)
	}
	return nil
}

// Client talks to the bucket. Its methods are safe for concurrent use.
type Client struct {
	cfg   Config
	mc    *minio.Client
	stats clientStats
}

type clientStats struct {
	gets, getBytes, getErrs atomic.Int64
	puts, putBytes, putErrs atomic.Int64
	heads, deletes, lists   atomic.Int64
}

// ClientStats counts the requests a Client made.
type ClientStats struct {
	Gets, GetBytes, GetErrors int64
	Puts, PutBytes, PutErrors int64
	Heads, Deletes, Lists     int64
}

// Stats returns the client's counters.
func (c *Client) Stats() ClientStats {
	s := &c.stats
	return ClientStats{
		Gets: s.gets.Load(), GetBytes: s.getBytes.Load(), GetErrors: s.getErrs.Load(),
		Puts: s.puts.Load(), PutBytes: s.putBytes.Load(), PutErrors: s.putErrs.Load(),
		Heads: s.heads.Load(), Deletes: s.deletes.Load(), Lists: s.lists.Load(),
	}
}

// New makes a client; it contacts nothing (see EnsureBucket).
func New(cfg Config) (*Client, error) {
	if err := cfg.fill(); err != nil {
		return nil, err
	}
	var creds *credentials.Credentials
	if cfg.AccessKey != "" || cfg.SecretKey != "" {
		creds = credentials.NewStaticV4(cfg.AccessKey, cfg.SecretKey, cfg.SessionToken)
	} else {
		creds = credentials.NewChainCredentials([]credentials.Provider{
			&credentials.EnvAWS{}, &credentials.EnvMinio{},
			&credentials.FileAWSCredentials{}, &credentials.FileMinioClient{},
		})
	}
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConnsPerHost:   256,
		IdleConnTimeout:       90 * time.Second,
		ResponseHeaderTimeout: cfg.Timeout,
		TLSHandshakeTimeout:   10 * time.Second,
		DisableCompression:    true,
	}
	mc, err := minio.New(cfg.Endpoint, &minio.Options{
		Creds: creds, Secure: cfg.Secure, Region: cfg.Region, Transport: tr,
		BucketLookup: minio.BucketLookupPath, MaxRetries: cfg.MaxRetries,
	})
	if err != nil {
		return nil, fmt.Errorf("remote: %w", err)
	}
	return &Client{cfg: cfg, mc: mc}, nil
}

// Config returns the client's configuration (defaults filled in).
func (c *Client) Config() Config { return c.cfg }

// EnsureBucket creates the bucket if it does not exist.
func (c *Client) EnsureBucket(ctx context.Context) error {
	ok, err := c.mc.BucketExists(ctx, c.cfg.Bucket)
	if err != nil {
		return fmt.Errorf("remote: bucket %s at %s: %w", c.cfg.Bucket, c.cfg.Endpoint, err)
	}
	if ok {
		return nil
	}
	if err := c.mc.MakeBucket(ctx, c.cfg.Bucket, minio.MakeBucketOptions{Region: c.cfg.Region}); err != nil {
		if ok, err2 := c.mc.BucketExists(ctx, c.cfg.Bucket); err2 == nil && ok {
			return nil // another node made it
		}
		return fmt.Errorf("remote: make bucket %s at %s: %w", c.cfg.Bucket, c.cfg.Endpoint, err)
	}
	return nil
}

// The keys, under Prefix:
//
//	seg/STORE/seg-NNNNNNNN.hcs   a sealed segment of store STORE (its written bytes)
//	ctx/STORE/BINDING.hcx        a context object (one generation of one context)
//	name/NS/ID.hcm               the manifest of a named context (NS, ID path-escaped)

func (c *Client) segKey(store string, seg uint32) string {
	return fmt.Sprintf("%sseg/%s/seg-%08d.hcs", c.cfg.Prefix, store, seg)
}

func (c *Client) ctxKey(store string, binding [32]byte) string {
	return fmt.Sprintf("%sctx/%s/%x.hcx", c.cfg.Prefix, store, binding)
}

func (c *Client) nameKey(ns, id string) string {
	return fmt.Sprintf("%sname/%s/%s.hcm", c.cfg.Prefix, escape(ns), escape(id))
}

// escape makes a name one safe key segment: bytes outside [A-Za-z0-9._-]
// (and a leading '.') become %XX.
func escape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		ch := s[i]
		if ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' || ch == '_' || ch == '-' || (ch == '.' && i > 0) {
			b.WriteByte(ch)
		} else {
			fmt.Fprintf(&b, "%%%02X", ch)
		}
	}
	return b.String()
}

func (c *Client) reqCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, c.cfg.Timeout)
}

// ErrNotFound is wrapped by errors about an object that does not exist.
var ErrNotFound = errors.New("remote: object not found")

// ErrUnavailable is wrapped by the errors of a request the object store
// failed: down, erroring, slow past the timeout, a reply cut short.
var ErrUnavailable = errors.New("remote: object store unavailable")

func wrapErr(op, key string, err error) error {
	if err == nil {
		return nil
	}
	var er minio.ErrorResponse
	if errors.As(err, &er) && (er.Code == "NoSuchKey" || er.StatusCode == http.StatusNotFound) {
		return fmt.Errorf("%w: %s %s", ErrNotFound, op, key)
	}
	// Not %w: a transport error can wrap io.ErrUnexpectedEOF, which the
	// store reads as bytes past a segment's end (damage), and an outage
	// must never damage a context.
	return fmt.Errorf("%w: %s %s: %v", ErrUnavailable, op, key, err)
}

// stat returns an object's size and modification time.
func (c *Client) stat(ctx context.Context, key string) (minio.ObjectInfo, error) {
	c.stats.heads.Add(1)
	ctx, cancel := c.reqCtx(ctx)
	defer cancel()
	oi, err := c.mc.StatObject(ctx, c.cfg.Bucket, key, minio.StatObjectOptions{})
	return oi, wrapErr("stat", key, err)
}

// getRange reads len(p) bytes at off of an object with one ranged GET; a
// short body (a cut connection, a truncated reply) is an error, never
// silently short.
func (c *Client) getRange(ctx context.Context, key string, p []byte, off int64) error {
	c.stats.gets.Add(1)
	ctx, cancel := c.reqCtx(ctx)
	defer cancel()
	var o minio.GetObjectOptions
	if err := o.SetRange(off, off+int64(len(p))-1); err != nil {
		return err
	}
	body, _, _, err := minio.Core{Client: c.mc}.GetObject(ctx, c.cfg.Bucket, key, o)
	if err != nil {
		c.stats.getErrs.Add(1)
		return wrapErr("get", key, err)
	}
	defer body.Close()
	n, err := io.ReadFull(body, p)
	c.stats.getBytes.Add(int64(n))
	if err != nil {
		c.stats.getErrs.Add(1)
		// Not %w: a body cut short is a transport failure (retry, fall
		// back), not bytes that fail their checks (io.ErrUnexpectedEOF
		// would read as a record past the segment's end: damage).
		return fmt.Errorf("%w: get %s [%d, %d): %d bytes arrived: %v", ErrUnavailable, key, off, off+int64(len(p)), n, err)
	}
	return nil
}

// readRanges reads len(p) bytes at off as ranged GETs of at most RangeBytes,
// Parallel in flight.
func (c *Client) readRanges(ctx context.Context, key string, p []byte, off int64) error {
	rb := int(c.cfg.RangeBytes)
	if len(p) <= rb {
		return c.getRange(ctx, key, p, off)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sem := make(chan struct{}, c.cfg.Parallel)
	errc := make(chan error, (len(p)+rb-1)/rb)
	n := 0
	for i := 0; i < len(p); i += rb {
		part := p[i:min(i+rb, len(p))]
		at := off + int64(i)
		sem <- struct{}{}
		n++
		go func() {
			defer func() { <-sem }()
			err := c.getRange(ctx, key, part, at)
			if err != nil {
				cancel()
			}
			errc <- err
		}()
	}
	var first error
	for range n {
		if err := <-errc; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// get reads a whole (small) object.
func (c *Client) get(ctx context.Context, key string, limit int64) ([]byte, error) {
	c.stats.gets.Add(1)
	ctx, cancel := c.reqCtx(ctx)
	defer cancel()
	body, oi, _, err := minio.Core{Client: c.mc}.GetObject(ctx, c.cfg.Bucket, key, minio.GetObjectOptions{})
	if err != nil {
		c.stats.getErrs.Add(1)
		return nil, wrapErr("get", key, err)
	}
	defer body.Close()
	if oi.Size > limit {
		return nil, fmt.Errorf("remote: get %s: %d bytes, more than the %d a %s holds", key, oi.Size, limit, "manifest")
	}
	b, err := io.ReadAll(io.LimitReader(body, limit+1))
	c.stats.getBytes.Add(int64(len(b)))
	if err == nil && int64(len(b)) != oi.Size {
		err = fmt.Errorf("%d bytes arrived of %d", len(b), oi.Size)
	}
	if err != nil {
		c.stats.getErrs.Add(1)
		return nil, fmt.Errorf("remote: get %s: %w", key, err)
	}
	return b, nil
}

// put uploads an object of size bytes from r (a failed upload leaves no
// object: a single PUT or a multipart upload is visible only once whole).
// The body's MD5 travels with it and the store checks it.
// putChecked uploads body as key and checks the stored object's size
// against it (a short object is ErrCorrupt).
func (c *Client) putChecked(ctx context.Context, key string, body []byte, meta map[string]string) error {
	if err := c.put(ctx, key, bytes.NewReader(body), int64(len(body)), meta); err != nil {
		return err
	}
	oi, err := c.stat(ctx, key)
	if err != nil {
		return err
	}
	if oi.Size != int64(len(body)) {
		return fmt.Errorf("%w: %s holds %d bytes, %d uploaded", format.ErrCorrupt, key, oi.Size, len(body))
	}
	return nil
}

func (c *Client) put(ctx context.Context, key string, r io.Reader, size int64, meta map[string]string) error {
	c.stats.puts.Add(1)
	_, err := c.mc.PutObject(ctx, c.cfg.Bucket, key, r, size, minio.PutObjectOptions{
		SendContentMd5: true, PartSize: 16 << 20, NumThreads: 4, UserMetadata: meta,
		ContentType: "application/octet-stream",
	})
	if err != nil {
		c.stats.putErrs.Add(1)
		return wrapErr("put", key, err)
	}
	c.stats.putBytes.Add(size)
	return nil
}

func (c *Client) remove(ctx context.Context, key string) error {
	c.stats.deletes.Add(1)
	ctx, cancel := c.reqCtx(ctx)
	defer cancel()
	return wrapErr("delete", key, c.mc.RemoveObject(ctx, c.cfg.Bucket, key, minio.RemoveObjectOptions{}))
}

// ObjectInfo is one listed object.
type ObjectInfo struct {
	Key      string
	Size     int64
	Modified time.Time
}

// list lists the objects under prefix (relative to Config.Prefix).
func (c *Client) list(ctx context.Context, sub string) ([]ObjectInfo, error) {
	c.stats.lists.Add(1)
	var out []ObjectInfo
	for oi := range c.mc.ListObjects(ctx, c.cfg.Bucket, minio.ListObjectsOptions{Prefix: c.cfg.Prefix + sub, Recursive: true}) {
		if oi.Err != nil {
			return nil, fmt.Errorf("remote: list %s%s: %w", c.cfg.Prefix, sub, oi.Err)
		}
		out = append(out, ObjectInfo{Key: oi.Key, Size: oi.Size, Modified: oi.LastModified})
	}
	return out, nil
}
