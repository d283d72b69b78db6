# `make test` is the README's (and CI's) test command; run it inside the project's virtualenv.
# Two pytest workers (pytest-xdist), each test file on one of them: 10 minutes instead of 15 on
# 2 cores, as much of the time is tracing, compiling and subprocesses rather than arithmetic.
# Three workers were slower on 2 cores (2026-12-03: not done after 17.5 min; two took 14.7-18.4).
# The model and its layers run on JAX and PyTorch too, in pytest processes that
# tests/test_backends.py starts (the backend is fixed at import): inside the two workers' load,
# not after it.
.PHONY: test
test:
	TF_CPP_MIN_LOG_LEVEL=3 python -m pytest -q -n 2 --dist loadfile tests
