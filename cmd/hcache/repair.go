package main

import (
	"fmt"
	"io"

	"github.com/hcache/hcache/chunk"
	"github.com/hcache/hcache/internal/progress"
)

func init() {
	register("repair", "rebuild a lost or damaged index from the segment files alone", repair)
	examples["repair"] = "hcache repair --dir /var/lib/hcache   # after open or fsck said the index is damaged"
	examples["fsck"] = "hcache fsck --dir /var/lib/hcache      # exit 0 only if every indexed byte verifies"
	examples["stat"] = "hcache stat --dir /var/lib/hcache --json"
}

func repair(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("repair", stderr)
	dir := fs.String("dir", "", "store directory (required)")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	ct := fs.Int("chunk-tokens", 0, "tokens per chunk group, used only when no record and no readable index says (an empty store)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *dir == "" {
		fs.Usage()
		return errUsage
	}
	var bar *progress.Bar
	var last int64
	rep, err := chunk.Repair(chunk.RepairOptions{Dir: *dir, ChunkTokens: *ct, Logf: func(f string, a ...any) { fmt.Fprintf(stderr, f+"\n", a...) },
		Progress: func(done, total int64) {
			if bar == nil {
				bar = progress.New(stderr, "repair", total, "bytes")
			}
			bar.Add(done - last)
			last = done
		}})
	bar.Finish()
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(stdout, rep)
	}
	fmt.Fprintf(stdout, "%d segments scanned, %d records checked\n", rep.Segments, rep.Records)
	if rep.OldIndex != "" {
		fmt.Fprintf(stdout, "previous index moved to %s\n", rep.OldIndex)
	}
	for _, a := range rep.Adopted {
		fmt.Fprintf(stdout, "adopted: %s\n", a)
	}
	for _, a := range rep.SetAside {
		fmt.Fprintf(stdout, "set aside: %s\n", a)
	}
	fmt.Fprintf(stdout, "adopted %d contexts (%d groups, %d tokens); %d set aside; %d records of deleted contexts; %d superseded versions\n", rep.Contexts, rep.Groups, rep.Tokens, len(rep.SetAside), rep.Deleted, rep.Superseded)
	return nil
}
