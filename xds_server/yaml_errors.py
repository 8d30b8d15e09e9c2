"""One line for a YAML syntax error (or a file that is not UTF-8 text), the same in
every command that reads a file.

Called by the readers of user files (`xds_server.istio.objects`, `.istio.registry`,
`mesh.spec`, `fastpath.input_checks`); they prefix the file name. PyYAML's own text
is several lines with a caret drawing and `in "<unicode string>"` instead of the
file, which buries the line number a user needs.
"""

from __future__ import annotations

from pathlib import Path


def problem(exc: BaseException) -> str:
    """`line L, column C: what` for a yaml.MarkedYAMLError (a tab said as such);
    the first line of the exception's text for anything else."""
    mark = getattr(exc, "problem_mark", None)
    lines = str(exc).splitlines()
    text = str(getattr(exc, "problem", None) or (lines[0] if lines else type(exc).__name__))
    if "'\\t'" in text:
        text += " (a tab: YAML indents with spaces)"
    if mark is None:
        return text
    return f"line {mark.line + 1}, column {mark.column + 1}: {text}"


def read_text(path: str | Path) -> str:
    """The text of `path`, UTF-8 as YAML and JSON are; a file that is not says so
    with its name (ValueError `FILE: not UTF-8 text (byte N)`), where Python's
    own error names only the codec and the byte. OSError as open() raises it."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
