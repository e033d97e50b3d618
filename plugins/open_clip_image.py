"""Bundled architecture: the image tower of an open_clip CLIP with a frozen zero-shot head.

CLIP (Radford et al. 2021) embeds images with an image tower ``f`` and text with a text
tower ``g`` into one space. A zero-shot classifier of classes ``c`` with prompt templates
``t_1 .. t_m`` ("a photo of a {}.") is built from the text tower alone, as in the
task-vector protocol (Ilharco et al. 2023, Editing Models with Task Arithmetic, and
their reference code):

    e_{c,k} = g(t_k(c)) / ||g(t_k(c))||              each prompt's embedding, normalised
    w_c     = mean_k e_{c,k} / ||mean_k e_{c,k}||    the class's embedding, normalised again
    logit_c(x) = exp(s) * < f(x) / ||f(x)||, w_c >   s: CLIP's learned log logit scale

The model this architecture builds is ``f`` followed by that head. Only ``f`` is a
module of it: the head is a buffer left out of the state dict and the text tower is
kept aside (shared by every copy of the model), so checkpoints, task vectors and merges
hold the image tower alone, and the head never trains (``[models.train]`` fine-tunes
the image tower against it, as the papers fine-tune). A task with a head of its own
(``[[tasks]] head``, see :mod:`mergescope.tasks`) is scored with that head swapped in,
built by the same text tower (:meth:`ZeroShotImageClassifier.task_head`).

Weights are read from local files only, never downloaded:

- ``pretrained``: the whole CLIP's state dict, as ``torch.save(model.state_dict())`` of an
  open_clip model writes it (keys ``visual.*``, ``transformer.*``, ``token_embedding.*``,
  ``positional_embedding``, ``ln_final.*``, ``text_projection``, ``logit_scale``), also
  under a ``state_dict`` / ``model`` / ``model_state_dict`` entry or with a ``module.``
  prefix (open_clip's training checkpoints). It gives the text tower (the heads) and the
  starting image tower.
- ``[[models]] checkpoint``: an image tower replacing the pretrained one, with the
  model's keys ``visual.*``: what mergescope writes for fine-tunes and merges.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor, nn

from mergescope.checkpoints import load_state_dict
from mergescope.errors import CheckpointError, ConfigError
from mergescope.extras import require
from mergescope.hookspecs import hookimpl
from mergescope.keys import file_digest
from mergescope.options import PATH, path_if
from mergescope.tasks import check_templates
from mergescope.validators import list_of, non_empty_str, optional

__all__ = [
    "DEFAULT_TEMPLATES",
    "prompts",
    "zero_shot_weights",
    "zero_shot_logits",
    "clip_state",
    "ZeroShotImageClassifier",
    "OpenClipImage",
    "register_architectures",
]

#: CLIP's plain prompt, the templates a head gets when none are given.
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")

# A tiny CLIP (one-layer towers) for the conformance kit and examples: 32x32 images.
_TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# ------------------------------------------------------------------ the head's math


def prompts(classname: str, templates: Sequence[str]) -> list[str]:
    """Every template with ``classname`` in place of its ``{}``."""
    return [template.replace("{}", classname) for template in templates]


def zero_shot_weights(
    encode: Callable[[list[str]], Tensor], classnames: Sequence[str], templates: Sequence[str], logit_scale: float
) -> Tensor:
    """The zero-shot head ``exp(s) * w_c`` of every class: ``(n_classes, embed_dim)``.

    Parameters
    ----------
    encode
        The text tower: prompts -> their embeddings ``(n_prompts, embed_dim)``.
    classnames
        One name per class, in label order.
    templates
        Prompt templates with ``{}`` where the class name goes.
    logit_scale
        ``s``, the log of the scale (CLIP's ``logit_scale`` parameter).
    """
    rows = []
    for name in classnames:
        embeddings = encode(prompts(name, templates)).float()
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        mean = embeddings.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows) * float(torch.as_tensor(logit_scale).exp())


def zero_shot_logits(features: Tensor, weights: Tensor) -> Tensor:
    """``< f(x) / ||f(x)||, exp(s) w_c >`` for every image and class: ``(n_images, n_classes)``."""
    return (features / features.norm(dim=-1, keepdim=True)) @ weights.t().to(features.dtype)


# --------------------------------------------------------------------- checkpoints


def clip_state(path: str | Path) -> dict[str, Tensor]:
    """The whole CLIP's state dict in a checkpoint file, in open_clip's keys.

    The layouts read are those of :func:`mergescope.checkpoints.load_state_dict` (a plain
    state dict, or one under ``state_dict`` / ``model`` / ``model_state_dict``); a
    ``module.`` prefix on every key (distributed training) is removed.

    Raises
    ------
    CheckpointError
        The file cannot be read safely, or holds no text tower (an image tower alone
        cannot build zero-shot heads).
    """
    state = load_state_dict(path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    if (
        not any(k.startswith("visual.") for k in state)
        or "text_projection" not in state
        and not any(k.startswith("text.") for k in state)
    ):
        shown = ", ".join(list(state)[:4])
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a whole CLIP state dict (image and text towers; its keys begin "
            f"{shown}): 'pretrained' needs both, the text tower builds the zero-shot heads. Save the whole model "
            "(torch.save(clip.state_dict(), path)); give a fine-tuned image tower alone as the model's "
            "'checkpoint' (keys visual.*)"
        )
    return state


# ------------------------------------------------------------------------ the model


class _TextTower:
    """A CLIP's text tower and tokenizer, shared by every copy of a model (never copied, never merged)."""

    def __init__(self, clip: nn.Module, tokenizer: Any, source: str) -> None:
        self.clip = clip.eval()
        self.tokenizer = tokenizer
        self.source = source
        self._heads: dict[tuple[tuple[str, ...], tuple[str, ...]], Tensor] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> _TextTower:
        return self  # every merge and fine-tune of a model reads the heads of its one text tower

    def head(self, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
        key = (tuple(classnames), tuple(templates))
        if key not in self._heads:
            with torch.no_grad():
                self._heads[key] = zero_shot_weights(
                    self._encode, classnames, templates, float(self.clip.logit_scale.detach().reshape(-1)[0])
                )
        return self._heads[key]

    def _encode(self, texts: list[str]) -> Tensor:
        return self.clip.encode_text(self.tokenizer(texts))


class ZeroShotImageClassifier(nn.Module):
    """A CLIP image tower followed by a frozen zero-shot head (see the module docstring).

    Parameters
    ----------
    visual
        The image tower (``clip.visual``): images -> embeddings.
    text
        The text tower that builds heads (shared, not a submodule).
    classnames, templates
        The model's own head.
    """

    def __init__(self, visual: nn.Module, text: _TextTower, classnames: Sequence[str], templates: Sequence[str]):
        super().__init__()
        self.visual = visual
        self.text = text
        # Not persistent: the head is the text tower's, out of checkpoints and task vectors.
        self.register_buffer("head", text.head(classnames, templates).clone(), persistent=False)

    @property
    def head_key(self) -> str:
        """Where the heads come from (the text tower's checkpoint): part of the task table's cache key."""
        return self.text.source

    def forward(self, images: Tensor) -> Tensor:
        return zero_shot_logits(self.visual(images), self.head)

    @contextlib.contextmanager
    def task_head(self, classnames: Sequence[str], templates: Sequence[str]) -> Iterator[None]:
        """The zero-shot head of ``classnames`` and ``templates`` in place of the model's own, for a while."""
        own = self.head
        self.head = self.text.head(classnames, templates).to(own.device)
        try:
            yield
        finally:
            self.head = own


# --------------------------------------------------------------- the architecture

# The text tower of the last CLIP built, by its source: the models of one pipeline share it.
_TEXT_TOWERS: dict[str, _TextTower] = {}


def _digest(path: str) -> str:
    """The content digest of a checkpoint, hashed once per file version (size and modification time)."""
    stat = Path(path).stat()
    return _file_digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime: int) -> str:
    return file_digest(path)


@functools.cache
def _open_clip() -> Any:
    return require("open_clip", "clip", "architecture 'open-clip-image'")


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.startswith("~") or value.lower().endswith(_CHECKPOINT_SUFFIXES)


def _check_model(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"'{attribute.name}' must be the name of an open_clip model, got {value!r}")
    known = _open_clip().list_models()
    if value not in known:
        close = difflib.get_close_matches(value, known, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else " See open_clip.list_models()."
        raise ValueError(f"'{attribute.name}' = {value!r} is not an open_clip model.{hint}")


def _check_config(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"'{attribute.name}' must be a model config table or the path of a JSON file")
        return
    if not isinstance(value, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(value):
        raise ValueError(
            f"'{attribute.name}' must be an open_clip model config (a table with embed_dim, vision_cfg and "
            f"text_cfg, as in open_clip's model_configs/*.json) or the path of such a JSON file, got {value!r}"
        )


def _check_pretrained(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    non_empty_str(instance, attribute, value)
    if not _looks_like_path(value) and not Path(value).expanduser().is_file():
        tags = sorted({tag for _, tag in _open_clip().list_pretrained()})
        what = "is an open_clip pretrained tag, not" if value in tags else "is neither a file nor"
        raise ValueError(
            f"'{attribute.name}' = {value!r} {what} a local checkpoint path: mergescope never downloads weights. "
            "Fetch them once where there is network (model = open_clip.create_model(name, pretrained=tag); "
            "torch.save(model.state_dict(), 'clip.pt')) and give the file's path"
        )


def _check_templates(value: Any) -> None:
    try:
        check_templates(value, "key 'templates'")
    except ConfigError as exc:  # the option's error names the key itself
        raise ValueError(exc.message) from None


@attrs.define
class OpenClipImage:
    """An open_clip CLIP's image tower with a frozen zero-shot head built by its text tower.

    The model maps images to the logits of a zero-shot classifier of ``classnames``
    (``exp(s) <f(x)/||f(x)||, w_c>``, see the module docstring); its modules and state
    dict are the image tower's alone (``visual.*``), so merges and task vectors are over
    the image encoder only. Tasks with their own class names and templates are scored
    with their heads swapped in. Images must be RGB at the tower's size (224 x 224 for
    the ViT-B models), normalised as the CLIP was trained (CLIP's mean and std).

    Parameters
    ----------
    model
        An open_clip model name (``open_clip.list_models()``), e.g. ``"ViT-B-32"``.
    config
        A model config instead of ``model``: a table with ``embed_dim``, ``vision_cfg`` and
        ``text_cfg`` (as open_clip's ``model_configs/*.json``), or the path of such a JSON
        file (also an ``open_clip_config.json`` with ``model_cfg``). For small or custom CLIPs.
    pretrained
        The local checkpoint of the whole CLIP (see the module docstring for its layouts).
        Required: a pretrained tag is refused, nothing is downloaded.
    classnames
        The classes of the model's own head, one per class of the data it is built for
        (``[data]``, or the training data), in label order.
    templates
        Prompt templates with ``{}`` where the class name goes.
    """

    name: ClassVar[str] = "open-clip-image"
    paper: ClassVar[str] = (
        "Radford et al. 2021, Learning Transferable Visual Models From Natural Language Supervision; "
        "zero-shot heads as in Ilharco et al. 2023, Editing Models with Task Arithmetic"
    )
    example_input_shape: ClassVar[tuple[int, int, int]] = (3, 32, 32)

    model: str = attrs.field(default="ViT-B-32", validator=_check_model)
    config: Any = attrs.field(default=None, validator=_check_config, metadata=PATH)
    pretrained: str | None = attrs.field(default=None, validator=_check_pretrained, metadata=path_if(_looks_like_path))
    classnames: list[str] | None = attrs.field(default=None, validator=optional(list_of(non_empty_str, min_length=1)))
    templates: list[str] = attrs.field(
        factory=lambda: list(DEFAULT_TEMPLATES),
        validator=lambda _i, _a, v: _check_templates(v),
    )

    @classmethod
    def conformance_instance(cls, directory: Path) -> OpenClipImage:
        """A tiny random CLIP saved in ``directory`` (no CLIP weights ship offline), for the conformance kit."""
        open_clip = _open_clip()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clip = open_clip.CLIP(**copy.deepcopy(_TINY_CONFIG))
        path = Path(directory) / "tiny-clip.pt"
        torch.save(clip.state_dict(), path)
        return cls(config=copy.deepcopy(_TINY_CONFIG), pretrained=str(path), classnames=list("abcde"))

    def _config(self) -> dict[str, Any]:
        if self.config is None:
            config = _open_clip().get_model_config(self.model)
        elif isinstance(self.config, str):
            try:
                config = json.loads(Path(self.config).expanduser().read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read the model config {self.config!r}: {exc}", where="key 'config'") from exc
            config = config.get("model_cfg", config)
        else:
            config = self.config
        return copy.deepcopy(config)

    def _label(self) -> str:
        return f"open_clip model {self.model!r}" if self.config is None else "the open_clip model of 'config'"

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """The image tower with the pretrained weights and the zero-shot head of ``classnames``.

        Parameters
        ----------
        input_shape
            ``(3, H, W)`` at the tower's image size.
        num_classes
            The number of classes of the data, the length of ``classnames``.

        Raises
        ------
        ConfigError
            No ``pretrained`` file, no ``classnames`` or as many as the data's classes,
            images of another shape than the tower's.
        CheckpointError
            The file is not a whole CLIP, or does not fit the model.
        """
        open_clip = _open_clip()
        if self.pretrained is None:
            raise ConfigError(
                f"{self._label()} needs its weights, and mergescope never downloads them: give pretrained = "
                "'<path of the whole CLIP's state dict>' (fetched once where there is network: "
                "torch.save(open_clip.create_model(name, pretrained=tag).state_dict(), 'clip.pt'))",
                where="key 'pretrained'",
            )
        if not Path(self.pretrained).expanduser().is_file():
            raise ConfigError(f"the checkpoint {self.pretrained!r} does not exist", where="key 'pretrained'")
        if self.classnames is None or len(self.classnames) != num_classes:
            given = "no classnames" if self.classnames is None else f"{len(self.classnames)} classnames"
            raise ConfigError(
                f"the zero-shot head needs one class name per class of the data ({num_classes}); got {given}. "
                "Give classnames = [...] in the order of the data's labels",
                where="key 'classnames'",
            )
        config = self._config()
        size = config["vision_cfg"].get("image_size", 224)
        side = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if tuple(input_shape) != (3, *side):
            raise ConfigError(
                f"{self._label()} takes RGB images of {side[0]}x{side[1]} (input shape (3, {side[0]}, {side[1]})), "
                f"the data gives {tuple(input_shape)}: resize the images (and make them RGB)"
            )
        custom = bool(config.pop("custom_text", False)) or "hf_model_name" in config["text_cfg"]
        config["text_cfg"].setdefault("hf_model_pretrained", False) if custom else None
        try:
            clip = (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**config)
            tokenizer = self._tokenizer(open_clip, config)
        except (OSError, TypeError, ValueError) as exc:
            raise ConfigError(f"cannot build {self._label()} offline: {exc}", where="key 'config'") from exc
        state = clip_state(self.pretrained)
        if "logit_scale" in state and state["logit_scale"].ndim != clip.logit_scale.ndim:
            state["logit_scale"] = state["logit_scale"].reshape(clip.logit_scale.shape)
        missing, unexpected = clip.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "logit_bias"]
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {self.pretrained!r} does not fit {self._label()}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        visual = clip.visual
        del clip.visual  # the image tower lives in the classifier; the rest is the text tower
        source = f"{_digest(self.pretrained)}:{json.dumps(config, sort_keys=True)}"
        if source not in _TEXT_TOWERS:  # models of one CLIP share its text tower and its heads
            _TEXT_TOWERS.clear()
            _TEXT_TOWERS[source] = _TextTower(clip, tokenizer, source)
        return ZeroShotImageClassifier(visual, _TEXT_TOWERS[source], self.classnames, self.templates)

    def _tokenizer(self, open_clip: Any, config: dict[str, Any]) -> Any:
        text = config["text_cfg"]
        if self.config is None:
            return open_clip.get_tokenizer(self.model)
        if "hf_tokenizer_name" in text:
            return open_clip.HFTokenizer(text["hf_tokenizer_name"], context_length=text.get("context_length", 77))
        return open_clip.SimpleTokenizer(context_length=text.get("context_length", 77))


@hookimpl
def register_architectures(register):
    """Register :class:`OpenClipImage`."""
    register(OpenClipImage)
