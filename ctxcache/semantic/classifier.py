"""Request category: explicit metadata first, then the route, then a nearest-centroid model.

The model is linear over the same normalised embeddings the cache already computes, so
classifying costs one [categories × 384] matrix-vector product (microseconds, ≪ the embedding
itself). The shipped weights (``data/classifier.npz``) come from multinomial logistic
regression on ~2.5K labelled questions and two casual rewrites of each, so a question keeps its
category when asked sloppily; with another embedder the model is trained at start-up from the
examples in ``data/categories.jsonl`` (or any list of (text, category) pairs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ctxcache.errors import InvalidInputError

DEFAULT_CATEGORIES = ("code", "factual", "conversation", "creative", "math", "other")
ROUTE_CATEGORIES = {"/v1/rag": "factual"}
EXAMPLES = Path(__file__).parent / "data" / "categories.jsonl"
# weights trained by benchmarks/semantic_categories.py on ~2.5K labelled questions plus casual
# rewrites of each (SQuAD, chatterbot corpus, templates, the examples above)
CLASSIFIER_FILE = Path(__file__).parent / "data" / "classifier.npz"


def load_trained(embedder_name: str, dim: int,
                 categories: Sequence[str]) -> "CentroidClassifier | None":
    """The shipped classifier, if it was trained on this embedder and these categories."""
    if not CLASSIFIER_FILE.is_file():
        return None
    d = np.load(CLASSIFIER_FILE)
    if str(d["embedder"]) != embedder_name or int(d["dim"]) != dim or \
            list(d["categories"]) != list(categories):
        return None
    return CentroidClassifier(list(d["categories"]), d["weights"], d["bias"])


def load_examples(path: str | Path = EXAMPLES) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [(r["text"], r["category"]) for r in rows]


class CentroidClassifier:
    """Linear scores ``W·x + b`` per category (W: centroids or logistic-regression weights)."""

    def __init__(self, categories: Sequence[str], weights: np.ndarray,
                 bias: np.ndarray | None = None):
        if len(categories) != weights.shape[0]:
            raise InvalidInputError("one weight row per category is required")
        self.categories = list(categories)
        self.weights = weights.astype(np.float32)
        self.bias = (np.zeros(len(categories)) if bias is None else bias).astype(np.float32)

    @classmethod
    def train(cls, embeddings: np.ndarray, labels: Sequence[str],
              categories: Sequence[str] | None = None, method: str = "logreg",
              l2: float = 1e-3, steps: int = 300, weights: Sequence[float] | None = None,
              balanced: bool = False) -> "CentroidClassifier":
        """``weights`` per example (e.g. to trust hand-labelled ones more); ``balanced``
        scales each category to the same total weight, so a large corpus of one category
        does not pull the boundaries towards it."""
        cats = list(categories or sorted(set(labels)))
        labels_arr = np.asarray(labels)
        for c in cats:
            if not (labels_arr == c).any():
                raise InvalidInputError(f"no training examples for category {c!r}")
        if method == "centroid":
            cents = []
            for c in cats:
                v = embeddings[labels_arr == c].mean(0)
                cents.append(v / (np.linalg.norm(v) + 1e-9))
            return cls(cats, np.stack(cents))
        if method != "logreg":
            raise InvalidInputError("method must be 'logreg' or 'centroid'")
        import torch

        keep = np.isin(labels_arr, cats)
        x = torch.tensor(embeddings[keep], dtype=torch.float32)
        y = torch.tensor([cats.index(c) for c in labels_arr[keep]])
        sw = np.ones(len(labels_arr)) if weights is None else np.asarray(weights, dtype=float)
        sw = sw[keep]
        if balanced:
            for c in range(len(cats)):
                m = (y.numpy() == c)
                sw[m] = sw[m] / max(sw[m].sum(), 1e-9)
        sw = torch.tensor(sw / sw.mean(), dtype=torch.float32)
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(len(cats), x.shape[1], generator=g) * 0.01).requires_grad_()
        b = torch.zeros(len(cats), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            ce = torch.nn.functional.cross_entropy(x @ w.T + b, y, reduction="none")
            loss = (ce * sw).mean() + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(cats, w.detach().numpy(), b.detach().numpy())

    def predict(self, emb: np.ndarray) -> list[str]:
        scores = np.atleast_2d(emb) @ self.weights.T + self.bias
        return [self.categories[i] for i in scores.argmax(1)]

    def accuracy(self, emb: np.ndarray, labels: Iterable[str]) -> float:
        pred = self.predict(emb)
        labels = list(labels)
        return sum(p == t for p, t in zip(pred, labels)) / max(len(labels), 1)


class CategoryRouter:
    """explicit category > route > classifier."""

    def __init__(self, classifier: CentroidClassifier, categories: Sequence[str]):
        self.classifier = classifier
        self.categories = list(categories)

    def categorize(self, embedding: np.ndarray, explicit: str | None = None,
                   route: str | None = None) -> str:
        if explicit is not None:
            if explicit not in self.categories:
                raise InvalidInputError(
                    f"unknown category {explicit!r}; known: {', '.join(self.categories)}")
            return explicit
        if route in ROUTE_CATEGORIES and ROUTE_CATEGORIES[route] in self.categories:
            return ROUTE_CATEGORIES[route]
        cat = self.classifier.predict(embedding)[0]
        return cat if cat in self.categories else "other"
