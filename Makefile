# Two commands do everything on a fresh clone (see README): `make demo` and `make test`.
# Both create .venv, install the package with its pinned dependencies, and build the custom ops.

PYTHON ?= python3
# TF_EXTRA=gpu installs the CUDA build of TensorFlow instead of tensorflow-cpu.
TF_EXTRA ?= cpu
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-$(TF_EXTRA)

.PHONY: install ops demo test test-slow test-all test-beam reproduce clean

# The --no-deps line: legacy tf.keras + TFRS (tests/test_legacy_keras.py) and TF Serving's protos
# (tensorflow-serving-api, which `tfcompress export` requires for models.config and the warm-up requests) each
# declare a dependency on the full `tensorflow` wheel, which would land beside tensorflow-cpu; what they need at
# run time comes with TensorFlow itself.
$(INSTALLED): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	$(PY) -m pip install --quiet -e ".[$(TF_EXTRA),data,export,tune,recommenders,test]"
	$(PY) -m pip install --quiet --no-deps "tf-keras==2.21.0" "tensorflow-recommenders==0.7.7" \
		"tensorflow-serving-api==2.21.0"
	touch $(INSTALLED)

install: $(INSTALLED)

# The custom-op library is optional: without a compiler the package warns once and uses the pure-TF path.
ops: $(INSTALLED)
	@if [ -f custom_ops/build.py ]; then $(PY) custom_ops/build.py || echo "custom ops not built; the pure-TF path will be used"; fi

demo: ops
	$(VENV)/bin/tfcompress train --pipeline pipelines/synthetic_dlrm_full.toml --pipeline pipelines/synthetic_dlrm_robe.toml

test: ops
	$(PY) -m pytest -q

test-slow: ops
	$(PY) -m pytest -q -m "slow and not beam"

# Everything but the Beam tests, which need their own venv: `make test-all test-beam` runs every test.
test-all: ops
	$(PY) -m pytest -q -m "not beam"

# `--runner beam` (Apache Beam) in a venv of its own: apache-beam 2.77 pins protobuf < 7, so the main venv keeps
# its newer protobuf. The custom ops are not needed (conversion only).
BEAM_VENV := .venv-beam
BEAM_INSTALLED := $(BEAM_VENV)/.installed-$(TF_EXTRA)

$(BEAM_INSTALLED): setup.cfg pyproject.toml
	test -x $(BEAM_VENV)/bin/python || $(PYTHON) -m venv $(BEAM_VENV)
	$(BEAM_VENV)/bin/python -m pip install --quiet --upgrade "pip>=23"
	$(BEAM_VENV)/bin/python -m pip install --quiet -e ".[$(TF_EXTRA),data,beam,test]"
	touch $(BEAM_INSTALLED)

# Only the files that hold beam tests are collected: .venv-beam lacks the export extras other test files import.
test-beam: $(BEAM_INSTALLED)
	$(BEAM_VENV)/bin/python -m pytest -q -m beam $$(grep -l "pytest.mark.beam" tests/test_*.py)

# The seed papers' claims on planted-signal synthetic data, <= 60 minutes on 2 cores: reproduce/REPORT.md.
# REPRODUCE_ARGS="--data data/criteo_kaggle" runs it on converted real data; rerunning resumes.
reproduce: ops
	$(VENV)/bin/tfcompress reproduce --profile full --out reproduce $(REPRODUCE_ARGS)

clean:
	rm -rf $(VENV) $(BEAM_VENV) build *.egg-info tfcompress/*.so
