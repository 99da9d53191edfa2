// Package importrules holds no code: its test checks the module's import
// rules (the layering order, who may link the storage engine and the CUDA
// backend, and that internal/ is leaf plumbing) with `go list`, so that
// `go test ./...` fails when a change breaks them. The rules are written down
// in importrules_test.go.
package importrules
