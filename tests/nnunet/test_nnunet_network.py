"""The wrapped nnU-Net network: forward shapes, features, strict loading, head initialisation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from nnunet_testlib import managers

from mobseg.core.config import METHOD_NAMES, HeadConfig
from mobseg.core.registry import build_head
from mobseg.errors import ConfigurationError, InvalidInputError
from mobseg.nnunet.network import (
    StochasticUNet,
    build_backbone,
    build_network,
    feature_channels,
    load_backbone,
    load_full,
)


def _net(method: str = "mob", ds: bool = True, seed: int = 0) -> StochasticUNet:
    pm, cm = managers()
    torch.manual_seed(seed)
    return build_network(pm, cm, 1, 2, HeadConfig(method, rank=4, bases=2, partitions=2), ds)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_forward_shapes_for_every_method(method: str) -> None:
    net = _net(method).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        out, dist = net(x, stochastic=True)
    assert isinstance(out, list) and [tuple(o.shape) for o in out] == [
        (2, 2, 16, 16, 16),
        (2, 2, 8, 8, 8),
    ]
    assert torch.equal(dist.mean, out[0])
    samples = dist.rsample(3)
    assert samples.shape == (3, 2, 2, 16, 16, 16)
    if method == "deterministic":
        assert torch.equal(samples, out[0].expand_as(samples))


def test_plain_forward_is_the_backbone_output() -> None:
    net = _net().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        wrapped = net(x)
        plain = net.backbone(x)
    assert all(torch.equal(a, b) for a, b in zip(wrapped, plain, strict=True))


def test_features_are_the_input_of_the_last_segmentation_layer() -> None:
    """Oracle: nnU-Net's own seg layer applied to the captured features gives mu."""
    net = _net("diagonal", ds=False).eval()
    captured = {}
    net.head.register_forward_hook(lambda m, inp, out: captured.update(h=inp[0]))
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        mu, _ = net(x, stochastic=True)
        again = net.backbone.decoder.seg_layers[-1](captured["h"])
    assert captured["h"].shape == (1, net.backbone.decoder.stages[-1].output_channels, 16, 16, 16)
    assert net.feature_channels == feature_channels(net.backbone) == 4
    torch.testing.assert_close(again, mu)


def test_decoder_attribute_switches_deep_supervision() -> None:
    net = _net()
    assert net.decoder is net.backbone.decoder
    net.decoder.deep_supervision = False
    with torch.no_grad():
        out = net(torch.randn(1, 1, 16, 16, 16))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, 16, 16, 16)


def test_parameters_live_under_backbone_and_head_only() -> None:
    keys = _net().state_dict().keys()
    assert keys and all(k.startswith(("backbone.", "head.")) for k in keys)
    assert any(k.startswith("head.") for k in keys)


def test_class_count_mismatch_is_a_configuration_error() -> None:
    pm, cm = managers()
    with pytest.raises(ConfigurationError, match="3 classes but the dataset has 2"):
        build_network(pm, cm, 1, 2, HeadConfig("diagonal", num_classes=3), True)


def _save_backbone(tmp_path: Path, prefix: str = "") -> tuple[Path, dict]:
    pm, cm = managers()
    torch.manual_seed(123)
    pretrained = build_backbone(pm, cm, 1, 2, True)
    weights = {prefix + k: v.clone() for k, v in pretrained.state_dict().items()}
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": weights, "trainer_name": "nnUNetTrainer"}, path)
    return path, pretrained.state_dict()


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod."])
def test_backbone_loads_strictly_and_only_the_head_keeps_its_init(
    tmp_path: Path, prefix: str
) -> None:
    path, expected = _save_backbone(tmp_path, prefix)
    net = _net("mob", seed=7)
    head_before = {k: v.clone() for k, v in net.head.state_dict().items()}
    load_backbone(net, path)
    for k, v in net.backbone.state_dict().items():
        assert torch.equal(v, expected[k]), k
    # the head is exactly what build_head made with the same seed
    for k, v in net.head.state_dict().items():
        assert torch.equal(v, head_before[k]), k


def test_head_initialisation_is_the_registry_head_under_the_seed() -> None:
    net = _net("lowrank", seed=11)
    torch.manual_seed(11)
    pm, cm = managers()
    build_backbone(pm, cm, 1, 2, True)  # same draws as build_network before the head
    fresh = build_head(HeadConfig("lowrank", rank=4, bases=2, partitions=2), 4)
    ours, theirs = net.head.state_dict(), fresh.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_missing_backbone_key_is_refused(tmp_path: Path) -> None:
    path, _ = _save_backbone(tmp_path)
    ckpt = torch.load(path, weights_only=False)
    dropped = next(k for k in ckpt["network_weights"] if "seg_layers" in k)
    del ckpt["network_weights"][dropped]
    torch.save(ckpt, path)
    with pytest.raises(InvalidInputError, match="does not fit the planned network"):
        load_backbone(_net(), path)


def test_missing_checkpoint_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_backbone(_net(), tmp_path / "nope.pth")


def test_full_checkpoint_round_trip_and_wrong_method(tmp_path: Path) -> None:
    net = _net("single-basis", seed=3)
    path = tmp_path / "ft.pth"
    torch.save({"network_weights": net.state_dict()}, path)
    other = _net("single-basis", seed=4)
    load_full(other, path)
    for k, v in other.state_dict().items():
        assert torch.equal(v, net.state_dict()[k])
    with pytest.raises(InvalidInputError, match="does not fit its method"):
        load_full(_net("diagonal"), path)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_convolutions_match_torch_and_keep_their_gradients(batch: int, bias: bool) -> None:
    from mobseg.nnunet.network import CPUConv3d, fast_cpu_convolutions

    torch.manual_seed(0)
    stock = torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1, bias=bias), torch.nn.Conv3d(8, 4, 3, 2, 1, bias=bias)
    )
    fast = fast_cpu_convolutions(copy.deepcopy(stock))
    assert all(type(m) is CPUConv3d for m in fast)
    assert fast.state_dict().keys() == stock.state_dict().keys()
    x = torch.randn(batch, 1, 12, 10, 9, requires_grad=True)
    xs = x.detach().clone().requires_grad_()
    y, ys = fast(x), stock(xs)
    torch.testing.assert_close(y, ys, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ys * g).sum().backward()
    torch.testing.assert_close(x.grad, xs.grad, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast.parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-5)


def test_built_backbones_use_the_cpu_convolutions() -> None:
    from mobseg.nnunet.network import CPUConv3d

    convs = [m for m in _net().backbone.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(type(m) is CPUConv3d for m in convs)


def _dropout_pair(p: float) -> tuple[StochasticUNet, StochasticUNet]:
    pm, cm = managers()
    head = HeadConfig("deterministic")
    torch.manual_seed(0)
    plain = build_network(pm, cm, 1, 2, head, False)
    drop = build_network(pm, cm, 1, 2, head, False, decoder_dropout=p)
    drop.load_state_dict(plain.state_dict(), strict=True)  # same keys: loads strictly
    return plain, drop


def test_decoder_dropout_keeps_the_weights_and_acts_in_training_mode_only() -> None:
    plain, drop = _dropout_pair(0.5)
    assert list(plain.state_dict()) == list(drop.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        plain.eval(), drop.eval()
        assert torch.equal(plain(x), drop(x))  # eval: the plain network
        plain.train(), drop.train()
        a, b = drop(x), drop(x)
        assert not torch.equal(a, b)  # two passes differ
        assert torch.equal(plain(x), plain(x))  # instance norm: no randomness without it
    hooked = [m for m in drop.modules() if getattr(m, "mobseg_dropout", None) is not None]
    decoder_convs = [
        m for m in drop.backbone.decoder.stages.modules() if isinstance(m, torch.nn.Conv3d)
    ]
    assert hooked and set(map(id, hooked)) == set(map(id, decoder_convs))
    assert not any(getattr(m, "mobseg_dropout", None) for m in drop.backbone.encoder.modules())
    copy.deepcopy(drop)  # the hook is a picklable object


def test_channel_dropout_is_torchs_dropout3d() -> None:
    from mobseg.nnunet.network import ChannelDropout

    conv = torch.nn.Conv3d(1, 6, 1).train()
    y = torch.randn(2, 6, 4, 4, 4)
    torch.manual_seed(3)
    got = ChannelDropout(0.3)(conv, (), y)
    torch.manual_seed(3)
    want = torch.nn.functional.dropout3d(y, 0.3, training=True)
    assert torch.equal(got, want)
    # whole channels are zeroed, the others scaled by 1/(1 - p)
    flat = got.reshape(2, 6, -1)
    zero = (flat == 0).all(-1)
    kept = ~zero
    assert torch.allclose(flat[kept], y.reshape(2, 6, -1)[kept] / 0.7)
    assert torch.equal(ChannelDropout(0.3)(conv.eval(), (), y), y)
    with pytest.raises(ConfigurationError, match="dropout rate"):
        ChannelDropout(1.0)


def test_cpu_convolution_backward_of_a_batch_of_one_takes_the_batched_kernel() -> None:
    # ATen picks its slow kernel for the backward of a batch of one with few channels
    # (N * C * D * H <= 20480); CPUConv3d hands it a batch of two (a zero sample).
    from torch.utils._python_dispatch import TorchDispatchMode

    from mobseg.nnunet.network import fast_cpu_convolutions

    class Batches(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default:
                self.seen.append(int(args[1].shape[0]))  # the input's batch
            return func(*args, **(kwargs or {}))

    conv = fast_cpu_convolutions(torch.nn.Sequential(torch.nn.Conv3d(8, 8, 3, padding=1)))
    y = conv(torch.randn(1, 8, 12, 12, 12, requires_grad=True))
    with Batches() as mode:
        y.sum().backward()
    assert mode.seen == [2]
