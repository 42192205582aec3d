"""diffprobe's representation similarity on cached features: CKA and kNN alignment.

diffprobe.analyze.engine   the CKA engine (no store)
diffprobe.analyze.knn      the kNN alignment engine: mutual-knn, cknna (no store)
diffprobe.analyze.cka      the store adapter (cells, pools, id alignment, sources, files) for both
diffprobe.analyze.align    `analyze align` on that adapter
diffprobe.analyze.cli      `analyze cka`, `analyze align`
"""
