"""A deterministic set of natural 224x224 photos built from the pictures scikit-image ships.

scikit-image ships about sixteen usable photographs; random square crops (scale, position, mirror) of each give an
image set large enough for a top-1 agreement score. Verification and calibration use different random crops.
Imported only while building an entry.
"""

from __future__ import annotations

import numpy as np
import skimage.data
from skimage.transform import resize

SIZE = 224
_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "clock",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "cell",
)


def _photo(name: str) -> np.ndarray:
    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def square(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Resize an RGB uint8 image to ``size`` x ``size`` uint8 (anti-aliased)."""
    out = resize(image, (size, size), anti_aliasing=True, preserve_range=True)
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def center_crop(image: np.ndarray) -> np.ndarray:
    """The largest centred square of an image."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


def photo_crops(per_photo: int, seed: int) -> np.ndarray:
    """``per_photo`` random crops of every photo, as uint8 [n, 224, 224, 3] RGB.

    Each crop is a square covering 40-100% of the photo's short side at a random position, mirrored half the time.
    Photos are interleaved (one crop of each, then the next round) so any leading slice spans all photos.
    """
    rng = np.random.default_rng(seed)
    crops = []
    for name in _PHOTOS:
        image = _photo(name)
        h, w = image.shape[:2]
        for _ in range(per_photo):
            side = int(min(h, w) * rng.uniform(0.4, 1.0))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = image[top : top + side, left : left + side]
            crops.append(square(crop[:, ::-1] if rng.random() < 0.5 else crop))
    by_photo = np.stack(crops).reshape(len(_PHOTOS), per_photo, SIZE, SIZE, 3)
    return by_photo.swapaxes(0, 1).reshape(-1, SIZE, SIZE, 3)
