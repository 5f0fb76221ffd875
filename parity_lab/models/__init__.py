"""Recurrent parity classifiers: torch's built-in RNNs and hand-written twins with equal weights."""

from parity_lab.models.classifier import ParityRNN
from parity_lab.models.manual import ManualGRU, ManualLSTM, ManualRNN

__all__ = ["ManualGRU", "ManualLSTM", "ManualRNN", "ParityRNN"]
