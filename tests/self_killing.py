"""A loss whose construction SIGKILLs its own process: a sweep job dying as under the
out-of-memory killer (``loss._target_=tests.self_killing.SelfKillingLoss``)."""

import os
import signal

from torch import nn


class SelfKillingLoss(nn.BCEWithLogitsLoss):
    def __init__(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)
