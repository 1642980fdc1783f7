"""From params to the torch objects of a run: the backbone spec, the method, the two views.

The one place that turns `model:`, `method:` and `augment:` into moco/ objects, so the
training loop, the precision probe, evaluate and the benches build them alike and never name a
method (neutral ground: no Ray here, so evaluate can import it)."""

from __future__ import annotations

from dataclasses import replace

from moco.augment import AugmentRecipe, BatchMoCoAugment
from moco.backbones import BackboneSpec
from moco.methods import Method, build_method
from pipeline.config import ModelParams, Params, method_settings


def backbone_spec(model: ModelParams) -> BackboneSpec:
    """The model section as the spec that builds, exports and reloads the backbone."""
    settings = model.model_dump()
    return BackboneSpec.from_dict(settings | {"name": settings.pop("backbone")})


def build_model(params: Params, world_size: int) -> Method:
    """The configured method on the configured backbone, for a run of `world_size` ranks."""
    return build_method(
        params.method.name,
        backbone_spec(params.model),
        method_settings(params.method),
        world_size=world_size,
    )


def build_augment(params: Params, image_size: int | None = None) -> BatchMoCoAugment:
    """The params' two-view augmentation, as every stage that draws views uses it; `image_size`
    (default model.image_size) for images decoded at another encoder's size."""
    size = image_size or params.model.image_size
    recipe = AugmentRecipe.named(params.augment.recipe, size)
    recipe = replace(recipe, scale=(params.augment.crop_min_scale, 1.0))
    return BatchMoCoAugment(size, recipe)
