"""diffprobe's representation similarity on cached features: CKA (and kNN alignment).

diffprobe.analyze.cka   the engine and the store adapter
diffprobe.analyze.cli   `analyze cka`
"""
