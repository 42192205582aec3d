"""diffprobe's probes on cached features: the linear probe, label subsets, sweeps and their
plots, and the results ledger. Attention/fusion heads and CKA are not here yet.
"""
