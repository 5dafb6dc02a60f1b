"""What every method is built from: the method contract (:mod:`.method`), the low-rank layer and rank
rule (:mod:`.lowrank`), streamed calibration statistics (:mod:`.stats`) and the linear algebra (:mod:`.linalg`).
Nothing here knows about models, configs or files.
"""
