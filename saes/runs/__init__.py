"""One run from config to record: validation, the record key, compression or loading, evaluation and the
record (:mod:`.pipeline`, :mod:`.records`); the saved compressed model (:mod:`.checkpoint`,
:mod:`.hf_portable`) and the optional LoRA stage (:mod:`.finetune`). The only layer that reads Hydra configs.
"""
