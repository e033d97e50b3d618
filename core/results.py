"""A run's results as labelled objects, shown inline in a notebook.

:func:`mergescope.run` returns a :class:`RunResult`: the run's DataTree, its models, its
claims and figures, and a step's group by name (``result["kendall-tau"]``, a
:class:`StepResult`). Both draw themselves in Jupyter (``_repr_html_``) with the report's
own sections: the run without its figure panels, a step with its tables, curves and
panel. The page sits in a sandboxed ``<iframe>`` so that its styles and scripts stay out
of the notebook's, with the run's images inlined, since a notebook cannot reach files in
the run directory by relative links. :meth:`RunResult.open` reads a finished run back.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import mimetypes
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import xarray as xr
from torch import nn

from .claims import CLAIMS_GROUP
from .errors import did_you_mean
from .report import REPORT_FILE, SECTIONS, node_files, render_report
from .storage import load_tree

__all__ = ["RunResult", "StepResult", "inline_page", "INLINE_LIMIT"]

#: Results groups that are not steps.
_NOT_STEPS = ("tasks", CLAIMS_GROUP)
#: A quoted relative path of an image: an ``src`` attribute, or a path in a panel's JSON that its script shows.
_IMAGE_PATH = re.compile(r'(["\'])([^"\'<>\s:]+?\.(?:png|svg|jpe?g|gif|webp))(["\'])', re.IGNORECASE)
#: Bytes of images inlined into one notebook display; the rest stay links (a page of thousands of grids).
INLINE_LIMIT = 32 * 2**20
#: The iframe heights of a run's and a step's page, in pixels; the frame scrolls beyond.
_RUN_HEIGHT, _STEP_HEIGHT = 720, 520


class StepResult(xr.DataTree):
    """One step's group of ``results.nc``: a DataTree whose notebook display is the step's panel.

    Every DataTree method works as on ``run.results["<step>"]``; the group is detached
    from the run's tree (its root is the step). :attr:`run` is the :class:`RunResult` it
    came from; trees derived from it by xarray methods show as plain DataTrees.
    """

    __slots__ = ("_run",)

    @property
    def run(self) -> RunResult | None:
        """The run this step belongs to (``None`` for a tree derived from it)."""
        return getattr(self, "_run", None)

    @property
    def figures(self) -> list[Path]:
        """The files the step wrote (a visualizer's), as paths in the run directory."""
        owner = self.run
        return [] if owner is None else [owner.out_dir / f for f in node_files(self.to_dataset(inherit=False))]

    def _repr_html_(self) -> str:
        owner = self.run
        if owner is None or self.name is None:
            return str(super()._repr_html_())
        return owner.step_html(str(self.name))


class RunResult:
    """What :func:`mergescope.run` returns: the run directory, its results and its models.

    Parameters
    ----------
    out_dir
        The run directory.
    results
        The run's results (``results.nc``): one group per step, ``tasks`` and ``claims``.
    summary
        The run's ``summary.txt``.
    models
        Every model by name: declared, merged (the step's name) and aligned
        (``"b@wm"``), as ``nn.Module`` in eval mode. Empty for a run read back with
        :meth:`open`.
    components
        Step name -> component instance (a visualizer's panel may come from its component).

    Examples
    --------
    >>> result = ms.run(pipeline, "runs/x")          # doctest: +SKIP
    >>> result["kendall-tau"]["relu1"]["tau"]        # a step's group, then a layer's  # doctest: +SKIP
    >>> result                                       # in a notebook: the report's tables  # doctest: +SKIP
    """

    def __init__(
        self,
        out_dir: str | Path,
        results: xr.DataTree,
        summary: str,
        models: Mapping[str, nn.Module],
        components: Mapping[str, Any] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.results = results
        self.summary = summary
        self.models = dict(models)
        self.components = dict(components or {})

    @classmethod
    def open(cls, out_dir: str | Path) -> RunResult:
        """A finished run read back from its directory (its results in memory, no models).

        Raises
        ------
        FileNotFoundError
            The directory holds no ``results.nc``: no run finished there.
        """
        out = Path(out_dir)
        path = out / "results.nc"
        if not path.is_file():
            raise FileNotFoundError(f"{str(out)!r} holds no results.nc: no run has finished there")
        tree = load_tree(path)
        summary_path = out / "summary.txt"
        summary = summary_path.read_text(encoding="utf-8") if summary_path.is_file() else ""
        return cls(out, tree, summary, {})

    # -- what the run holds ----------------------------------------------------------------

    @functools.cached_property
    def info(self) -> dict[str, Any]:
        """The run's ``run.json``: versions, seed, device, seconds, steps, models and data."""
        path = self.out_dir / "run.json"
        return dict(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else {}

    @functools.cached_property
    def steps(self) -> list[str]:
        """The names of the steps with results, in the order they ran."""
        declared = [str(n) for n in self.info.get("steps") or {}]
        present = [str(n) for n in self.results.children if n not in _NOT_STEPS]
        return [n for n in declared if n in present] + [n for n in present if n not in declared]

    @property
    def claims(self) -> xr.Dataset | None:
        """The claims checked (statement, quantity, measured value, state), or ``None`` without ``[[claims]]``."""
        node = self.results.children.get(CLAIMS_GROUP)
        return None if node is None else node.to_dataset(inherit=False)

    @property
    def tasks(self) -> xr.Dataset | None:
        """Accuracy of every model on every ``[[tasks]]`` task, or ``None`` without tasks."""
        node = self.results.children.get("tasks")
        return None if node is None or "tasks" in self.steps else node.to_dataset(inherit=False)

    @property
    def figures(self) -> dict[str, list[Path]]:
        """The files each visualizer step wrote, by step, as paths in the run directory."""
        found = {name: node_files(self.results.children[name].to_dataset(inherit=False)) for name in self.steps}
        return {name: [self.out_dir / f for f in files] for name, files in found.items() if files}

    @property
    def report_path(self) -> Path:
        """The run's self-contained ``report.html``."""
        return self.out_dir / REPORT_FILE

    def __getitem__(self, step: str) -> StepResult:
        """The group of ``step`` in the results, as a :class:`StepResult`.

        Raises
        ------
        KeyError
            No step of that name has results; the message lists those that do.
        """
        self._check_step(step)
        node = self.results.children[step]
        group = StepResult(
            dataset=node.to_dataset(inherit=False), children={k: c.copy() for k, c in node.children.items()}, name=step
        )
        group._run = self
        return group

    def _check_step(self, step: str) -> None:
        if step not in self.steps:
            hint = did_you_mean(step, self.steps)
            raise KeyError(f"no step {step!r} in this run.{hint} Steps: {', '.join(self.steps) or '(none)'}")

    def __contains__(self, step: object) -> bool:
        return step in self.steps

    def __iter__(self) -> Iterator[str]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def _ipython_key_completions_(self) -> list[str]:
        """What ``result["<tab>`` completes to in IPython: the steps."""
        return self.steps

    def __repr__(self) -> str:
        return f"RunResult({str(self.out_dir)!r}, steps: {', '.join(self.steps) or '(none)'})"

    # -- inline display ----------------------------------------------------------------------

    def _page(self, **options: Any) -> str:
        pipeline_path = self.out_dir / "pipeline.toml"
        return render_report(
            self.out_dir,
            self.results,
            info=self.info,
            pipeline_text=pipeline_path.read_text(encoding="utf-8") if pipeline_path.is_file() else "",
            summary=self.summary,
            components=self.components,
            **options,
        )

    def _repr_html_(self) -> str:
        """The report's claims, pipeline, models, metric tables, tasks and results; figures by step."""
        page = self._page(sections=tuple(s for s in SECTIONS if s != "figures"))
        return inline_page(page, self.out_dir, height=_RUN_HEIGHT, title=f"mergescope run {self.out_dir.name}")

    def step_html(self, step: str) -> str:
        """The HTML a notebook shows for ``step``: its tables, curves and panel (images inlined)."""
        self._check_step(step)
        sections = ("metrics", "results", "figures")
        page = self._page(sections=sections, only=[step], title=f"step {step} of {self.out_dir.name}")
        return inline_page(page, self.out_dir, height=_STEP_HEIGHT, title=f"mergescope step {step}")


def inline_page(page: str, run_dir: str | Path, *, height: int, title: str) -> str:
    """A whole HTML page as an ``<iframe>`` for a notebook, its images from ``run_dir`` inlined.

    Quoted relative paths of image files in ``run_dir`` (``src`` attributes, and the
    paths a panel's script reads from its JSON) become data URIs, up to
    :data:`INLINE_LIMIT` bytes. The frame is sandboxed: its scripts run apart from the
    notebook's page.
    """
    run_dir = Path(run_dir)
    budget = [INLINE_LIMIT]

    def inline(match: re.Match[str]) -> str:
        path = run_dir / unquote(html.unescape(match.group(2)))
        if not path.is_file() or path.stat().st_size > budget[0]:
            return match.group(0)
        budget[0] -= path.stat().st_size
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"{match.group(1)}data:{mime};base64,{data}{match.group(3)}"

    framed = html.escape(_IMAGE_PATH.sub(inline, page), quote=True)
    return (
        f'<iframe title="{html.escape(title)}" srcdoc="{framed}" sandbox="allow-scripts" '
        f'style="width:100%;height:{height}px;border:1px solid #ccc;border-radius:4px"></iframe>'
    )
