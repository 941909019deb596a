"""The grader's augmentation recipe, and the two engines that apply it.

:class:`AugmentationRecipe` is the one place that says which augmentations training
applies, with which probability and range. The CPU trainer applies it per crop with
albumentations (:func:`albumentations_pipeline`); the GPU trainer applies it to a whole
batch on the device with torch (:func:`augment_batch`), which covers all of it except
CLAHE (left out there, as the shipped GPU runs were trained) and edge enhancement, blur
and the tight crop, which it refuses.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2

AFFINE_P = 0.8  # rotation, zoom and shift come together, on most crops
BRIGHTNESS_CONTRAST_P = 0.5
GAMMA_P = 0.5
NOISE_STD = (0.01, 0.04)  # Gaussian noise, as a fraction of the grey range
TIGHT_CROP_SCALE = (0.45, 1.0)  # share of the crop kept by the tight, wide band
TIGHT_CROP_RATIO = (1.2, 2.0)  # its width over its height


@dataclass(frozen=True)
class AugmentationRecipe:
    """Probabilities and ranges of the training augmentations (the grade config's keys).

    Besides pose (flip, rotation, zoom, shift) they vary what differs between sites:
    exposure and contrast (brightness/contrast, gamma, CLAHE), the imaging chain's
    sharpness (a digital system's edge enhancement, or a soft, downsampled film), noise,
    and the crop's framing: a tight, wide band around the joint stretched to the square
    (``tight_crop``), as a folder of another site's non-square crops arrives.
    """

    hflip: float
    rotate: float
    scale: float
    shift: float
    brightness_contrast: float
    gamma: float
    clahe: float
    noise: float
    sharpen: float
    blur: float
    tight_crop: float

    @classmethod
    def from_config(cls, config) -> AugmentationRecipe:
        """The recipe a :class:`~kneepipe.grade.config.GradeConfig` asks for."""
        return cls(**{name: float(getattr(config, name)) for name in cls.__dataclass_fields__})

    def refused_on_device(self) -> list[str]:
        """The augmentations asked for that :func:`augment_batch` cannot apply (CLAHE is left out silently)."""
        return [name for name in ("sharpen", "blur", "tight_crop") if getattr(self, name)]


def albumentations_pipeline(recipe: AugmentationRecipe, size: int = 224):
    """The recipe as an albumentations ``Compose`` for one ``size`` x ``size`` uint8 crop at a time (CPU)."""
    try:
        import albumentations as A
    except ImportError as err:
        raise ImportError('training on the CPU needs the training extra: pip install "kneepipe[train]"') from err

    transforms = [
        A.HorizontalFlip(p=recipe.hflip),
        A.RandomResizedCrop(
            size=(size, size),
            scale=TIGHT_CROP_SCALE,
            ratio=TIGHT_CROP_RATIO,
            interpolation=cv2.INTER_AREA,
            p=recipe.tight_crop,
        ),
        A.Affine(
            rotate=(-recipe.rotate, recipe.rotate),
            scale=(1 - recipe.scale, 1 + recipe.scale),
            translate_percent=(-recipe.shift, recipe.shift),
            border_mode=cv2.BORDER_REFLECT_101,
            p=AFFINE_P,
        ),
        A.RandomBrightnessContrast(recipe.brightness_contrast, recipe.brightness_contrast, p=BRIGHTNESS_CONTRAST_P),
        A.RandomGamma((100 * (1 - recipe.gamma), 100 * (1 + recipe.gamma)), p=GAMMA_P),
        A.CLAHE(clip_limit=(1.0, 3.0), tile_grid_size=(4, 4), p=recipe.clahe),
        A.OneOf(
            [
                A.Sharpen(alpha=(0.2, 0.6), lightness=(0.8, 1.0)),
                A.UnsharpMask(blur_limit=(3, 7), sigma_limit=(1.0, 2.0), alpha=(0.3, 0.8)),
            ],
            p=recipe.sharpen,
        ),
        A.OneOf(
            [
                A.GaussianBlur(sigma_limit=(0.4, 1.2)),
                A.Downscale(scale_range=(0.5, 0.8), interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": 1}),
            ],
            p=recipe.blur,
        ),
        A.GaussNoise(std_range=NOISE_STD, p=recipe.noise),
    ]
    return A.Compose(transforms)


def augment_batch(x, recipe: AugmentationRecipe, generator):
    """Apply the recipe to a ``(b, h, w)`` float batch in 0-255 on its device (GPU trainer).

    Horizontal flip; rotation, zoom and shift with reflected borders; brightness and
    contrast; gamma; Gaussian noise: the probabilities and ranges of :class:`AugmentationRecipe`.
    """
    import torch
    import torch.nn.functional as F

    b, h, w = x.shape

    def uniform(low: float, high: float):
        return torch.rand(b, device=x.device, generator=generator) * (high - low) + low

    def coin(p: float):
        return torch.rand(b, device=x.device, generator=generator) < p

    x = torch.where(coin(recipe.hflip)[:, None, None], x.flip(-1), x)

    on = coin(AFFINE_P).float()
    angle = torch.deg2rad(uniform(-recipe.rotate, recipe.rotate)) * on
    zoom = 1 + uniform(-recipe.scale, recipe.scale) * on
    shift_x, shift_y = (uniform(-recipe.shift, recipe.shift) * 2 * on for _ in range(2))  # [-1, 1] spans 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    x = F.grid_sample(x[:, None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[:, 0]

    on = coin(BRIGHTNESS_CONTRAST_P).float()
    contrast = 1 + uniform(-recipe.brightness_contrast, recipe.brightness_contrast) * on
    brightness = uniform(-recipe.brightness_contrast, recipe.brightness_contrast) * on * 255
    x = (x * contrast[:, None, None] + brightness[:, None, None]).clamp(0, 255)

    on = coin(GAMMA_P).float()
    gamma = 1 + uniform(-recipe.gamma, recipe.gamma) * on
    x = 255 * (x / 255).clamp_min(1e-6) ** gamma[:, None, None]

    std = uniform(*NOISE_STD) * 255 * coin(recipe.noise).float()
    noise = torch.randn(x.shape, device=x.device, generator=generator)
    return (x + noise * std[:, None, None]).clamp(0, 255)
