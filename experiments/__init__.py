"""The ERPD study on the embedded task (run.py), its statistics and verdict rules (analysis.py), and its
report and figures (report.py)."""
