"""The digits data and CNN for the tests: `benchmarks.digits` (shared with the benchmarks)."""
from benchmarks.digits import BATCH, accuracy, batches, cnn, load, train  # noqa: F401
