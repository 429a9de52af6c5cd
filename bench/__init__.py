"""The harness: data, models, training, runner and record store, profiler, report, CLI."""
