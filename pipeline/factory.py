"""User code that builds a network: a factory named ``module:function`` or ``path/to/file.py:function``,
imported while a code folder (e.g. the user's checkout of the model's repository) is first on sys.path.

The annotator (`foundation.factory`, the `pytorch` backend) and the student (`--model`, the trainer) are both
built this way. ``fingerprint`` records what the function's source file holds, so that a run can tell
when the code that built its weights has changed since.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

from pipeline.errors import UserError, describe


def is_factory(spec: str) -> bool:
    return ":" in spec


def absolute_spec(spec: str, base: Path) -> str:
    """``file.py:function`` with the file taken relative to ``base`` (normalised: one file, one spec); a
    ``module:function`` as it is."""
    where, name = spec.rsplit(":", 1)
    return f"{os.path.abspath(Path(base) / where)}:{name}" if where.endswith(".py") else spec


@contextlib.contextmanager
def on_path(code: Path | None):
    """A code folder first on sys.path while its modules are imported, and off it afterwards: its top-level
    names (SEEM v1.0's 'utils', EdgeNets' 'model') must win over installed packages of those names, and must
    not shadow later imports (SEEM v1.0 also has top-level 'pipeline' and 'trainer')."""
    if code is None:
        yield
        return
    sys.path.insert(0, str(code))
    try:
        yield
    finally:
        sys.path.remove(str(code))


def load_factory(spec: str | None, code: Path | None, flag: str):
    """The function named by ``spec``; errors name ``flag`` (e.g. ``--model``) and what to give instead."""
    if not spec or not is_factory(spec):
        raise UserError(f"{flag} {spec!r}: give 'module:function' or 'path/to/file.py:function' (the function "
                        "returns the model)")
    if code is not None and not Path(code).is_dir():
        raise UserError(f"{flag} {spec}: its code folder {code} does not exist (the checkout the factory imports "
                        "from)")
    where, name = spec.rsplit(":", 1)
    try:
        with on_path(code):
            if where.endswith(".py"):
                if not Path(where).is_file():
                    raise UserError(f"{flag} {spec}: {where} not found")
                module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
            else:
                module = importlib.import_module(where)
    except UserError:
        raise
    except Exception as exc:  # the user's module: any error while importing it
        raise UserError(f"{flag} {spec}: importing {where} failed ({describe(exc)}){_hint(exc, code, flag)}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UserError(f"{flag} {spec}: {where} has no function '{name}'")
    return factory


def call_factory(factory, spec: str, code: Path | None, flag: str, *args):
    """``factory(*args)`` with the code folder on sys.path; any failure is one line."""
    try:
        with on_path(code):
            return factory(*args)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{flag} {spec}: calling it failed ({describe(exc)}){_hint(exc, code, flag)}") from None


def _hint(exc: Exception, code: Path | None, flag: str) -> str:
    if not isinstance(exc, ModuleNotFoundError):
        return ""
    if code is not None:
        return f"; is {code} the folder that provides it?"
    where = "--model-code, or code in the config's [train]" if flag == "--model" else "foundation.code"
    return f"; name the folder it imports from ({where})"


def fingerprint(factory, spec: str) -> dict:
    """What a checkpoint records of the factory: its spec and the content of the file defining it."""
    try:
        file = inspect.getsourcefile(factory)
        source = Path(file).read_text()
    except (TypeError, OSError, UnicodeDecodeError):  # built in, or no readable source: the name is all there is
        return {"spec": spec, "file": None, "sha256": None, "source": None}
    return {"spec": spec, "file": str(file), "sha256": hashlib.sha256(source.encode()).hexdigest(),
            "source": source}


def difference(recorded: dict, current: dict) -> str | None:
    """None when the factory is unchanged, else one line: which file and its first changed lines."""
    if recorded.get("sha256") == current.get("sha256"):
        return None
    old, new = (recorded.get("source") or "").splitlines(), (current.get("source") or "").splitlines()
    changes = [line for line in difflib.unified_diff(old, new, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    shown = "; ".join(repr(line) for line in changes[:4]) + (f"; ... ({len(changes)} lines)" if len(changes) > 4 else "")
    return (f"{current.get('file') or recorded.get('file')} changed since (sha256 {str(recorded.get('sha256'))[:12]} -> "
            f"{str(current.get('sha256'))[:12]}): {shown or 'whitespace only'}")
