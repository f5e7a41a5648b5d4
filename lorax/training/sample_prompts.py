"""Sample prompts for images during training, one a line, with kohya sd-scripts' per-line options.

kohya's ``library/train_util.py`` (``line_to_prompt_dict``, ``sample_images_common``) reads a ``.txt`` prompt file
this way: blank lines and lines starting with ``#`` are skipped; each other line is split at ``" --"``; the first
piece is the prompt, each other piece an option, matched case-insensitively from its start:

==========  ========================  =========================================================
``--n``     negative prompt           the rest of the piece
``--s``     denoising steps           an integer, clamped to [1, 1000]
``--l``     guidance scale            a decimal number
``--d``     seed                      an integer
``--w``     width                     an integer, rounded down to a multiple of 8 (at least 64)
``--h``     height                    as width
==========  ========================  =========================================================

kohya logs a piece it cannot parse and goes on; lorax refuses the file with the line named (one line, exit 1),
so that a typo does not silently sample at other settings. Other kohya options (``--ss`` sampler, ``--cn``
ControlNet image …) are refused as well: lorax samples with the model's scheduler. Options a line leaves out take
the run's values (``--validation-prompt``'s: ``--sample-steps``, ``--guidance-scale``, the training resolution, a
seed derived from ``--seed`` and the prompt's position).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lorax.errors import InputError


@dataclass(frozen=True)
class SamplePrompt:
    """One sample prompt; ``None`` options take the run's values."""

    prompt: str
    negative: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None


# kohya's patterns, in its order (``ss`` and ``cn`` would also match ``s``/``n``-led pieces were they first)
_OPTIONS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("width", re.compile(r"w (\d+)", re.IGNORECASE)),
    ("height", re.compile(r"h (\d+)", re.IGNORECASE)),
    ("seed", re.compile(r"d (\d+)", re.IGNORECASE)),
    ("steps", re.compile(r"s (\d+)", re.IGNORECASE)),
    ("guidance", re.compile(r"l ([\d.]+)", re.IGNORECASE)),
    ("negative", re.compile(r"n (.+)", re.IGNORECASE)),
)


def _size(value: int) -> int:
    return max(64, value - value % 8)  # kohya: "round to divisible by 8"


def parse_line(line: str, *, where: str = "line") -> SamplePrompt:
    """One prompt line (``a dog --n blurry --s 20 --l 7.5 --d 42 --w 512 --h 768``) → ``SamplePrompt``."""
    pieces = line.strip().split(" --")
    values: dict[str, object] = {}
    for piece in pieces[1:]:
        if not piece.strip():
            continue
        for name, pattern in _OPTIONS:
            match = pattern.match(piece)
            if match is None:
                continue
            text = match.group(1)
            try:
                if name in ("width", "height"):
                    values[name] = _size(int(text))
                elif name == "steps":
                    values[name] = max(1, min(1000, int(text)))
                elif name == "seed":
                    values[name] = int(text)
                elif name == "guidance":
                    values[name] = float(text)
                else:
                    values[name] = text.strip()
            except ValueError:
                raise InputError(f"{where}: --{piece.strip()} is not a number") from None
            break
        else:
            if piece.strip().split(" ", 1)[0].lower() in ("w", "h", "d", "s", "l"):
                raise InputError(f"{where}: --{piece.strip()} is not a number")
            raise InputError(
                f"{where}: unknown option --{piece.strip().split(' ', 1)[0]} (kohya's --n negative, --s steps, "
                "--l guidance, --d seed, --w width, --h height)"
            )
    prompt = pieces[0].strip()
    if not prompt:
        raise InputError(f"{where}: the line has options but no prompt")
    return SamplePrompt(prompt, **values)  # type: ignore[arg-type]


def read_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    """The prompts of a kohya ``.txt`` prompt file (``#`` comments and blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("sample prompts file not found", path=path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"not UTF-8 text ({err.reason})", path=path) from None
    prompts = [
        parse_line(line, where=f"{path}:{number}")
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise InputError("no prompts in the file (one a line; '#' starts a comment)", path=path)
    return prompts


def run_prompts(validation_prompts: list[str], sample_prompts: str | Path | None) -> list[SamplePrompt]:
    """The run's sample prompts: ``--validation-prompt``'s, then those of ``--sample-prompts FILE``."""
    prompts = [SamplePrompt(p) for p in validation_prompts]
    if sample_prompts is not None:
        prompts += read_sample_prompts(sample_prompts)
    return prompts


@dataclass(frozen=True)
class SampleSettings:
    """What one sample is drawn with: the prompt's own options, else the run's."""

    steps: int
    guidance: float
    seed: int
    width: int
    height: int

    def parameters(self, spec: SamplePrompt, step: int, clip_skip: int = 1) -> str:
        """A1111's ``parameters`` text for the PNG (``lorax.gen.params``), with the training step."""
        from lorax.gen.params import format_parameters

        fields: dict[str, object] = {
            "Steps": self.steps,
            "CFG scale": self.guidance,
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}",
        }
        if clip_skip > 1:
            fields["Clip skip"] = clip_skip
        fields["Training step"] = step
        return format_parameters(spec.prompt, spec.negative or "", fields)


def sample_settings(
    spec: SamplePrompt, steps: int, guidance: float, resolution: int, seed: int
) -> SampleSettings:
    """``spec``'s options over the run's defaults (``seed``: the one derived for the prompt's position)."""
    return SampleSettings(
        steps=spec.steps if spec.steps is not None else steps,
        guidance=spec.guidance if spec.guidance is not None else guidance,
        seed=spec.seed if spec.seed is not None else seed,
        width=spec.width if spec.width is not None else resolution,
        height=spec.height if spec.height is not None else resolution,
    )
