"""MapCoder-Lite training: trajectory collection (``collect``), supervisor-guided correction
(``correct``) and agent-wise LoRA fine-tuning (``sft``); ``python -m mcl_runtime.train --help``.

Modules: ``data`` (the JSONL example format, prompt masking, record files), ``clients`` (teacher
and supervisor endpoints, replaying a trajectory), ``runner`` (resumable concurrent runs),
``collect``, ``correct``, ``sft``.
"""
