# Two commands do all the set-up on a fresh clone (each creates .venv when needed):
#   make run ARGS="--prompt 'a photo of the dolomites' --width 2048 --height 1024"   # generate
#   make test                                                                       # test suite
# Also: `make app` starts the text-to-image demo, `make app-img2img` the ControlNet demo.
# Without the hub: `make tiny-model` writes a tiny random-weight model to tiny-model/ (its pictures are noise)
# to try all of them offline, e.g. make run ARGS="--model tiny-model --width 512 --height 512 --steps 4".
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run app app-img2img tiny-model test benchmark clean

run: $(VENV)/.runtime
	$(BIN)/python elastic_diffusion.py $(ARGS)

app: $(VENV)/.runtime
	$(BIN)/python app_gradio.py $(ARGS)

app-img2img: $(VENV)/.runtime
	$(BIN)/python app_gradio_img2img.py $(ARGS)

# ARGS: the folder (default tiny-model) and --kind sd1|sd2|sdxl (default sdxl, the default model's).
tiny-model: $(VENV)/.runtime
	$(BIN)/python tests/tiny_models.py $(ARGS)

test: $(VENV)/.dev
	$(BIN)/python -m pytest $(ARGS)

benchmark: $(VENV)/.runtime
	$(BIN)/python benchmarks/benchmark.py $(ARGS)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install -r requirements.txt
	touch $@

# One resolve for runtime + test requirements, so torch is installed once.
$(VENV)/.dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

clean:
	rm -rf $(VENV) .pytest_cache
