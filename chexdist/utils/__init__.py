"""Shared leaves: atomic files, progress lines, stop signals (standard library and tqdm only)."""
