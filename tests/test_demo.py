"""The training demo's model: every gradient against central differences, and learning."""

from __future__ import annotations

import numpy as np
import pytest

from fastlstm.demo.charlm import Adam, CharLM
from fastlstm.demo.train import CORPUS, Corpus
from lstm_testing import ALL_CPU_BACKENDS, central_differences


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_char_model_gradients_match_finite_differences(backend, dropout):
    model = CharLM(7, embed_size=3, hidden_size=4, num_layers=2, dropout=dropout, backend=backend,
                   dtype="float64", seed=0)
    rng = np.random.default_rng(1)
    inputs = rng.integers(0, 7, size=(5, 3))
    targets = rng.integers(0, 7, size=(5, 3))
    masks = (model.rng.bit_generator.state, model.rnn._dropout_rng.bit_generator.state)

    def loss():  # the same dropout masks at every evaluation
        model.rng.bit_generator.state, model.rnn._dropout_rng.bit_generator.state = masks
        return model.loss(inputs, targets)[0]

    model.zero_grad()
    loss()
    model.backward()
    analytic = {k: np.array(v) for k, v in model.gradients().items()}
    for name, param in model.parameters().items():
        numeric = central_differences(loss, param)
        np.testing.assert_allclose(analytic[name], numeric, rtol=1e-5, atol=1e-8, err_msg=name)


def test_adam_clips_the_global_norm_and_learns():
    corpus = Corpus(CORPUS.read_text(encoding="utf-8"))
    model = CharLM(len(corpus.vocab), embed_size=8, hidden_size=32, backend="numpy", seed=0)
    optimizer = Adam(model.parameters(), lr=1e-2, clip_norm=0.5)
    rng = np.random.default_rng(0)
    windows = corpus.validation_windows(16, limit=8)
    start = model.loss(*windows)[0]
    for _ in range(40):
        model.zero_grad()
        model.loss(*corpus.batch(rng, 16, 8))
        model.backward()
        before = {k: np.array(v) for k, v in model.parameters().items()}
        norm = optimizer.step(model.parameters(), model.gradients())
        moved = np.sqrt(sum(float(np.sum((np.array(v) - before[k]) ** 2)) for k, v in model.parameters().items()))
        assert norm > 0 and moved > 0
    assert model.loss(*windows)[0] < start - 0.3
    assert model.loss(*windows)[0] < corpus.unigram_loss(windows[1]) + 0.2


def test_corpus_split_and_baseline():
    corpus = Corpus(CORPUS.read_text(encoding="utf-8"))
    assert len(corpus.val) > 1000 and len(corpus.train) > 9 * len(corpus.val) - 10
    inputs, targets = corpus.batch(np.random.default_rng(0), 10, 3)
    assert inputs.shape == targets.shape == (10, 3)
    np.testing.assert_array_equal(inputs[1:], targets[:-1])
    assert 2.0 < corpus.unigram_loss(corpus.val[1:]) < 4.0
    with pytest.raises(ValueError, match="at least 1000"):
        Corpus("too short")
