"""Sound levels: the sound-level meter (weightings, time weightings, Leq, percentiles, bands;
``meter.py``) and the levels tables (``level_tables.py``). Pure numpy/scipy and pyarrow. May
import ``schemas`` only.
"""
