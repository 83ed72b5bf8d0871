"""DiT (Peebles & Xie, 2023): a class-conditional ImageNet latent transformer, a diffusers ``DiTPipeline``,
conditioned on the model's own class ids rather than on prompts.

Notation (as in :mod:`dp_ops.engine.backends.latent`): ε̂ = ε_u + s·(ε_c − ε_u) from one batched transformer
call, the conditional half labelled with each sample's class id y, the unconditional half with the null class
(id ``num_embeds_ada_norm``: 1000 for ImageNet-1k, the extra row of the label embedding that training's label
dropout taught). DiT predicts ε and, with learned σ, a variance channel-stacked behind it (2C output channels for
C latent ones); as in ``DiTPipeline.__call__`` the variance is dropped and only the first C channels, ε, are
guided and stepped, so every scheduler samples it with its fixed variance.

Classes: each class is given a model class id at construction, before any sampling (:func:`class_ids_for`):
``data.class_ids`` when set (one per class), else the class's name read as an ImageNet WordNet id (a folder
``n01443537``, by the ImageNet-1k synset order timm ships, which is the order DiT was trained in) or as one of
the pipeline's own label names (``DiTPipeline.labels``: every comma-separated name in ``id2label``, which the
saved folder keeps in ``model_index.json``), ``_`` read as a space, exactly or else ignoring case.

The pipeline is loaded component by component from a ``save_pretrained`` folder (``transformer/``, ``vae/``,
``scheduler/``, ``model_index.json``) or a hub id (facebook/DiT-XL-2-256). Its scheduler is kept unless
``generator.scheduler`` names another (DPM-Solver++ at 25 steps, as diffusers' example does).
"""

from __future__ import annotations

import dp_ops.engine._torchvision_compat  # noqa: F401  (before diffusers' model imports)

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dp_ops.engine.backends.latent import (
    LatentGenerator,
    PipelineSettings,
    load_component,
    load_vae,
    loading,
    scheduler_config,
)
from dp_ops.engine.schedulers import config_of
from dp_ops.errors import GeneratorError

Tensor = torch.Tensor

WORDNET_ID = re.compile(r"n\d{8}")
IMAGENET_1K = 1000


def label_ids(id2label: Mapping[Any, str] | None) -> dict[str, set[int]]:
    """The pipeline's label names and the class ids each names: ``DiTPipeline.labels`` built the same way (every
    comma-separated name of ``id2label``, stripped), except that a name two classes share (ImageNet's "crane",
    "maillot") keeps both ids, where the pipeline's dict silently keeps the last."""
    table: dict[str, set[int]] = {}
    for key, value in (id2label or {}).items():
        for label in value.split(","):
            table.setdefault(label.strip(), set()).add(int(key))
    return table


def imagenet_wnids() -> list[str]:
    """ImageNet-1k's WordNet ids in class-index order (timm's table; DiT's class ids are these indices)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


def class_ids_for(
    class_names: Sequence[str],
    num_classes: int,
    id2label: Mapping[Any, str] | None = None,
    class_ids: Sequence[int] = (),
) -> tuple[int, ...]:
    """The model's class id for each class: ``class_ids`` (``data.class_ids``, one per class, each in
    [0, num_classes)) when given, else each name read as a WordNet id (ImageNet-1k models only) or as one of the
    pipeline's label names (``_`` read as a space; exact, else ignoring case when that names one class). Raises
    one ``GeneratorError`` line naming every class it cannot map and the three ways to map it."""
    if class_ids:
        if len(class_ids) != len(class_names):
            raise GeneratorError(
                f"data.class_ids has {len(class_ids)} ids for {len(class_names)} classes: give one per class"
            )
        bad = [i for i in class_ids if not 0 <= int(i) < num_classes]
        if bad:
            raise GeneratorError(
                f"data.class_ids={list(class_ids)}: {bad[0]} is not a class of this model (ids 0..{num_classes - 1})"
            )
        return tuple(int(i) for i in class_ids)
    table = label_ids(id2label)
    folded: dict[str, set[int]] = {}
    for label, ids in table.items():
        folded.setdefault(label.casefold(), set()).update(ids)
    wnids = imagenet_wnids() if num_classes == IMAGENET_1K and any(map(WORDNET_ID.fullmatch, class_names)) else []
    mapped: list[int] = []
    unmapped: list[str] = []
    shared: list[str] = []
    for name in class_names:
        label = name.replace("_", " ").strip()
        if WORDNET_ID.fullmatch(name) and name in wnids:
            mapped.append(wnids.index(name))
            continue
        ids = table.get(label) or folded.get(label.casefold(), set())
        if len(ids) == 1:
            mapped.append(next(iter(ids)))
        elif ids:
            shared.append(f"{name!r} (label of classes {', '.join(map(str, sorted(ids)))})")
        else:
            unmapped.append(repr(name))
    if unmapped or shared:
        problems = unmapped + shared
        what = ", ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise GeneratorError(
            f"{'class' if len(problems) == 1 else 'classes'} {what}: no single DiT class id; name each class folder by "
            "one of the pipeline's label names (e.g. 'goldfish' or 'great_white_shark'), by its ImageNet WordNet "
            f"id (e.g. 'n01443537'), or set data.class_ids (one id in 0..{num_classes - 1} per class)"
        )
    return tuple(mapped)


class DiT(LatentGenerator):
    """Transformer, VAE and scheduler of a DiT pipeline; samples class-conditionally by class id, optionally
    entropy-guided. ``id2label``: the pipeline's label names (``model_index.json``'s), for mapping classes by
    name; ``settings.class_ids`` overrides every name."""

    def __init__(
        self,
        transformer: Any,
        vae: Any,
        scheduler_config: Mapping[str, Any],
        class_names: Sequence[str],
        settings: PipelineSettings,
        id2label: Mapping[Any, str] | None = None,
    ) -> None:
        cfg = transformer.config
        if cfg.out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
            raise GeneratorError(
                f"the DiT transformer has {cfg.out_channels} output channels for {cfg.in_channels} latent ones: "
                f"dp_ops drives ε ({cfg.in_channels}) or ε with learned σ ({2 * cfg.in_channels})"
            )
        self.class_names = tuple(class_names)
        ids = class_ids_for(self.class_names, cfg.num_embeds_ada_norm, id2label, settings.class_ids)
        super().__init__(transformer, vae, scheduler_config, settings, cfg.patch_size)
        self.transformer = self.denoiser
        self.null_class = int(cfg.num_embeds_ada_norm)  # (the pipeline hard-codes 1000)
        self.class_ids = torch.tensor(ids, dtype=torch.long, device=self.device)  # class index -> model class id

    @classmethod
    def from_components(cls, parts: Mapping[str, Any], class_names: Sequence[str], settings: PipelineSettings) -> DiT:
        """From components built in code (``transformer``, ``vae``, ``scheduler`` and optionally ``id2label``:
        what :func:`~dp_ops.engine.backends.dit_random.random_components` returns), cast to ``settings``."""
        schedule = config_of(parts["scheduler"])
        return cls(parts["transformer"], parts["vae"], schedule, class_names, settings, parts.get("id2label"))

    @classmethod
    def load(cls, model: str, class_names: Sequence[str], settings: PipelineSettings) -> DiT:
        """The pipeline at ``model`` (a folder or hub id), its weights read in ``settings.dtype``; the classes
        are mapped from the configs, before any weight is read."""
        from diffusers import DiTPipeline, DiTTransformer2DModel

        dtype = settings.dtype
        with loading(model, "a DiT pipeline"):
            id2label = dict(DiTPipeline.load_config(model)).get("id2label")
            config = DiTTransformer2DModel.load_config(model, subfolder="transformer")
        num_classes = int(config.get("num_embeds_ada_norm") or IMAGENET_1K)
        class_ids_for(class_names, num_classes, id2label, settings.class_ids)
        with loading(model, "a DiT pipeline"):
            # (the hub's config names the class Transformer2DModel; DiTTransformer2DModel reads it as is)
            transformer = load_component(DiTTransformer2DModel, model, "transformer", dtype)
            vae = load_vae(model, dtype)
            schedule = scheduler_config(model)
        return cls(transformer, vae, schedule, class_names, settings, id2label)

    # ---- the pieces of a denoising step (what the shared sampler, dp_ops.engine.sampling, calls) ----
    def model_output(self, z_t: Tensor, t: Tensor, labels: Tensor, cfg_scale: float) -> Tensor:
        """ε̂ with classifier-free guidance (one batched transformer call, the conditional half labelled with the
        class ids of ``labels``, the other with the null class), learned σ dropped, in float32."""
        channels, y = z_t.shape[1], self.class_ids[labels]
        if cfg_scale != 1.0:
            z_t, y = torch.cat([z_t, z_t]), torch.cat([y, torch.full_like(y, self.null_class)])
        timestep = t.reshape(1).expand(z_t.shape[0])  # (as the pipeline passes it: one per row)
        out = self.transformer(z_t.to(self.dtype), timestep=timestep, class_labels=y).sample
        eps = out[:, :channels].float()  # learned σ: the first C channels are ε, the rest the variance
        if cfg_scale == 1.0:
            return eps
        eps_c, eps_u = eps.chunk(2)
        return eps_u + cfg_scale * (eps_c - eps_u)
