# mechvit: two commands matter. `make study` runs the main job, `make test` runs the tests.
# Each creates .venv when missing and installs everything pinned (constraints.txt holds torch).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mechvit-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PYTEST_ARGS ?=

.PHONY: install data browser study study-seeds study-all-saes study-relu docs-numbers docs-cards test test-slow lint bench checkpoints clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23" "setuptools<81" wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; set MECHVIT_DATA to use a folder of your own.
data:
	@if [ -z "$$MECHVIT_DATA" ] && [ ! -f $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q dataset-fashion-mnist; }; \
	  else echo "Fashion-MNIST missing: install Debian's dataset-fashion-mnist or set MECHVIT_DATA" >&2; fi; \
	fi

# Debian's Chromium and ChromeDriver: the page tests (report.html, features.html) run in a real headless browser.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	  else echo "chromium missing: the browser tests will be skipped" >&2; fi; \
	fi

study: install data
	$(VENV)/bin/mechvit study --config configs/fashion_mnist.yaml --out runs/default

# The README's and docs/training.md's checkpoint tables come from the cards in checkpoints/ (every accuracy with its
# count and Wilson CI, mechvit/training/cards.py; tests/test_cards.py checks they agree).
docs-cards: install
	$(PY) tests/test_cards.py --write-docs

# The README's study block and docs/default_study/metrics.json come from the last `make study` (tests check they agree).
docs-numbers: install docs-cards
	$(PY) -m mechvit.study.summary runs/default/metrics.json --readme README.md --keep docs/default_study
	@if [ -f runs/fashion_mnist_seeds/metrics.json ]; then \
	  $(PY) -m mechvit.study.summary runs/fashion_mnist_seeds/metrics.json --readme docs/study.md --block seeds \
	    --keep docs/seeds_study; fi
	@if [ -f runs/fashion_mnist_all_saes/metrics.json ]; then \
	  $(PY) -m mechvit.study.summary runs/fashion_mnist_all_saes/metrics.json --readme docs/sae.md --block all_saes \
	    --keep docs/all_saes_study; fi
	@if [ -f runs/fashion_mnist_relu/metrics.json ]; then \
	  $(PY) -m mechvit.study.summary runs/fashion_mnist_relu/metrics.json --readme docs/sae.md --block relu \
	    --keep docs/relu_study; fi

# Fine-tune seed variation: robustness and logit lens over three training seeds of blur-4, noise-4 and the control.
study-seeds: install data
	$(VENV)/bin/mechvit study --config configs/fashion_mnist_seeds.yaml --out runs/fashion_mnist_seeds

# The default study with SAEs on every model (5 seeds x 8 models; about 16.5 minutes on 2 cores): docs/sae.md.
study-all-saes: install data
	$(VENV)/bin/mechvit study --config configs/fashion_mnist_all_saes.yaml --out runs/fashion_mnist_all_saes

# The default study with ReLU + L1 SAEs beside the BatchTopK ones (about 21 minutes on 2 cores): docs/sae.md.
study-relu: install data
	$(VENV)/bin/mechvit study --config configs/fashion_mnist_relu.yaml --out runs/fashion_mnist_relu

# Two stages: the fast tests first (a failure there stops before the long ones), then the tests marked slow (> ~20 s).
test: install data browser
	$(PY) -m pytest -q -n 2 -m "not slow" --durations=15 $(PYTEST_ARGS)
	$(PY) -m pytest -q -n 2 -m slow --durations=15 $(PYTEST_ARGS)

test-slow: install data
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check mechvit tests benchmarks
	$(VENV)/bin/ruff format --check mechvit tests benchmarks
	$(VENV)/bin/lint-imports

bench: install data
	$(PY) benchmarks/bench_forward.py
	$(PY) benchmarks/bench_corruptions.py
	$(PY) benchmarks/bench_patching.py
	$(PY) benchmarks/bench_sae.py
	$(PY) benchmarks/bench_splicer.py
	$(PY) benchmarks/bench_robustness_estimates.py

# Reproduce the shipped models: base training (3,351 s by its card, on 2 cores shared with other jobs), the seed
# paper's six fine-tunes (gaussian_blur and gaussian_noise at severities 1, 2, 4; 136-220 s each by their cards, 1
# thread), the clean fine-tune control (330 s), training seeds 1 and 2 of blur-4, noise-4 and the control
# (210-919 s), then the evaluation of the base and six fine-tunes into the cards (not timed in the cards):
# docs/training.md, "Rebuild all of them" (the cards' wall times add up to 2.1 h; their machine was not recorded).
FINETUNES := gaussian_blur_1 gaussian_blur_2 gaussian_blur_4 gaussian_noise_1 gaussian_noise_2 gaussian_noise_4
CKPTS := checkpoints/fmnist_vit_base $(addprefix checkpoints/fmnist_vit_,$(FINETUNES))
checkpoints: install data
	$(VENV)/bin/mechvit train --config configs/train_base.yaml
	for f in $(FINETUNES) clean; do $(VENV)/bin/mechvit train --config configs/finetune_$$f.yaml || exit 1; done
	for f in gaussian_blur_4 gaussian_noise_4; do for s in 1 2; do \
	  $(VENV)/bin/mechvit train --config configs/finetune_$$f.yaml --set seed=$$s out=checkpoints/fmnist_vit_$${f}_seed$$s || exit 1; done; done
	for s in 1 2; do $(VENV)/bin/mechvit train --config configs/finetune_clean.yaml --set seed=$$s out=checkpoints/fmnist_vit_clean_ft_seed$$s || exit 1; done
	$(VENV)/bin/mechvit evaluate $(CKPTS) --n-test 2000 --out runs/robustness --update-cards
	$(MAKE) docs-cards

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs
