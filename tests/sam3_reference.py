"""Reference outputs straight from transformers' SAM3 classes, for the teacher tests to compare against.

The references load the same checkpoint directory the teacher loads. ``Sam3TrackerModel`` cannot load a
``sam3_video`` checkpoint saved by transformers 5.24 (its tracker keys come back with a doubled prefix), so it is
built from the video model's state dict with the key mapping transformers itself declares for ``sam3_tracker``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def image_processor(size: int) -> Any:
    from transformers import Sam3ImageProcessor

    return Sam3ImageProcessor(size={"height": size, "width": size})


def pixel_values(images: list[np.ndarray], size: int) -> torch.Tensor:
    return image_processor(size)(images=images, return_tensors="pt").pixel_values


def tracker_model(video_model: Any) -> Any:
    """``Sam3TrackerModel`` with the teacher's weights (trunk, tracker neck, tracker heads)."""
    from transformers import Sam3TrackerModel

    renames = {
        "detector_model.vision_encoder.backbone.": "vision_encoder.backbone.",
        "tracker_neck.": "vision_encoder.neck.",
        "tracker_model.": "",
    }
    state = {}
    for key, value in video_model.state_dict().items():
        for old, new in renames.items():
            if key.startswith(old):
                state[new + key[len(old) :]] = value
    model = Sam3TrackerModel(video_model.config).eval()
    missing, _ = model.load_state_dict(state, strict=False)
    assert not missing, missing
    return model


def video_processor(size: int) -> Any:
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor
    from transformers.models.sam3_tracker_video.processing_sam3_tracker_video import Sam3TrackerVideoProcessor

    return Sam3TrackerVideoProcessor(
        image_processor=image_processor(size), video_processor=Sam2VideoVideoProcessor(size={"height": size, "width": size})
    )


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> bool:
    """Equal up to ``rel`` of the reference's largest magnitude (random tiny weights give small logits)."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return bool(torch.allclose(actual.float(), expected.float(), rtol=0, atol=rel * scale + 1e-7))


def track(checkpoint_dir: str, pixels: torch.Tensor, prompts: list[Any], size: int) -> list[dict[str, Any]]:
    """Run ``Sam3TrackerVideoModel`` (its own vision encoder) over ``pixels`` (T, 3, S, S) with the prompts added
    through ``Sam3TrackerVideoProcessor`` on each object's first frame; per frame: outputs per object id, and
    every memory-conditioned map (what ``_prepare_memory_conditioned_features`` returned, in object order)."""
    from transformers import Sam3TrackerVideoModel
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession

    model = Sam3TrackerVideoModel.from_pretrained(checkpoint_dir, local_files_only=True).eval()
    processor = video_processor(size)
    session = Sam3TrackerVideoInferenceSession(video=pixels, video_height=size, video_width=size, dtype=torch.float32)
    conditioned: list[torch.Tensor] = []
    prepare = model._prepare_memory_conditioned_features

    def capture(*args: Any, **kwargs: Any) -> torch.Tensor:
        conditioned.append(prepare(*args, **kwargs))
        return conditioned[-1]

    model._prepare_memory_conditioned_features = capture
    frames = []
    with torch.inference_mode():
        for frame in range(len(pixels)):
            starting = [p for p in prompts if p.frame == frame]
            if starting and starting[0].mask is not None:
                processor.add_inputs_to_inference_session(
                    session, frame, [p.object_id for p in starting], input_masks=[p.mask for p in starting]
                )
            elif starting:
                processor.add_inputs_to_inference_session(
                    session,
                    frame,
                    [p.object_id for p in starting],
                    input_points=[[p.points.tolist() for p in starting]],
                    input_labels=[[p.labels.tolist() for p in starting]],
                    original_size=(size, size),
                )
            conditioned.clear()
            if session.get_obj_num() == 0:
                frames.append({})
                continue
            model(inference_session=session, frame_idx=frame)
            per_object = {}
            for obj_idx in range(session.get_obj_num()):
                outputs = session.output_dict_per_obj[obj_idx]
                stored = outputs["cond_frame_outputs"].get(frame) or outputs["non_cond_frame_outputs"].get(frame)
                if stored is not None:
                    per_object[session.obj_idx_to_id(obj_idx)] = stored
            frames.append({"objects": per_object, "memory_conditioned": list(conditioned)})
    return frames
