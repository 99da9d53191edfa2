// Command hcache is the command-line tool of the hcache state store: the
// demo, benchmarks, the consistency checker, store statistics, synthetic
// models and the crash-consistency harness, as subcommands of one binary.
//
// The subcommands use the standard library's flag package: each has a
// handful of flags, and a dispatch table keeps the binary free of a CLI
// framework's dependency tree. The table is one tree: a two-word command
// ("bench io") sits in the group of its first word, and every level answers
// -h, --help and help with its usage and an example (exit 0).
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"slices"
	"sort"
	"strings"

	"github.com/hcache/hcache/internal/buildinfo"
	"github.com/hcache/hcache/internal/units"
)

type command struct {
	summary string
	run     func(args []string, stdout, stderr io.Writer) error
}

var commands = map[string]command{}

func register(name, summary string, run func(args []string, stdout, stderr io.Writer) error) {
	commands[name] = command{summary, run}
}

// errUsage marks an error already explained by a usage message.
var errUsage = errors.New("usage")

func main() {
	// HCACHE_CPUPROFILE=FILE writes a CPU profile of the command.
	if path := os.Getenv("HCACHE_CPUPROFILE"); path != "" {
		if f, err := os.Create(path); err == nil {
			pprof.StartCPUProfile(f)
			code := run(os.Args[1:], os.Stdout, os.Stderr)
			pprof.StopCPUProfile()
			f.Close()
			os.Exit(code)
		}
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	switch args[0] {
	case "-h", "--help", "-help", "help":
		if len(args) > 1 && args[0] == "help" { // "help bench io" is "bench io -h"
			return run(append(args[1:], "-h"), stdout, stderr)
		}
		usage(stdout)
		return 0
	case "--version", "-version", "version":
		fmt.Fprintln(stdout, buildinfo.String("hcache"))
		return 0
	}
	// Two-word commands ("bench io") first, then one-word ones.
	name := args[0]
	rest := args[1:]
	if len(args) > 1 {
		if _, ok := commands[args[0]+" "+args[1]]; ok {
			name, rest = args[0]+" "+args[1], args[2:]
		}
	}
	c, ok := commands[name]
	if !ok {
		if group := groupOf(args[0]); group != nil {
			// "hcache bench" alone or with -h: the group's commands.
			if len(args) > 1 && isHelp(args[1]) {
				groupUsage(stdout, args[0], group)
				return 0
			}
			if len(args) > 1 {
				fmt.Fprintf(stderr, "hcache: unknown command %q\n\n", args[0]+" "+args[1])
			}
			groupUsage(stderr, args[0], group)
			return 2
		}
		fmt.Fprintf(stderr, "hcache: unknown command %q\n\n", strings.Join(args[:min(2, len(args))], " "))
		usage(stderr)
		return 2
	}
	if slices.ContainsFunc(rest, isHelpFlag) {
		stderr = stdout // asked-for help goes to stdout (hcache ls -h | less)
	}
	if err := c.run(rest, stdout, stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0 // help was asked for and printed
		}
		if errors.Is(err, errUsage) {
			return 2
		}
		fmt.Fprintf(stderr, "hcache %s: %v\n", name, err)
		var ec interface{ ExitCode() int }
		if errors.As(err, &ec) {
			return ec.ExitCode()
		}
		return 1
	}
	return 0
}

// isHelpFlag reports the flags the flag package answers with the usage.
func isHelpFlag(a string) bool { return a == "-h" || a == "--help" || a == "-help" }

func isHelp(a string) bool { return isHelpFlag(a) || a == "help" }

// groupOf lists the two-word commands whose first word is word, sorted.
func groupOf(word string) []string {
	var names []string
	for n := range commands {
		if first, _, ok := strings.Cut(n, " "); ok && first == word {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	return names
}

func groupUsage(w io.Writer, word string, names []string) {
	fmt.Fprintf(w, "usage: hcache %s COMMAND [flags]\n\ncommands:\n", word)
	for _, n := range names {
		fmt.Fprintf(w, "  %-16s %s\n", n, commands[n].summary)
	}
	fmt.Fprintf(w, "\nExample:\n  %s\n\nRun 'hcache %s COMMAND -h' for the flags and an example of one command.\n", examples[names[0]], word)
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: hcache COMMAND [flags]\n\ncommands:")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-16s %s\n", n, commands[n].summary)
	}
	fmt.Fprintln(w, "\nExample:\n  hcache demo                     # a conversation saved, evicted and restored; checks losslessness\n"+
		"  hcache ls --addr /run/hcache/hcache.sock\n\n"+
		"Run 'hcache COMMAND -h' for the flags and an example of one command, 'hcache --version' for the build.")
}

// examples holds one example invocation per command, shown by its -h.
var examples = map[string]string{}

func newFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("hcache "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		w := fs.Output()
		fmt.Fprintf(w, "usage: hcache %s [flags]\n\n%s\n", name, commands[name].summary)
		if ex := examples[name]; ex != "" {
			fmt.Fprintf(w, "\nExample:\n  %s\n", ex)
		}
		fmt.Fprintln(w, "\nflags:")
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses args and refuses stray positional arguments.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err) // the flag package printed it
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return errUsage
	}
	return nil
}

// sizeFlag parses byte sizes such as 4096, 64K, 1M, 4G.
type sizeFlag int64

func (s *sizeFlag) String() string { return units.FormatSize(int64(*s)) } // -h shows 1G, not 1073741824

func (s *sizeFlag) Set(v string) error {
	n, err := parseSize(v)
	if err != nil {
		return err
	}
	*s = sizeFlag(n)
	return nil
}

func parseSize(v string) (int64, error) { return units.ParseSize(v) }

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
