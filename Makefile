# fastssl: the two commands of the README, each idempotent on a fresh Debian machine.
#   make demo   installs everything, trains SwAV on Fashion-MNIST, reports kNN accuracy against a random trunk
#               (also while training), leaves the run's curves and a neighbour grid as PNGs
#   make test   installs everything, runs the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastssl-installed
SYSTEM_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist
# torch and torchvision come first and pinned: on the reference machines they are on local disk.
# DALI and FFCV are installed too (FFCV builds from source against the system packages above).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup system-packages demo demo-pinned test test-all bench clean

setup: $(STAMP)

system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "fastssl needs system packages; run: sudo apt-get update && sudo apt-get install -y $$missing"; exit 1; fi; \
	fi

$(STAMP): pyproject.toml | system-packages
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,dali,ffcv,slurm]"
	touch $(STAMP)

DEMO := pretrain/swav/swav_1node_cpu_fmnist_resnet18
demo: $(STAMP)
	$(BIN)/fastssl-train config=$(DEMO)
	$(BIN)/fastssl-eval knn --checkpoint checkpoints/swav_1node_cpu_fmnist_resnet18 --baselines
	$(BIN)/fastssl-eval neighbours --checkpoint checkpoints/swav_1node_cpu_fmnist_resnet18
	@echo "fastssl: curves in checkpoints/swav_1node_cpu_fmnist_resnet18/curves.png, neighbours in checkpoints/swav_1node_cpu_fmnist_resnet18/neighbours.png"

# The demo with the CPU's kernels held to those of a 2-core AVX2 machine, so that x86-64 CPUs with AVX2 compute
# the same losses and trunk (checked on the built-in dataset on an AVX2-only and an AVX-512 AMD EPYC), at up to
# half the speed on a newer CPU. `make demo` uses the fastest kernels (benchmarks/RESULTS.md compares the two).
PINNED_KERNELS := OMP_NUM_THREADS=2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2
demo-pinned: $(STAMP)
	$(PINNED_KERNELS) $(BIN)/fastssl-train config=$(DEMO) \
	    config.CHECKPOINT.DIR=./checkpoints/swav_1node_cpu_fmnist_resnet18_pinned
	$(PINNED_KERNELS) $(BIN)/fastssl-eval knn --checkpoint checkpoints/swav_1node_cpu_fmnist_resnet18_pinned --baselines

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow" --runslow

clean:
	rm -rf $(VENV) checkpoints .pytest_cache
