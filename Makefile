# The two commands of the README: `make up` (install + start) and `make test`.
.PHONY: install up down test lint

install:
	bash scripts/install.sh

up: install
	.venv/bin/python -m service.stack up

down:
	.venv/bin/python -m service.stack down

test: install
	.venv/bin/python -m pytest

lint:
	.venv/bin/ruff check handlers service model_store tests benchmarks load_tests
