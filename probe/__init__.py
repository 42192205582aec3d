"""diffprobe's probes and analyses on cached features (linear, attention, CKA: later issues)."""
