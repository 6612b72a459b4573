"""The student registry (every student: forward, backward, shapes, public parameter counts, local init) and the
stage-1 loss terms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from esam3.train.losses import LossWeights, chosen_prompts, feature_terms, mask_terms, per_image_mean, total_loss
from esam3.train.students import REGISTRY, Student, StudentError, StudentSpec


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_student_maps_pixels_to_the_trunk_shape_and_trains(name: str) -> None:
    torch.manual_seed(0)
    student = Student(StudentSpec(name, trunk_width=24, grid=5, image_size=64))
    # the backbone is the public one: EfficientSAM3's parameter counts (millions, two decimals)
    assert round(student.backbone_parameters() / 1e6, 2) == REGISTRY[name][1]
    pixels = torch.randint(0, 256, (2, 3, 80, 80), dtype=torch.uint8)  # resized to the student's 64 px inside
    out = student(pixels)
    assert out.shape == (2, 24, 5, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in student.backbone.parameters() for g in [g.grad])


def test_student_spec_is_checked_and_round_trips() -> None:
    spec = StudentSpec("es-rv-m", 1024, 72, 1008)
    assert StudentSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(StudentError, match="unknown student 'es-xx-s'; choose one of es-ev-s"):
        StudentSpec("es-xx-s", 8, 2, 64)
    with pytest.raises(StudentError, match="image_size must be at least 32"):
        StudentSpec("es-ev-s", 8, 2, 16)
    with pytest.raises(StudentError, match="not a student spec"):
        StudentSpec.from_dict({"name": "es-ev-s", "width": 3})


def test_init_from_a_local_timm_checkpoint(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("efficientvit_b0", pretrained=False)
    path = tmp_path / "b0.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    student = Student(StudentSpec("es-ev-s", 8, 2, 64), init=path)
    ours = student.backbone.state_dict()
    theirs = source.state_dict()
    assert torch.equal(ours["stem_in_conv.conv.weight"], theirs["stem.in_conv.conv.weight"])  # features_only flattens names
    assert torch.equal(ours["stages_3.blocks.0.main.point_conv.conv.weight"], theirs["stages.3.blocks.0.main.point_conv.conv.weight"])
    with pytest.raises(StudentError, match="--init .*missing.pth: no such file"):
        Student(StudentSpec("es-ev-s", 8, 2, 64), init=tmp_path / "missing.pth")
    with pytest.raises(StudentError, match="not a repvit_m0_9 checkpoint"):
        Student(StudentSpec("es-rv-s", 8, 2, 64), init=path)


def test_feature_terms_follow_the_public_definitions() -> None:
    teacher = torch.randn(2, 6, 3, 3)
    terms = feature_terms(teacher, teacher)
    assert float(terms["mse"]) == 0 and abs(float(terms["cosine"])) < 1e-6
    shifted = feature_terms(teacher + 0.5, teacher)
    assert float(shifted["mse"]) == pytest.approx(6 * 0.25, rel=1e-6)  # summed over channels, averaged over pixels
    assert float(feature_terms(-teacher, teacher)["cosine"]) == pytest.approx(2.0, abs=1e-5)


def test_mask_terms_and_per_image_means_split_over_ranks_like_the_whole_batch() -> None:
    logits = torch.tensor([[[10.0, -10.0], [10.0, -10.0]]])
    bce, dice = mask_terms(logits, (logits > 0).float())
    assert float(bce[0]) < 1e-4 and float(dice[0]) < 1e-3
    bce, dice = mask_terms(-logits, (logits > 0).float())
    assert float(bce[0]) > 5 and float(dice[0]) > 0.6
    values = torch.tensor([1.0, 3.0, 5.0, 2.0, 4.0])
    image = torch.tensor([0, 0, 1, 2, 3])  # image 0 has two prompts, image 4 none
    whole = per_image_mean(values, image, 6)
    assert float(whole) == pytest.approx((2.0 + 5.0 + 2.0 + 4.0) / 6)
    halves = [per_image_mean(values[:4], image[:4], 3), per_image_mean(values[4:], image[4:] - 3, 3)]  # images 0-2, 3-5
    assert float(sum(halves) / 2) == pytest.approx(float(whole))  # DDP averages the ranks' gradients


def test_prompt_draws_are_seeded_and_capped() -> None:
    valid = torch.tensor([[True, True, True, False], [False, True, False, False]])
    assert chosen_prompts(valid, None, None).tolist() == [[0, 0], [0, 1], [0, 2], [1, 1]]
    first = chosen_prompts(valid, 2, torch.Generator().manual_seed(3))
    assert first.tolist() == chosen_prompts(valid, 2, torch.Generator().manual_seed(3)).tolist()
    assert (first[:, 0] == 0).sum() == 2 and first[-1].tolist() == [1, 1]


def test_total_loss_weights_each_term() -> None:
    terms = {
        k: torch.tensor(v) for k, v in dict(mse=2.0, cosine=0.5, mask_bce=0.25, mask_dice=0.75, iou_l1=0.1, gt_bce=1.0, gt_dice=1.0).items()
    }
    weights = LossWeights(feature=0.5, cosine=2.0, prompt=3.0, iou=10.0, gt=0.5)
    assert float(total_loss(terms, weights)) == pytest.approx(0.5 * 2 + 2 * 0.5 + 3 * 1.0 + 10 * 0.1 + 0.5 * 2.0)
    assert not LossWeights(prompt=0, iou=0, gt=0).needs_prompts
