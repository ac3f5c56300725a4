"""Long evaluation text: the haystack essays beside the project, or any file/folder of .txt."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "KVTRT_TEXTS"


def default_text_dir() -> Path:
    """`$KVTRT_TEXTS`, else `../shared/data/haystack` beside the current folder or the project root."""
    candidates = []
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    candidates.append(Path.cwd().parent / "shared" / "data" / "haystack")
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data" / "haystack")
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError("no evaluation text found (looked for ../shared/data/haystack); pass --texts PATH "
                            f"(a .txt file or a folder of them) or set {ENV_VAR}")


def load_texts(path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(name, text) for a .txt file or every .txt in a folder, sorted by name."""
    path = Path(path) if path else default_text_dir()
    if not path.exists():
        raise FileNotFoundError(f"text path {path} does not exist; give a .txt file or a folder of .txt files")
    files = [path] if path.is_file() else sorted(path.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no .txt files in {path}")
    return [(f.stem, f.read_text(errors="replace")) for f in files]


def token_prefix(encode, texts: list[tuple[str, str]], n: int) -> list[int]:
    """Exactly `n` token ids from the texts joined in order (an error if they are too short)."""
    ids: list[int] = []
    for _, text in texts:
        ids += encode(text + "\n\n")
        if len(ids) >= n:
            return ids[:n]
    raise ValueError(f"the texts hold only {len(ids)} tokens, fewer than the {n} asked for; give more text")
