"""The ground floor: what every stage shares — bad-input errors, atomic writes and file hashes, JSONL
and QA records, access scopes, packaged-model files, and the quieting of other libraries' notices.

Imports nothing of hybrid's other floors (tests/test_layers.py holds it).
"""

from core import quiet_libraries

# Before anything imports torch, transformers or mlflow: their notices that tell a user nothing (the list
# and why each is one: core/quiet_libraries.py). Every floor imports `core` first, the CLI and library too.
quiet_libraries.install()
