"""Which mask logits a store keeps and at which size (``--mask-outputs``, ``--mask-size``), what that costs the
masks, and that the stage-1 loss reads either layout the same way."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from esam3.schemas.prompts import MaskOutputs
from esam3.train.losses import PromptOutputs, prompt_terms, teacher_outputs
from esam3.workers.device_codecs import quantise_logits
from esam3.workers.mask_targets import logits_mask_iou, resize_logits, stored_logits


def sam_like(prompts: int, size: int) -> torch.Tensor:
    """(prompts, 4, size, size) logits like a trained decoder's (the codec benchmark's generator)."""
    spec = importlib.util.spec_from_file_location("codecs_benchmark", Path(__file__).parents[1] / "benchmarks" / "codecs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return torch.from_numpy(module.sam_like_logits(np.random.default_rng(0), 4 * prompts, size)).reshape(prompts, 4, size, size)


def test_resize_keeps_the_masks_and_leaves_the_right_size_alone() -> None:
    x = sam_like(3, 64)
    assert resize_logits(x, 64) is x
    small = resize_logits(x, 32)
    assert small.shape == (3, 4, 32, 32)
    back = resize_logits(small, 64)
    inter, union = ((back > 0) & (x > 0)).sum(), ((back > 0) | (x > 0)).sum()
    assert inter / union > 0.97  # smooth logits: halving the side moves only boundary pixels
    assert resize_logits(torch.zeros(0, 64, 64), 32).shape == (0, 32, 32)


@pytest.mark.parametrize("outputs", list(MaskOutputs))
def test_stored_logits_and_their_measured_mask_iou(outputs: MaskOutputs) -> None:
    x = sam_like(5, 64)
    pick = torch.tensor([0, 1, 2, 3, 1])
    kept = stored_logits(x[:, :1], x[:, 1:], pick, outputs, 64)
    if outputs == MaskOutputs.CHOSEN:
        assert list(kept) == ["chosen_logits"] and torch.equal(kept["chosen_logits"][1], x[torch.arange(5), pick])
    else:
        assert list(kept) == ["multi_logits", "single_logits"] and kept["multi_logits"][1].shape == (5, 3, 64, 64)
    exact = logits_mask_iou([(original, quantise_logits(stored)) for original, stored in kept.values()])
    assert exact.dtype == torch.float64 and 0.99 < float(exact) <= 1  # int8 moves a few boundary pixels at most
    small = stored_logits(x[:, :1], x[:, 1:], pick, outputs, 16)
    shrunk = float(logits_mask_iou([(original, quantise_logits(stored)) for original, stored in small.values()]))
    assert 0.5 < shrunk < float(exact)  # a quarter of the side costs boundary pixels, and the measure says so


def test_the_loss_reads_either_layout_and_any_stored_size_the_same_way() -> None:
    torch.manual_seed(0)
    x = sam_like(3, 32)
    pick = torch.tensor([2, 0, 3])
    single, multi = x[:, :1][None], x[:, 1:][None]  # one image of 3 prompts
    student = torch.randn(3, 32, 32)
    outputs = PromptOutputs(torch.zeros(3, dtype=torch.long), torch.arange(3), pick, student, torch.rand(3, 4))
    common = {"iou": torch.rand(1, 3, 4), "prompt_valid": torch.ones(1, 3, dtype=torch.bool), "chosen_output": pick[None]}
    every = {**common, "single_logits": single, "multi_logits": multi}
    expected = x[torch.arange(3), pick]  # output 0 is the single mask, 1..3 the multimask ones
    chosen = {**common, "chosen_logits": expected[None].clone()}
    for batch in (every, chosen):
        logits, iou = teacher_outputs(batch, outputs)
        assert torch.equal(logits, expected) and torch.equal(iou, common["iou"][0])
    a, b = prompt_terms(every, outputs, with_gt=False), prompt_terms(chosen, outputs, with_gt=False)
    assert {k: float(v) for k, v in a.items()} == {k: float(v) for k, v in b.items()}
    half = {**common, "chosen_logits": resize_logits(chosen["chosen_logits"], 16)}  # cached with --mask-size 16
    logits, _ = teacher_outputs(half, outputs)
    assert logits.shape == (3, 32, 32) and ((logits > 0) == (expected > 0)).float().mean() > 0.97


def test_training_judges_by_the_stored_output_and_the_live_arm_gives_full_size_targets(tiny_teacher, sa1b_store: Path) -> None:
    """decode_batch takes the output the store says the teacher used (not its own reading of the IoU scores), and
    the fidelity benchmark's live teacher gives the same layout at the decoder's size (any --mask-size cost shows)."""
    from esam3.train.fidelity import LiveTargets
    from esam3.train.losses import chosen_prompts, decode_batch
    from esam3.train.reader import StoreDataset

    dataset = StoreDataset(str(sa1b_store), fields=("input", "trunk", "prompts"), split="all")
    batch = dataset[[0, 1]]
    heads = tiny_teacher.heads
    pairs = chosen_prompts(batch["prompt_valid"], None, None)
    image, slot = pairs[:, 0], pairs[:, 1]
    multimask = batch["chosen_output"][image, slot] > 0  # one-click prompts: any of the 3 multimask outputs is legal
    assert multimask.any()
    moved = dict(batch, chosen_output=batch["chosen_output"].clone())
    moved["chosen_output"][image[multimask], slot[multimask]] = 1 + batch["chosen_output"][image[multimask], slot[multimask]] % 3
    out = decode_batch(heads, batch["trunk"], moved, pairs)
    assert torch.equal(out.pick, moved["chosen_output"][image, slot]) and not torch.equal(out.pick, batch["chosen_output"][image, slot])
    live = LiveTargets(tiny_teacher)(batch)
    assert live["chosen_logits"].shape == batch["chosen_logits"].shape and torch.equal(live["chosen_output"], batch["chosen_output"])
    cached, fresh = batch["chosen_logits"][image, slot], live["chosen_logits"][image, slot]
    assert ((cached > 0) == (fresh > 0)).float().mean() > 0.95  # the fp16 store vs the teacher now: a few pixels at most
    small = dict(batch, chosen_logits=resize_logits(batch["chosen_logits"], 16))  # as a --mask-size 16 store holds them
    assert LiveTargets(tiny_teacher)(small)["chosen_logits"].shape[-1] == 32  # the live arm stays at the decoder's size
