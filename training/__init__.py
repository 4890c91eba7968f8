"""The training floor, beside retrieval and tuning: what every trainer shares — the launcher, the train
settings, the precision policy, the trainer's output, the time budget, peak memory, the run record and
the memory plan. Imports only the ground floor (`core`).
"""

import core  # noqa: F401  (other libraries' notices quieted before torch is imported)
