"""Audio before features: decoding, work units, window grids, offline augmentation, recording times
and the demo's synthetic sounds (numpy, soundfile, soxr; no Beam). May import ``schemas`` only.
"""
