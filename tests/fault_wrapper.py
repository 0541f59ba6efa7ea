"""train.py with a fault injected, for tests/test_faults.py (never used by the library).

Runs ``herbarium.train_cli.main`` with the command line it is given. On
torchrun's first attempt only (``TORCHELASTIC_RESTART_COUNT`` 0), the
process whose ``RANK`` is ``FAULT_RANK`` fails at its ``FAULT_AT``-th
forward pass: ``FAULT_MODE=die`` ends it at once with ``os._exit(17)`` (as a
kill or a crash of the machine would), ``FAULT_MODE=hang`` makes it sleep
forever (a stuck GPU or a dead network).

With ``STEP_LOG`` set, every process also appends one JSON line per batch
it trains to ``STEP_LOG.<attempt>.<RANK>``: the epoch, the optimizer step
the batch belongs to, that step's learning rate and the batch's dataset
indices (tests/test_elastic.py compares runs with them).
"""

import json
import os
import time

from herbarium import engine
from herbarium.train_cli import main

if os.environ.get("RANK") == os.environ.get("FAULT_RANK") and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    real_forward_loss, calls = engine.forward_loss, [0]

    def failing_forward_loss(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(os.environ["FAULT_AT"]):
            if os.environ.get("FAULT_MODE", "die") == "hang":
                time.sleep(3600)
            os._exit(17)
        return real_forward_loss(*args, **kwargs)

    engine.forward_loss = failing_forward_loss

if os.environ.get("STEP_LOG"):
    real_micro_step = engine.Trainer._micro_step
    log_name = f"{os.environ['STEP_LOG']}.{os.environ.get('ATTEMPT', '0')}.{os.environ.get('RANK', '0')}"

    def logged_micro_step(self, model, batch, *args, **kwargs):
        record = {"epoch": self.state.epoch, "step": self.state.global_step + 1, "lr": self.optimizer.current_lr(),
                  "index": batch["index"].tolist()}
        with open(log_name, "a") as log:
            log.write(json.dumps(record) + "\n")
        return real_micro_step(self, model, batch, *args, **kwargs)

    engine.Trainer._micro_step = logged_micro_step

raise SystemExit(main())
