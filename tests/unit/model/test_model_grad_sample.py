"""Per-sample gradients of the network under Opacus, against micro-batches of one.

Opacus computes each patient's gradient from layer activations and backpropagated
outputs; the trusted reference is plain autograd run on each patient alone. Every
module type of the network is covered: the encoders' embeddings and value projection,
the attention's linear projections, LayerNorm, the feed-forward layers and the heads.
"""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.grad_sample.utils import wrap_model

from medfed.model.contract import MODALITY_ORDER
from medfed.model.network import MedModel, build_model
from medfed.model.tokenizers import encode
from tests.modelkit import SUBSETS, all_modalities_contract, sample

CONTRACT = all_modalities_contract()

# Opacus's hooks make torch warn that a full backward hook fires with no input needing
# gradients (token ids and values never do); third-party noise.
# In functorch mode torch warns, from inside Opacus's vmap machinery, that float32 is not
# a CPU autocast dtype; the network never enters autocast. Third-party noise.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:In CPU autocast, but the target dtype:UserWarning"),
]


def per_patient_loss(outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """A loss that is a sum over patients, touching every head nonlinearly."""
    losses = [
        torch.nn.functional.binary_cross_entropy_with_logits(
            outputs["readmission"], targets, reduction="sum"
        ),
        outputs["stage"].logsumexp(dim=1).sum(),
        (outputs["egfr"] - 0.3).pow(2).sum(),
        torch.nn.functional.softplus(outputs["survival"]).sum(),
    ]
    return torch.stack(losses).sum()


def micro_batch_gradients(
    model: MedModel, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor
) -> list[dict[str, torch.Tensor]]:
    gradients = []
    for i in range(targets.shape[0]):
        model.zero_grad()
        one = tuple(tensor[i : i + 1] for tensor in inputs)
        per_patient_loss(model(*one), targets[i : i + 1]).backward()
        gradients.append(
            {
                name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                for name, p in model.named_parameters()
            }
        )
    return gradients


@pytest.mark.parametrize(
    ("mode", "seed"), [("hooks", 0), ("hooks", 1), ("functorch", 0), ("ew", 0)]
)
def test_per_sample_gradients_match_micro_batches(mode: str, seed: int) -> None:
    # Every subset of modalities once, plus a full patient twice: mixed documents per batch.
    subsets = [*SUBSETS, frozenset(MODALITY_ORDER), frozenset(MODALITY_ORDER)]
    batch = encode([sample(f"p{i}", s, seed=i) for i, s in enumerate(subsets)], CONTRACT)
    targets = batch.targets["readmission"][0]
    model = build_model("tiny", contract=CONTRACT, seed=seed)
    reference = copy.deepcopy(model)

    wrapped = wrap_model(model, grad_sample_mode=mode, batch_first=True, loss_reduction="sum")
    per_patient_loss(wrapped(*batch.inputs), targets).backward()
    expected = micro_batch_gradients(reference, batch.inputs, targets)

    checked = 0
    for name, parameter in model.named_parameters():
        grad_sample = parameter.grad_sample  # type: ignore[attr-defined]
        assert grad_sample.shape == (len(subsets), *parameter.shape), name
        for i, gradients in enumerate(expected):
            torch.testing.assert_close(
                grad_sample[i], gradients[name], rtol=1e-4, atol=1e-6, msg=f"{name}, patient {i}"
            )
        checked += 1
    modules = {type(m).__name__ for m in model.modules() if list(m.parameters(recurse=False))}
    assert modules == {"Embedding", "Linear", "LayerNorm"}
    assert checked == len(list(model.parameters()))
    wrapped._close()  # type: ignore[operator]
