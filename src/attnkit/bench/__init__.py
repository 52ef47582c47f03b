"""``attnkit bench``: time, peak memory and GFLOP/s of attention backends and their peers.

Cases live in modules named ``attnkit.bench.cases_*`` (each registers ``BenchCase`` objects in
``attnkit.bench.registry``); ``runner`` times each in a fresh subprocess (``worker``) and
``report`` writes the markdown table, the CSV and the log-log plot.
"""
