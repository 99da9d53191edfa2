package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/chunk/remote"
)

func init() {
	register("remote gc", "remove objects of the remote tier nothing refers to and older than --grace (idempotent; --dir: also this store's unlisted segments)", remoteGCCmd)
	register("remote check", "check the remote tier read-only: every manifest, its context object's size, header and trailer (--deep: every layer's checksum, every group object and its parent link, each tip's chain of groups and its tail)", remoteCheckCmd)
	register("remote fetch-segments", "copy this store's segment objects with no local file into --dir/segments (before hcache repair; writes nothing to the bucket)", remoteFetchCmd)
	examples["remote gc"] = "hcache remote gc --remote-endpoint 127.0.0.1:8333 --remote-bucket hcache --dir /var/lib/hcache --remote-store-id node-a --grace 1h"
	examples["remote check"] = "hcache remote check --remote-endpoint 127.0.0.1:8333 --remote-bucket hcache --deep --json"
	examples["remote fetch-segments"] = "hcache remote fetch-segments --remote-endpoint 127.0.0.1:8333 --dir /var/lib/hcache --remote-store-id node-a && hcache repair --dir /var/lib/hcache"
}

// remoteFlags parses the --remote-* flags (required) and more.
func remoteClient(name string, args []string, stderr io.Writer, more func(*targetFlags)) (*remote.Client, *targetFlags, error) {
	f := &targetFlags{FlagSet: newFlags(name, stderr)}
	f.StringVar(&f.t.dir, "dir", "", "store directory (opened read-only)")
	f.BoolVar(&f.t.asJSON, "json", false, "print JSON")
	f.t.remote = remote.RegisterFlags(f.FlagSet)
	if more != nil {
		more(f)
	}
	if err := parseFlags(f.FlagSet, args); err != nil {
		return nil, nil, err
	}
	rc, err := f.t.remote.Config()
	if err != nil {
		return nil, nil, err
	}
	if rc == nil {
		return nil, nil, f.usage("missing --remote-endpoint HOST:PORT (the S3 API of the remote tier)")
	}
	c, err := remote.New(*rc)
	return c, f, err
}

func remoteGCCmd(args []string, stdout, stderr io.Writer) error {
	var grace time.Duration
	var dry bool
	c, f, err := remoteClient("remote gc", args, stderr, func(f *targetFlags) {
		f.DurationVar(&grace, "grace", remote.DefaultGrace, "keep objects younger than this whatever refers to them (what another node just wrote, what a reader still reads); above the longest upload and clock skew")
		f.BoolVar(&dry, "dry-run", false, "list what would be deleted, delete nothing")
	})
	if err != nil {
		return err
	}
	if grace <= 0 {
		return f.usage("--grace must be positive")
	}
	o := remote.GCOptions{Grace: grace, DryRun: dry}
	if f.t.dir != "" {
		// Read-only: the running daemon keeps its lock; what it wrote
		// since is younger than the grace.
		st, err := f.t.open(stderr, true)
		if err != nil {
			return err
		}
		defer st.Close()
		o.Stores, o.StoreIDs = []*chunk.Store{st}, []string{c.Config().StoreID}
	}
	rep, err := c.GC(context.Background(), o)
	if err != nil {
		return err
	}
	if f.t.asJSON {
		if err := printJSON(stdout, rep); err != nil {
			return err
		}
	} else {
		verb := "deleted"
		if dry {
			verb = "would delete"
		}
		fmt.Fprintf(stdout, "%d manifests, %d context objects, %d segment objects, %d tips, %d group objects; %s %d, kept %d younger than %v\n",
			rep.Manifests, rep.ContextObjects, rep.SegmentObjects, rep.Tips, rep.GroupObjects, verb, len(rep.Deleted), rep.KeptYoung, grace)
		for _, k := range rep.Deleted {
			fmt.Fprintf(stdout, "  %s %s\n", verb, k)
		}
		for _, s := range rep.Skipped {
			fmt.Fprintf(stdout, "  skipped: %s\n", s)
		}
	}
	if len(rep.Errors) > 0 {
		return fmt.Errorf("%d errors: %s", len(rep.Errors), strings.Join(rep.Errors, "; "))
	}
	return nil
}

func remoteCheckCmd(args []string, stdout, stderr io.Writer) error {
	var deep bool
	c, f, err := remoteClient("remote check", args, stderr, func(f *targetFlags) {
		f.BoolVar(&deep, "deep", false, "also read every layer and check its checksum, every group object, and walk each tip object's chain")
	})
	if err != nil {
		return err
	}
	rep, err := c.Check(context.Background(), deep)
	if err != nil {
		return err
	}
	if f.t.asJSON {
		if err := printJSON(stdout, rep); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(stdout, "%d manifests checked, %d layers verified, %d tips read, %d group objects verified, %d errors\n", rep.Manifests, rep.Layers, rep.Tips, rep.Groups, len(rep.Errors))
		for _, e := range rep.Errors {
			fmt.Fprintf(stdout, "  %s\n", e)
		}
	}
	if !rep.OK() {
		return fmt.Errorf("the remote tier has %d errors", len(rep.Errors))
	}
	return nil
}

func remoteFetchCmd(args []string, stdout, stderr io.Writer) error {
	c, f, err := remoteClient("remote fetch-segments", args, stderr, nil)
	if err != nil {
		return err
	}
	if f.t.dir == "" {
		return f.usage("missing --dir DIR (the store directory to copy the segments into)")
	}
	got, err := c.DownloadSegments(context.Background(), f.t.dir)
	for _, n := range got {
		fmt.Fprintf(stdout, "fetched %s\n", n)
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%d segments fetched; now hcache repair --dir %s rebuilds the index from every segment\n", len(got), f.t.dir)
	return nil
}
