# The README's two commands: `make demo` runs the end-to-end demo, `make test` runs the tests.
# Both set up ./.venv and the Debian packages they need first.
.PHONY: setup demo test bench clean

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/mmid demo

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/mmid bench --preset paper

clean:
	rm -rf .mmid-cache .pytest_cache
