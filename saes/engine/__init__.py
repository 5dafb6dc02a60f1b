"""The compression engine: a model's decoder blocks compressed one at a time with two activation
streams (:mod:`.loop`), the architectures' block layouts and rank plans (:mod:`.layout`), the dense
block-by-block passes methods build on (:mod:`.propagate`), and what makes a long run restartable and
cheap to repeat (:mod:`.resume`, :mod:`.stats_cache`). It takes typed values (:mod:`.config`), not configs.
"""
