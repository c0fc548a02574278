"""tunewise: decide whether to fine-tune, prepare the data, beat the baselines with evidence, ship."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (imported by peft) warns on every import that an optional hub-downloaded CPU kernel
# is missing; tunewise never downloads kernels at run time, and the pure-torch path is used instead.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
