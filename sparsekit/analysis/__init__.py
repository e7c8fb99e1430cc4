"""Reading the features a dictionary found: metrics, elbows, per-feature statistics, reports."""
