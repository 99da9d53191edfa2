// Package buildinfo says which build a binary is: the module version and
// the commit it was built from, for `hcache --version` and `hcached
// --version`.
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Commit may be set at link time (go build -ldflags "-X
// github.com/hcache/hcache/internal/buildinfo.Commit=SHA") for builds
// without the VCS stamp (go build -buildvcs=false, a source tarball).
var Commit string

// String is one line: "NAME VERSION commit SHA[ (modified)] TIME GOVERSION".
func String(name string) string {
	version, commit, when, modified := "(devel)", Commit, "", false
	if bi, ok := debug.ReadBuildInfo(); ok {
		if v := bi.Main.Version; v != "" {
			version = v
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				if commit == "" {
					commit = s.Value
				}
			case "vcs.time":
				when = s.Value
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
	}
	if commit == "" {
		commit = "unknown (built without VCS information)"
	}
	out := fmt.Sprintf("%s %s commit %s", name, version, commit)
	if modified {
		out += " (modified)"
	}
	if when != "" {
		out += " " + when
	}
	return out + " " + runtime.Version()
}
