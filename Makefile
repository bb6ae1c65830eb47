# Two commands for a new user: `make demo` runs the GRPO example, `make test` runs the tests.
# Both build .venv first with the CPU build of torch (an unpinned torch would pull a multi-GB CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo arith-ppo arith-distill calc test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	# DeepSpeed ships as an sdist whose build imports torch: build it against the torch above.
	$(PY) -m pip install -q --no-build-isolation deepspeed
	$(PY) -m pip install -q -e '.[test]'
	# DeepSpeed's CPU comm op, built now (a few minutes on 2 cores) so that no trainer start has to build it.
	DS_ACCELERATOR=cpu $(PY) -m actors.deepspeed_ops
	touch $@

demo: install
	$(VENV)/bin/raylhf train examples/arith_grpo.yaml

# PPO rewarded only by a learned reward model (examples/arith_ppo.yaml); the reward model is trained first
# (raylhf train-rm examples/arith_rm.yaml) when checkpoints/arith-rm is missing.
arith-ppo: checkpoints/arith-rm/config.json
	$(VENV)/bin/raylhf train examples/arith_ppo.yaml

# Multi-turn GRPO with a calculator tool (examples/calc_tools.yaml, docs/agents.md); the warm start is built first.
calc: install
	$(VENV)/bin/raylhf train examples/calc_tools.yaml

checkpoints/arith-rm/config.json: | install
	$(VENV)/bin/raylhf train-rm examples/arith_rm.yaml

# On-policy distillation (examples/arith_distill.yaml) from a bigger, better teacher, built first when
# checkpoints/arith-teacher is missing (the warm start's recipe on a 1.44M-parameter model, to 90% validation accuracy).
arith-distill: checkpoints/arith-teacher/config.json
	$(VENV)/bin/raylhf train examples/arith_distill.yaml

checkpoints/arith-teacher/config.json: | install
	$(PY) -c "from examples.arith.warmstart import prepare_teacher; prepare_teacher('checkpoints/arith-teacher')"

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs checkpoints
