"""fxopt's benchmark harness: `python -m benchmarks --suite passes`.

`harness` holds the timing helpers and writers, `models` the model zoo, and
`suites/` one module per suite, each with `run(models, repeats, quick, out_dir)`.
Results go to benchmarks/results/<suite>.json and .md. Benchmarks use only
fxopt's public API.
"""
