# hcache: a state store for LLM serving. `make help` lists the targets.
GO        ?= go
BIN       := bin/hcache
BENCH_DIR ?= $(CURDIR)/tmp
FUZZTIME  ?= 4s
FUZZ_LONG ?= 60s
FUZZ_TARGETS := FuzzRecordHeader FuzzSegmentScan FuzzSegmentHeader FuzzIndexRecords FuzzIdentity FuzzHFConfig FuzzSafetensorsHeader

.PHONY: help build test unit fuzz-smoke fuzz bench bench-compare demo crash lint clean

help:
	@echo "make demo        multi-turn conversation on an embedded store and a synthetic model; checks losslessness"
	@echo "make test        lint, unit/integration tests under -race, and every fuzz target briefly"
	@echo "make bench       go benchmarks, then bench io and bench store against fio (BENCH_DIR=$(BENCH_DIR))"
	@echo "make crash       >= 1000 simulated power cuts and 50 SIGKILLed writers"
	@echo "make fuzz        every fuzz target for FUZZ_LONG=$(FUZZ_LONG)"
	@echo "make bench-compare  hcache against its peers, llama2-7b chat and long, llama3-8b chat; reports in bench/results"
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

bench-compare: build
	mkdir -p $(BENCH_DIR)
	./$(BIN) bench compare --model llama2-7b --workload chat --dir $(BENCH_DIR) --json
	./$(BIN) bench compare --model llama2-7b --workload long --dir $(BENCH_DIR) --json
	./$(BIN) bench compare --model llama3-8b --workload chat --dir $(BENCH_DIR) --json

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

clean:
	rm -rf bin tmp
