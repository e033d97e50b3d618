"""Bundled dataset ``concat``: several datasets one after another, as one ``[data]``.

A pipeline has one dataset. ``concat`` builds every part from its own table, exactly as
``[data]`` would be built, and chains them: sample ids are kept apart by a fixed stride
per part, class lists are joined with the part's name as a prefix, and every part must
give images of one shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import attrs
import numpy as np
import torch

from mergescope.components import ImageDataset
from mergescope.errors import ConfigError, closest
from mergescope.hookspecs import hookimpl
from mergescope.options import component_tables
from mergescope.pipeline import component_from_table
from mergescope.validators import distinct, list_of, non_empty_str, optional

__all__ = ["ID_STRIDE", "Concat", "ConcatImageDataset", "part_of", "register_datasets"]

#: Sample id of item ``j`` of part ``i`` is ``i * ID_STRIDE + j``'s own sample id. A part's
#: ids depend only on its position and its own ids, so appending a part, or changing a
#: later one, leaves every earlier id as it was.
ID_STRIDE = 10**9

#: Keys of a part table that are not options of the part's dataset.
PART_KEYS = ("use", "name")


def part_of(sample_ids: Any) -> np.ndarray:
    """Position of the part each ``concat`` sample id comes from (``id // ID_STRIDE``)."""
    return np.asarray(sample_ids, dtype=np.int64) // ID_STRIDE


def _where(index: int, table: Any) -> str:
    use = table.get("use") if isinstance(table, dict) else None
    return f"part #{index + 1}" + (f" (use = {use!r})" if isinstance(use, str) else "")


def _check_parts(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{attribute.name}' must be a non-empty list of dataset tables, got {value!r}")
    for i, table in enumerate(value):
        if not isinstance(table, dict):
            raise ValueError(
                f"'{attribute.name}': part #{i + 1} must be a table like {{use = \"foolbox-samples\"}}, got {table!r}"
            )
        if table.get("use") == Concat.name:
            raise ValueError(f"'{attribute.name}': {_where(i, table)} is itself a concat; list its parts here instead")
        name = table.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(
                f"'{attribute.name}': {_where(i, table)} has 'name' = {name!r}; it must be a non-empty string"
            )
        try:
            # Build now, so a misspelled dataset or option is reported when the pipeline is read.
            component_from_table("dataset", table, where=f"'{attribute.name}', part #{i + 1}", reserved=PART_KEYS)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None


# ----------------------------------------------------------------- the loaded data


@attrs.define(eq=False)
class ConcatImageDataset(torch.utils.data.Dataset):
    """The items of several :class:`~mergescope.ImageDataset` parts, one part after another.

    Items are read from their part on ``dataset[i]``, so lazily read parts (an image
    folder) stay lazy. Item ``i`` is item ``positions[i]`` of part ``part[i]``.

    Parameters
    ----------
    name
        A short name used in labels.
    parts
        The part datasets, all with images of one shape.
    part_names
        One name per part: the prefix of its class names.
    part
        Part of every item, ``(N,)``.
    positions
        Position of every item in its part, ``(N,)``.

    Attributes
    ----------
    sample_ids
        ``part * ID_STRIDE + <the item's id in its part>``.
    labels
        The item's label in its part plus the number of classes of all earlier parts.
    classes
        ``"<part name>:<class>"`` for every class of every part, in part order.
    """

    name: str
    parts: tuple[Any, ...] = attrs.field(converter=tuple)
    part_names: tuple[str, ...] = attrs.field(converter=tuple)
    part: np.ndarray = attrs.field(converter=lambda a: np.asarray(a, dtype=np.int64))
    positions: np.ndarray = attrs.field(converter=lambda a: np.asarray(a, dtype=np.int64))
    sample_ids: np.ndarray = attrs.field(init=False)
    labels: np.ndarray = attrs.field(init=False)
    classes: tuple[str, ...] = attrs.field(init=False)
    _class_offsets: np.ndarray = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if len(self.parts) != len(self.part_names):
            raise ValueError(f"dataset {self.name!r}: {len(self.parts)} parts but {len(self.part_names)} part names")
        if len(self.part) != len(self.positions):
            raise ValueError(
                f"dataset {self.name!r}: {len(self.part)} part indices but {len(self.positions)} positions"
            )
        sizes = [len(p.classes) for p in self.parts]
        self._class_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.classes = tuple(f"{n}:{c}" for n, p in zip(self.part_names, self.parts) for c in p.classes)
        ids = np.empty(len(self.part), dtype=np.int64)
        labels = np.empty(len(self.part), dtype=np.int64)
        for i, data in enumerate(self.parts):
            mask = self.part == i
            ids[mask] = i * ID_STRIDE + np.asarray(data.sample_ids, dtype=np.int64)[self.positions[mask]]
            labels[mask] = self._class_offsets[i] + np.asarray(data.labels, dtype=np.int64)[self.positions[mask]]
        self.sample_ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.part)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = int(self.part[index])
        image, _ = self.parts[i][int(self.positions[index])]
        return image, int(self.labels[index])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.parts[0].input_shape)

    @property
    def part_name(self) -> np.ndarray:
        """The part name of every item, ``(N,)`` strings."""
        return np.asarray(self.part_names, dtype=object)[self.part]

    def part_classes(self, part: str) -> np.ndarray:
        """Positions in :attr:`classes` of the classes of the part named ``part``."""
        i = self.part_names.index(part)
        return np.arange(self._class_offsets[i], self._class_offsets[i + 1])

    def subset(self, indices: Sequence[int], name: str | None = None) -> ConcatImageDataset:
        """Return the items at ``indices`` (positions, not sample ids), keeping their ids and classes."""
        idx = np.asarray(indices, dtype=np.int64)
        return ConcatImageDataset(name or self.name, self.parts, self.part_names, self.part[idx], self.positions[idx])


# --------------------------------------------------------------------- the dataset


@attrs.define
class Concat:
    """Several datasets as one: parts built from their own tables, ids kept apart, classes prefixed.

    Every entry of ``parts`` is a table like ``[data]``: ``use`` names a dataset and the
    other keys are its options, plus an optional ``name`` for the part. A part's name
    defaults to the name of its loaded data (``foolbox/imagenet``, ``skimage-photos``,
    ``imagefolder/<folder>``); two parts may not share one.

    - Sample ids: item ``j`` of part ``i`` (counting from 0) gets ``i * 10**9 + id``,
      with ``id`` its sample id in the part. The part of an id is ``id // 10**9``
      (:func:`part_of`). A part's ids depend only on its position, so appending a part,
      or changing a later one, keeps every earlier id.
    - Classes: the parts' class lists one after another, each name prefixed with the
      part's name and a colon (``foolbox/cifar10:3``); labels are re-indexed into that
      list (a part's label plus the class count of the parts before it).
    - Shapes: every part must give images of one shape ``(C, H, W)``; set ``image_size``
      (and, for grey sets, three channels) on the parts to match them. Values are not
      re-normalised: give the parts the same ``mean`` / ``std``.

    Parameters
    ----------
    parts
        The part tables, in order.
    split
        When set, ``split`` of every part is set to this (training on ``[data]``
        without ``[models.train_data]`` asks for ``"train"``); every part must then have
        a ``split`` option. Unset: each part as its table says.
    only
        Keep the items of these parts only (part names). The class list still holds
        every part's classes and the labels keep their places in it, so a model trained
        on one task's part gets the head of all tasks: experts of several tasks that are
        to be merged, or a task's images evaluated against the joint head.
    """

    name: ClassVar[str] = "concat"

    # list[Any], not list[dict]: a part that is not a table then gets the validator's message.
    parts: list[Any] = attrs.field(validator=_check_parts, metadata=component_tables("dataset"))
    split: str | None = attrs.field(default=None, validator=optional(non_empty_str))
    only: list[str] | None = attrs.field(
        default=None, validator=optional([list_of(non_empty_str, min_length=1), distinct("part")])
    )

    def sources(self) -> list[Any]:
        """The dataset component of every part, with :attr:`split` applied.

        Raises
        ------
        ConfigError
            A part names an unknown dataset or option, or :attr:`split` is set and a
            part has no ``split`` option or rejects the value.
        """
        out = []
        for i, table in enumerate(self.parts):
            where = f"dataset 'concat', {_where(i, table)}"
            # component_from_table adds "(use = ...)" itself
            source = component_from_table(
                "dataset", table, where=f"dataset 'concat', part #{i + 1}", reserved=PART_KEYS
            )
            if self.split is not None:
                if "split" not in {f.name for f in attrs.fields(type(source))}:
                    raise ConfigError(
                        f"split = {self.split!r} is asked of every part, but {type(source).name!r} has no 'split' "
                        "option (a model trained without [models.train_data] trains on [data] with "
                        "split = 'train'): give such models a [models.train_data] table or a checkpoint, "
                        "or concatenate only datasets with splits",
                        where=where,
                    )
                try:
                    source = attrs.evolve(source, split=self.split)
                except (ValueError, TypeError) as exc:
                    raise ConfigError(f"split = {self.split!r}: {exc}", where=where) from exc
            out.append(source)
        return out

    def load(self) -> ConcatImageDataset:
        """Load every part and chain them.

        Raises
        ------
        ConfigError
            As :meth:`sources`; or two parts share a name, give images of different
            shapes, or hold sample ids outside ``0 .. 10**9 - 1``; or ``only`` names no part.
        """
        parts: list[ImageDataset] = []
        names: list[str] = []
        for i, (table, source) in enumerate(zip(self.parts, self.sources())):
            data = source.load()
            name = table.get("name") or str(data.name)
            where = f"dataset 'concat', {_where(i, table)}"
            if name in names:
                j = names.index(name)
                raise ConfigError(
                    f"parts #{j + 1} and #{i + 1} are both named {name!r} (their class names would clash); "
                    "give one of them a 'name' key",
                    where=where,
                )
            ids = np.asarray(data.sample_ids, dtype=np.int64)
            if len(ids) and (ids.min() < 0 or ids.max() >= ID_STRIDE):
                raise ConfigError(
                    f"part {name!r} has sample ids from {int(ids.min())} to {int(ids.max())}; concat keeps parts "
                    f"apart by a stride of {ID_STRIDE} and needs ids from 0 to {ID_STRIDE - 1}",
                    where=where,
                )
            if parts and tuple(data.input_shape) != tuple(parts[0].input_shape):
                raise ConfigError(
                    f"part #{i + 1} {name!r} gives images of shape {tuple(data.input_shape)} but part #1 "
                    f"{names[0]!r} gives {tuple(parts[0].input_shape)}; every part must give one shape: set "
                    "'image_size' (and three channels for grey sets) on the parts",
                    where=where,
                )
            parts.append(data)
            names.append(name)
        part = np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(parts)])
        positions = np.concatenate([np.arange(len(p), dtype=np.int64) for p in parts])
        data = ConcatImageDataset(f"concat/{'+'.join(names)}", parts, names, part, positions)
        if self.only is None:
            return data
        for name in self.only:
            if name not in names:
                hint = closest(name, names)
                raise ConfigError(
                    f"'only' names the part {name!r}, but the parts are {names}"
                    + (f"; did you mean {hint!r}?" if hint else ""),
                    where="dataset 'concat', key 'only'",
                )
        keep = np.flatnonzero(np.isin(part, [names.index(n) for n in self.only]))
        return data.subset(keep, name=f"{data.name}[{'+'.join(self.only)}]")


@hookimpl
def register_datasets(register):
    """Register the ``concat`` dataset."""
    register(Concat)
