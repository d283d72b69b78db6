# `make test` is the README's (and CI's) test command; run it inside the project's virtualenv.
.PHONY: test
test:
	TF_CPP_MIN_LOG_LEVEL=3 python -m pytest -q tests
