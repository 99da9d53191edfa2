package remote

import (
	"flag"
	"fmt"
	"os"
	"time"
)

// Flags are the command-line flags of the remote tier, shared by hcached
// and the hcache commands that read a store with remote segments.
type Flags struct {
	Endpoint, Bucket, Prefix, Region, StoreID *string
	TLS                                       *bool
	Parallel                                  *int
	Timeout                                   *time.Duration
}

// RegisterFlags adds the --remote-* flags to fs. Credentials are never
// flags (they would show in ps): AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
// MINIO_ACCESS_KEY/MINIO_SECRET_KEY, ~/.aws/credentials
// (AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE) or ~/.mc/config.json.
func RegisterFlags(fs *flag.FlagSet) *Flags {
	host, _ := os.Hostname()
	return &Flags{
		Endpoint: fs.String("remote-endpoint", "", "S3 API host:port of the shared remote tier (\"\": no remote tier); credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/credentials or MINIO_* env"),
		Bucket:   fs.String("remote-bucket", "hcache", "bucket of the remote tier (created if missing)"),
		Prefix:   fs.String("remote-prefix", "", "key prefix of the remote tier in the bucket, e.g. prod/"),
		Region:   fs.String("remote-region", "", "region of the bucket (\"\": discovered)"),
		StoreID:  fs.String("remote-store-id", host, "this store's id in the bucket, unique in the fleet (segment objects carry it)"),
		TLS:      fs.Bool("remote-tls", false, "talk HTTPS to --remote-endpoint"),
		Parallel: fs.Int("remote-parallel", 8, "ranged GETs one remote read keeps in flight"),
		Timeout:  fs.Duration("remote-timeout", 30*time.Second, "longest one request to the object store may take"),
	}
}

// Config returns the configuration the flags give (nil: no remote tier).
func (f *Flags) Config() (*Config, error) {
	if *f.Endpoint == "" {
		return nil, nil
	}
	c := &Config{Endpoint: *f.Endpoint, Bucket: *f.Bucket, Prefix: *f.Prefix, Region: *f.Region, StoreID: *f.StoreID,
		Secure: *f.TLS, Parallel: *f.Parallel, Timeout: *f.Timeout}
	if err := c.fill(); err != nil {
		return nil, fmt.Errorf("--remote-*: %w", err)
	}
	return c, nil
}
