# hcache: a state store for LLM serving. `make help` lists the targets.
GO        ?= go
BIN       := bin/hcache
BENCH_DIR ?= $(CURDIR)/tmp
FUZZTIME  ?= 4s
FUZZ_LONG ?= 60s
FUZZ_TARGETS := FuzzRecordHeader FuzzSegmentScan FuzzSegmentHeader FuzzIndexRecords FuzzIdentity FuzzHFConfig FuzzSafetensorsHeader

.PHONY: help build test unit fuzz-smoke fuzz bench demo crash lint clean

help:
	@echo "make demo        multi-turn conversation on an embedded store and a synthetic model; checks losslessness"
	@echo "make test        lint, unit/integration tests under -race, and every fuzz target briefly"
	@echo "make bench       go benchmarks, then bench io and bench store against fio (BENCH_DIR=$(BENCH_DIR))"
	@echo "make crash       >= 1000 simulated power cuts and 50 SIGKILLed writers"
	@echo "make fuzz        every fuzz target for FUZZ_LONG=$(FUZZ_LONG)"
	@echo "make build       bin/hcache"

build:
	$(GO) build -o $(BIN) ./cmd/hcache

demo: build
	./$(BIN) demo

test: lint unit fuzz-smoke

unit:
	$(GO) test -race -count=1 -timeout 20m ./...

fuzz-smoke:
	@for t in $(FUZZ_TARGETS); do \
		echo "fuzz $$t for $(FUZZTIME)"; \
		$(GO) test ./fuzz -run='^$$' -fuzz="^$$t$$" -fuzztime=$(FUZZTIME) >/dev/null || exit 1; \
	done
	@echo "fuzz-smoke: $(words $(FUZZ_TARGETS)) passed, 0 failed"

fuzz:
	@for t in $(FUZZ_TARGETS); do \
		echo "fuzz $$t for $(FUZZ_LONG)"; \
		$(GO) test ./fuzz -run='^$$' -fuzz="^$$t$$" -fuzztime=$(FUZZ_LONG) || exit 1; \
	done

crash: build
	./$(BIN) crashtest --cycles 10 --ops 200 --kill 50 --json

bench: build
	mkdir -p $(BENCH_DIR)
	$(GO) test -run='^$$' -bench=. -benchtime=2s ./chunk ./internal/tensor
	./$(BIN) bench io --dir $(BENCH_DIR) --size 4G --bs 1M --qd 8 --json
	./$(BIN) bench io --dir $(BENCH_DIR) --size 4G --bs 1M --qd 32 --json
	./$(BIN) bench io --dir $(BENCH_DIR) --size 4G --bs 1M --qd 8 --engine fallback --json
	./$(BIN) bench store --dir $(BENCH_DIR) --model llama2-7b --tokens 4096 --contexts 16 --json
	./$(BIN) bench daemon --dir $(BENCH_DIR) --model llama2-7b --tokens 512 --contexts 8 --rounds 4 --json

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

clean:
	rm -rf bin tmp

# Regenerates the committed gRPC code from proto/ with pinned generators:
# protoc from Debian's protobuf-compiler (3.21.12), protoc-gen-go and
# protoc-gen-go-grpc at the versions below.
PROTOC_GEN_GO      := google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
PROTOC_GEN_GO_GRPC := google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.5.1
PROTO_BIN          := $(CURDIR)/bin/proto

.PHONY: proto
proto:
	GOBIN=$(PROTO_BIN) $(GO) install $(PROTOC_GEN_GO)
	GOBIN=$(PROTO_BIN) $(GO) install $(PROTOC_GEN_GO_GRPC)
	protoc -I proto --plugin=protoc-gen-go=$(PROTO_BIN)/protoc-gen-go --plugin=protoc-gen-go-grpc=$(PROTO_BIN)/protoc-gen-go-grpc \
		--go_out=proto --go_opt=paths=source_relative \
		--go-grpc_out=proto --go-grpc_opt=paths=source_relative \
		proto/hcache/v1/hcache.proto
	protoc -I proto --python_out=clients/python/hcache_client proto/hcache/v1/hcache.proto
	mv clients/python/hcache_client/hcache/v1/hcache_pb2.py clients/python/hcache_client/hcache_pb2.py
	rm -rf clients/python/hcache_client/hcache
