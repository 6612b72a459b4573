"""The teacher runner against transformers' own SAM3 classes, on the tiny random teacher (saved and reloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from esam3.pipeline.demo_data import write_demo_data
from esam3.pipeline.sources import SAVSource
from esam3.schemas.prompts import PromptConfig
from esam3.schemas.teacher import ConceptTargetConfig, TeacherConfig, TeacherLoadError, VideoPrompt, VideoTargetConfig
from esam3.workers.preprocess import normalize, preprocess_images, resize_uint8, transform_record
from esam3.workers.prompts import PromptSet, sample_prompts
from esam3.workers.teacher import Sam3Teacher
from esam3.workers.teacher_loading import load_checkpoint, materialize_random, weights_checksum
from esam3.workers.video_targets import annotated_masks, object_prompts, track
from tests import sam3_reference as ref
from tests.conftest import small_config

rng = np.random.default_rng(0)
IMAGES = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((150, 230, 3), (96, 64, 3), (112, 112, 3))]


def prompt_set(size: int) -> PromptSet:
    """Five prompts covering every shape: 1 click, click + negative, box, box + click, click + 2 negatives."""
    points = np.array(
        [
            [[50, 60], [0, 0], [0, 0]],
            [[20, 30], [70, 80], [0, 0]],
            [[0, 0]] * 3,
            [[40, 40], [0, 0], [0, 0]],
            [[10, 10], [90, 90], [100, 20]],
        ],
        np.float32,
    )
    labels = np.array([[1, -1, -1], [1, 0, -1], [-1, -1, -1], [1, -1, -1], [1, 0, 0]], np.int8)
    boxes = np.full((5, 4), np.nan, np.float32)
    boxes[2], boxes[3] = [10, 20, 60, 90], [30, 30, 80, 70]
    return PromptSet(
        mask_index=np.arange(5, dtype=np.int32),
        kinds=np.zeros(5, np.int8),
        points=points,
        labels=labels,
        boxes=boxes,
        points_model=points,
        boxes_model=boxes,
        image_size=(size, size),
        model_size=size,
    )


def test_preprocessing_equals_sam3_image_processor(tiny_teacher: Sam3Teacher) -> None:
    size = tiny_teacher.geometry.image_size
    ours = preprocess_images(IMAGES, size)
    expected = ref.pixel_values(IMAGES, size)
    assert ours.shape == (3, 3, size, size)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    record = transform_record((150, 230), size)
    assert record["scale_x"] == size / 230 and record["scale_y"] == size / 150 and record["mean"] == record["std"] == 0.5
    with pytest.raises(ValueError, match="image 0: expected uint8"):
        preprocess_images([IMAGES[0].astype(np.float32)], size)


def test_trunk_and_neck_equal_transformers(tiny_teacher: Sam3Teacher) -> None:
    from transformers import Sam3Model, Sam3TrackerVideoModel

    g = tiny_teacher.geometry
    targets = tiny_teacher.image_targets(IMAGES, neck=True)
    assert targets.trunk.shape == (3, g.trunk_width, g.grid, g.grid)
    pixels = ref.pixel_values(IMAGES, g.image_size)
    detector = Sam3Model.from_pretrained(tiny_teacher.card.checkpoint_dir, local_files_only=True).eval()
    tracker = Sam3TrackerVideoModel.from_pretrained(tiny_teacher.card.checkpoint_dir, local_files_only=True).eval()
    with torch.no_grad():
        tokens = detector.get_vision_features(pixel_values=pixels).last_hidden_state
        levels = tracker.vision_encoder(pixels).fpn_hidden_states
    expected = tokens.transpose(1, 2).reshape(3, g.trunk_width, g.grid, g.grid)
    assert ref.close(targets.trunk, expected) and expected.std() > 0.1
    assert [tuple(level.shape[1:]) for level in targets.neck] == [(g.hidden, s, s) for s in g.neck_sizes]
    for ours, theirs in zip(targets.neck, levels):
        assert ref.close(ours, theirs)
    assert targets.transforms[1]["original_height"] == 96 and targets.transforms[1]["original_width"] == 64


def test_prompt_targets_equal_sam3_tracker_model(tiny_teacher: Sam3Teacher) -> None:
    g = tiny_teacher.geometry
    prompts = prompt_set(g.image_size)
    trunk = tiny_teacher.image_targets(IMAGES[:1]).trunk[0]
    out = tiny_teacher.prompt_targets(trunk, prompts)
    assert out.multi.shape == (5, 3, g.mask_size, g.mask_size) and out.single.shape == (5, 1, g.mask_size, g.mask_size)
    assert out.iou.shape == (5, 4) and out.object_score.shape == (5,) and out.object_pointer.shape == (5, g.hidden)
    model = ref.tracker_model(tiny_teacher.model)
    pixels = ref.pixel_values(IMAGES[:1], g.image_size)
    with torch.no_grad():
        embeddings = model.get_image_embeddings(pixels)
    for i in range(5):
        n = int((prompts.labels[i] >= 0).sum())
        kwargs = {}
        if n:
            kwargs["input_points"] = torch.tensor(prompts.points_model[i : i + 1, :n] - 0.5)[None]
            kwargs["input_labels"] = torch.tensor(prompts.labels[i : i + 1, :n].astype(np.int64))[None]
        if not np.isnan(prompts.boxes_model[i]).any():
            kwargs["input_boxes"] = torch.tensor(prompts.boxes_model[i : i + 1] - 0.5)[None]
        with torch.no_grad():
            multi = model(pixel_values=pixels, multimask_output=True, **kwargs)
            single = model(pixel_values=pixels, multimask_output=False, **kwargs)
        assert ref.close(out.multi[i], multi.pred_masks[0, 0]) and multi.pred_masks.std() > 0
        assert ref.close(out.single[i], single.pred_masks[0, 0])
        assert ref.close(out.iou[i], torch.cat([single.iou_scores[0, 0], multi.iou_scores[0, 0]]))
        assert ref.close(out.object_score[i : i + 1], multi.object_score_logits[0, 0])
        # The pointer the video tracker stores when this prompt starts a track (its own rule for multimask).
        points = kwargs.get("input_points", torch.zeros(1, 1, 0, 2))
        labels = kwargs.get("input_labels", torch.zeros(1, 1, 0, dtype=torch.int64))
        if "input_boxes" in kwargs:
            points = torch.cat([kwargs["input_boxes"].reshape(1, 1, 2, 2), points], dim=2)
            labels = torch.cat([torch.tensor([[[2, 3]]]), labels], dim=2)
        tracker = tiny_teacher.heads.tracker_model
        multimask = tracker._use_multimask(True, {"point_labels": labels})
        with torch.no_grad():
            track = tracker._single_frame_forward(
                input_points=points, input_labels=labels, image_embeddings=embeddings, multimask_output=multimask
            )
        assert ref.close(out.object_pointer[i], track.object_pointer[0])


def test_prompt_targets_from_sampled_prompts_and_empty(tiny_teacher: Sam3Teacher, demo_root: Path) -> None:
    from esam3.pipeline.sources import SA1BSource

    sample = next(s for s in SA1BSource(str(demo_root / "sa-1b")).iter_samples("0"))
    image_hw = (sample.record.image.height, sample.record.image.width)
    size = tiny_teacher.geometry.image_size
    prompts = sample_prompts(sample.key, sample.masks, image_hw, size, PromptConfig(num_prompts=6, min_area_model_px=1))
    image = np.zeros((*image_hw, 3), np.uint8)
    trunk = tiny_teacher.image_targets([image]).trunk
    out = tiny_teacher.prompt_targets(trunk, prompts)
    assert out.multi.shape[0] == len(prompts) == 6 and torch.isfinite(out.multi).all()
    empty = tiny_teacher.prompt_targets(
        trunk,
        PromptSet(
            *(
                np.zeros((0, *a.shape[1:]), a.dtype)
                for a in (
                    prompts.mask_index,
                    prompts.kinds,
                    prompts.points,
                    prompts.labels,
                    prompts.boxes,
                    prompts.points_model,
                    prompts.boxes_model,
                )
            ),
            image_hw,
            size,
        ),
    )
    assert empty.multi.shape == (0, 3, tiny_teacher.geometry.mask_size, tiny_teacher.geometry.mask_size)
    wrong = PromptSet(**{**prompts.__dict__, "model_size": size * 2})
    with pytest.raises(ValueError, match="frame"):
        tiny_teacher.prompt_targets(trunk, wrong)


def test_targets_do_not_depend_on_batch_size_and_seed_is_deterministic(tiny_teacher: Sam3Teacher) -> None:
    one = Sam3Teacher(tiny_teacher.model, TeacherConfig(source="tiny-random", batch_size=1), tiny_teacher.card.checkpoint_dir)
    assert ref.close(one.image_targets(IMAGES).trunk, tiny_teacher.image_targets(IMAGES).trunk, rel=1e-5)
    again = load_checkpoint(materialize_random("tiny-random", 0, root=Path(tiny_teacher.card.checkpoint_dir).parent.parent / "again"))
    assert weights_checksum(again) == tiny_teacher.card.checksum
    other = Sam3Teacher.load(TeacherConfig(source="tiny-random", seed=1))
    assert other.card.checksum != tiny_teacher.card.checksum
    assert not ref.close(other.image_targets(IMAGES[:1]).trunk, tiny_teacher.image_targets(IMAGES[:1]).trunk)


@pytest.fixture(scope="module")
def video(demo_root: Path):
    """The demo video with the most masklets (one of them enters late)."""
    samples = list(SAVSource(str(demo_root / "sa-v")).iter_samples("0"))
    return max(samples, key=lambda s: s.record.masklet_num)


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory):
    """A 3.6 s demo video: 22 annotated frames, more than the tracker's 16-frame memory window."""
    root = tmp_path_factory.mktemp("long-video")
    write_demo_data(small_config(root, sa1b_shards=0, videos_per_shard=1, video_seconds=3.6))
    return next(iter(SAVSource(str(root / "sa-v")).iter_samples("0")))


@pytest.mark.parametrize("kind", list(VideoPrompt))
def test_video_targets_equal_sam3_tracker_video_model(tiny_teacher: Sam3Teacher, video, kind: VideoPrompt) -> None:
    g = tiny_teacher.geometry
    config = VideoTargetConfig(prompt=kind, max_objects=8, max_frames=9)
    ours = list(tiny_teacher.video_targets(video, config))
    frames = annotated_masks(video, config.max_frames)
    prompts = object_prompts(video.key, frames, video.record.masklet_id, g.image_size, config)
    assert len(ours) == len(frames) == 9 and len(prompts) >= 2
    assert len({p.frame for p in prompts}) >= 2, "demo video should have an object that enters late"
    pixels = ref.pixel_values([video.frames[p] for p, _ in frames], g.image_size)
    expected = ref.track(tiny_teacher.card.checkpoint_dir, pixels, prompts, g.image_size)
    checked_memory = 0
    for frame, (mine, theirs) in enumerate(zip(ours, expected)):
        assert mine.frame == frame and mine.frame_index == 4 * frame
        assert mine.trunk.shape == (g.trunk_width, g.grid, g.grid)
        assert mine.object_ids == sorted(p.object_id for p in prompts if p.frame <= frame)
        assert mine.is_conditioning.tolist() == [p.frame == frame for p in prompts if p.frame <= frame]
        objects = theirs.get("objects", {})
        assert list(objects) == mine.object_ids
        for i, object_id in enumerate(mine.object_ids):
            stored = objects[object_id]
            assert ref.close(mine.mask_logits[i], stored["pred_masks"][0, 0], rel=1e-3)
            assert ref.close(mine.object_score[i : i + 1], stored["object_score_logits"].reshape(1), rel=1e-3)
            assert ref.close(mine.object_pointer[i], stored["object_pointer"][0], rel=1e-3)
            memory = stored["maskmem_features"].float().permute(1, 2, 0).reshape(g.memory_channels, g.grid, g.grid)
            assert ref.close(mine.maskmem_features[i], memory, rel=2e-2)  # stored in bf16 by SAM3
        for i in range(len(mine.object_ids)):  # a mask-prompted first frame uses the mask as its output
            assert bool(mine.has_memory_conditioned[i]) == (not mine.is_conditioning[i] or kind != VideoPrompt.MASK)
        conditioned = [i for i in range(len(mine.object_ids)) if mine.has_memory_conditioned[i]]
        assert len(theirs.get("memory_conditioned", [])) == len(conditioned)
        for i, expected_map in zip(conditioned, theirs.get("memory_conditioned", [])):
            assert ref.close(mine.pix_feat_with_mem[i], expected_map[0], rel=1e-3)
            checked_memory += 1
    assert checked_memory > 5


@pytest.mark.parametrize("kind", [VideoPrompt.POINT, VideoPrompt.MASK])
def test_a_prefix_of_a_video_gets_the_targets_of_a_whole_video_run(tiny_teacher: Sam3Teacher, video, kind: VideoPrompt) -> None:
    """max_frames cuts what is cached, not the tracker's view of the video: SAM3 scales pointer positions by
    min(num_frames, 16) - 1, so a session sized to the 3 frames used would give other pointers and memory."""
    whole = list(tiny_teacher.video_targets(video, VideoTargetConfig(prompt=kind, max_frames=100_000)))
    prefix = list(tiny_teacher.video_targets(video, VideoTargetConfig(prompt=kind, max_frames=3)))
    assert len(whole) == len(video.masks) == 9 and len(prefix) == 3
    for cut, full in zip(prefix, whole):
        assert cut.object_ids == full.object_ids
        for name in ("mask_logits", "object_pointer", "maskmem_features", "pix_feat_with_mem"):
            assert torch.equal(getattr(cut, name), getattr(full, name)), (cut.frame, name)
    # the difference is there to see: the same prefix in a session of 3 frames moves frame 2's memory-conditioned map
    frames = annotated_masks(video, 3)
    prompts = object_prompts(video.key, frames, video.record.masklet_id, tiny_teacher.geometry.image_size, VideoTargetConfig(prompt=kind))
    trunks = [
        tiny_teacher.trunk_features(normalize(resize_uint8(video.frames[p], tiny_teacher.geometry.image_size)[None]))[0][None]
        for p, _ in frames
    ]
    short = [outputs for _, outputs in track(tiny_teacher.heads, iter(trunks), 3, prompts, tiny_teacher.device)]
    tracked = [i for i, c in enumerate(short[2]["conditioned"]) if c is not None]
    assert tracked and not torch.allclose(short[2]["conditioned"][tracked[0]][0].float(), prefix[2].pix_feat_with_mem[tracked[0]])


def test_video_limits_and_determinism(tiny_teacher: Sam3Teacher, video) -> None:
    config = VideoTargetConfig(prompt=VideoPrompt.POINT, max_objects=1, max_frames=3)
    out = list(tiny_teacher.video_targets(video, config))
    assert len(out) == 3 and all(len(f.object_ids) <= 1 for f in out)
    assert out[-1].mask_logits.shape[0] == 1
    again = list(tiny_teacher.video_targets(video, config))
    for first, second in zip(out, again):
        for name in ("trunk", "mask_logits", "object_pointer", "maskmem_features", "pix_feat_with_mem"):
            assert torch.equal(getattr(first, name), getattr(second, name))
    other_seed = list(tiny_teacher.video_targets(video, config.model_copy(update={"seed": 5})))
    assert not torch.equal(other_seed[0].mask_logits, out[0].mask_logits), "point prompts follow the seed"


def test_concept_targets_equal_sam3_model(tiny_teacher: Sam3Teacher) -> None:
    from transformers import Sam3Model

    phrases = ["a cat", "red car", "tree"]
    trunk = tiny_teacher.image_targets(IMAGES[:1]).trunk
    out = tiny_teacher.concept_targets(trunk, phrases, ConceptTargetConfig(top_k=4))
    assert out.boxes.shape == (3, 4, 4) and out.masks.shape[:2] == (3, 4) and out.text_features.shape[:2] == (3, 32)
    assert torch.all(out.scores[:, :-1] >= out.scores[:, 1:])
    model = Sam3Model.from_pretrained(tiny_teacher.card.checkpoint_dir, local_files_only=True).eval()
    pixels = ref.pixel_values(IMAGES[:1], tiny_teacher.geometry.image_size)
    for i in range(3):
        with torch.no_grad():
            expected = model(pixel_values=pixels, input_ids=out.input_ids[i : i + 1], attention_mask=out.attention_mask[i : i + 1])
            text = model.get_text_features(input_ids=out.input_ids[i : i + 1], attention_mask=out.attention_mask[i : i + 1])
        index = out.query_index[i]
        assert ref.close(out.boxes[i], expected.pred_boxes[0, index])
        assert ref.close(out.masks[i], expected.pred_masks[0, index]) and out.masks[i].std() > 0
        assert ref.close(out.logits[i], expected.pred_logits[0, index])
        assert ref.close(out.presence_logit[i : i + 1], expected.presence_logits[0])
        assert ref.close(out.text_features[i], text.pooler_output[0])
        expected_scores = expected.pred_logits[0, index].sigmoid() * expected.presence_logits[0].sigmoid()
        assert ref.close(out.scores[i], expected_scores) and ref.close(out.scores[i], expected_scores.topk(4).values)
    with pytest.raises(ValueError, match="noun phrase"):
        tiny_teacher.concept_targets(trunk, ["  "], ConceptTargetConfig())


def test_bf16_autocast_stays_close_to_fp32(tiny_teacher: Sam3Teacher, video) -> None:
    """The GPU precision path (bf16 autocast) also runs on CPU: every target kind, close to fp32."""
    bf16 = Sam3Teacher(tiny_teacher.model, TeacherConfig(source="tiny-random", precision="bf16"), None)
    assert bf16.card.precision == "bf16-autocast"
    trunk32, trunk16 = tiny_teacher.image_targets(IMAGES).trunk, bf16.image_targets(IMAGES).trunk
    assert trunk16.dtype == torch.float32 and ref.close(trunk16, trunk32, rel=3e-2)
    prompts = prompt_set(tiny_teacher.geometry.image_size)
    p32, p16 = tiny_teacher.prompt_targets(trunk32[:1], prompts), bf16.prompt_targets(trunk32[:1], prompts)
    assert ref.close(p16.multi, p32.multi, rel=5e-2) and ref.close(p16.object_pointer, p32.object_pointer, rel=5e-2)
    config = VideoTargetConfig(max_objects=2, max_frames=3)
    v32, v16 = list(tiny_teacher.video_targets(video, config)), list(bf16.video_targets(video, config))
    assert ref.close(v16[-1].pix_feat_with_mem, v32[-1].pix_feat_with_mem, rel=5e-2)
    c32 = tiny_teacher.concept_targets(trunk32[:1], ["cat"], ConceptTargetConfig(top_k=3))
    c16 = bf16.concept_targets(trunk32[:1], ["cat"], ConceptTargetConfig(top_k=3))
    assert ref.close(c16.text_features, c32.text_features, rel=5e-2)


def test_trunk_shape_errors(tiny_teacher: Sam3Teacher) -> None:
    trunk = tiny_teacher.image_targets(IMAGES[:2]).trunk
    with pytest.raises(ValueError, match="one image's trunk output"):
        tiny_teacher.prompt_targets(trunk, prompt_set(tiny_teacher.geometry.image_size))
    with pytest.raises(ValueError, match="one image's trunk output"):
        tiny_teacher.concept_targets(trunk, ["cat"], ConceptTargetConfig())
    with pytest.raises(ValueError, match=r"\(B, 3, 112, 112\)"):
        tiny_teacher.trunk_features(torch.zeros(1, 3, 64, 64))


def test_video_prompts_follow_the_ground_truth(video) -> None:
    """Checked apart from the tracker reference (which is fed these same prompts)."""
    size = 112
    frames = annotated_masks(video, 9)
    for kind in VideoPrompt:
        for prompt in object_prompts(video.key, frames, video.record.masklet_id, size, VideoTargetConfig(prompt=kind)):
            obj = list(video.record.masklet_id).index(prompt.object_id)
            runs = frames[prompt.frame][1][obj]
            assert runs.area > 0 and all(frames[t][1][obj].area == 0 for t in range(prompt.frame))
            sx, sy = size / runs.width, size / runs.height
            if kind == VideoPrompt.POINT:
                x, y = prompt.points[0] + 0.5  # back to continuous coordinates in the teacher frame
                assert runs.contains(np.array([int(y / sy)]), np.array([int(x / sx)]))[0]
                assert prompt.labels.tolist() == [1]
            elif kind == VideoPrompt.BOX:
                x0, y0, x1, y1 = runs.bbox_xyxy()
                np.testing.assert_allclose(prompt.points + 0.5, [[x0 * sx, y0 * sy], [x1 * sx, y1 * sy]], rtol=1e-5)
                assert prompt.labels.tolist() == [2, 3]
            else:  # SAM3's video processor resize: antialiased bilinear, then >= 0.5
                expected = (
                    torch.nn.functional.interpolate(
                        torch.from_numpy(runs.to_mask().astype(np.float32))[None, None],
                        size=(size, size),
                        mode="bilinear",
                        align_corners=False,
                        antialias=True,
                    )[0, 0]
                    >= 0.5
                )
                np.testing.assert_array_equal(prompt.mask, expected.float().numpy())
                assert prompt.mask.sum() > 0


def test_two_videos_in_flight_on_one_teacher(tiny_teacher: Sam3Teacher, video, long_video) -> None:
    config = VideoTargetConfig(prompt=VideoPrompt.BOX, max_objects=3, max_frames=6)
    alone = [list(tiny_teacher.video_targets(v, config)) for v in (video, long_video)]
    first, second = tiny_teacher.video_targets(video, config), tiny_teacher.video_targets(long_video, config)
    interleaved: list[list] = [[], []]
    for a, b in zip(first, second):
        interleaved[0].append(a)
        interleaved[1].append(b)
        assert not torch.is_inference_mode_enabled(), "the caller's code must not run in inference mode"
    for expected, got in zip(alone, interleaved):
        for e, g in zip(expected, got):
            assert torch.equal(e.pix_feat_with_mem, g.pix_feat_with_mem)
            assert torch.equal(e.has_memory_conditioned, g.has_memory_conditioned)


def test_long_video_past_the_memory_window_equals_the_tracker(tiny_teacher: Sam3Teacher, long_video) -> None:
    """Past 16 frames the session drops old outputs; the targets must still equal the unpruned reference."""
    g = tiny_teacher.geometry
    config = VideoTargetConfig(prompt=VideoPrompt.BOX, max_objects=3, max_frames=20)
    ours = list(tiny_teacher.video_targets(long_video, config))
    frames = annotated_masks(long_video, config.max_frames)
    assert len(ours) == len(frames) == 20
    prompts = object_prompts(long_video.key, frames, long_video.record.masklet_id, g.image_size, config)
    pixels = ref.pixel_values([long_video.frames[p] for p, _ in frames], g.image_size)
    expected = ref.track(tiny_teacher.card.checkpoint_dir, pixels, prompts, g.image_size)
    for mine, theirs in zip(ours[16:], expected[16:]):
        for i, object_id in enumerate(mine.object_ids):
            stored = theirs["objects"][object_id]
            assert ref.close(mine.mask_logits[i], stored["pred_masks"][0, 0], rel=1e-3)
            assert ref.close(mine.object_pointer[i], stored["object_pointer"][0], rel=1e-3)


def test_device_cuda_without_gpu_is_a_clear_error(tiny_teacher: Sam3Teacher, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TeacherLoadError, match="no CUDA device"):
        Sam3Teacher(tiny_teacher.model, TeacherConfig(device="cuda"), None)


def test_auto_picks_cuda_with_bf16_autocast_when_a_gpu_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    from esam3.schemas.teacher import Device, Precision
    from esam3.workers.teacher import resolve_device, resolve_precision

    assert resolve_device(Device.AUTO) == torch.device("cpu") or torch.cuda.is_available()
    assert resolve_precision(Precision.AUTO, torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(Device.AUTO) == torch.device("cuda")
    assert resolve_precision(Precision.AUTO, torch.device("cuda")) == torch.bfloat16
    assert resolve_precision(Precision.FP32, torch.device("cuda")) is None


@pytest.mark.parametrize("breakage", ["no-files", "foreign-tokenizer"])
def test_concept_targets_refuse_a_missing_or_foreign_tokenizer(tiny_teacher: Sam3Teacher, tmp_path: Path, breakage: str) -> None:
    """Without its files transformers would build an empty tokenizer: every phrase the same ids, silently."""
    import shutil

    from esam3.workers.teacher_loading import character_tokenizer

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_teacher.card.checkpoint_dir, checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (checkpoint / name).unlink(missing_ok=True)
    text = tiny_teacher.model.config.detector_config.text_config
    message = "CLIP tokenizer files"
    if breakage == "foreign-tokenizer":
        tokenizer = character_tokenizer(text.max_position_embeddings)
        tokenizer.add_tokens([f"word{i}" for i in range(text.vocab_size)])
        tokenizer.save_pretrained(checkpoint)
        message = "do not belong to this checkpoint"
    teacher = Sam3Teacher(tiny_teacher.model, TeacherConfig(source=str(checkpoint)), str(checkpoint))
    trunk = tiny_teacher.image_targets(IMAGES[:1]).trunk
    with pytest.raises(TeacherLoadError, match=message):
        teacher.concept_targets(trunk, ["a cat"], ConceptTargetConfig())


def test_prompt_labels_must_list_valid_points_first(tiny_teacher: Sam3Teacher) -> None:
    trunk = tiny_teacher.image_targets(IMAGES[:1]).trunk
    with torch.no_grad():
        embeddings = tiny_teacher.heads.image_embeddings(trunk)
    points = torch.full((1, 3, 2), 10.0)
    boxes = torch.full((1, 4), float("nan"))
    with pytest.raises(ValueError, match="valid points first"):
        tiny_teacher.heads.decode_prompts(embeddings, points, torch.tensor([[1, -1, 0]]), boxes)
