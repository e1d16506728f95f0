# The two commands of the README: `make up` (install + start) and `make test`.
.PHONY: install install-test up down test lint audit lock

# what the service needs (make up); install-test adds the test tools (make test)
install:
	bash scripts/install.sh

install-test:
	bash scripts/install.sh --test

up: install
	.venv/bin/python -m model_store.stack up

down:
	.venv/bin/python -m model_store.stack down

test: install-test
	.venv/bin/python scripts/audit_deps.py check
	.venv/bin/python -m pytest

# known vulnerabilities in what we ship (requirements.lock; exceptions in .pip-audit-ignore)
audit:
	.venv/bin/python scripts/audit_deps.py check

# re-resolve and pin the runtime dependencies after changing them in pyproject.toml
lock:
	.venv/bin/python scripts/audit_deps.py lock

lint:
	.venv/bin/ruff check protocol handlers service model_store tests benchmarks load_tests
	.venv/bin/lint-imports --no-cache
