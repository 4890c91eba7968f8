"""The generator half: packaged models, the prompt template and parser, RAFT data, LoRA/QLoRA SFT,
DPO, the groundedness judge, abstention scores and the memory plan."""

import core  # noqa: F401,E402  (first: other libraries' notices quieted before torch is imported)
