"""Labels in time: Audacity and Raven annotation files and the strong labels of windows (pure Python
and numpy). May import ``schemas`` only.
"""
