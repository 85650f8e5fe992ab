"""The k-NN monitor (knn.py) on features it must separate."""

import torch

from smallvit.knn import knn_predict


def test_knn_classifier_on_separable_features():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    y = torch.arange(300) % 3
    bank = torch.nn.functional.normalize(centres[y] + 0.05 * torch.randn(300, 8), dim=1)
    votes = knn_predict(bank, y, bank[:30], 3, k=20, temperature=0.07)
    assert (votes.argmax(1) == y[:30]).all()
