"""The walk of a directory `l7fp split DIR` surveys: which files to read.

Called by `fastpath.inputs.files` (the list of files) and `fastpath.coverage.analyse`
(which also reports the directories the walk could not list); owned by the split.

Why its own walk, not `Path.rglob`: `l7fp split /` walked into /proc, where a
process that ends while the walk lists it makes rglob raise `[Errno 2] No such
file or directory: '/proc/NNN'` and the whole run die. Here:

* an entry that disappears during the walk is passed over (there is nothing
  left to read);
* a directory that cannot be listed (permissions, I/O error) is returned in
  `Listing.unreadable` with why, and the walk goes on;
* a mount point of a pseudo filesystem (`PSEUDO_FS`: /proc, /sys, /dev, cgroups,
  ...) under the directory named is not descended into: they hold no policy
  files, and some of their files block or change while read. The mount type is
  read from /proc/self/mountinfo (not st_dev, which would also stop at a real
  second disk mounted under the directory). A directory named on the command
  line is walked even when it is itself such a mount point: the user asked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

SUFFIXES = (".yaml", ".yml", ".json")

# Kernel and virtual filesystems: no policy file lives there
PSEUDO_FS = frozenset({
    "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs", "devpts",
    "devtmpfs", "efivarfs", "fusectl", "hugetlbfs", "mqueue", "nsfs", "proc", "pstore",
    "securityfs", "selinuxfs", "sysfs", "tracefs",
})


@dataclass
class Listing:
    """What the walk of one directory found."""

    files: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # (directory, why)


def pseudo_mounts(mountinfo: str) -> frozenset[str]:
    """The mount points of `PSEUDO_FS` filesystems in a /proc/self/mountinfo text
    (proc(5): field 5 is the mount point, octal-escaped; the type follows ' - ')."""
    out = set()
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if sep and len(fields) >= 5 and tail.split(" ", 1)[0] in PSEUDO_FS:
            out.add(_unescape(fields[4]))
    return frozenset(out)


def _unescape(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\040, \\011, \\012, \\134."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path


def _this_hosts_pseudo_mounts() -> frozenset[str]:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            return pseudo_mounts(f.read())
    except OSError:  # no /proc mounted: nothing known to skip
        return frozenset()


def walk(root: Path, skip: frozenset[str] | None = None) -> Listing:
    """The *.yaml/*.yml/*.json files under `root` (sorted; hidden names and the
    directories under them left out; symlinks to files followed, to directories
    not), and the directories that could not be listed. `skip`: mount points not
    to descend into (default: this host's pseudo filesystems)."""
    skip = _this_hosts_pseudo_mounts() if skip is None else skip
    out = Listing()
    stack = [root]
    while stack:
        directory = stack.pop()
        for entry in _entries(directory, out):
            if entry.name.startswith("."):
                continue
            kind = _kind(entry)
            if kind == "dir" and os.path.abspath(entry.path) not in skip:
                stack.append(Path(entry.path))
            elif kind == "file" and entry.name.endswith(SUFFIXES):
                out.files.append(Path(entry.path))
    out.files.sort()
    out.unreadable.sort()
    return out


def _entries(directory: Path, out: Listing) -> list[os.DirEntry[str]]:
    """The entries of `directory`; [] when it is gone, and said in `out` when it
    cannot be listed."""
    try:
        with os.scandir(directory) as it:
            return list(it)
    except FileNotFoundError:
        return []  # removed while the walk ran
    except OSError as e:
        out.unreadable.append((directory, f"cannot list: {e.strerror or e}"))
        return []


def _kind(entry: os.DirEntry[str]) -> str:
    """'dir' (not a symlink), 'file' (a symlink to one too) or '' (other, or gone)."""
    try:
        if entry.is_dir(follow_symlinks=False):
            return "dir"
        return "file" if entry.is_file() else ""
    except OSError:  # vanished, or a symlink loop
        return ""
