"""Parity classifiers: torch's built-in RNNs, hand-written twins with equal weights, and the
state-tracking families (linear RNNs, DeltaNet, xLSTM cells, a Transformer), minimal and as
published."""

from parity_lab.models.classifier import ParityRNN
from parity_lab.models.deltanet import DeltaNet
from parity_lab.models.deltanet_published import DeltaNetPublished
from parity_lab.models.linear_rnn import LinearRNN
from parity_lab.models.mamba import Mamba
from parity_lab.models.manual import ManualGRU, ManualLSTM, ManualRNN
from parity_lab.models.mlstm import MLSTM
from parity_lab.models.slstm import SLSTM
from parity_lab.models.transformer import CausalTransformer
from parity_lab.models.xlstm_published import MLSTMPublished, SLSTMPublished

__all__ = [
    "MLSTM",
    "MLSTMPublished",
    "SLSTM",
    "SLSTMPublished",
    "CausalTransformer",
    "DeltaNet",
    "DeltaNetPublished",
    "LinearRNN",
    "Mamba",
    "ManualGRU",
    "ManualLSTM",
    "ManualRNN",
    "ParityRNN",
]
