"""diffprobe's probes on cached features: the linear probe, the kNN classifier, the attention and
DifFormer heads, DifFeed (which re-runs the U-Net), label subsets, sweeps and their plots, and the
results ledger.
"""
