"""The exported heads: load without the trunk or text encoder, reproduce the teacher's targets from cached trunk features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from esam3.schemas.teacher import ConceptTargetConfig, HeadsLoadError, TeacherConfig, VideoPrompt, VideoTargetConfig
from esam3.workers.heads import HEAD_PREFIXES, HEADS_CONFIG, HEADS_WEIGHTS, TeacherHeads
from esam3.workers.teacher import Sam3Teacher, export_heads, prompt_targets
from esam3.workers.video_targets import annotated_masks, frame_targets, object_prompts, track
from tests.sam3_reference import close
from tests.test_teacher import IMAGES, prompt_set


@pytest.fixture(scope="module")
def exported(tiny_teacher: Sam3Teacher, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("heads")
    result = export_heads(TeacherConfig(source="tiny-random"), out)
    assert result.teacher.checksum == tiny_teacher.card.checksum
    assert result.heads_bytes == (out / HEADS_WEIGHTS).stat().st_size
    assert 0 < result.heads_parameters < result.teacher_parameters
    return out


@pytest.fixture()
def no_trunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the ViT trunk or the CLIP text encoder fails loudly."""
    from transformers import CLIPTextModelWithProjection
    from transformers.models.sam3.modeling_sam3 import Sam3ViTModel

    def refuse(*args, **kwargs):
        raise AssertionError("the heads must not build the trunk or the text encoder")

    monkeypatch.setattr(Sam3ViTModel, "__init__", refuse)
    monkeypatch.setattr(CLIPTextModelWithProjection, "__init__", refuse)


def test_heads_file_is_the_teacher_state_subset(tiny_teacher: Sam3Teacher, exported: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(exported / HEADS_WEIGHTS))
    full = tiny_teacher.model.state_dict()
    assert state and all(key.startswith(HEAD_PREFIXES) for key in state)
    assert not any(".backbone." in key or "text_encoder" in key for key in state)
    for key, value in state.items():
        assert torch.equal(value, full[key]), key
    document = json.loads((exported / HEADS_CONFIG).read_text())
    assert document["teacher"]["checksum"] == tiny_teacher.card.checksum and document["detector"] is True


def test_heads_load_without_trunk_and_reproduce_prompt_targets(tiny_teacher: Sam3Teacher, exported: Path, no_trunk: None) -> None:
    heads, document = TeacherHeads.load(exported)
    assert document["teacher"]["checksum"] == tiny_teacher.card.checksum
    assert not any("ViT" in type(m).__name__ or "CLIP" in type(m).__name__ for m in heads.modules())
    trunk = tiny_teacher.image_targets(IMAGES[:1]).trunk  # what the cache stores
    prompts = prompt_set(tiny_teacher.geometry.image_size)
    from_heads = prompt_targets(heads, trunk, prompts, torch.device("cpu"))
    from_teacher = tiny_teacher.prompt_targets(trunk, prompts)
    for name in ("multi", "single", "iou", "object_score", "object_pointer"):
        torch.testing.assert_close(getattr(from_heads, name), getattr(from_teacher, name), rtol=0, atol=1e-6)
    with torch.no_grad():
        neck = heads.neck_levels(trunk)
    torch.testing.assert_close(neck[0], tiny_teacher.image_targets(IMAGES[:1], neck=True).neck[0], rtol=0, atol=1e-6)


def test_heads_reproduce_video_targets_from_cached_trunks(
    tiny_teacher: Sam3Teacher, exported: Path, demo_root: Path, no_trunk: None
) -> None:
    from esam3.pipeline.sources import SAVSource

    video = max(SAVSource(str(demo_root / "sa-v")).iter_samples("0"), key=lambda s: s.record.masklet_num)
    config = VideoTargetConfig(prompt=VideoPrompt.BOX, max_objects=4, max_frames=5)
    teacher_frames = list(tiny_teacher.video_targets(video, config))
    heads, _ = TeacherHeads.load(exported)
    frames = annotated_masks(video, config.max_frames)
    prompts = object_prompts(video.key, frames, video.record.masklet_id, heads.geometry.image_size, config)
    trunks = (f.trunk[None] for f in teacher_frames)
    for (frame, outputs), expected in zip(track(heads, trunks, len(frames), prompts, torch.device("cpu")), teacher_frames):
        mine = frame_targets(frame, expected.frame_index, expected.trunk, outputs, heads)
        assert mine.object_ids == expected.object_ids
        for name in ("mask_logits", "object_score", "object_pointer", "pix_feat_with_mem"):
            torch.testing.assert_close(getattr(mine, name), getattr(expected, name), rtol=0, atol=1e-5)
        # SAM3 keeps maskmem_features in bf16: float-level differences upstream can flip the last bf16 bit.
        assert close(mine.maskmem_features, expected.maskmem_features, rel=2**-8)


def test_heads_reproduce_concept_targets_from_cached_features(tiny_teacher: Sam3Teacher, exported: Path, no_trunk: None) -> None:
    """Stage 3 from the store: cached trunk + cached text features through the exported detector heads."""
    trunk = tiny_teacher.image_targets(IMAGES[:1]).trunk
    expected = tiny_teacher.concept_targets(trunk, ["a cat", "tree"], ConceptTargetConfig(top_k=5))
    heads, _ = TeacherHeads.load(exported)
    with torch.no_grad():
        out = heads.require_detector().detect(trunk, expected.text_features, expected.attention_mask)
    rows = torch.arange(2)[:, None]
    torch.testing.assert_close(out.pred_boxes[rows, expected.query_index], expected.boxes, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.pred_masks[rows, expected.query_index], expected.masks, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.presence_logits.reshape(2), expected.presence_logit, rtol=0, atol=1e-6)


def test_concepts_need_detector_heads(tiny_teacher: Sam3Teacher, tmp_path: Path) -> None:
    result = export_heads(TeacherConfig(source="tiny-random"), tmp_path, detector=False)
    heads, document = TeacherHeads.load(tmp_path)
    assert heads.detector_model is None and document["detector"] is False
    assert result.heads_parameters == sum(p.numel() for p in heads.parameters())
    with pytest.raises(HeadsLoadError, match="without the detector"):
        heads.require_detector()


def test_bad_heads_directories(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(HeadsLoadError, match="heads.json is missing"):
        TeacherHeads.load(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / HEADS_WEIGHTS).write_bytes((exported / HEADS_WEIGHTS).read_bytes())
    document = json.loads((exported / HEADS_CONFIG).read_text())
    (bad / HEADS_CONFIG).write_text(json.dumps({**document, "format": 99}))
    with pytest.raises(HeadsLoadError, match="format 99"):
        TeacherHeads.load(bad)
    (bad / HEADS_CONFIG).write_text("{not json")
    with pytest.raises(HeadsLoadError, match="not a heads config"):
        TeacherHeads.load(bad)
    (bad / HEADS_CONFIG).write_text("[1, 2]")
    with pytest.raises(HeadsLoadError, match="not a heads config .*list"):
        TeacherHeads.load(bad)
    (bad / HEADS_CONFIG).write_text(json.dumps(document))
    (bad / HEADS_WEIGHTS).write_bytes((exported / HEADS_WEIGHTS).read_bytes()[:500])
    with pytest.raises(HeadsLoadError, match="unreadable"):
        TeacherHeads.load(bad)
    (bad / HEADS_WEIGHTS).write_bytes((exported / HEADS_WEIGHTS).read_bytes())
    config = document["teacher_config"]
    config["tracker_config"]["num_maskmem"] = 3  # a different architecture than the weights
    (bad / HEADS_CONFIG).write_text(json.dumps({**document, "teacher_config": config}))
    with pytest.raises(HeadsLoadError, match="do not match"):
        TeacherHeads.load(bad)


def test_heads_geometry_is_read_from_config(exported: Path) -> None:
    heads, _ = TeacherHeads.load(exported)
    g = heads.geometry
    assert (g.image_size, g.grid, g.mask_size, g.memory_channels) == (112, 8, 32, 64)
    trunk = torch.randn(1, g.trunk_width, g.grid, g.grid)
    embeddings = heads.image_embeddings(trunk)
    assert [tuple(e.shape[-2:]) for e in embeddings] == [(s, s) for s in g.neck_sizes]


def test_gradients_flow_through_heads_to_student_features(exported: Path) -> None:
    """Stage 1 prompt-in-the-loop: a student's features go through the frozen heads and get gradients."""
    from esam3.workers.teacher import prompt_tensors

    heads, _ = TeacherHeads.load(exported)
    heads.requires_grad_(False)
    g = heads.geometry
    student = torch.randn(1, g.trunk_width, g.grid, g.grid, requires_grad=True)
    out = heads.decode_prompts(heads.image_embeddings(student), *prompt_tensors(prompt_set(g.image_size), torch.device("cpu")))
    (out["multi"].square().mean() + out["single"].square().mean()).backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


def test_a_batch_of_images_decodes_like_each_image_alone(exported: Path) -> None:
    """Trainers decode every prompt of a batch in one call per prompt shape (``image=``): the same outputs as
    decoding each image's prompts on their own; and the picked output follows the tracker's multimask rule."""
    from esam3.workers.teacher import prompt_tensors

    heads, _ = TeacherHeads.load(exported)
    g = heads.geometry
    torch.manual_seed(0)
    trunks = torch.randn(2, g.trunk_width, g.grid, g.grid)
    points, labels, boxes = prompt_tensors(prompt_set(g.image_size), torch.device("cpu"))
    with torch.no_grad():
        alone = [heads.decode_prompts(heads.image_embeddings(trunks[b : b + 1]), points, labels, boxes) for b in range(2)]
        image = torch.tensor([0] * len(labels) + [1] * len(labels))
        together = heads.decode_prompts(
            heads.image_embeddings(trunks), points.repeat(2, 1, 1), labels.repeat(2, 1), boxes.repeat(2, 1), image=image
        )
    for name in ("multi", "single", "iou", "object_score", "object_pointer"):
        assert torch.allclose(together[name], torch.cat([a[name] for a in alone]), atol=1e-5), name
    pick = heads.picked_output(labels, boxes, alone[0]["iou"])
    n_points = (labels >= 0).sum(-1) + 2 * (~torch.isnan(boxes).any(-1)).long()
    for k in range(len(labels)):
        expected = 1 + int(alone[0]["iou"][k, 1:].argmax()) if int(n_points[k]) == 1 else 0  # SAM3: multimask for one click
        assert int(pick[k]) == expected
    assert {int(n) for n in n_points} & {1} and {int(n) for n in n_points} - {1}  # both rules are exercised
    # a trainer decodes only the pass that gives each prompt's chosen output: the same logits and scores
    with torch.no_grad():
        chosen = heads.decode_prompts(heads.image_embeddings(trunks[:1]), points, labels, boxes, choose=pick)
    both = torch.cat([alone[0]["single"], alone[0]["multi"]], dim=1)
    assert torch.allclose(chosen["chosen"], both[torch.arange(len(pick)), pick], atol=1e-5)
    ran = ~torch.isnan(chosen["iou"])
    assert torch.equal(ran.sum(1), torch.where(pick > 0, 3, 1)) and torch.allclose(chosen["iou"][ran], alone[0]["iou"][ran], atol=1e-5)
    with pytest.raises(ValueError, match="is judged by its"):
        heads.decode_prompts(heads.image_embeddings(trunks[:1]), points, labels, boxes, choose=torch.where(pick > 0, 0, 1))
