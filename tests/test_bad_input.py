"""Every public op refuses integer tensors, mismatched shapes and mixed devices with an error naming the argument,
before writing anything (the "meta" device stands in for a second device on a CPU-only machine)."""
import pytest
import torch
import torch.nn as nn

import semu_fast as sf
from helpers import assert_same_state, forget_batches, small_cnn, snapshot


def _linear(**change):
    args = dict(x=torch.randn(2, 5), weight=torch.randn(6, 5), U=torch.randn(6, 2), R=torch.randn(2, 2),
                Vh=torch.randn(2, 5), bias=torch.randn(6))
    args.update(change)
    return args


def _conv(**change):
    args = dict(x=torch.randn(1, 3, 5, 5), weight=torch.randn(4, 3, 3, 3), U=torch.randn(3, 4, 2),
                R=torch.randn(3, 2, 2), Vh=torch.randn(3, 2, 9), bias=torch.randn(4))
    args.update(change)
    return args


BAD_CALLS = [
    ("lowrank_linear int x", lambda: sf.ops.lowrank_linear(**_linear(x=torch.ones(2, 5, dtype=torch.int64))),
     TypeError, "x must be a floating tensor"),
    ("lowrank_linear int R", lambda: sf.ops.lowrank_linear(**_linear(R=torch.ones(2, 2, dtype=torch.int32))),
     TypeError, "R must be a floating tensor"),
    ("lowrank_linear bias shape", lambda: sf.ops.lowrank_linear(**_linear(bias=torch.randn(5))), ValueError,
     "bias has 5 entries"),
    ("lowrank_linear devices", lambda: sf.ops.lowrank_linear(**_linear(U=torch.randn(6, 2, device="meta"))),
     ValueError, "one device.*U on meta"),
    ("lowrank_conv2d int weight", lambda: sf.ops.lowrank_conv2d(**_conv(weight=torch.ones(4, 3, 3, 3).long())),
     TypeError, "weight must be a floating tensor"),
    ("lowrank_conv2d Vh shape", lambda: sf.ops.lowrank_conv2d(**_conv(Vh=torch.randn(3, 2, 4))), ValueError,
     "must match weight"),
    ("lowrank_conv2d devices", lambda: sf.ops.lowrank_conv2d(**_conv(x=torch.randn(1, 3, 5, 5, device="meta"))),
     ValueError, "one device"),
    ("lowrank_conv2d stride", lambda: sf.ops.lowrank_conv2d(**_conv(), stride=(1, 2, 3)), ValueError,
     "stride must be an int or a pair"),
    ("accumulate_ devices", lambda: sf.ops.accumulate_([torch.zeros(3)], [torch.ones(3, device="meta")]),
     ValueError, "one device"),
    ("accumulate_ int", lambda: sf.ops.accumulate_([torch.zeros(3)], [torch.ones(3, dtype=torch.int64)]),
     TypeError, r"grads\[0\] must be a floating tensor"),
    ("project_perpendicular_ devices",
     lambda: sf.ops.project_perpendicular_([torch.zeros(3)], [torch.ones(3, device="meta")]), ValueError,
     "one device"),
    ("project_perpendicular int", lambda: sf.ops.project_perpendicular([torch.ones(3).long()], [torch.ones(3)]),
     TypeError, "floating"),
    ("gram_svd int", lambda: sf.ops.gram_svd(torch.ones(2, 4, 3, dtype=torch.int64)), ValueError, "floating"),
    ("truncated_svd int", lambda: sf.ops.truncated_svd(torch.ones(4, 3, dtype=torch.int64), 0.9), TypeError,
     "floating"),
]


@pytest.mark.parametrize("what, call, error, match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_ops_refuse_bad_input_by_name(what, call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_accumulate_refuses_before_writing_any_accumulator():
    accs = [torch.zeros(3), torch.zeros(2)]
    with pytest.raises(ValueError):
        sf.ops.accumulate_(accs, [torch.ones(3), torch.ones(2, device="meta")])
    assert all((a == 0).all() for a in accs)


@pytest.mark.parametrize("layer, match", [(nn.ConvTranspose2d(3, 3, 3), "ConvTranspose2d is not supported"),
                                          (nn.Conv2d(3, 3, 3, groups=3), "grouped Conv2d")])
def test_unsupported_layer_named_explicitly_leaves_the_model_untouched(layer, match):
    model = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(2, 3, 6, 6))
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        sf.prepare(model, [(torch.randn(2, 3, 6, 6), torch.zeros(2, dtype=torch.long))],
                   config=sf.SEMUConfig(target_modules=["^0$"]))
    assert_same_state(model, before)


@pytest.mark.parametrize("bad", ["non-scalar loss", "NaN input"])
def test_a_pass_that_fails_midway_in_train_norm_mode_puts_the_norm_statistics_back(bad):
    model = small_cnn()
    before = snapshot(model)
    batches = forget_batches()
    if bad == "NaN input":
        batches[-1][0][0, 0, 0, 0] = float("nan")
        expected = (FloatingPointError, "holds NaN or Inf")
    else:
        expected = (TypeError, "loss_fn must return a scalar")
    calls = []

    def loss(m, batch):  # the first batch moves the statistics before the failure
        calls.append(1)
        out = nn.functional.cross_entropy(m(batch[0]), batch[1])
        return out if bad == "NaN input" or len(calls) == 1 else out.expand(2)

    with pytest.raises(expected[0], match=expected[1]):
        sf.prepare(model, batches, loss_fn=loss, config=sf.SEMUConfig(norm_mode="train"))
    assert len(calls) >= 2
    assert_same_state(model, before)  # buffers included


def test_batches_the_loss_cannot_use_leave_the_model_untouched():
    model = small_cnn()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"expects batches of \(inputs, targets\)"):
        sf.prepare(model, [torch.randn(4, 3, 6, 6)])
    with pytest.raises(ValueError, match="forget_loader is empty|yielded no batches"):
        sf.prepare(model, [])
    assert_same_state(model, before)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    sf.prepare(model, forget_batches())  # and it still works afterwards


def test_loss_functions_and_callbacks_that_are_not_callable_are_refused_before_anything_runs():
    model = small_cnn()
    before = snapshot(model)
    with pytest.raises(TypeError, match="loss_fn must be None or a callable .model, batch. -> scalar, got SEMUConfig"):
        sf.prepare(model, forget_batches(), sf.SEMUConfig())  # the config passed where loss_fn goes
    for name, value in (("train_loss_fn", "ce"), ("retain_loss_fn", 1), ("on_epoch", 5), ("loss_fn", "ce")):
        with pytest.raises(TypeError, match=f"^{name} must be None or a callable"):
            sf.unlearn(model, forget_batches(), progress=False, **{name: value})
    assert_same_state(model, before)


def test_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    assert sf.SEMUConfig(gamma=np.float32(0.5)).gamma == 0.5
    assert isinstance(sf.SEMUConfig(gamma=np.float64(0.9)).gamma, float)


@pytest.mark.parametrize("op", ["accumulate_", "project_perpendicular_", "accumulate_matmul_"])
def test_in_place_ops_never_silently_change_what_autograd_tracks(op):
    """The in-place ops have no autograd formula: writing a tensor autograd tracks is refused by name, and writing one
    that a graph saved moves its version counter, so that the backward is refused instead of using the new values
    (the C++ kernels, registered for the CPU/CUDA keys alone, left the counter as it was: x.grad came out 12, not 8)."""
    def call(t):
        if op == "accumulate_":
            sf.ops.accumulate_([t], [torch.ones(3)])
        elif op == "project_perpendicular_":
            sf.ops.project_perpendicular_([t], [torch.tensor([1.0, 0.0, 0.0])])
        else:
            sf.ops.accumulate_matmul_(t.view(3, 1), torch.ones(3, 1), torch.ones(1, 1))

    name = {"accumulate_": r"accumulators\[0\]", "project_perpendicular_": r"grads\[0\]"}.get(op, "acc")
    for tracked in (torch.zeros(3, requires_grad=True), torch.ones(3, requires_grad=True) * 2):
        with pytest.raises(ValueError, match=f"^{name} requires grad, but the op writes it in place"):
            call(tracked)
    x = torch.ones(3, requires_grad=True)
    w = torch.full((3,), 2.0)  # no grad of its own, but saved for x's
    loss = (x * w).sum()
    version = w._version
    call(w)
    assert w._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with torch.no_grad():  # outside grad mode nothing is tracked: any tensor may be written
        call(torch.zeros(3, requires_grad=True))


def test_min_rank_is_an_int_0_or_1_and_kept_as_a_python_int(tmp_path):
    """min_rank=np.int64(1) passed `in (0, 1)` and was kept as given: the config then made save_adapters fail after
    the whole gradient pass (np.int64 is not JSON); min_rank=1.0 passed too and made the ranks floats."""
    np = pytest.importorskip("numpy")
    config = sf.SEMUConfig(min_rank=np.int64(1), rank_rule="official", conv_rank="per_channel")
    assert type(config.min_rank) is int
    sf.prepare(small_cnn(), forget_batches(), config=config).save_adapters(tmp_path / "adapters")
    for bad in (1.0, 0.0, True, "1"):
        with pytest.raises(ValueError, match="min_rank must be 0 or 1"):
            sf.SEMUConfig(min_rank=bad, rank_rule="official")
        with pytest.raises(ValueError, match="min_rank must be 0 or 1"):
            sf.ops.truncated_svd(torch.randn(3, 4, 5), 0.5, "official", min_rank=bad)
    assert sf.ops.truncated_svd(torch.randn(3, 4, 5), 0.5, "official", min_rank=np.int64(1)).ranks.dtype == torch.long
