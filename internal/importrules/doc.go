// Package importrules holds no code: its test checks the module's import
// rules with `go list` (the layering order, who may link the storage engine
// and the CUDA backend, that internal/ is leaf plumbing, that package names
// match their folders), so that `go test ./...` fails when a change breaks
// them. The rules are written down in importrules_test.go.
package importrules
