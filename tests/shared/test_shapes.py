"""Bad expert-path arguments give the same clear error in the float64 oracle, torch_impl and jax_impl."""

import numpy as np
import pytest

from shared_math import reference
from shared_math.shapes import check_expert_args

T, H, I, E, K, R = 3, 8, 4, 5, 2, 2


def good() -> dict:
    z = np.zeros
    return dict(x=z((T, H)), expert_ids=np.zeros((T, K), dtype=np.int64), expert_weights=z((T, K)),
                w_gate_up=z((E, H, 2 * I)), w_down=z((E, I, H)), lora_gate_up=(z((E, H, R)), z((E, R, 2 * I))),
                lora_down=(z((E, I, R)), z((E, R, H))), biases=(z((E, 2 * I)), z((E, H))))


BAD = {
    "x not 2-D": (dict(x=np.zeros((T, H, 1))), "x must be \\[T, H\\]"),
    "w_down of the wrong I": (dict(w_down=np.zeros((E, I + 1, H))), "expert weights do not fit"),
    "odd 2I": (dict(w_gate_up=np.zeros((E, H, 2 * I + 1))), "expert weights do not fit"),
    "weights vs ids": (dict(expert_weights=np.zeros((T, K + 1))), "must both be \\[T=3, K\\]"),
    "LoRA B of gate_up": (dict(lora_gate_up=(np.zeros((E, H, R)), np.zeros((E, R, I)))), "lora_gate_up must be"),
    "LoRA A of down": (dict(lora_down=(np.zeros((E, H, R)), np.zeros((E, R, H)))), "lora_down must be"),
    "bias of down": (dict(biases=(np.zeros((E, 2 * I)), np.zeros((E, I)))), "biases must be"),
}


def test_good_arguments_give_the_sizes():
    assert check_expert_args(**good()) == (T, H, I, E, K)


def _implementations():
    impls = [("reference", reference.split_lora_experts, lambda a: a)]
    try:
        import torch

        from torch_impl.moe import split_lora_experts as t

        impls.append(("torch", t, lambda a: torch.as_tensor(a, dtype=torch.int64 if a.dtype == np.int64
                                                               else torch.float32)))
    except ImportError:
        pass
    try:
        import jax.numpy as jnp

        from jax_impl.moe import split_lora_experts as j

        impls.append(("jax", j, jnp.asarray))
    except ImportError:
        pass
    return impls


@pytest.mark.parametrize("impl", _implementations(), ids=lambda i: i[0])
@pytest.mark.parametrize("what", list(BAD))
def test_each_bad_shape_is_named_by_every_implementation(impl, what):
    _, fn, conv = impl
    changes, message = BAD[what]
    args = {**good(), **changes}
    conv_args = {k: (tuple(conv(t) for t in v) if isinstance(v, tuple) else conv(v)) for k, v in args.items()}
    biases = conv_args.pop("biases")
    lora_gate_up, lora_down = conv_args.pop("lora_gate_up"), conv_args.pop("lora_down")
    with pytest.raises(ValueError, match=message):
        fn(conv_args["x"], conv_args["expert_ids"], conv_args["expert_weights"], conv_args["w_gate_up"],
           conv_args["w_down"], lora_gate_up, lora_down, scale=1.0, biases=biases)
