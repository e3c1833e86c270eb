"""The Inductor pass (fuse.py), its manager (manager.py) and graph surgery (splice.py)."""
