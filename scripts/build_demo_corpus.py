"""Build the demo model's training text from what ships with Python itself.

Three sources, all offline:
- `pydoc_data.topics`: the language reference topics (~465k characters of prose);
- `pydoc.render_doc(module, renderer=pydoc.plaintext)` over a fixed list of stdlib modules;
- question/answer pairs made from docstrings ("What does json.dumps do?" -> its summary).

The output is deterministic for a given Python version: modules and names are sorted, the
phrasing of each question is drawn from a generator seeded by the name, and the held-out
split is chosen by a CRC of each item's key (never by `hash()`, which is salted per process).

    python scripts/build_demo_corpus.py --out /tmp/offload-demo/corpus.json
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pydoc
import pydoc_data.topics
import random
import re
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

# The modules whose documentation and docstrings make the corpus: the everyday stdlib.
MODULES: tuple[str, ...] = (
    "abc", "argparse", "array", "ast", "asyncio", "atexit", "base64", "binascii", "bisect", "builtins",
    "bz2", "cProfile", "calendar", "cmath", "cmd", "code", "codecs", "codeop", "collections",
    "collections.abc", "colorsys", "compileall", "concurrent.futures", "configparser", "contextlib",
    "contextvars", "copy", "copyreg", "csv", "ctypes", "dataclasses", "datetime", "dbm", "decimal",
    "difflib", "dis", "doctest", "email.message", "email.parser", "email.utils", "enum", "errno",
    "faulthandler", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "gc",
    "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html",
    "html.parser", "http", "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib",
    "importlib", "importlib.metadata", "importlib.resources", "inspect", "io", "ipaddress", "itertools",
    "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "marshal", "math",
    "mimetypes", "mmap", "multiprocessing", "netrc", "numbers", "operator", "optparse", "os", "os.path",
    "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "profile", "pstats", "py_compile", "pyclbr", "queue", "quopri", "random", "re", "reprlib", "runpy",
    "sched", "secrets", "select", "selectors", "shelve", "shlex", "shutil", "signal", "site", "smtplib",
    "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "struct", "subprocess",
    "symtable", "sys", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "time",
    "timeit", "tokenize", "tomllib", "trace", "traceback", "tracemalloc", "types", "typing",
    "unicodedata", "unittest", "unittest.mock", "urllib.error", "urllib.parse", "urllib.request",
    "urllib.robotparser", "uuid", "venv", "warnings", "wave", "weakref", "webbrowser",
    "wsgiref.simple_server", "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax", "xmlrpc.client",
    "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
)  # fmt: skip

# Builtin types whose methods get their own questions ("What does str.split do?").
BUILTIN_TYPES: tuple[str, ...] = ("bytes", "dict", "float", "int", "list", "set", "str", "tuple")

# Names the sample transcripts in docs/DEMO_MODEL.md ask about stay in the training split,
# so the demo shows what the model learned rather than a guess at an unseen name.
ALWAYS_TRAIN: frozenset[str] = frozenset(
    {"json.dumps", "os.path.join", "str.split", "math.sqrt", "random.choice", "itertools.chain"}
)

# pydoc sections that are boilerplate, leak the local machine (FILE, os.environ under DATA),
# or print object reprs with memory addresses.
DROPPED_SECTIONS = frozenset({"DATA", "FILE", "MODULE REFERENCE", "PACKAGE CONTENTS", "SUBMODULES"})
SECTION_HEADER = re.compile(r"^[A-Z][A-Z ]+$")
ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# pydoc draws class bodies with " |  " rails; as plain indentation they read like ordinary docs.
RAILS = re.compile(r"^[ |]+", re.MULTILINE)
INHERITED = re.compile(
    r"^( *[A-Z][\w ]* inherited from [\w.]+:\n).*?(?=^ *-{20,}$|\Z)", re.MULTILINE | re.DOTALL
)

QUESTIONS: tuple[str, ...] = ("What does {name} do?", "Explain {name}.", "How do I use {name}?")
HELD_OUT_PERCENT = 5
MAX_SUMMARY_CHARS = 600


def held_out(key: str) -> bool:
    """True when the item named `key` belongs to the held-out split (~5%, stable across runs)."""
    return zlib.crc32(key.encode()) % 100 < HELD_OUT_PERCENT


def clean_render(text: str) -> str:
    """Drop machine-specific and boilerplate sections from pydoc's plain-text rendering."""
    kept: list[str] = []
    dropping = False
    for line in text.splitlines():
        if SECTION_HEADER.match(line):
            dropping = line.strip() in DROPPED_SECTIONS
        if not dropping:
            kept.append(line.rstrip())
    text = RAILS.sub(lambda rail: " " * len(rail.group()), "\n".join(kept))
    # "Methods inherited from object:" blocks repeat the same text in every class; keep the first
    # line (it says where to look) and drop the block up to pydoc's next "-----" rule.
    text = INHERITED.sub(r"\1", text)
    return ADDRESS.sub("", re.sub(r" +$", "", text, flags=re.MULTILINE)).strip()


def chunk(text: str, target_chars: int = 2000) -> list[str]:
    """Split text at blank lines into pieces of about `target_chars`, so the split is fine-grained."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        current.append(para)
        size += len(para) + 2
        if size >= target_chars:
            pieces.append("\n\n".join(current).strip())
            current, size = [], 0
    if current and "\n\n".join(current).strip():
        pieces.append("\n\n".join(current).strip())
    return pieces


def summary(doc: str) -> str | None:
    """The docstring's first real paragraph on one line, or None when it has nothing useful."""
    for para in doc.strip().split("\n\n"):
        line = re.sub(r"\s+", " ", para).strip()
        # C functions often open with a signature line ("S.split(sep=None) -> list"); skip it.
        if not line or re.match(r"^[\w.]+\(.*\)( -> .*)?$", line) or "-->" in line:
            continue
        if len(line) < 15:
            return None
        if len(line) > MAX_SUMMARY_CHARS:
            # Keep whole sentences up to the limit so answers stay short but grammatical.
            cut = line[:MAX_SUMMARY_CHARS]
            line = cut[: cut.rfind(". ") + 1] or cut
        return line
    return None


def signature(name: str, obj: Any) -> str:
    """`name(args)` when inspect can tell, else `name(...)`."""
    try:
        return f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return f"{name}(...)"


def answer(style: int, name: str, obj: Any, module: str, text: str) -> str:
    """The reply for question `style` (an index into QUESTIONS)."""
    owner = name.rsplit(".", 1)[0]
    if inspect.isclass(obj):
        kind = "class"
    elif owner not in (module, "") and owner != name:
        kind = f"method of `{owner}`"
    else:
        kind = "function"
    if style == 0:
        return text
    if style == 1:
        if kind.startswith("method"):
            return f"`{name}` is a {kind}. {text}"
        return f"`{name}` is a {kind} in the `{module}` module. {text}"
    verb = "Create one with" if kind == "class" else "Call"
    return f"{verb} `{signature(name, obj)}`. {text}"


def documented_names(module_name: str) -> list[tuple[str, Any]]:
    """Public functions and classes defined in `module_name`, with their qualified names."""
    module = importlib.import_module(module_name)
    public = getattr(module, "__all__", None)
    found: list[tuple[str, Any]] = []
    for attr in sorted(set(public or dir(module))):
        obj = getattr(module, attr, None)
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        # Without __all__, keep only what the module defines itself (or its C accelerator `_name`),
        # so `os.sys` or `shutil.os` do not turn into questions.
        owner = (getattr(obj, "__module__", None) or "").lstrip("_")
        if public is None and owner not in (module_name, module_name.rsplit(".", 1)[-1]):
            continue
        found.append((f"{module_name}.{attr}" if module_name != "builtins" else attr, obj))
    # Methods a class defines itself (not inherited ones): str.split, pathlib.Path.read_text, ...
    classes = [(n, o) for n, o in found if inspect.isclass(o)]
    if module_name == "builtins":
        classes = [(n, getattr(module, n)) for n in BUILTIN_TYPES]
    for class_name, cls in classes:
        for attr in sorted(vars(cls)):
            method = getattr(cls, attr, None)
            if not attr.startswith("_") and inspect.isroutine(method):
                found.append((f"{class_name}.{attr}", method))
    return found


def make_pairs(modules: tuple[str, ...], seed: int, limit: int | None = None) -> list[dict[str, str]]:
    """Question/answer pairs from docstrings; each name gets two of the three phrasings.

    With `limit`, stop after that many pairs (the test corpus), skipping the slower modules.
    """
    pairs: list[dict[str, str]] = []
    seen: set[str] = set()
    for module_name in modules:
        if limit is not None and len(pairs) >= limit:
            break
        for name, obj in documented_names(module_name):
            text = summary(inspect.getdoc(obj) or "")
            if name in seen or text is None:
                continue
            seen.add(name)
            # str seeds hash with SHA-512, so the choice is the same in every process.
            styles = random.Random(f"{seed}:{name}").sample(range(len(QUESTIONS)), 2)
            for style in styles:
                question = QUESTIONS[style].format(name=name)
                pairs.append({"key": name, "q": question, "a": answer(style, name, obj, module_name, text)})
    return pairs[:limit]


def make_docs(modules: tuple[str, ...], limit: int | None = None) -> list[dict[str, str]]:
    """Reference prose: every pydoc topic, then each module's rendered documentation, in chunks.

    With `limit`, stop after that many chunks.
    """
    docs: list[dict[str, str]] = []
    for topic in sorted(pydoc_data.topics.topics):
        for i, piece in enumerate(chunk(pydoc_data.topics.topics[topic])):
            docs.append({"key": f"topic:{topic}:{i}", "text": piece})
    for module_name in modules:
        if limit is not None and len(docs) >= limit:
            break
        module = importlib.import_module(module_name)
        rendered = clean_render(pydoc.render_doc(module, renderer=pydoc.plaintext))
        for i, piece in enumerate(chunk(rendered)):
            docs.append({"key": f"module:{module_name}:{i}", "text": piece})
    return docs[:limit]


def build_corpus(seed: int = 0, limit: int | None = None) -> dict[str, Any]:
    """The whole corpus as {"train": {...}, "eval": {...}, "meta": {...}}.

    `limit` keeps only the first `limit` documents and pairs (for fast tests).
    """
    with warnings.catch_warnings():
        # Some modules warn about deprecated names while pydoc walks them.
        warnings.simplefilter("ignore")
        docs = make_docs(MODULES, limit)
        pairs = make_pairs(MODULES, seed, limit)
    corpus: dict[str, Any] = {"train": {"docs": [], "pairs": []}, "eval": {"docs": [], "pairs": []}}
    for doc in docs:
        corpus["eval" if held_out(doc["key"]) else "train"]["docs"].append(doc)
    for pair in pairs:
        split = "eval" if held_out(pair["key"]) and pair["key"] not in ALWAYS_TRAIN else "train"
        corpus[split]["pairs"].append(pair)
    corpus["meta"] = {
        "python": sys.version.split()[0],
        "seed": seed,
        "limit": limit,
        "modules": list(MODULES),
        "counts": {
            split: {
                "docs": len(corpus[split]["docs"]),
                "pairs": len(corpus[split]["pairs"]),
                "chars": sum(len(d["text"]) for d in corpus[split]["docs"])
                + sum(len(p["q"]) + len(p["a"]) for p in corpus[split]["pairs"]),
            }
            for split in ("train", "eval")
        },
    }
    return corpus


def load_or_build(path: Path | None, seed: int = 0, limit: int | None = None) -> dict[str, Any]:
    """Read the cached corpus at `path` if it was built with the same settings, else build it (and cache)."""
    if path is not None and path.exists():
        corpus = json.loads(path.read_text())
        if corpus["meta"]["seed"] == seed and corpus["meta"]["limit"] == limit:
            return corpus
    corpus = build_corpus(seed=seed, limit=limit)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(corpus))
        tmp.replace(path)
    return corpus


def main() -> None:
    """Build the corpus and print its size."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the corpus JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed for question phrasing")
    parser.add_argument("--limit", type=int, default=None, help="keep only this many docs and pairs")
    args = parser.parse_args()
    corpus = build_corpus(seed=args.seed, limit=args.limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(corpus))
    print(json.dumps(corpus["meta"]["counts"], indent=2))


if __name__ == "__main__":
    main()
