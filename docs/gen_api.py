"""Write ``docs/api.md``, the API reference, from the public API's signatures and docstrings.

    python docs/gen_api.py            # regenerate docs/api.md
    python docs/gen_api.py --check    # exit 1 if docs/api.md is out of date

Covers everything in ``hf_moe_opt.__all__``, the public names of ``hf_moe_opt.cache`` and
``hf_moe_opt.placement``, the whole-step graph runner (``hf_moe_opt.step_graphs``,
``hf_moe_opt.host_sync``) and the helpers the examples use (``hf_moe_opt.assets``,
``hf_moe_opt.baselines``). Docstrings are Google style with reStructuredText inline markup; this
script turns them into Markdown (sections into lists, ``::`` literal blocks into code fences, roles
such as ``:func:`x``` into code spans).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import re
import sys
import types
from pathlib import Path

OUT = Path(__file__).resolve().parent / "api.md"

# Section order; within the top-level package the most used calls come first.
TOP_LEVEL_ORDER = [
    "optimize",
    "restore",
    "is_optimized",
    "optimized_layers",
    "supported_architectures",
    "stats",
    "reset_stats",
    "sync_expert_copies",
    "profile",
    "plan_placement",
    "PlacementPlan",
    "RoutingTrace",
    "register_experts_implementation",
    "OptimizedMoE",
]
EXTRA_MODULES = {
    "hf_moe_opt.step_graphs": ["StepGraphs", "CudaGraphCapture", "EagerCapture", "runner_of", "check_supported"],
    "hf_moe_opt.host_sync": ["no_host_reads", "HostReadError"],
    "hf_moe_opt.assets": ["shipped_model_path", "SHIPPED_MODELS"],
    "hf_moe_opt.baselines": [
        "use_nllb_eager_reference",
        "remove_nllb_eager_reference",
        "use_switch_eager_reference",
        "remove_switch_eager_reference",
        "hf_reference",
        "NllbMoeEagerReference",
        "SwitchEagerReference",
    ],
    "hf_moe_opt.integrations": ["continuous_batching_config", "continuous_batching_available", "uncapturable_layers"],
}
SECTION_RE = re.compile(
    r"^(Args|Arguments|Parameters|Returns|Return|Yields|Raises|Attributes|Keys|Example|Examples|Note|Notes):\s*$"
)
LIST_SECTIONS = {"Args", "Arguments", "Parameters", "Raises", "Attributes"}
ROLE_RE = re.compile(r":(?:py:)?(?:func|meth|class|attr|mod|data|obj|exc|const):`~?([^`]+)`")
DOUBLE_TICK_RE = re.compile(r"``([^`]+?)``")


def _inline(text: str) -> str:
    """reStructuredText inline markup -> Markdown code spans."""
    text = ROLE_RE.sub(lambda m: f"`{m.group(1).split('<')[-1].rstrip('>')}`", text)
    return DOUBLE_TICK_RE.sub(lambda m: f"`{m.group(1)}`", text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _take_block(lines: list[str], i: int) -> tuple[list[str], int]:
    """The indented block starting at ``lines[i]`` (blank lines inside kept), dedented, and the next index."""
    block: list[str] = []
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > 0):
        block.append(lines[i])
        i += 1
    while block and not block[-1].strip():
        block.pop()
        i -= 1
    width = min((_indent(x) for x in block if x.strip()), default=0)
    return [x[width:] for x in block], i


def _render_text(lines: list[str]) -> list[str]:
    """Paragraphs with ``::`` literal blocks turned into code fences."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::") and i + 1 < len(lines):
            head = line.rstrip()[:-2].rstrip()
            if head:
                out.append(_inline(head) + ":")
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and _indent(lines[j]) > _indent(line):
                block, i = _take_block(lines, j)
                width = _indent(line)
                block = [x[width:] if x[:width].strip() == "" else x for x in block]
                out += ["", "```python", *block, "```", ""]
                continue
            i += 1
            continue
        if line.strip() and _indent(line) > 0 and (not out or not out[-1].strip()):
            # an indented block after a blank line outside a literal marker: keep it verbatim
            block, i = _take_block(lines, i)
            out += ["```", *block, "```"]
            continue
        out.append(_inline(line.strip()) if line.strip() else "")
        i += 1
    return out


def _render_list(body: list[str]) -> list[str]:
    """``name: text`` items (continuation lines indented further) -> a Markdown list."""
    items: list[str] = []
    base = min((_indent(x) for x in body if x.strip()), default=0)
    for line in body:
        if not line.strip():
            continue
        if _indent(line) == base:
            items.append(line.strip())
        elif items:
            items[-1] += " " + line.strip()
        else:
            items.append(line.strip())
    out = []
    for item in items:
        name, sep, text = item.partition(":")
        if sep and name and " " not in name.strip().replace(", ", ",") and not name.startswith("`"):
            out.append(f"- `{name.strip()}`: {_inline(text.strip())}")
        else:
            out.append(f"- {_inline(item)}")
    return out


def render_docstring(doc: str | None, *, module: bool = False) -> list[str]:
    """Markdown lines for a docstring (a module docstring is not indented, so it is not dedented)."""
    if not doc:
        return ["*(no docstring)*"]
    lines = doc.strip("\n").splitlines() if module else inspect.cleandoc(doc).splitlines()
    out: list[str] = []
    i = 0
    text: list[str] = []
    while i < len(lines):
        match = SECTION_RE.match(lines[i])
        if match is None:
            text.append(lines[i])
            i += 1
            continue
        out += _render_text(text)
        text = []
        name = match.group(1)
        body, i = _take_block(lines, i + 1)
        out += ["", f"**{name}**", ""]
        out += _render_list(body) if name in LIST_SECTIONS else _render_text(body)
        out.append("")
    out += _render_text(text)
    # collapse runs of blank lines
    clean: list[str] = []
    for line in out:
        if line == "" and (not clean or clean[-1] == ""):
            continue
        clean.append(line.rstrip())
    while clean and clean[-1] == "":
        clean.pop()
    return clean


class _Text:
    """An annotation kept as source text (``from __future__ import annotations``), shown unquoted."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _signature(obj, *, name: str = "", is_class: bool = False) -> str:
    """``name(params) -> return`` with unquoted annotations; one parameter per line when long."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{name}(...)"

    def text(annotation):
        return _Text(annotation) if isinstance(annotation, str) else annotation

    params = [p.replace(annotation=text(p.annotation)) for p in sig.parameters.values()]
    ret = inspect.Signature.empty if is_class else text(sig.return_annotation)
    sig = sig.replace(parameters=params, return_annotation=ret)
    flat = re.sub(r" at 0x[0-9a-f]+", "", f"{name}{sig}")
    if len(flat) <= 100 or not params:
        return flat
    # Re-render one parameter per line, keeping the markers of positional-only / keyword-only.
    parts: list[str] = []
    seen_star = False
    for i, p in enumerate(params):
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not seen_star:
            parts.append("*")
            seen_star = True
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            seen_star = True
        parts.append(str(p))
        nxt = params[i + 1] if i + 1 < len(params) else None
        if p.kind is inspect.Parameter.POSITIONAL_ONLY and (nxt is None or nxt.kind is not p.kind):
            parts.append("/")
    tail = "" if ret is inspect.Signature.empty else f" -> {inspect.formatannotation(ret)}"
    body = "".join(f"    {x},\n" for x in parts)
    return re.sub(r" at 0x[0-9a-f]+", "", f"{name}(\n{body}){tail}")


def _members(cls) -> list[tuple[str, object]]:
    """Public methods and properties defined on ``cls`` itself, in definition order."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_") or name in fields:
            continue
        if isinstance(value, (staticmethod, classmethod)):
            out.append((name, value.__func__))
        elif isinstance(value, property) or inspect.isfunction(value):
            out.append((name, value))
    return out


def _alias_docstring(name: str, obj) -> str | None:
    """The string literal right after ``name = ...`` in the module that defines the alias ``obj``
    (attribute docstrings exist only in the source)."""
    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith("hf_moe_opt") or getattr(module, name, None) is not obj:
            continue
        try:
            tree = ast.parse(inspect.getsource(module))
        except (OSError, TypeError):
            continue
        body = tree.body
        for stmt, following in zip(body, body[1:], strict=False):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else []
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                    return following.value.value if isinstance(following.value.value, str) else None
    return None


def render_object(qualname: str, obj, seen: dict[int, str]) -> list[str]:
    if isinstance(obj, types.GenericAlias):  # a type alias such as ``tuple[int, float]``
        name = qualname.rsplit(".", 1)[-1]
        out = [f"### `{qualname}`", "", "```python", f"{name} = {obj!r}", "```", ""]
        return out + render_docstring(_alias_docstring(name, obj)) + [""]
    if id(obj) in seen and (inspect.isclass(obj) or callable(obj)):
        return [f"### `{qualname}`", "", f"The same object as `{seen[id(obj)]}` (documented above).", ""]
    if inspect.isclass(obj) or callable(obj):
        seen[id(obj)] = qualname
    if inspect.isclass(obj):
        bases = [b.__name__ for b in obj.__bases__ if b is not object]
        head = _signature(obj, name=obj.__name__, is_class=True)
        out = [f"### `{qualname}`", "", "```python", f"class {head}", "```", ""]
        if bases:
            out += [f"Bases: {', '.join(f'`{b}`' for b in bases)}", ""]
        out += render_docstring(obj.__doc__) + [""]
        bare: list[str] = []
        for name, member in _members(obj):
            if not member.__doc__:
                bare.append(f"`{name}`")
            elif isinstance(member, property):
                out += [f"#### `{obj.__name__}.{name}` (property)", ""]
                out += render_docstring(member.__doc__) + [""]
            else:
                sig = _signature(member, name=f"{obj.__name__}.{name}")
                if "\n" in sig:
                    out += [f"#### `{obj.__name__}.{name}`", "", "```python", sig, "```", ""]
                else:
                    out += [f"#### `{sig}`", ""]
                out += render_docstring(member.__doc__) + [""]
        if bare:
            out += [f"Other public members of `{obj.__name__}`: {', '.join(bare)}.", ""]
        return out
    if callable(obj):
        return [
            f"### `{qualname}`",
            "",
            "```python",
            _signature(obj, name=obj.__name__),
            "```",
            "",
            *render_docstring(obj.__doc__),
            "",
        ]
    value = repr(obj)
    return [f"### `{qualname}`", "", "```python", f"{qualname.rsplit('.', 1)[-1]} = {value}", "```", ""]


def render() -> str:
    import hf_moe_opt

    seen: dict[int, str] = {}
    sections: list[tuple[str, list[str]]] = []
    top = [n for n in TOP_LEVEL_ORDER if n in hf_moe_opt.__all__]
    top += [n for n in hf_moe_opt.__all__ if n not in top]
    sections.append(("hf_moe_opt", top))
    for module in ("hf_moe_opt.cache", "hf_moe_opt.placement"):
        sections.append((module, list(importlib.import_module(module).__all__)))
    for module, names in EXTRA_MODULES.items():
        sections.append((module, names))

    lines = [
        "# API reference",
        "",
        "<!-- Generated by docs/gen_api.py from the docstrings; do not edit by hand. -->",
        "",
        "Generated from the signatures and docstrings of the public API by `python docs/gen_api.py`.",
        "",
    ]
    for module, _ in sections:
        lines += [f"- [`{module}`](#{module.replace('.', '')})"]
    lines.append("")
    for module, names in sections:
        mod = importlib.import_module(module)
        lines += [f"## {module}", ""]
        if mod.__doc__:
            lines += render_docstring(mod.__doc__, module=True) + [""]
        for name in names:
            lines += render_object(f"{module}.{name}", getattr(mod, name), seen)
    text = "\n".join(lines).rstrip() + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/api.md from the public API's docstrings.")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md differs from a fresh render")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    text = render()
    out = Path(args.out)
    if args.check:
        if not out.exists() or out.read_text(encoding="utf-8") != text:
            print(f"{out} is out of date; run: python docs/gen_api.py", file=sys.stderr)
            return 1
        print(f"{out} is up to date")
        return 0
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
