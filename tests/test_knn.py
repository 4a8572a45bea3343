import math

import pytest
import torch

from sop_lightning.evaluation import knn_classify


def _reference(train, labels, test, k, T, C):
    out = []
    for q in test.tolist():
        qn = math.sqrt(sum(v * v for v in q))
        sims = []
        for x, y in zip(train.tolist(), labels.tolist()):
            xn = math.sqrt(sum(v * v for v in x))
            sims.append((sum(a * b for a, b in zip(q, x)) / (qn * xn), y))
        sims.sort(key=lambda s: -s[0])
        scores = [0.0] * C
        for s, y in sims[:k]:
            scores[y] += math.exp(s / T)
        out.append(scores)
    return torch.tensor(out)


@pytest.mark.parametrize("backend", ["torch", "faiss", "auto"])
def test_weighted_vote_matches_reference(backend):
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 8, generator=g), torch.randn(15, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    ref = _reference(train, labels, test, 5, 0.07, 4)
    got = knn_classify(train, labels, test, k=5, temperature=0.07, num_classes=4, backend=backend, max_elements=100)
    torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-3)
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="k must be"):
        knn_classify(x, torch.zeros(4, dtype=torch.long), x, k=0)
    with pytest.raises(ValueError, match="same D"):
        knn_classify(x, torch.zeros(4, dtype=torch.long), torch.randn(2, 5))
    with pytest.raises(ValueError, match="backend"):
        knn_classify(x, torch.zeros(4, dtype=torch.long), x, backend="gpu")
