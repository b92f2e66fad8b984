"""The pipeline's stage entry points, one module a stage: `python -m tasks.<stage>` (dvc.yaml).

Each reads its params section, calls the library (:mod:`chatuie`), logs and writes its outputs;
:mod:`tasks._stage` is what they share.
"""
