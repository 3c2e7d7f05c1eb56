# Two commands on a fresh machine: `make run` and `make test`. Everything else is a step they share.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-stamp
DATA   ?= ./data
LISTEN ?= 127.0.0.1:50051
BLUEPRINT ?= examples/blueprint.toml
PYTEST_ARGS ?=

.PHONY: all install build compile run demo cluster test test-compiled test-pure reliability fuzz lint bench bench-full bench-micro bench-deps bench-hostile bench-targets clean

all: build

# Nothing beyond Python 3.11+ and a C compiler: no system package (the build says so in one sentence if the
# compiler is missing).
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# build requirements first, so the project itself installs without build isolation (fast, offline-safe)
	$(PIP) install -q setuptools==84.2.1 wheel cython==3.3.1 grpcio-tools==1.85.1 mypy-protobuf==5.1.0 googleapis-common-protos==1.76.0 phonenumbers==9.0.43
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	touch $@

install: $(STAMP)

# Stubs from proto/ and the Cython modules from ext/, in place (fails loudly if either cannot be built).
build compile: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# The example blueprint's secrets (encryption key, webhook secrets) by environment variable: fresh random ones,
# made once per data directory and kept beside it (never committed).
DEMO_ENV := $(DATA)/demo.env

$(DEMO_ENV):
	mkdir -p $(DATA)
	umask 077 && $(PY) examples/demo_env.py > $@

demo: build $(DEMO_ENV)
	. $(DEMO_ENV) && $(VENV)/bin/resolver import examples/demo_customers.jsonl --config $(BLUEPRINT) --data-dir $(DATA) --no-progress

run: demo
	. $(DEMO_ENV) && exec $(VENV)/bin/resolver serve --config $(BLUEPRINT) --data-dir $(DATA) --listen $(LISTEN)

# Issue 19: three NATS JetStream servers and three resolver nodes on 127.0.0.1, until Ctrl-C (README "Past one
# machine"); stores in ./data/cluster (kept between runs), CLUSTER_ARGS="--config FILE" to serve a blueprint.
CLUSTER_ARGS ?=
cluster: build
	$(PY) scripts/cluster.py $(CLUSTER_ARGS)

# Issue 19's figures: Resolve p99 on a cluster node while the cluster takes writes vs one machine in the same run,
# write p99 end to end, reads over 1-3 nodes; report in bench/out/cluster/ (3 NATS + 3 nodes + 1 server, 127.0.0.1).
.PHONY: bench-cluster
bench-cluster: bench-deps
	$(PY) -m bench.cluster $(BENCH_ARGS)

# The cluster suite at the issue's scale (10,000 concurrent Upserts over 3 nodes); `make test` runs it at 1,000.
.PHONY: cluster-test
cluster-test: build
	CLUSTER=full $(PY) -m pytest -q tests/cluster $(PYTEST_ARGS)

# The whole suite, against the compiled modules and again against the pure-Python twins.
# pytest exit code 5 (no tests collected) is a failure here, never a silent pass.
test: lint test-compiled test-pure

# Both passes run on TEST_JOBS pytest-xdist processes (one per CPU, at most 4; TEST_JOBS=0: in pytest's own
# process). Every test makes its own data directory, ports and servers, so none waits on another; most of a
# test's time is servers starting, processes signalled and disks synced, which overlap. `make test` asserts no
# timing (the reliability suite's timed targets are `make reliability`'s, which stays one test at a time).
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
XDIST := -n $(TEST_JOBS) --dist worksteal

test-compiled: build
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# The pure pass proves the twins are the whole product in process: every unit test and every in-process server
# test. What is about processes, disks, signals and the wire (tests/reliability, tests/cluster, tests marked
# `process`), the scale runs of paths it already covers (`scale`) and the differential tests, which load both
# implementations themselves (`differential`), run once, in the compiled pass: run again they would repeat the
# same work for twice the CI time. tests/unit/test_selection.py checks the switch picks the twins here.
test-pure: build
	RESOLVER_NO_EXTENSIONS=1 $(PY) -m pytest $(XDIST) --ignore=tests/reliability --ignore=tests/cluster \
		-m "not process and not scale and not differential" $(PYTEST_ARGS)

# Issue 18's suite at full scale (20 kills, a minute of overload, 10,000 model steps, fuzzing at scale): writes
# tests/reliability/out/report.md. `make test` runs the same tests short.
reliability: build
	RELIABILITY=full $(PY) -m pytest -q -p no:cacheprovider tests/reliability $(PYTEST_ARGS)

# `make test` runs the request-decoding fuzz target at 200 examples per source to stay fast; this runs it at scale.
fuzz: build
	FUZZ_EXAMPLES=20000 $(PY) -m pytest -q tests/unit/test_wire_fuzz.py

lint: build
	$(VENV)/bin/ruff check resolver tests bench
	$(VENV)/bin/mypy resolver

# Micro suites (pytest-benchmark, in process), then the load benchmark: dataset, import, PostgreSQL peer,
# open-loop load against Resolve, the health-check floor and the peer; report and plots in bench/out/ (git-ignored).
BENCH_ARGS ?=
REPEAT ?= 3
bench: bench-micro bench-deps
	$(PY) -m bench.run --customers 200000 --out bench/out/quick $(BENCH_ARGS)
	$(PY) -m bench.targets --repeat $(REPEAT) --out bench/out/targets

# Issue 13's table alone: 1 channel and 4, with and without writes, CPU per call, both CPU layouts (~25 min).
bench-targets: bench-deps
	$(PY) -m bench.targets --repeat $(REPEAT) --out bench/out/targets $(BENCH_ARGS)

bench-full: bench-deps
	$(PY) -m bench.run --customers 1000000 --queries 100000 --duration 60 --windows 12 --step 4 \
		--rates 500,1000,1500,2000,2500,3000,3500,4000,5000,6000 --out bench/out/full $(BENCH_ARGS)

bench-micro: build
	$(PY) -m pytest bench -o testpaths=bench --ignore=bench/test_hotpath.py --benchmark-only \
		--benchmark-columns=min,median,mean,ops,rounds --benchmark-group-by=group

# Issue 3's hot-path figures on a 1M-customer index (imported once by `resolver import`, kept in bench/out/cache/).
.PHONY: bench-hotpath
bench-hotpath: build
	$(PY) -m pytest bench/test_hotpath.py -o testpaths=bench --benchmark-only \
		--benchmark-columns=min,median,mean,ops,rounds --benchmark-group-by=group

bench-deps: build
	$(PY) -c "import hdrh, matplotlib, psycopg" 2>/dev/null || $(PIP) install -q --no-build-isolation -e ".[dev,bench]"

clean:
	rm -rf build dist *.egg-info resolver/*.so resolver/v1/*_pb2* resolver/_phonemeta.py ext/*.c .pytest_cache .benchmarks

# Is this machine fast for RPCs right now? Server CPU per bare grpcio health check (no resolver code), ~10 s.
.PHONY: bench-machine
bench-machine: bench-deps
	$(PY) -m bench.machine $(BENCH_ARGS)

# Back-pressure (issue 5): Resolve at 1,000/s while 20,000 signed webhooks are pushed and drained; report in
# bench/out/events/ (about 2-3 minutes, everything on 127.0.0.1).
.PHONY: bench-events
bench-events: bench-deps
	$(PY) -m bench.events --out bench/out/events $(BENCH_ARGS)

# Outbound delivery (issue 15): messages/s to a local CRM receiver (rate unlimited), and Resolve p99 at 1,000/s while
# 20,000 outbound messages drain vs without; report in bench/out/outbound/ (about 2-3 minutes a run; BENCH_ARGS="--repeat 3").
.PHONY: bench-outbound
bench-outbound: bench-deps
	$(PY) -m bench.outbound --out bench/out/outbound $(BENCH_ARGS)

# `resolver import` rows/s (issue 3): dataset, the real CLI into a fresh data directory, the same file again
# (every row replays), `resolver check`, beside the raw py-lmdb floor in the same run; report in bench/out/import/.
# 200k customers by default; BENCH_ARGS="--customers 1000000" for the issue's figure.
.PHONY: bench-import
bench-import: build
	$(PY) -m bench.import_rate --out bench/out/import $(BENCH_ARGS)

# Server CPU per call (issue 12): Resolve of 1, 100 and 101 phones, undecodable bytes, health floor; new vs old registration.
bench-hostile: build
	$(PY) -m bench.hostile $(BENCH_ARGS)

# Issue 13: Resolve p99 / health p99 from 1 channel, 1 round-robin channel over the workers, and 4 channels; and
# Resolve alone / with 5% Upserts / alone again beside the disk's own fsync. Both reuse a 200k dataset in /tmp/wvr.
.PHONY: bench-channels bench-writes
bench-channels: bench-deps
	$(PY) -m bench.channels $(BENCH_ARGS)

bench-writes: bench-deps
	$(PY) -m bench.writes_vs_reads $(BENCH_ARGS)

# Issue 15 part 4: Upserts/s from 4 writers with no change-feed watcher, a live one and a stalled one (median of
# $(REPEAT) rounds, ratios to "none"); about 1.5 minutes; results in bench/out/feed/.
.PHONY: bench-feed
bench-feed: bench-deps
	$(PY) -m bench.feed --repeat $(REPEAT) --out bench/out/feed $(BENCH_ARGS)

# Issue 16: server CPU per Resolve at 1,000/s, plaintext without a token vs TLS + bearer token, alternating, 5 rounds
# of 15 s each (about 3 minutes); report in bench/out/security/.
.PHONY: bench-security
bench-security: build
	$(PY) -m bench.security --out bench/out/security $(BENCH_ARGS)

# Issue 17: server CPU per Resolve at 1,000/s with [metrics] off vs on (/metrics scraped every 5 s), alternating,
# 5 rounds of 15 s each (about 3 minutes); report in bench/out/metrics/.
.PHONY: bench-metrics
bench-metrics: build
	$(PY) -m bench.metrics --out bench/out/metrics $(BENCH_ARGS)

# Server CPU per Resolve at 1,000/s with the access log off ([logging] level WARNING) vs on (INFO), alternating.
.PHONY: bench-access-log
bench-access-log: build
	$(PY) -m bench.access_log --out bench/out/access_log $(BENCH_ARGS)

# ResolveStream's items/s and server CPU per item beside a bare grpcio echo stream, alternating (~1 minute).
.PHONY: bench-stream
bench-stream: build
	$(PY) -m bench.stream --out bench/out/stream $(BENCH_ARGS)
