"""What a run reads: models (:mod:`.models`: the hub, local folders, the embedded GGUF), calibration and
evaluation text (:mod:`.data`), and files shipped inside installed packages (:mod:`.packages`).
"""
