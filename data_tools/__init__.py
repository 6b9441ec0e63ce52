"""Data curation for Ring-lite (Ring-Lite-Distill recipe): every step reads and writes Parquet in
record batches, shows progress, sends what it removes to a side file with the reason, and writes a
JSON report whose counts add up (input = kept + removed by reason)."""
