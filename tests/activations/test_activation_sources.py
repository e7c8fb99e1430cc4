"""ActivationSource implementations: TensorSource, IterableSource, as_source."""
import itertools
import json

import numpy as np
import pytest
import torch
from helpers.seeds import fresh_seed

from sparsekit.activations import ActivationSource, IterableSource, TensorSource, as_source


def take(source, n):
    return list(itertools.islice(iter(source), n))


def json_round_trip(state):
    return json.loads(json.dumps(state))


def assert_batches_equal(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        if isinstance(b, tuple):
            assert isinstance(a, tuple) and len(a) == len(b)
            for u, v in zip(a, b):
                assert torch.equal(u, v)
        else:
            assert torch.equal(a, b)


# --- TensorSource -------------------------------------------------------------------------------

@pytest.mark.parametrize("with_targets", [False, True])
def test_tensor_source_resumes_exactly_from_state_dict(with_targets):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(37, 5, generator=gen)
    y = torch.randn(37, 3, generator=gen) if with_targets else None
    kwargs = dict(y=y, batch_size=8, shuffle=True, seed=seed % 1000)
    uninterrupted = take(TensorSource(x, **kwargs), 20)  # crosses three epoch boundaries
    for stop in (1, 4, 5, 11):
        first = TensorSource(x, **kwargs)
        take(first, stop)
        state = json_round_trip(first.state_dict())
        resumed = TensorSource(x, **kwargs)
        resumed.load_state_dict(state)
        assert_batches_equal(take(resumed, 20 - stop), uninterrupted[stop:])


def test_tensor_source_covers_every_row_once_per_epoch_with_targets_aligned():
    x = torch.randn(50, 4)
    y = x[:, :2] * 3  # y is a function of x: alignment is checkable
    source = TensorSource(x, y, batch_size=7, seed=fresh_seed() % 1000)
    for _ in range(3):
        batches = take(source, 8)  # ceil(50 / 7) = 8 batches per epoch
        xs = torch.cat([b[0] for b in batches])
        ys = torch.cat([b[1] for b in batches])
        assert [b[0].shape[0] for b in batches] == [7] * 7 + [1]
        assert torch.equal(ys, xs[:, :2] * 3)
        assert torch.equal(xs[torch.argsort(xs[:, 0])], x[torch.argsort(x[:, 0])])


def test_tensor_source_shuffles_each_epoch_differently_and_reproducibly():
    x = torch.arange(64, dtype=torch.float32)[:, None]
    order = lambda batches: torch.cat(batches)[:, 0].tolist()
    a = take(TensorSource(x, batch_size=64, seed=3), 2)
    b = take(TensorSource(x, batch_size=64, seed=3), 2)
    c = take(TensorSource(x, batch_size=64, seed=4), 1)
    assert order(a) == order(b)
    assert order(a[:1]) != order(a[1:])  # epoch 0 and epoch 1 differ
    assert order(a[:1]) != order(c)
    assert order(a[:1]) != list(range(64))


def test_tensor_source_without_shuffle_yields_rows_in_order_and_drop_last_drops_the_tail():
    x = torch.randn(10, 2)
    batches = list(TensorSource(x, batch_size=4, shuffle=False, epochs=1))
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), x)
    dropped = list(TensorSource(x, batch_size=4, shuffle=False, epochs=2, drop_last=True))
    assert [b.shape[0] for b in dropped] == [4, 4, 4, 4]
    assert torch.equal(dropped[2], x[:4])


def test_tensor_source_stops_after_epochs_and_iterating_continues_the_stream():
    x = torch.randn(9, 3)
    source = TensorSource(x, batch_size=4, epochs=2)
    head = take(source, 2)
    rest = list(source)  # a new iterator continues where the first stopped
    assert len(head) + len(rest) == 6
    assert list(source) == []
    assert source.state_dict()["epoch"] == 2


def test_tensor_source_state_is_json_serialisable():
    source = TensorSource(torch.randn(12, 2), torch.randn(12, 1), batch_size=5)
    take(source, 4)
    state = source.state_dict()
    assert json_round_trip(state) == state


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be a positive int, got 0"),
    (dict(batch_size=2.0), "batch_size must be a positive int, got 2.0"),
    (dict(seed=-1), "seed must be a non-negative int, got -1"),
    (dict(epochs=0), "epochs must be a positive int, got 0"),
    (dict(y=torch.randn(5, 2)), "y has 5 rows but x has 6"),
    (dict(y=torch.randn(6)), "y must be 2-D"),
    (dict(batch_size=7, drop_last=True), "batch_size=7 exceeds the 6 rows of x with drop_last=True"),
])
def test_tensor_source_rejects_bad_arguments_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TensorSource(torch.randn(6, 3), **kwargs)


@pytest.mark.parametrize("x, message", [
    (torch.randn(6), "x must be 2-D"),
    (torch.ones(6, 3, dtype=torch.int64), "x must be a floating-point tensor"),
    (torch.randn(0, 3), "x has 0 rows"),
    (np.ones((6, 3), dtype=np.float32), "x must be a torch.Tensor, got ndarray"),
])
def test_tensor_source_rejects_bad_inputs_naming_them(x, message):
    with pytest.raises(ValueError, match=message):
        TensorSource(x)


def test_tensor_source_refuses_a_state_saved_with_other_settings():
    x = torch.randn(20, 3)
    source = TensorSource(x, batch_size=4, seed=1)
    take(source, 2)
    state = source.state_dict()
    with pytest.raises(ValueError, match="'seed' is 1 but this TensorSource has 2"):
        TensorSource(x, batch_size=4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="'rows' is 20 but this TensorSource has 10"):
        TensorSource(x[:10], batch_size=4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="saved by 'IterableSource'"):
        source.load_state_dict({"kind": "IterableSource", "consumed": 3})
    with pytest.raises(ValueError, match="'position' must be a non-negative int"):
        source.load_state_dict({**state, "position": -1})


# --- IterableSource -----------------------------------------------------------------------------

def test_iterable_source_replays_and_skips():
    seed = fresh_seed()
    calls = []

    def factory():
        calls.append(1)
        gen = torch.Generator().manual_seed(seed)
        return ((torch.randn(3 + i % 4, 6, generator=gen), torch.randn(3 + i % 4, 2, generator=gen))
                for i in range(15))

    uninterrupted = list(IterableSource(factory))
    first = IterableSource(factory)
    take(first, 6)
    state = json_round_trip(first.state_dict())
    assert state["consumed"] == 6
    resumed = IterableSource(factory)
    resumed.load_state_dict(state)
    calls.clear()
    assert_batches_equal(list(resumed), uninterrupted[6:])
    assert len(calls) == 1  # replay asks the factory for one fresh iterable


def test_iterable_source_accepts_a_list_and_resumes():
    batches = [torch.randn(4, 3) for _ in range(5)]
    first = IterableSource(batches)
    take(first, 2)
    resumed = IterableSource(batches)
    resumed.load_state_dict(json_round_trip(first.state_dict()))
    assert_batches_equal(list(resumed), batches[2:])
    assert_batches_equal(list(IterableSource(batches)), batches)  # re-iterable: a new source starts over


def test_one_shot_generator_cannot_resume_from_a_position():
    batches = [torch.randn(4, 3) for _ in range(5)]
    trained = IterableSource(b for b in batches)
    assert_batches_equal(take(trained, 3), batches[:3])  # training on a generator works
    state = trained.state_dict()
    with pytest.raises(ValueError, match="resume needs a re-iterable .* or a zero-argument factory"):
        IterableSource(b for b in batches).load_state_dict(state)
    with pytest.raises(ValueError, match="one-shot iterator"):
        trained.load_state_dict({"kind": "IterableSource", "consumed": 0})  # cannot rewind either
    IterableSource(b for b in batches).load_state_dict({"kind": "IterableSource", "consumed": 0})


def test_iterable_source_detects_a_replay_that_differs_from_the_original_run():
    draws = iter(range(100))

    def unseeded():  # a different stream on every call: replay cannot reproduce it
        gen = torch.Generator().manual_seed(next(draws))
        return [torch.randn(4, 3, generator=gen) for _ in range(5)]

    first = IterableSource(unseeded)
    take(first, 3)
    resumed = IterableSource(unseeded)
    resumed.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="batch 2 sums to .* not .* as when the state was saved"):
        next(iter(resumed))


def test_iterable_source_detects_a_replay_that_ends_before_the_saved_position():
    source = IterableSource(lambda: [torch.randn(2, 2)] * 3)
    source.load_state_dict({"kind": "IterableSource", "consumed": 5})
    with pytest.raises(ValueError, match="ended after 3 batches, before the saved position 5"):
        next(iter(source))


def test_iterable_source_rejects_objects_that_are_not_iterable():
    with pytest.raises(ValueError, match="factory must be .* got int"):
        IterableSource(3)


# --- as_source and the protocol -----------------------------------------------------------------

def test_as_source_dispatches_by_type():
    x, y = torch.randn(10, 4), torch.randn(10, 2)
    single = as_source(x, batch_size=3)
    assert isinstance(single, TensorSource) and single.batch_size == 3 and single.y is None
    paired = as_source((x, y), batch_size=5)
    assert isinstance(paired, TensorSource) and paired.y is y
    assert isinstance(as_source(np.ones((4, 2), dtype=np.float32)), TensorSource)
    assert as_source(single) is single
    assert isinstance(as_source([x, x]), IterableSource)
    assert isinstance(as_source(lambda: [x]), IterableSource)
    assert isinstance(as_source(b for b in [x]), IterableSource)


@pytest.mark.parametrize("obj, name", [(3, "int"), ("acts/", "str"), ({"x": 1}, "dict"), (None, "NoneType")])
def test_as_source_rejects_unknown_objects_naming_them(obj, name):
    with pytest.raises(ValueError, match=f"cannot read activations from a {name}"):
        as_source(obj)


def test_sources_satisfy_the_activation_source_protocol():
    x = torch.randn(4, 2)
    assert isinstance(TensorSource(x), ActivationSource)
    assert isinstance(IterableSource([x]), ActivationSource)
    assert not isinstance([x], ActivationSource)
    assert not isinstance(x, ActivationSource)


def test_iterable_source_state_is_strict_json_even_after_a_non_finite_batch():
    source = IterableSource([torch.full((2, 2), float("nan"))])
    take(source, 1)
    assert json.loads(json.dumps(source.state_dict(), allow_nan=False))["consumed"] == 1


@pytest.mark.parametrize("make", [
    lambda batches: TensorSource(torch.cat(batches), batch_size=4, shuffle=False),
    lambda batches: IterableSource(batches),
])
def test_loading_a_state_moves_an_iterator_already_in_use(make):
    batches = [torch.randn(4, 3) for _ in range(6)]
    source = make(batches)
    iterator = iter(source)
    take(iterator, 1)
    later = make(batches)
    take(later, 4)
    source.load_state_dict(later.state_dict())
    assert torch.equal(next(iterator), batches[4])
