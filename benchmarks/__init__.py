"""The benchmarks of amaml_ext. Run them from the repository root: ``python -m benchmarks.<name>``
for a script, ``python -m pytest benchmarks`` for the pytest-benchmark suites. What each one
measures, and the command behind every recorded number: docs/benchmarks.md."""
