# `make test` is the README's (and CI's) test command; run it inside the project's virtualenv.
# Two pytest workers (pytest-xdist), each test file on one of them: 10 minutes instead of 15 on
# 2 cores, as much of the time is tracing, compiling and subprocesses rather than arithmetic.
.PHONY: test
test:
	TF_CPP_MIN_LOG_LEVEL=3 python -m pytest -q -n 2 --dist loadfile tests
