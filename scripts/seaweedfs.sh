#!/usr/bin/env bash
# Builds SeaweedFS's `weed` (the S3-compatible object store the remote-tier
# tests run against, no mock) into a cache directory if it is not there yet,
# and prints its path on stdout. The build takes 5-7 minutes on 2 cores and
# makes a ~230 MB binary: it runs once per cache directory.
#   WEED=$(bash scripts/seaweedfs.sh [CACHE_DIR])   # default $HCACHE_CACHE or ~/.cache/hcache
# `go install` refuses the module (its go.mod has replace directives), so the
# module's source is downloaded, copied to a writable directory and built there.
# The tests find the binary through HCACHE_WEED (or weed on PATH); without it they
# skip, naming this script; with HCACHE_REQUIRE_S3=1 (CI) they fail instead.
set -euo pipefail
VERSION=v0.0.0-20261109003541-7506e5f91cd6
CACHE=${1:-${HCACHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hcache}}
BIN="$CACHE/weed-$VERSION/weed"
if [ -x "$BIN" ]; then
	echo "$BIN"
	exit 0
fi
mkdir -p "$CACHE"
SRC=$(cd /tmp && GOFLAGS=-mod=mod go mod download -json "github.com/seaweedfs/seaweedfs@$VERSION" |
	sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
if [ -z "$SRC" ] || [ ! -d "$SRC" ]; then
	echo "seaweedfs.sh: go mod download gave no source directory for seaweedfs@$VERSION" >&2
	exit 1
fi
WORK=$(mktemp -d "$CACHE/weed-build.XXXXXX")
trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT
cp -r "$SRC/." "$WORK/"
chmod -R u+w "$WORK"
echo "seaweedfs.sh: building weed from $SRC (5-7 minutes on 2 cores)" >&2
(cd "$WORK" && go build -o "$WORK/weed.bin" ./weed)
mkdir -p "$(dirname "$BIN")"
mv "$WORK/weed.bin" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
echo "$BIN"
