# Two entry points: `make run` (set up, run the main job) and `make test`
# (set up with the dev extra, lint, run the test suite). Both are idempotent:
# the venv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP     := $(VENV)/.stamp-run
DEV_STAMP := $(VENV)/.stamp-dev

.PHONY: run test lint check validate validate-quick sensitivity large-partitions bench fuzz clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(STAMP)

# The headline experiment: every policy vs overcommit, then its figures.
# --resume makes a second `make run` reuse finished sweep runs instead of recomputing them; the single
# default run (one second) is this target's own output and is simply written again (--force).
run: $(STAMP)
	$(BIN)/tlbsim run experiments/configs/default.toml --out results/default --force
	$(BIN)/tlbsim sweep experiments/overcommit.toml --out results/overcommit --resume
	$(BIN)/tlbsim plot results/overcommit

lint: $(DEV_STAMP)
	$(BIN)/ruff check tlbsim tests experiments benchmarks notebooks

test: $(DEV_STAMP) lint
	$(BIN)/python -m pytest

# The CI regression gate: simulated latency against results/baselines/ (exit 1 on a regression).
check: $(STAMP)
	$(BIN)/tlbsim check

# Validation against published measurements: the table, figures and docs/validation.md (exit 1 on a miss).
validate: $(STAMP)
	$(BIN)/tlbsim validate --docs docs/validation.md

# The quick subset CI runs.
validate-quick: $(STAMP)
	$(BIN)/tlbsim validate --quick --no-progress

# Which estimated parameters decide the policy answers (Morris screening, Hyper-V and KVM hosts; about two
# minutes on 2 cores).
sensitivity: $(STAMP)
	$(BIN)/tlbsim sensitivity experiments/sensitivity/policy_choice.toml --resume
	$(BIN)/tlbsim sensitivity experiments/sensitivity/policy_choice_kvm.toml --resume

# Large partitions (experiments/large_partitions.toml): mask vs ALL_PROCESSORS vs linux against the active set's
# share of the VPs, then its figures. Capped at 1,024 VPs by default (576 runs: about 6 minutes on 2 shared
# cores); `make large-partitions LP_SETS=` runs every size up to 4,096 (README, "Large partitions").
LP_SETS ?= --set 'grid.partition.vps=[64, 256, 1024]'
LP_OUT  ?= results/large_partitions$(if $(strip $(LP_SETS)),_capped,)
large-partitions: $(STAMP)
	$(BIN)/tlbsim sweep experiments/large_partitions.toml $(LP_SETS) --out $(LP_OUT) --resume
	$(BIN)/tlbsim plot $(LP_OUT)

# The long fuzz: 1,000 fresh random cases of every output fuzz test (the suite runs a derandomized 50), then the
# input fuzz.
fuzz: $(DEV_STAMP)
	TLBSIM_FUZZ_EXAMPLES=1000 TLBSIM_FUZZ_RANDOM=1 $(BIN)/python -m pytest tests/test_fuzz_outputs.py -q
	$(BIN)/python -m pytest tests/test_fuzz.py -q

bench: $(STAMP)
	$(BIN)/tlbsim bench --compare benchmarks/reference.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
