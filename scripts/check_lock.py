"""Check that the environment holds every package of a lock file at exactly its locked version.

Usage: python scripts/check_lock.py locks/requirements.lock
Exit 1 naming each package that is missing or at another version (a hand install, a stale venv).
"""
import re
import sys
from importlib import metadata


def read_lock(path: str) -> dict[str, str]:
    pins = {}
    for n, line in enumerate(open(path), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)(\s*;.*)?", line)
        if not m:
            raise SystemExit(f"{path}:{n}: not an exact pin: {line!r}")
        name = re.sub(r"\[.*\]", "", m.group(1))
        pins[re.sub(r"[-_.]+", "-", name).lower()] = m.group(2)
    return pins


def main(path: str) -> int:
    bad, pins = [], read_lock(path)
    for name, version in sorted(pins.items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            bad.append(f"{name}: locked {version}, not installed")
            continue
        if have != version:
            bad.append(f"{name}: locked {version}, installed {have}")
    if bad:
        print(f"check_lock: the environment differs from {path}:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    print(f"check_lock: all {len(pins)} packages at their locked versions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "locks/requirements.lock"))
