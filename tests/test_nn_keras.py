"""Keras parity: configs, weights, activations, dropout, go_backwards, pooling layouts."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nowcast.nn import ConvLSTM2D, MaxPool3D, get_activation


def _keras_config(**overrides) -> dict:
    """A Keras 3 ``ConvLSTM2D.get_config()`` as it comes out of a saved model's JSON."""
    config = {
        "name": "conv_lstm2d", "trainable": True, "dtype": "float32",
        "return_sequences": True, "return_state": False, "go_backwards": False,
        "stateful": False, "unroll": False, "zero_output_for_mask": False, "filters": 4,
        "kernel_size": [3, 3], "strides": [1, 1], "padding": "same",
        "data_format": "channels_last", "dilation_rate": [1, 1], "activation": "tanh",
        "recurrent_activation": "sigmoid", "use_bias": True,
        "kernel_initializer": {"module": "keras.initializers", "class_name": "GlorotUniform", "config": {}},
        "recurrent_initializer": {"module": "keras.initializers", "class_name": "Orthogonal", "config": {}},
        "bias_initializer": {"module": "keras.initializers", "class_name": "Zeros", "config": {}},
        "unit_forget_bias": True, "kernel_regularizer": None, "recurrent_regularizer": None,
        "bias_regularizer": None, "activity_regularizer": None, "kernel_constraint": None,
        "recurrent_constraint": None, "bias_constraint": None, "dropout": 0.0,
        "recurrent_dropout": 0.0, "seed": None,
    }
    config.update(overrides)
    return json.loads(json.dumps(config))  # lists, as JSON gives them


def test_keras_config_builds_one_layer_with_a_list_kernel():
    layer = ConvLSTM2D.from_keras_config(_keras_config(padding="SAME", activation=None), in_channels=3)
    assert layer.num_layers == 1  # [3, 3] from JSON is one 3x3 kernel, not two layers
    cell = layer.cells[0]
    assert cell.kernel_size == (3, 3) and cell.padding == "same" and cell.hidden_channels == 4
    x = torch.randn(2, 5, 9, 11, 3)
    assert layer(x).shape == (2, 5, 9, 11, 4)
    assert torch.equal(get_activation(None)(x), x)  # Keras None = linear
    cfg = _keras_config()
    cfg["build_config"] = {"input_shape": [None, 5, 9, 11, 7]}
    assert ConvLSTM2D.from_keras_config(cfg).in_channels == 7


def test_keras_config_names_every_unsupported_option():
    cfg = _keras_config(kernel_regularizer={"class_name": "L2", "config": {"l2": 0.01}},
                        recurrent_initializer={"class_name": "HeNormal", "config": {}},
                        zero_output_for_mask=True, fancy=1)
    with pytest.raises(ValueError) as err:
        ConvLSTM2D.from_keras_config(cfg, in_channels=3)
    for name in ("kernel_regularizer='L2'", "recurrent_initializer='HeNormal'",
                 "zero_output_for_mask", "fancy (unknown option)"):
        assert name in str(err.value)
    with pytest.warns(UserWarning, match="kernel_regularizer"):
        ConvLSTM2D.from_keras_config(cfg, in_channels=3, strict=False)
    with pytest.raises(ValueError, match="pass in_channels"):
        ConvLSTM2D.from_keras_config(_keras_config())


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="hard_sigmoid_keras2"):
        get_activation("swishy")
    with pytest.raises(ValueError, match="'same' or 'valid'.*any case"):
        ConvLSTM2D(1, 2, padding="full")


def test_hard_sigmoid_keras2_and_keras3():
    x = torch.linspace(-4, 4, 81)
    torch.testing.assert_close(get_activation("hard_sigmoid_keras2")(x), (0.2 * x + 0.5).clamp(0, 1))
    torch.testing.assert_close(get_activation("hard_sigmoid")(x), F.relu6(x + 3) / 6)
    layer = ConvLSTM2D.from_keras_config(_keras_config(recurrent_activation="hard_sigmoid"),
                                         in_channels=1, keras_version=2)
    assert layer.cells[0].recurrent_activation_name == "hard_sigmoid_keras2"


def test_set_weights_takes_keras_flat_lists_and_names_bad_shapes():
    torch.manual_seed(0)
    src = ConvLSTM2D(3, [4, 5], 3)
    dicts = src.get_weights()
    flat = [w[k] for w in dicts for k in ("kernel", "recurrent_kernel", "bias")]
    for form in (flat, [[w["kernel"], w["recurrent_kernel"], w["bias"]] for w in dicts]):
        dst = ConvLSTM2D(3, [4, 5], 3)
        dst.set_weights(form)
        for a, b in zip(src.parameters(), dst.parameters()):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"expected 6 arrays \(kernel, recurrent_kernel, bias"):
        ConvLSTM2D(3, [4, 5], 3).set_weights(flat[:5])
    bad = list(flat)
    bad[4] = np.zeros((3, 3, 4, 20), np.float32)  # layer 1's recurrent kernel, wrong C
    with pytest.raises(ValueError, match=r"layer 1 recurrent_kernel: expected shape \(3, 3, 5, 20\)"):
        ConvLSTM2D(3, [4, 5], 3).set_weights(bad)
    bad[4] = np.zeros((3, 4, 20), np.float32)
    with pytest.raises(ValueError, match="layer 1 recurrent_kernel: expected shape"):
        ConvLSTM2D(3, [4, 5], 3).set_weights(bad)


def test_go_backwards_is_the_flipped_sequence():
    torch.manual_seed(0)
    fwd = ConvLSTM2D(2, 3, 3)
    back = ConvLSTM2D(2, 3, 3, go_backwards=True)
    back.load_state_dict(fwd.state_dict())
    x = torch.randn(2, 5, 2, 6, 6)
    torch.testing.assert_close(back(x), fwd(x.flip(1)))


@pytest.mark.parametrize("kind", ["dropout", "recurrent_dropout"])
def test_keras_dropout_only_while_training_with_one_mask_per_sequence(kind):
    torch.manual_seed(0)
    plain = ConvLSTM2D(2, 3, 3, num_layers=2)
    drop = ConvLSTM2D(2, 3, 3, num_layers=2, **{kind: 0.5})
    drop.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 2, 6, 6)
    drop.eval()
    torch.testing.assert_close(drop(x), plain(x))
    drop.train()
    torch.manual_seed(1)
    y1 = drop(x)
    torch.manual_seed(1)
    y2 = drop(x)
    torch.testing.assert_close(y1, y2)  # the masks come from torch's generator
    assert not torch.allclose(y1, plain(x))
    y1.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in drop.parameters())
    if kind == "dropout":  # one mask on the input for every step: step 0 sees it too
        mask = torch.zeros(1, 2, 2, 6, 6)
        mask[:, :, 0] = 2.0  # keep channel 0 only, as inverted dropout at p=0.5 scales
        ref = ConvLSTM2D(2, 3, 3)
        ref.load_state_dict({k: v for k, v in plain.state_dict().items() if k.startswith("cells.0")})
        ref.eval()
        one = ConvLSTM2D(2, 3, 3, dropout=0.5)
        one.load_state_dict(ref.state_dict())
        one.train()
        import nowcast.nn.convlstm as mod
        original = mod.F.dropout
        mod.F.dropout = lambda t, p, training=True: t * mask.expand_as(t)
        try:
            got = one(x)
        finally:
            mod.F.dropout = original
        torch.testing.assert_close(got, ref(x * mask.transpose(0, 1)))


def test_states_in_the_keras_layout():
    torch.manual_seed(0)
    layer = ConvLSTM2D(2, 3, 3, data_format="channels_last", return_state=True,
                       state_layout="data_format")
    x = torch.randn(2, 4, 6, 7, 2)
    y, [(h, c)] = layer(x)
    assert h.shape == (2, 6, 7, 3) and c.shape == (2, 6, 7, 3)
    torch.testing.assert_close(h, y[:, -1])
    y2, _ = layer(x, initial_state=[(h, c)])  # accepted back in the same layout
    assert y2.shape == y.shape


@pytest.mark.parametrize("remainder, want_t", [("drop", 2), ("keep", 3)])
def test_maxpool3d_remainder_and_keras_layout(remainder, want_t):
    x = torch.randn(2, 5, 3, 8, 8)  # T=5 does not fit pool 2
    with pytest.raises(ValueError, match="remainder='drop'"):
        MaxPool3D((2, 2, 2))(x)
    y = MaxPool3D((2, 2, 2), remainder=remainder)(x)
    assert y.shape == (2, want_t, 3, 4, 4)
    ncthw = x.transpose(1, 2)  # (B, C, T, H, W) as Keras channels_first
    z = MaxPool3D((2, 2, 2), data_format="keras_channels_first", remainder=remainder)(ncthw)
    torch.testing.assert_close(z, y.transpose(1, 2))
    assert MaxPool3D(2, ceil_mode=True).remainder == "keep"


# -- Keras itself as the oracle (keras 3 on the torch backend) -------------------------------
def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras runs on {keras.backend.backend()}, not torch")
    return keras


@pytest.mark.parametrize("options", [
    dict(padding="same", recurrent_activation="hard_sigmoid"),
    dict(padding="valid", go_backwards=True, strides=[2, 1], return_sequences=False),
    dict(padding="same", activation="relu", use_bias=False, dilation_rate=[2, 2]),
])
def test_matches_keras(options):
    keras = _keras()
    keras.utils.set_random_seed(0)
    klayer = keras.layers.ConvLSTM2D(filters=4, kernel_size=(3, 3), return_state=True,
                                     **{"return_sequences": True, **options})
    x = np.random.default_rng(0).normal(size=(2, 5, 9, 11, 3)).astype("float32")
    k_out, k_h, k_c = (np.asarray(keras.ops.convert_to_numpy(t)) for t in klayer(x))
    # bias and forget slice are random-free at init; give the bias values to compare
    weights = klayer.get_weights()
    if len(weights) == 3:
        weights[2] = np.random.default_rng(1).normal(size=weights[2].shape).astype("float32")
        klayer.set_weights(weights)
        k_out, k_h, k_c = (np.asarray(keras.ops.convert_to_numpy(t)) for t in klayer(x))
    layer = ConvLSTM2D.from_keras_config(klayer.get_config(), in_channels=3)
    layer.set_weights(klayer.get_weights())
    out, [(h, c)] = layer(torch.from_numpy(x))
    np.testing.assert_allclose(out.detach().numpy(), k_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h.detach().numpy(), k_h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c.detach().numpy(), k_c, rtol=1e-4, atol=1e-5)
